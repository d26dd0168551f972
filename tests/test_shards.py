"""`fwdata shard` and `fwdata validate SHARDS/`: deterministic WebDataset shards whose members are the
dataset's files byte for byte, a manifest that indexes them, incremental reruns that keep old shards,
and shard validation that gives the folder's per-sample results and catches damaged shard folders."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fwdata.cli import app
from fwdata.dataset.contract import QualityMetrics, SampleRecord, load_metadata
from fwdata.shards import iter_samples, load_index, load_manifest
from fwdata.shards.format import MEMBER_PATHS, shard_name
from fwdata.shards.manifest import quality_columns
from fwdata.shards.reader import ShardReader, ShardReadError, iter_shard
from fwdata.shards.writer import ShardConfig, tar_size, write_shards
from fwdata.synth.dataset import SynthOptions, write_synthetic_dataset
from fwdata.validate import ValidateOptions, validate_dataset

SYNTH = dict(num_frames=9, height=48, width=64, path_kinds=["orbit", "forward", "pan"])
runner = CliRunner()


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def grown(tmp_path_factory) -> dict:
    """A 2-clip dataset sharded one sample per shard, then grown to 3 clips and sharded again."""
    base = tmp_path_factory.mktemp("shards")
    ds, out = base / "ds", base / "inc"
    write_synthetic_dataset(ds, SynthOptions(num_scenes=2, **SYNTH))
    first = write_shards(ShardConfig(dataset=ds, out=out, samples_per_shard=1))
    before = {p.name: (p.read_bytes(), p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("shard-*.tar")}
    old_manifest = load_manifest(out)
    write_synthetic_dataset(ds, SynthOptions(num_scenes=3, **SYNTH))
    second = write_shards(ShardConfig(dataset=ds, out=out, samples_per_shard=1))
    return dict(ds=ds, out=out, first=first, second=second, before=before, old_manifest=old_manifest)


@pytest.fixture(scope="module")
def dataset(grown) -> Path:
    return grown["ds"]


@pytest.fixture(scope="module")
def shards(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "sh"
    write_shards(ShardConfig(dataset=dataset, out=out, samples_per_shard=2))
    return out


@pytest.fixture
def sh(shards, tmp_path) -> Path:
    """A copy of the shard folder to damage."""
    dst = tmp_path / "sh"
    shutil.copytree(shards, dst)
    return dst


def validate(root: Path, workers: int = 0):
    before = tree_bytes(root)
    report = validate_dataset(ValidateOptions(dataset=root, workers=workers))
    assert tree_bytes(root) == before, "validation changed the shard folder"
    return report


def checks(report) -> list[tuple[str, str | None]]:
    return sorted((f.check, f.file) for f in report.findings)


# --------------------------------------------------------------------------- writing


def test_same_dataset_gives_same_bytes_and_members_are_the_dataset_files(dataset, shards, tmp_path):
    again = tmp_path / "again"
    res = write_shards(ShardConfig(dataset=dataset, out=again, samples_per_shard=2))
    assert res.written == ["shard-000000.tar", "shard-000001.tar"] and not res.reused
    files = tree_bytes(shards)
    assert set(files) == {"shard-000000.tar", "shard-000001.tar", "manifest.parquet", "shards.json", ".fwdata/lock"}
    assert tree_bytes(again) == files  # a fresh run into another folder: byte for byte

    meta = load_metadata(dataset)
    seen = []
    for key, members in iter_samples(shards):
        rec = SampleRecord.model_validate_json(members["record.json"])
        seen.append((key, rec.id))
        assert rec == meta.sample(rec.id)
        assert set(members) == set(MEMBER_PATHS) | {"record.json"}
        for member, field in MEMBER_PATHS.items():
            assert members[member] == (dataset / getattr(rec.paths, field)).read_bytes(), member
    assert seen == [(f"{i:08d}", s.id) for i, s in enumerate(meta.samples)]  # metadata order, %08d keys
    import webdataset as wds

    plain = [(s["__key__"], s["mp4"]) for s in wds.WebDataset(sorted(str(p) for p in shards.glob("*.tar")),
                                                               shardshuffle=False, empty_check=False)]
    assert plain == [(k, m["mp4"]) for k, m in iter_samples(shards)]  # WebDataset itself reads the same samples

    with tarfile.open(shards / "shard-000000.tar") as tf:
        infos = tf.getmembers()
    assert [i.name for i in infos[:7]] == [f"00000000.{m}" for m in ("camera.json", "camera.txt", "depth.npz", "mp4",
                                                                     "ply", "points.npz", "record.json")]
    assert {(i.mtime, i.uid, i.gid, i.uname, i.mode) for i in infos} == {(0, 0, 0, "fwdata", 0o444)}


def test_shard_index_and_manifest(dataset, shards):
    meta = load_metadata(dataset)
    index = load_index(shards)
    assert index.format == "fwdata-shards" and index.version == 1 and index.num_samples == 3
    assert index.source == str(dataset)
    assert [(s.name, s.num_samples, s.first_index) for s in index.shards] == [
        ("shard-000000.tar", 2, 0), ("shard-000001.tar", 1, 2)]
    for s in index.shards:
        assert s.bytes == (shards / s.name).stat().st_size and s.sha256 == sha(shards / s.name)
    raw_meta = json.loads((dataset / "metadata.json").read_text())
    assert index.dataset_metadata == {k: v for k, v in raw_meta.items() if k != "samples"}

    df = load_manifest(shards)
    assert df["index"].tolist() == [0, 1, 2] and str(df["index"].dtype) == "int64"
    assert df["key"].tolist() == ["00000000", "00000001", "00000002"]
    assert df["id"].tolist() == [s.id for s in meta.samples]
    assert df["shard"].tolist() == ["shard-000000.tar", "shard-000000.tar", "shard-000001.tar"]
    assert df["split"].tolist() == ["train"] * 3 and df["status"].tolist() == ["ok"] * 3
    assert (df["num_frames"] == 9).all() and (df["height"] == 48).all() and (df["width"] == 64).all()
    for row, s in zip(df.to_dict("records"), meta.samples):
        assert row["sha256.mp4"] == s.video_sha256 == sha(dataset / s.paths.video)
        assert row["sha256.depth.npz"] == sha(dataset / s.paths.depth)
        assert np.isnan(row["registered_ratio"])  # synthetic records hold no SfM metrics


def test_quality_columns_are_flat_with_nan_where_absent(dataset):
    rec = load_metadata(dataset).samples[0]
    from fwdata.quality import MultiviewSettings

    rec = rec.model_copy(update={"quality": QualityMetrics(registered_ratio=0.75, blur=12.5,
                                                           multiview_settings=MultiviewSettings(stride=3))})
    cols = quality_columns(rec)
    assert cols["registered_ratio"] == 0.75 and cols["blur"] == 12.5 and cols["multiview_settings.stride"] == 3.0
    assert np.isnan(cols["path_length"]) and np.isnan(cols["valid_depth_fraction"])
    assert "multiview_settings" not in cols


def test_shard_size_rule(dataset, tmp_path):
    one = write_shards(ShardConfig(dataset=dataset, out=tmp_path / "one", shard_size="1B")).index
    assert [s.num_samples for s in one.shards] == [1, 1, 1]  # every sample is larger: a shard each
    sizes = [s.bytes for s in one.shards]
    # room for the first two samples exactly (the estimate is the real tar size)
    two = write_shards(ShardConfig(dataset=dataset, out=tmp_path / "two",
                                   shard_size=tar_size(sizes[0] + sizes[1] - 2 * tar_size(0)))).index
    assert [s.num_samples for s in two.shards] == [2, 1]
    assert two.shards[0].bytes <= two.options.shard_size
    assert write_shards(ShardConfig(dataset=dataset, out=tmp_path / "all")).index.options.shard_size == 10**9
    res = write_shards(ShardConfig(dataset=dataset, out=tmp_path / "train", split="train", ply=False))
    assert res.index.num_samples == 3 and not any("ply" in m for _, m in iter_samples(tmp_path / "train"))


def test_incremental_rerun_keeps_old_shards_byte_identical(grown):
    out, first, second = grown["out"], grown["first"], grown["second"]
    assert first.written == ["shard-000000.tar", "shard-000001.tar"]
    assert second.reused == ["shard-000000.tar", "shard-000001.tar"] and second.written == ["shard-000002.tar"]
    for name, (data, ino, mtime) in grown["before"].items():
        p = out / name
        assert p.read_bytes() == data and p.stat().st_ino == ino and p.stat().st_mtime_ns == mtime  # not rewritten
    df, old = load_manifest(out), grown["old_manifest"]
    assert df["id"].tolist()[:2] == old["id"].tolist() and df["key"].tolist() == ["00000000", "00000001", "00000002"]
    all_ids = [s.id for s in load_metadata(grown["ds"]).samples]
    assert df["id"].tolist()[2] == (set(all_ids) - set(old["id"])).pop()  # the new sample got the next key
    assert validate(out).exit_code == 0
    # rerunning on the unchanged dataset rewrites nothing
    third = write_shards(ShardConfig(dataset=grown["ds"], out=out, samples_per_shard=1))
    assert third.written == [] and len(third.reused) == 3


def test_changed_sample_and_new_options_rewrite_their_shards(dataset, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(dataset, ds)
    out = tmp_path / "sh"
    write_shards(ShardConfig(dataset=ds, out=out, samples_per_shard=1))
    rec = load_metadata(ds).samples[1]
    txt = ds / rec.paths.camera_txt
    txt.write_text(txt.read_text() + "\n")  # same cameras, other bytes
    res = write_shards(ShardConfig(dataset=ds, out=out, samples_per_shard=1))
    assert res.reused == ["shard-000000.tar", "shard-000002.tar"] and res.written == ["shard-000001.tar"]
    res = write_shards(ShardConfig(dataset=ds, out=out, samples_per_shard=3))
    assert res.written == ["shard-000000.tar"] and res.removed == ["shard-000001.tar", "shard-000002.tar"]
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar"]


def test_cli_shard_and_its_errors(dataset, tmp_path):
    out = tmp_path / "cli"
    res = runner.invoke(app, ["shard", str(dataset), "--out", str(out), "-n", "2", "-q"])
    assert res.exit_code == 0, res.output
    assert "3 samples in 2 shards" in res.output
    (tmp_path / "file").write_text("x")
    for args, words in [
        ([str(tmp_path / "nope"), "--out", str(out)], "does not exist"),
        ([str(dataset), "--out", str(tmp_path / "file")], "exists and is not a folder"),
        ([str(dataset), "--out", str(dataset / "shards")], "inside the dataset"),
        ([str(dataset), "--out", str(out), "-n", "2", "--shard-size", "1GB"], "not both"),
        ([str(dataset), "--out", str(out), "--shard-size", "lots"], "--shard-size"),
        ([str(dataset), "--out", str(out), "--split", "val"], "no samples in split 'val'"),
    ]:
        res = runner.invoke(app, ["shard", *args])
        assert res.exit_code == 2 and words in res.output, (args, res.output)
        assert "Traceback" not in res.output and len(res.output.strip().splitlines()) <= 2
    assert not (dataset / "shards").exists()


# --------------------------------------------------------------------------- validation


def test_validate_shards_gives_the_folder_results(dataset, shards):
    folder = validate_dataset(ValidateOptions(dataset=dataset, workers=0))
    report = validate(shards)
    assert folder.exit_code == 0 and report.exit_code == 0
    assert report.samples == folder.samples  # same ids, order, pass/fail, counts and recomputed metrics
    assert report.summary == folder.summary and report.findings == folder.findings == []
    outcomes = {c.id: c.outcome for c in report.checks}
    assert {outcomes[c] for c in outcomes if c.startswith("shards.")} == {"passed"}
    assert outcomes["integrity.video_decode"] == outcomes["cross.points_match_depth"] == "passed"
    assert outcomes["schema.metadata_json"] == "skipped"
    res = runner.invoke(app, ["validate", str(shards), "-j", "0", "--format", "json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["summary"]["samples_passed"] == 3


def test_damage_inside_a_shard_is_found_by_the_sample_checks(sh, dataset):
    """A depth npz made invalid inside the tar (its size kept): the same finding as in the folder."""
    name = sh / "shard-000000.tar"
    samples = list(iter_shard(name))
    key, members = samples[1]
    members["depth.npz"] = b"\0" * len(members["depth.npz"])
    _rewrite(sh, "shard-000000.tar", samples)
    report = validate(sh)
    rec = SampleRecord.model_validate_json(members["record.json"])
    assert ("integrity.depth_file", rec.paths.depth) in checks(report)
    assert {f.sample for f in report.findings if f.check == "integrity.depth_file"} == {rec.id}


def test_flipped_byte_is_a_checksum_finding(sh):
    p = sh / "shard-000000.tar"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x40
    p.write_bytes(bytes(data))
    report = validate(sh)
    assert report.exit_code == 1
    assert ("shards.checksum", "shard-000000.tar") in checks(report)


def test_truncated_shard_is_one_finding(sh):
    p = sh / "shard-000001.tar"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])
    report = validate(sh)
    shard_findings = [f for f in report.findings if f.file == "shard-000001.tar"]
    assert [f.check for f in shard_findings] == ["shards.read"] and "truncated" in shard_findings[0].message
    assert report.summary.samples_checked == 2 and report.exit_code == 1
    with open(p, "rb") as fh, pytest.raises(ShardReadError):
        list(ShardReader(fh, p.name))


def test_missing_shard(sh):
    (sh / "shard-000000.tar").unlink()
    report = validate(sh)
    assert ("shards.missing_shard", "shard-000000.tar") in checks(report)
    assert not [f for f in report.findings if f.check == "shards.manifest_match"]  # its rows: that one finding
    assert report.summary.samples_checked == 1 and report.exit_code == 1


def test_duplicated_sample(sh):
    first = list(iter_shard(sh / "shard-000000.tar"))
    last = list(iter_shard(sh / "shard-000001.tar"))
    _rewrite(sh, "shard-000001.tar", last + [("00000003", first[0][1])])  # sample 0 again, under a new key
    report = validate(sh)
    dup = [f for f in report.findings if f.check == "shards.duplicate_sample"]
    rec0 = SampleRecord.model_validate_json(first[0][1]["record.json"])
    assert [f.sample for f in dup] == [rec0.id] and "00000000" in dup[0].message
    assert report.exit_code == 1 and report.summary.samples_checked == 3  # the copy is not checked again
    _rewrite(sh, "shard-000001.tar", last + [("00000000", first[0][1])])  # the same key twice
    dup = [f for f in validate(sh).findings if f.check == "shards.duplicate_sample"]
    assert len(dup) == 1 and "key 00000000" in dup[0].message


def test_manifest_row_pointing_at_the_wrong_shard(sh):
    df = load_manifest(sh)
    df.loc[0, "shard"] = "shard-000001.tar"
    df.to_parquet(sh / "manifest.parquet", index=False)
    report = validate(sh)
    match = [f for f in report.findings if f.check == "shards.manifest_match"]
    assert len(match) == 1 and match[0].sample == df.loc[0, "id"] and "shard-000001.tar" in match[0].message
    assert report.exit_code == 1


def test_unreadable_index_exits_2(sh):
    (sh / "shards.json").write_text("{not json")
    res = runner.invoke(app, ["validate", str(sh), "-j", "0", "--quiet"])
    assert res.exit_code == 2 and "UNREADABLE" in res.output


def test_workers_give_the_same_report(shards):
    one = validate(shards, workers=0)
    two = validate(shards, workers=1)  # samples sent to a worker process as bytes
    assert two.samples == one.samples and two.findings == one.findings


def _rewrite(folder: Path, name: str, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """Write `samples` as shard `name` the way the writer does, and record its new size and sha256 in
    shards.json (so only what the test changed inside is wrong)."""
    import webdataset as wds

    buf = io.BytesIO()
    with wds.TarWriter(buf, user="fwdata", group="fwdata", mode=0o444, encoder=False, mtime=0) as tw:
        for key, members in samples:
            tw.write({"__key__": key, **members})
    (folder / name).write_bytes(buf.getvalue())
    index = json.loads((folder / "shards.json").read_text())
    for s in index["shards"]:
        if s["name"] == name:
            s["bytes"], s["sha256"] = len(buf.getvalue()), hashlib.sha256(buf.getvalue()).hexdigest()
    (folder / "shards.json").write_text(json.dumps(index))
