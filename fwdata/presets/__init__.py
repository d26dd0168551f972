"""Named presets shipped inside the packages: build presets and gate files here, training recipes in fwmodel.

The TOML files are package data (``pyproject.toml``), so an installed wheel has them too:

    fwdata/presets/build/*.toml    `fwdata build --config NAME`
    fwdata/presets/gates/*.toml    `fwdata validate --gates NAME`
    fwmodel/recipes/*.toml         `fwmodel train --config NAME`, `fwmodel cache --config NAME`

Every kind is found by one function, `find_preset`: an existing path is read as a file, otherwise a
bare name (`fast`, `strict`, `tiny-stage1`) is looked up among the packaged presets of that kind; an
unknown name is a one-line error listing the available names. A preset's description is the first
line of its leading comment (`fwdata presets`, `fwmodel recipes`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Union

from fwdata.runtime import ConfigFileError

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class PresetKind:
    """One kind of packaged preset: what it is called in messages, where its TOML files are, and the
    command that lists them."""

    what: str  # e.g. "build preset"
    directory: Path
    lister: str  # e.g. "fwdata presets"

    def names(self) -> list[str]:
        return sorted(p.stem for p in self.directory.glob("*.toml"))


@dataclass(frozen=True)
class Preset:
    name: str
    path: Path
    description: str


BUILD_PRESETS = PresetKind("build preset", HERE / "build", "fwdata presets")
GATE_FILES = PresetKind("gate file", HERE / "gates", "fwdata presets")


def find_preset(value: Union[str, Path], kind: PresetKind, error: type[ConfigFileError] = ConfigFileError) -> Path:
    """The TOML file meant by `value`: an existing file as it is, else the packaged preset of that name.

    Raises `error` (one line, listing the packaged names) for anything else."""
    text = str(value)
    path = Path(text)
    if text and path.is_file():
        return path
    if text and path.exists():
        raise error(f"{kind.what} {text}: is a folder, not a TOML file")
    if text and "/" not in text and "\\" not in text and not text.startswith("."):
        named = kind.directory / f"{text}.toml"
        if named.is_file():
            return named
    names = ", ".join(kind.names()) or "none"
    raise error(f"{kind.what} {text!r}: no such file, and not a packaged name (available: {names}; "
                f"`{kind.lister}` describes them)")


def description(path: Path) -> str:
    """The first line of the file's leading comment (its one-line summary), or '' without one."""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            return stripped.lstrip("#").strip()
        break
    return ""


def available(kind: PresetKind) -> list[Preset]:
    """The packaged presets of a kind, by name."""
    return [Preset(name, kind.directory / f"{name}.toml", description(kind.directory / f"{name}.toml"))
            for name in kind.names()]


def listing(kind: PresetKind, usage: str) -> list[str]:
    """Lines showing the packaged presets of a kind: a title with their use and folder, then `name  description`."""
    presets = available(kind)
    width = max((len(p.name) for p in presets), default=0)
    return ([f"{kind.what}s: {usage} (files in {kind.directory})"]
            + [f"  {p.name:<{width}}  {p.description}" for p in presets])
