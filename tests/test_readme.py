"""The README's "your own videos, offline, in six commands" block runs as it is (issue 14, item 1)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MARKER = "<!-- readme-six-commands -->"


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = re.search(re.escape(MARKER) + r"\s*```bash\n(.*?)```", text, re.S)
    assert block, f"README.md has no ```bash block after {MARKER}"
    return [line for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]


def test_readme_block_has_six_commands():
    commands = readme_commands()
    assert len(commands) == 6
    assert [c.split()[:2] for c in commands] == [["fwdata", "build"], ["fwdata", "validate"], ["fwdata", "report"],
                                                 ["fwmodel", "cache"], ["fwmodel", "train"], ["fwmodel", "train"]]


def test_readme_six_commands_run_verbatim(tmp_path):
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               COLUMNS="80")
    for command in readme_commands():
        done = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"`{command}` exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    # what each command promised is there
    from fwdata.dataset.contract import load_metadata

    meta = load_metadata(tmp_path / "my_dataset")
    assert sorted(Path(s.source.path).stem for s in meta.samples) == ["orbit", "pan"]
    assert (tmp_path / "my_report" / "index.html").stat().st_size > 10_000
    assert len(list((tmp_path / "my_report" / "samples").glob("*.png"))) == 2
    assert (tmp_path / "runs/stage1/step-6.safetensors").is_file()
    assert any((tmp_path / "runs/stage2").glob("step-*.safetensors"))
