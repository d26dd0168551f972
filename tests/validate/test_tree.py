"""The tree check: what lives beside the contract's files without being an orphan."""

from __future__ import annotations

import os

from fwdata.synth.dataset import SynthOptions, write_synthetic_dataset
from fwdata.validate import ValidateOptions, validate_dataset


def test_the_trainer_cache_is_not_an_orphan_but_stays_inside(tmp_path):
    ds = tmp_path / "ds"
    write_synthetic_dataset(ds, SynthOptions(num_scenes=1, num_frames=5, height=32, width=48, path_kinds=["orbit"],
                                             write_ply=False))
    cache = ds / ".fwmodel_cache" / "t5-h32-w48"
    cache.mkdir(parents=True)
    (cache / "cache.json").write_text("{}")
    (cache / "sample.safetensors").write_bytes(b"x")
    (ds / "videos" / "stray.txt").write_text("left here")
    report = validate_dataset(ValidateOptions(dataset=ds, workers=0))
    orphans = {f.file for f in report.findings if f.check == "schema.orphan_file"}
    assert orphans == {"videos/stray.txt"}, "only the stray file is an orphan"
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, cache / "elsewhere")
    report = validate_dataset(ValidateOptions(dataset=ds, workers=0))
    assert ".fwmodel_cache/t5-h32-w48/elsewhere" in {f.file for f in report.findings if f.check == "schema.path_escape"}
