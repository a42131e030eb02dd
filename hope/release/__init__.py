"""Release packaging (sprint plan P5): ``python -m hope.release <run_dir>``.

Copies the best checkpoint (lowest validation loss; else the latest), the resolved config, the logs, the
eval JSONs and plots into ``<run_dir>/release/`` with a ``metadata.json`` (git commit, package versions,
tokenizer sha256, data shard sha256s, sha256 of every released file), then verifies the folder.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path

PACKAGES = ("hope", "torch", "triton", "numpy", "safetensors", "sentencepiece", "wandb", "pyyaml")


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def git_commit(repo=None) -> dict:
    """HEAD commit and whether the work tree has uncommitted changes (None when not a git checkout)."""
    repo = Path(repo or Path(__file__).resolve().parents[2])
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                timeout=30, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=30, check=True).stdout.strip() != ""
        return {"commit": commit, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def package_versions() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    versions["python"] = platform.python_version()
    return versions


def _best_step_dir(run_dir: Path) -> Path:
    from hope.train.checkpoint import resolve_step_dir

    best = run_dir / "checkpoints" / "best"
    if best.is_file():
        candidate = run_dir / "checkpoints" / best.read_text().strip()
        if candidate.is_dir():
            return resolve_step_dir(candidate, files=None)
    return resolve_step_dir(run_dir, files=None)


def _shard_hashes(data_dir) -> dict:
    index_path = Path(data_dir) / "index.json" if data_dir else None
    if index_path is None or not index_path.is_file():
        return {}
    index = json.loads(index_path.read_text())
    return {shard["path"]: shard["sha256"] for src in index["sources"].values()
            for split in src["splits"].values() for shard in split["shards"]}


def release(run_dir) -> Path:
    """Build and verify ``<run_dir>/release/``; returns its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run_dir: {str(run_dir)!r} is not a folder")
    step_dir = _best_step_dir(run_dir)
    state = json.loads((step_dir / "state.json").read_text())
    out = run_dir / "release"
    tmp = run_dir / f".release-tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "checkpoint").mkdir(parents=True)
    for name in [*state["files"], "state.json"]:  # the checkpoint's files (verified), as state.json lists them
        shutil.copy2(step_dir / name, tmp / "checkpoint" / name)
    for name in ("config.yaml", "log.jsonl"):
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, tmp / name)
    for sub in ("eval", "plots"):
        if (run_dir / sub).is_dir():
            shutil.copytree(run_dir / sub, tmp / sub)
    tok = state.get("tokenizer", {})
    tok_path = Path(tok.get("path", ""))
    if tok_path.is_file():
        shutil.copy2(tok_path, tmp / "tokenizer.model")
    files = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    metadata = {
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run_dir": str(run_dir.resolve()), "checkpoint": step_dir.name, "step": state["step"],
        "tokens_seen": state.get("tokens_seen"), "val_loss": state.get("val_loss"),
        "git": git_commit(), "packages": package_versions(),
        "tokenizer": {"sha256": tok.get("sha256"), "source_path": tok.get("path")},
        "data": {"dir": state.get("data_dir"), "shards_sha256": _shard_hashes(state.get("data_dir"))},
        "model_config": state["model_config"], "files_sha256": files,
    }
    (tmp / "metadata.json").write_text(json.dumps(metadata, indent=1, sort_keys=True))
    if out.exists():
        shutil.rmtree(out)
    os.rename(tmp, out)
    verify(out)
    return out


def verify(release_dir) -> dict:
    """Check every file's sha256, the tokenizer hash and that the checkpoint loads; raises ValueError."""
    from hope.train.checkpoint import load_model

    release_dir = Path(release_dir)
    meta_path = release_dir / "metadata.json"
    if not meta_path.is_file():
        raise ValueError(f"release_dir: no metadata.json in {str(release_dir)!r}")
    meta = json.loads(meta_path.read_text())
    for rel, digest in meta["files_sha256"].items():
        path = release_dir / rel
        if not path.is_file():
            raise ValueError(f"release: {rel} is missing")
        if sha256_file(path) != digest:
            raise ValueError(f"release: {rel} sha256 mismatch")
    if (release_dir / "tokenizer.model").is_file() and meta["tokenizer"]["sha256"] != \
            sha256_file(release_dir / "tokenizer.model"):
        raise ValueError("release: tokenizer.model does not match the checkpoint's tokenizer sha256")
    load_model(release_dir / "checkpoint", strict=True)
    return meta


__all__ = ["release", "verify", "git_commit", "package_versions", "sha256_file"]
