"""Features at the source resolution, cameras on the clip (issue 12, item 3): a 384x672 render built
into 192x336 clips finds its SIFT features on the 672-px frames (`sfm.max_image_size`) and maps the
cameras onto the clip exactly; with `max_image_size = 0` it works on the clip itself."""

from __future__ import annotations

import numpy as np
import pytest

from fwdata.build.pipeline import build_dataset, load_config
from fwdata.compare import compare_datasets
from fwdata.dataset.contract import load_metadata
from fwdata.synth.dataset import SynthOptions, write_synthetic_dataset

from conftest import write_prior

T = 17


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("geometry_size")
    write_synthetic_dataset(root / "gt", SynthOptions(num_scenes=1, num_frames=T, height=384, width=672,
                                                      path_kinds=["orbit"], write_ply=False))
    write_prior(root / "gt", root / "prior")
    return root


@pytest.mark.parametrize("max_image_size", [1024, 0])
def test_cameras_from_the_source_resolution_map_onto_the_clip(source, tmp_path, max_image_size):
    config = load_config(None, {"write_ply": False, "depth": {"prior_dir": str(source / "prior")},
                                "sfm": {"max_image_size": max_image_size, "num_threads": 1},
                                "clips": {"num_frames": T, "height": 192, "width": 336, "stride": 1}})
    summary = build_dataset([source / "gt" / "videos"], tmp_path / "ds", config)
    assert not summary.failures, summary.failures
    rec = load_metadata(tmp_path / "ds").samples[0]
    at_source = any("features found at 672x384" in n for n in rec.notes)
    assert at_source == (max_image_size > 0), rec.notes
    df, _ = compare_datasets(tmp_path / "ds", source / "gt")
    row = df.iloc[0]
    assert row["registered_pct"] == 100.0 and row["ate_pct"] <= 1.0, row.to_dict()
    assert abs(row["focal_err_pct"]) <= 1.0, row.to_dict()
    assert row["depth_absrel_pct"] <= 3.0, row.to_dict()  # the cameras fit the clip's own pixels
    np.testing.assert_allclose(rec.source.camera.cx, 336.0, atol=1e-6)  # source pixels
