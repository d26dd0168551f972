"""`fwmodel package` (a run as one deterministic tar, and its --verify) and `fwmodel publish --dry-run` (the
Hugging Face model repository folder), on a real tiny Stage-2 run."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fwmodel.checkpoint import file_sha256, verify_checkpoint_file
from fwmodel.cli import app
from fwmodel.package import MTIME
from test_run_report import eval_dir, run_dir  # noqa: F401  (module fixtures: the run and its eval.json)

runner = CliRunner()


def _one_line_error(r, code: int, words: str) -> None:
    assert r.exit_code == code, r.output
    lines = [x for x in r.output.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], r.output


@pytest.fixture(scope="module")
def package(run_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pkg") / "run.tar"
    r = runner.invoke(app, ["package", str(run_dir), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "wrote" in r.output and "step-4.safetensors" in r.output
    return out


def test_package_holds_the_run_with_a_manifest_of_every_file(package, run_dir, dataset):
    from fwdata.dataset.contract import load_metadata

    top = run_dir.name
    with tarfile.open(package) as tar:
        members = tar.getmembers()
        files = {m.name: tar.extractfile(m).read() for m in members if m.isfile()}
    assert members[0].name == f"{top}/manifest.json"  # first: a reader finds it without scanning the tar
    tb = [p.name for p in (run_dir / "tb").iterdir()]
    assert len(tb) == 1
    want = ["config.toml", "dataset.json", "manifest.json", "metrics.jsonl", "step-4.json", "step-4.safetensors",
            f"tb/{tb[0]}", "train.log"]
    assert sorted(n.split("/", 1)[1] for n in files) == sorted(want)
    assert not any("/state" in m.name for m in members)  # never the state without --with-state
    assert all(m.mtime == MTIME and m.uid == 0 and m.gid == 0 and m.uname == "" for m in members)
    manifest = json.loads(files[f"{top}/manifest.json"])
    assert manifest["checkpoint"] == "step-4.safetensors" and manifest["stage"] == 2 and manifest["step"] == 4
    side = json.loads((run_dir / "step-4.json").read_text())
    assert manifest["data_fingerprint"] == side["extra"]["data_fingerprint"]
    listed = {f["path"]: f for f in manifest["files"]}
    assert sorted(listed) == sorted(w for w in want if w != "manifest.json")
    for rel, f in listed.items():
        if rel != "dataset.json":  # the run's own files, byte for byte
            assert f["sha256"] == file_sha256(run_dir / rel) and f["size"] == (run_dir / rel).stat().st_size, rel
            assert files[f"{top}/{rel}"] == (run_dir / rel).read_bytes(), rel
    ds = json.loads(files[f"{top}/dataset.json"])
    assert ds["data_fingerprint"] == side["extra"]["data_fingerprint"] and ds["data_root"] == str(dataset)
    train_ids = [s.id for s in load_metadata(dataset).samples if s.split == "train"]
    assert [s["id"] for s in ds["samples"]] == train_ids  # the dataset still gives the recorded fingerprint


def test_same_run_same_bytes(package, run_dir, tmp_path):
    for p in run_dir.rglob("*"):  # other file times: the tar does not change
        os.utime(p, (1e9, 1e9))
    again = tmp_path / "again.tar"
    r = runner.invoke(app, ["package", str(run_dir), "--out", str(again)])
    assert r.exit_code == 0, r.output
    assert again.read_bytes() == package.read_bytes()


def test_verify_finds_a_flipped_byte_a_missing_and_an_extra_member(package, tmp_path):
    r = runner.invoke(app, ["package", "--verify", str(package)])
    assert r.exit_code == 0, r.output
    assert "ok, 7 files match the manifest" in r.output

    with tarfile.open(package) as tar:
        ck = next(m for m in tar.getmembers() if m.name.endswith("step-4.safetensors"))
        members = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]
    flipped = tmp_path / "flipped.tar"
    data = bytearray(package.read_bytes())
    data[ck.offset_data + ck.size // 2] ^= 0x01
    flipped.write_bytes(bytes(data))
    r = runner.invoke(app, ["package", "--verify", str(flipped)])
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 2, r.output  # the problem, then the error summary
    assert lines[0].startswith(ck.name) and "sha256" in lines[0] and "does not match the manifest" in lines[0]
    assert lines[1].startswith("error:") and "1 problem" in lines[1]

    edited = tmp_path / "edited.tar"  # train.log left out, a file added
    with tarfile.open(edited, "w") as tar:
        for m, blob in members:
            if not m.name.endswith("train.log"):
                tar.addfile(m, io.BytesIO(blob) if blob is not None else None)
        extra = tarfile.TarInfo(f"{members[0][0].name.split('/')[0]}/notes.txt")
        extra.size = 5
        tar.addfile(extra, io.BytesIO(b"hello"))
    r = runner.invoke(app, ["package", "--verify", str(edited)])
    assert r.exit_code == 1, r.output
    assert "train.log: listed in the manifest but missing from the tar" in r.output
    assert "notes.txt: in the tar but not in the manifest" in r.output

    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(package.read_bytes()[: ck.offset_data + 1000])
    r = runner.invoke(app, ["package", "--verify", str(truncated)])
    assert r.exit_code == 1, r.output
    assert "damaged" in r.output or "missing from the tar" in r.output


def test_with_state_packs_the_state_of_the_chosen_checkpoint_and_it_resumes(run_dir, tmp_path):
    from fwmodel.train.state import open_state

    out = tmp_path / "s.tar"
    r = runner.invoke(app, ["package", str(run_dir), "--out", str(out), "--checkpoint", "step-2.safetensors",
                            "--with-state"])
    assert r.exit_code == 0, r.output
    with tarfile.open(out) as tar:
        names = [m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile()]
        tar.extractall(tmp_path / "x", filter="data")
    states = sorted(n for n in names if n.startswith("state/"))
    assert states == sorted(f"state/step-2/{p.name}" for p in (run_dir / "state" / "step-2").iterdir())
    assert "step-2.safetensors" in names and "step-4.safetensors" not in names
    restored = tmp_path / "x" / run_dir.name
    verify_checkpoint_file(restored / "step-2.safetensors")  # size, sha256 and header against the sidecar
    assert open_state(restored, None).step == 2  # what `fwmodel train --resume` verifies before loading
    assert runner.invoke(app, ["package", "--verify", str(out)]).exit_code == 0


def test_package_bad_input_is_one_line_exit_2(run_dir, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(run_dir, damaged, ignore=shutil.ignore_patterns("state"))
    data = bytearray((damaged / "step-4.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (damaged / "step-4.safetensors").write_bytes(bytes(data))
    (tmp_path / "empty").mkdir()
    cases = [
        (["package", str(run_dir), "--out", str(tmp_path / "a.tar"), "--checkpoint", "step-9.safetensors"],
         "not a checkpoint of"),
        (["package", str(damaged), "--out", str(tmp_path / "b.tar")], "sha256 does not match"),
        (["package", str(damaged), "--out", str(tmp_path / "c.tar"), "--checkpoint", "step-2.safetensors",
          "--with-state"], "no state/step-2"),
        (["package", str(tmp_path / "empty"), "--out", str(tmp_path / "d.tar")], "not a training run folder"),
        (["package", str(run_dir), "--out", str(tmp_path)], "is a folder"),
        (["package", "--verify", str(tmp_path / "nope.tar")], "no such file"),
        (["package", str(run_dir)], "--out"),
    ]
    for args, words in cases:
        _one_line_error(runner.invoke(app, args), 2, words)
    assert not list(tmp_path.glob("*.tar"))


# --------------------------------------------------------------------------- publish


def test_publish_dry_run_writes_a_hub_model_repository(run_dir, eval_dir, tmp_path):
    from huggingface_hub import ModelCard

    folder = tmp_path / "repo"
    r = runner.invoke(app, ["publish", str(run_dir), "--repo-id", "someone/fw-tiny", "--dry-run", str(folder),
                            "--eval", str(eval_dir)])
    assert r.exit_code == 0, r.output
    assert "nothing uploaded" in r.output
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "config.toml", "eval.json",
                                                        "step-4.json", "step-4.safetensors"]
    assert (folder / "step-4.safetensors").read_bytes() == (run_dir / "step-4.safetensors").read_bytes()
    verify_checkpoint_file(folder / "step-4.safetensors")  # the sidecar travels with it: the download is checked
    assert (folder / "config.toml").read_text() == (run_dir / "config.toml").read_text()
    side = json.loads((run_dir / "step-4.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    assert (config["preset"], config["stage"], config["step"]) == ("tiny", 2, 4)
    assert config["fingerprint"] == side["fingerprint"] and config["model"] == side["config"]

    card = ModelCard.load(folder / "README.md")  # huggingface_hub parses the front matter back
    assert card.data.library_name == "fwmodel" and card.data.license == "apache-2.0"
    assert "fwmodel" in card.data.tags and "wan2.1" in card.data.tags
    assert card.data.base_model is None  # the tiny preset has a random backbone, no base model
    text = card.text
    assert "**Stage 2**" in text and "**4 steps**" in text
    assert f"| data fingerprint | {side['extra']['data_fingerprint']} |" in text
    assert "| fantasy_world_stage2/step-4.safetensors | 2 | 4 | 0.37 | 0.5 |" in text  # the eval table
    assert "| fantasy_world_stage2/step-2.safetensors | 2 | 2 | 0.48 | - |" in text
    assert "[optim]" in text and "lr = 0.001" in text  # the recipe

    again = tmp_path / "again"
    r = runner.invoke(app, ["publish", str(run_dir), "--repo-id", "someone/fw-tiny", "--dry-run", str(again),
                            "--eval", str(eval_dir)])
    assert r.exit_code == 0, r.output
    for p in folder.iterdir():
        assert (again / p.name).read_bytes() == p.read_bytes(), p.name


def test_model_card_names_the_base_model_of_a_real_preset(run_dir, tmp_path):
    from fwmodel.publish import model_card
    from fwmodel.run_report import load_run, pick_checkpoint

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("state", "tb"))
    side = json.loads((copy / "step-4.json").read_text())
    side["preset"], side["config"]["hub_id"] = "wan2.1-t2v-1.3b", None  # base model from the preset
    (copy / "step-4.json").write_text(json.dumps(side))
    run = load_run(copy)
    card = model_card(run, pick_checkpoint(run), "someone/fw-1.3b")
    assert card.data.base_model == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    assert card.data.pipeline_tag == "text-to-video" and card.data.license == "apache-2.0"
    assert "https://huggingface.co/Wan-AI/Wan2.1-T2V-1.3B-Diffusers" in card.text


def test_publish_without_a_token_says_how_to_log_in_and_uploads_nothing(run_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")  # no stored token; and no network if it tried
    r = subprocess.run([sys.executable, "-m", "fwmodel.cli", "publish", str(run_dir), "--repo-id", "someone/x"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr  # 1 would mean it got as far as the Hub
    lines = [x for x in (r.stdout + r.stderr).strip().splitlines() if x.strip()]
    assert len(lines) == 1 and "hf auth login" in lines[0] and "HF_TOKEN" in lines[0], lines


def test_publish_bad_input_is_one_line_exit_2(run_dir, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    cases = [
        (["--repo-id", "not a repo id", "--dry-run", str(tmp_path / "a")], "--repo-id"),
        (["--repo-id", "no-namespace", "--dry-run", str(tmp_path / "b")], "USER/NAME"),
        (["--repo-id", "someone/x", "--dry-run", str(tmp_path / "full")], "not empty"),
        (["--repo-id", "someone/x", "--dry-run", str(tmp_path / "c"), "--checkpoint", "step-3.safetensors"],
         "not a checkpoint of"),
        (["--repo-id", "someone/x", "--dry-run", str(tmp_path / "d"), "--eval", str(tmp_path)], "no eval.json"),
    ]
    for args, words in cases:
        _one_line_error(runner.invoke(app, ["publish", str(run_dir), *args]), 2, words)
    assert not any((tmp_path / n).exists() for n in "abcd")
