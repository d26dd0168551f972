"""The build and validation measure `multiview_consistency` the same way, whatever the gate file says."""

from __future__ import annotations

from fwdata.dataset.contract import load_metadata
from fwdata.quality import MultiviewSettings
from fwdata.validate import ValidateOptions, validate_dataset
from fwdata.validate import gates


def test_recorded_settings_are_used_to_compare_the_recorded_value(main_build):
    ds = main_build / "ds"
    meta = load_metadata(ds)
    assert all(r.quality.multiview_settings == MultiviewSettings() for r in meta.samples)
    strict = gates.GateConfig(tolerances=gates.Tolerances(multiview_rel_tol=0.005))  # 10x stricter than the build
    report = validate_dataset(ValidateOptions(dataset=ds, workers=0), config=strict)
    assert not [f for f in report.findings if f.check == "cross.recorded_quality"], \
        "good data is not flagged because the gate file measures with other tolerances"
    by_id = {s.id: s for s in report.samples}
    for rec in meta.samples:
        # the gate itself does use the gate file's tolerances: a stricter tolerance gives a lower value
        assert by_id[rec.id].metrics["multiview_consistency"] < rec.quality.multiview_consistency - 0.05
