"""The check registry: every id is declared by a check function, and emitting an undeclared id is a bug."""

from __future__ import annotations

from pathlib import Path

import pytest

from fwdata.dataset.contract import load_metadata
from fwdata.validate.registry import CHECK_FUNCTIONS, INTERNAL_IDS, REGISTRY, CheckTally, UndeclaredCheck, emits
from fwdata.validate.results import SampleResult
from fwdata.validate.sample import _Ctx
from fwdata.validate import gates

import fwdata.validate  # noqa: F401  (imports every module that declares check functions)


def test_every_registered_id_is_declared_by_a_check_function():
    declared = {cid for fn in CHECK_FUNCTIONS.values() for cid in fn.ids}
    sample_gates = {gates.sample_gate_id(m) for m in gates.METRICS}  # emitted by the gate evaluation itself
    undeclared = set(REGISTRY) - declared - sample_gates - INTERNAL_IDS
    assert not undeclared, f"registered ids no check function emits: {sorted(undeclared)}"
    assert declared <= set(REGISTRY)


def test_declaring_an_unregistered_id_fails_at_import():
    with pytest.raises(ValueError, match="unregistered"):
        emits("integrity.no_such_check")


def _ctx(tmp_path: Path, record) -> _Ctx:
    return _Ctx(tmp_path, record, gates.Tolerances(), SampleResult(id=record.id, status=record.status,
                                                                   split=record.split))


def test_emitting_an_undeclared_id_raises_and_is_not_a_finding(tmp_path, any_record):
    @emits("integrity.video_fps")
    def wrong(ctx):
        with ctx.check("integrity.video_fps"):
            ctx.emit("integrity.video_dims", "not this function's id")

    @emits("integrity.video_fps")
    def right(ctx):
        with ctx.check("integrity.video_fps"):
            ctx.emit("integrity.video_fps", "fine")

    ctx = _ctx(tmp_path, any_record)
    with pytest.raises(UndeclaredCheck, match="integrity.video_dims"):
        wrong(ctx)
    assert not [f for f in ctx.result.findings if f.check == "internal.check_crashed"]
    right(ctx)
    assert [f.check for f in ctx.result.findings] == ["integrity.video_fps"]
    # a crash inside a check is still a finding, not an exception
    @emits("integrity.video_fps")
    def crashes(ctx):
        with ctx.check("integrity.video_fps"):
            raise RuntimeError("boom")

    crashes(ctx)
    assert ctx.result.findings[-1].check == "internal.check_crashed"


def test_tally_counts_what_a_dataset_check_declares():
    tally = CheckTally()

    @emits("schema.splits")
    def splits_check():
        return ["ok"]

    assert tally.run(splits_check) == ["ok"]
    tally.run(splits_check)
    tally.add_skipped("schema.statistics", "because", 2)
    tally.add_skipped("schema.statistics", "other reason")
    assert tally.ran == {"schema.splits": 2}
    assert tally.skipped == {"schema.statistics": (3, "because")}


@pytest.fixture
def any_record(tmp_path):
    from fwdata.synth.dataset import SynthOptions, write_synthetic_dataset

    write_synthetic_dataset(tmp_path / "ds", SynthOptions(num_scenes=1, num_frames=5, height=32, width=48,
                                                          path_kinds=["orbit"], write_ply=False))
    return load_metadata(tmp_path / "ds").samples[0]

