"""The on-disk rules of a dataset folder, in one place: which folders it has, where the internal
completion markers live, and how temporary files are named while a sample is being written.

Writers (`fwdata.dataset.store`), the build and validation all read these names from here.
The per-sample file names are part of the contract (`fwdata.dataset.contract.sample_paths`).

    dataset/
      metadata.json  videos/  depth/  points/  camera_params/      (the contract)
      requested_cameras/                                           (optional: cameras asked of `fwmodel generate`)
      .fwdata/done/<id>.json                                       (completion markers, internal)
      .fwdata/lock                                                 (the write lock of the running build)
      .fwmodel_cache/                                              (derived: the trainer's latent cache)
      <folder>/.<stem>.tmp-<pid><suffix>                           (a file being written by <pid>)
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional, Union

from fwdata.dataset.contract import CAMERAS_DIR, DEPTH_DIR, POINTS_DIR, REQUESTED_CAMERAS_DIR, VIDEOS_DIR

#: the folder of the tool's own bookkeeping inside a dataset; validation ignores it
INTERNAL_DIR = ".fwdata"
#: completion markers: `<id>.json` holding the sample's record, written last
MARKER_DIR = f"{INTERNAL_DIR}/done"

#: optional contract folders that no sample record names (requested_cameras/: the cameras asked of
#: `fwmodel generate`, beside the predicted ones in camera_params/); their files are not orphans
OPTIONAL_DIRS = (REQUESTED_CAMERAS_DIR,)

#: folders other tools derive from a dataset and keep inside it (the trainer's latent cache, first), and
#: the optional folders; they hold no orphans, but stay inside the root like everything else
DERIVED_DIRS = (".fwmodel_cache", *OPTIONAL_DIRS)

#: the write lock of a dataset: held by the one build writing into it (`fwdata.dataset.store.write_lock`)
LOCK_FILE = f"{INTERNAL_DIR}/lock"

#: what `tmp_name` makes: .<stem>.tmp-<pid><suffix>
_TMP_NAME = re.compile(r"^\..+\.tmp-(\d+)(\.[^.]+)?$")


def tmp_name(path: Union[str, Path]) -> Path:
    """The temporary name a file is written under before it is renamed to `path`.

    Hidden, in the same folder (so the rename is atomic), tagged with the writer's pid (so a dead
    writer's leftovers can be told from a live one's), suffix kept last (libraries such as open3d
    pick the format from it).
    """
    path = Path(path)
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")


def temp_writer_pid(name: str) -> Optional[int]:
    """The pid of the writer of a temporary file named `name` (see `tmp_name`), or None if it is not one."""
    m = _TMP_NAME.match(name)
    return int(m.group(1)) if m else None


def is_temp_name(name: str) -> bool:
    """True for a file name made by `tmp_name` (a file being written, or left by a killed writer)."""
    return temp_writer_pid(name) is not None


def dataset_dirs(root: Union[str, Path]) -> list[Path]:
    """The contract's data folders of a dataset (videos, depth, points, camera_params)."""
    root = Path(root)
    return [root / d for d in (VIDEOS_DIR, DEPTH_DIR, POINTS_DIR, CAMERAS_DIR)]


def marker_path(root: Union[str, Path], sample_id: str) -> Path:
    """The completion marker of one sample."""
    return Path(root) / MARKER_DIR / f"{sample_id}.json"
