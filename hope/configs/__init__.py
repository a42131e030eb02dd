"""Named run configs and data manifests shipped inside the package (``hope/configs/*.yaml`` and
``hope/configs/data/*.yaml``), so ``python -m hope.train pilot`` works from any folder and from a
non-editable install.

A config reference is resolved in this order:

1. an existing file (``my_run.yaml``, ``/abs/path/pilot.yaml``): used as it is;
2. a name (``pilot``, ``pilot.yaml``) or a package-relative path (``configs/pilot.yaml``): the packaged file.

Data manifests (``data.manifest`` of a run config, ``python -m hope.data prepare``) resolve the same way
among ``hope/configs/data/``: ``embedded``, ``data/embedded`` and ``configs/data/embedded.yaml`` all name
the packaged ``embedded`` manifest.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

ConfigKind = Literal["run", "data"]
KINDS: tuple[str, ...] = ("run", "data")
_SUFFIXES = (".yaml", ".yml")


def config_dir(kind: ConfigKind = "run") -> Path:
    """The folder holding the packaged configs of ``kind`` (``run``: ``hope/configs``; ``data``: its ``data/``)."""
    _check_kind(kind)
    root = Path(str(resources.files(__name__)))
    return root if kind == "run" else root / "data"


def config_names(kind: ConfigKind = "run") -> list[str]:
    """Sorted names of the packaged configs of ``kind`` (file names without ``.yaml``)."""
    return sorted(p.stem for p in config_dir(kind).glob("*.yaml"))


def _check_kind(kind) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")


def _packaged_name(ref: str, kind: str) -> str | None:
    """``pilot`` / ``pilot.yaml`` / ``configs/pilot.yaml`` -> ``pilot`` (data: also ``data/x``,
    ``configs/data/x.yaml``); None when ``ref`` has another shape."""
    rel = ref.replace("\\", "/")
    for suffix in _SUFFIXES:
        if rel.endswith(suffix):
            rel = rel[: -len(suffix)]
            break
    if rel.startswith("configs/"):
        rel = rel[len("configs/"):]
    if kind == "data" and rel.startswith("data/"):
        rel = rel[len("data/"):]
    return rel if rel and "/" not in rel and not rel.startswith(".") else None


def resolve_config(ref: str | os.PathLike, kind: ConfigKind = "run") -> Path:
    """The YAML file ``ref`` names: an existing file, else the packaged config of that name.

    Raises ValueError naming the reference and listing the packaged names when neither exists.
    """
    _check_kind(kind)
    if not isinstance(ref, (str, os.PathLike)):
        raise TypeError(f"config: expected a name or a path, got {type(ref).__name__}")
    path = Path(os.path.expanduser(os.fspath(ref)))
    if path.is_file():
        return path
    name = _packaged_name(os.fspath(ref), kind)
    if name is not None:
        candidate = config_dir(kind) / f"{name}.yaml"
        if candidate.is_file():
            return candidate
    what = "config" if kind == "run" else "manifest"
    raise ValueError(f"{what}: no such file or named {what} {os.fspath(ref)!r}; named {what}s: "
                     f"{', '.join(config_names(kind))} (python -m hope.train --list)")


@dataclass(frozen=True)
class ConfigInfo:
    """One line of ``python -m hope.train --list``."""

    name: str
    path: Path
    description: str  # the file's first comment line
    model: str        # the model preset (or ``hf:<base>`` for a Hugging Face base model)
    steps: int | None
    tokens_per_step: int | None  # batch_size x seq_len, one rank

    @property
    def total_tokens(self) -> int | None:
        return self.steps * self.tokens_per_step if self.steps and self.tokens_per_step else None


def _first_comment(text: str) -> str:
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            return stripped.lstrip("#").strip()
        if stripped:
            break
    return ""


def describe_configs() -> list[ConfigInfo]:
    """Every packaged run config with its description, model, steps and tokens per step."""
    from hope.yamlio import load_yaml

    infos = []
    for name in config_names("run"):
        path = config_dir("run") / f"{name}.yaml"
        text = path.read_text(encoding="utf-8")
        data = load_yaml(text) or {}
        model = data.get("model") or {}
        label = f"hf:{model['hf']}" if "hf" in model else str(model.get("preset", model.get("arch", "?")))
        steps, batch, seq = data.get("steps"), data.get("batch_size"), data.get("seq_len")
        infos.append(ConfigInfo(name, path, _first_comment(text), label, steps,
                                batch * seq if isinstance(batch, int) and isinstance(seq, int) else None))
    return infos


def format_count(n: int | float | None) -> str:
    """``3000008704`` -> ``3.00B``; ``159196224`` -> ``159.2M``."""
    if n is None:
        return "?"
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}" if unit in ("T", "B") else f"{n / scale:.1f}{unit}"
    return str(int(n))


def format_config_list(infos: list[ConfigInfo] | None = None, width: int = 120) -> str:
    """The ``--list`` table: name, model, steps x tokens per step = total tokens, description."""
    infos = describe_configs() if infos is None else infos
    rows = []
    for info in infos:
        budget = (f"{info.steps} x {format_count(info.tokens_per_step)} = {format_count(info.total_tokens)} tok"
                  if info.total_tokens else "")
        rows.append((info.name, info.model, budget, info.description))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = []
    for row in rows:
        line = "  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3]
        lines.append(line if len(line) <= width else line[: width - 3] + "...")
    return "\n".join(lines)


__all__ = ["ConfigInfo", "config_dir", "config_names", "describe_configs", "format_config_list", "format_count",
           "resolve_config"]
