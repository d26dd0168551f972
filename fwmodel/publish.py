"""`fwmodel publish`: a training run as a Hugging Face model repository, uploaded with `huggingface_hub`.

    fwmodel publish RUN_DIR --repo-id USER/NAME [--private] [--checkpoint step-N.safetensors] [--eval EVAL_DIR]
    fwmodel publish RUN_DIR --repo-id USER/NAME --dry-run DIR      (writes the folder only)

The repository folder:

```
step-N.safetensors   the checkpoint under its own name (the trainable modules only; the frozen Wan
step-N.json          backbone is not in it) and its sidecar (size, sha256, config), so that
                     `fwmodel` loads the downloaded file with the same checks as a local one
config.json          what the checkpoint is: format, preset, stage, step, fingerprints, base model, model config
config.toml          the training recipe as the run resolved it
eval.json            with --eval: the scores of `fwmodel eval`
README.md            the model card (huggingface_hub ModelCard / ModelCardData): YAML front matter with
                     library_name, license (the base model's: Wan2.1 is Apache-2.0), tags, base_model;
                     then the recipe, stage, steps, data fingerprint and the eval table
```

Upload: `HfApi().create_repo(exist_ok=True)` then `upload_folder`, with the token `hf auth login`
stored or HF_TOKEN holds; without one (and without --dry-run) nothing is sent and the command says
how to log in (exit 2). Same run, same folder bytes.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from fwmodel.run_report import CONFIG_FILE, EvalFile, Run, RunCheckpoint, RunError

__all__ = ["PublishError", "UploadError", "PublishResult", "write_repo_folder", "publish"]

LIBRARY_NAME = "fwmodel"
#: the licence of the Wan2.1 base models (and so of what is trained on them)
LICENSE = "apache-2.0"
TAGS = ["fwmodel", "fantasyworld", "wan2.1", "world-model", "video-generation", "depth-estimation",
        "camera-pose-estimation", "3d-reconstruction"]

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

A FantasyWorld-style geometry-aware video world model trained with `fwmodel`: the trainable modules of
**Stage {{ stage }}** ({{ stage_name }}) after **{{ step }} steps**, on top of the frozen Wan2.1 backbone
{{ base_text }}. The checkpoint holds only the trainable modules ({{ num_params }} parameters: the geometry
branch{{ stage2_text }}); the Wan2.1 weights are not in it.

| | |
|---|---|
{% for k, v in facts %}| {{ k }} | {{ v }} |
{% endfor %}
## Use

```bash
hf download {{ repo_id }} --local-dir {{ repo_name }}
fwmodel generate --checkpoint {{ repo_name }}/{{ checkpoint }} --prompt "..." --trajectory orbit --out results/
```

`{{ sidecar }}` (next to the weights) holds their size and sha256: `fwmodel` refuses a damaged download.
{% if base_model %}The frozen backbone comes from [{{ base_model }}](https://huggingface.co/{{ base_model }})
(`hf download {{ base_model }}`, then `--wan-weights` that folder where the recorded path does not exist).
{% endif %}
## Training recipe

Stage {{ stage }}, {{ step }} of {{ num_steps }} steps; the resolved configuration (`config.toml`):

```toml
{{ config_toml }}
```
{% if eval_table %}
## Evaluation (`fwmodel eval`)

{{ eval_table }}
{% endif %}
## Licence

Apache-2.0, the licence of the Wan2.1 base model
{%- if base_model %} ([{{ base_model }}](https://huggingface.co/{{ base_model }})){% endif %}.
"""


class PublishError(RunError):
    """Bad input for `fwmodel publish` (repo id, run, checkpoint, --dry-run folder, no token): exit 2."""


class UploadError(RuntimeError):
    """The Hub refused or could not be reached: exit 1."""


@dataclass
class PublishResult:
    folder: Path  # the repository folder (after an upload: the temporary one, removed)
    files: list[str]
    url: Optional[str] = None  # the repository, once uploaded


def check_repo_id(repo_id: str) -> None:
    """PublishError unless `repo_id` is USER/NAME as the Hub accepts it."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise PublishError(f"--repo-id {repo_id!r}: {str(e).splitlines()[0]}") from None
    if repo_id.count("/") != 1:
        raise PublishError(f"--repo-id {repo_id!r}: give USER/NAME (or ORG/NAME)")


def markdown_table(evals: EvalFile) -> str:
    """The eval table as GitHub markdown (numbers to 4 significant digits; '-' where missing)."""
    df = evals.table()
    cols = list(df.columns)
    fmt = lambda v: "-" if v is None or v != v else (f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def model_card(run: Run, ck: RunCheckpoint, repo_id: str, evals: Optional[EvalFile] = None):
    """The model card (a huggingface_hub ModelCard) of checkpoint `ck` of `run`."""
    from huggingface_hub import ModelCard, ModelCardData

    from fwmodel.config import get_preset

    side = ck.sidecar or {}
    preset = side.get("preset")
    base = (side.get("config") or {}).get("hub_id")
    if base is None and preset:
        try:
            base = get_preset(preset).hub_id
        except (KeyError, ValueError):
            base = None
    pipeline = "image-to-video" if base and "I2V" in base else ("text-to-video" if base else None)
    data = ModelCardData(library_name=LIBRARY_NAME, license=LICENSE, tags=list(TAGS), base_model=base,
                         pipeline_tag=pipeline)
    facts = run.facts(ck)
    shown = [(k, facts[k]) for k in ("stage", "steps trained", "steps configured", "preset", "model fingerprint",
                                     "trainable parameters", "data fingerprint", "split", "clip (frames x H x W)",
                                     "batch per GPU x grad accum", "learning rate", "config hash", "tool version")]
    stage = side.get("stage")
    return ModelCard.from_template(
        data, template_str=CARD_TEMPLATE, title=repo_id.split("/")[1], stage=stage,
        stage_name="unified co-optimisation" if stage == 2 else "latent bridging", step=ck.step,
        base_text=f"[{base}](https://huggingface.co/{base})" if base else
        f"(preset `{preset}`: a randomly initialised test backbone, not a real model)",
        num_params=f"{side.get('num_params', 0):,}",
        stage2_text=", the video-geometry cross-attention and the camera adapters" if stage == 2 else "",
        facts=[(k, "-" if v is None else v) for k, v in shown], repo_id=repo_id, repo_name=repo_id.split("/")[1],
        checkpoint=ck.path.name, sidecar=ck.sidecar_path.name, num_steps=facts["steps configured"],
        config_toml=run.config_text.strip(), eval_table=markdown_table(evals) if evals is not None else "",
        base_model=base)


def write_repo_folder(run_dir: Path, folder: Path, repo_id: str, checkpoint: Optional[str] = None,
                      eval_dir: Optional[Path] = None) -> PublishResult:
    """Write the repository folder of the run (see the module docstring) into `folder` (new or empty)."""
    from fwmodel.checkpoint import CheckpointError, verify_checkpoint_file
    from fwmodel.run_report import load_eval, load_run, pick_checkpoint

    check_repo_id(repo_id)
    run = load_run(Path(run_dir))
    ck = pick_checkpoint(run, checkpoint)
    evals = load_eval(eval_dir) if eval_dir is not None else None
    try:
        verify_checkpoint_file(ck.path, verify_hash=True)
    except CheckpointError as e:
        raise PublishError(f"not published: {e}") from None
    if not run.config_text:
        raise PublishError(f"{run.root} has no {CONFIG_FILE}: the model card needs the training recipe")
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise PublishError(f"--dry-run {folder} is a file or a folder that is not empty; give a new folder")
    folder.mkdir(parents=True, exist_ok=True)
    side = ck.sidecar
    shutil.copyfile(ck.path, folder / ck.path.name)
    shutil.copyfile(ck.sidecar_path, folder / ck.sidecar_path.name)
    (folder / CONFIG_FILE).write_text(run.config_text)
    config = {"format": side.get("format"), "checkpoint": ck.path.name, "preset": side.get("preset"),
              "stage": side.get("stage"), "step": ck.step, "fingerprint": side.get("fingerprint"),
              "data_fingerprint": (side.get("extra") or {}).get("data_fingerprint"),
              "base_model": (side.get("config") or {}).get("hub_id"), "num_params": side.get("num_params"),
              "model": side.get("config")}
    (folder / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    if evals is not None:
        (folder / "eval.json").write_text(evals.model_dump_json(indent=1) + "\n")
    model_card(run, ck, repo_id, evals).save(folder / "README.md")
    return PublishResult(folder, sorted(p.name for p in folder.iterdir()))


def publish(run_dir: Path, repo_id: str, private: bool = False, checkpoint: Optional[str] = None,
            eval_dir: Optional[Path] = None, dry_run: Optional[Path] = None) -> PublishResult:
    """Write the folder (into `dry_run`, and stop there) or upload it to `repo_id`.

    Raises PublishError for bad input or no token (before anything is uploaded), UploadError when the Hub
    refuses or cannot be reached.
    """
    if dry_run is not None:
        return write_repo_folder(run_dir, dry_run, repo_id, checkpoint, eval_dir)
    from huggingface_hub import HfApi, get_token

    check_repo_id(repo_id)
    token = get_token()
    if not token:
        raise PublishError("not logged in to the Hugging Face Hub: run `hf auth login` (or set HF_TOKEN), or write "
                           "the folder only with --dry-run DIR")
    with tempfile.TemporaryDirectory(prefix="fwmodel-publish-") as tmp:
        res = write_repo_folder(run_dir, Path(tmp) / "repo", repo_id, checkpoint, eval_dir)
        api = HfApi(token=token)
        try:
            url = api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
            api.upload_folder(repo_id=repo_id, folder_path=res.folder, repo_type="model",
                              commit_message=f"fwmodel publish: {Path(run_dir).name}/{ck_name(res)}")
        except Exception as e:  # HfHubHTTPError, connection errors: one line
            first = str(e).splitlines()[0] if str(e) else ""
            raise UploadError(f"upload to {repo_id} failed: {type(e).__name__}: {first}") from None
        return PublishResult(res.folder, res.files, str(url))


def ck_name(res: PublishResult) -> str:
    """The checkpoint file among a repository folder's files."""
    return next((f for f in res.files if f.endswith(".safetensors")), "")
