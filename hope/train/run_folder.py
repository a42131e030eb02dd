"""The run folder: which folder a run writes to, its lock, and where a resume starts (docs/runs.md).

One run at a time owns a folder: ``run.lock`` holds the owner's pid and host and an exclusive ``flock`` for as
long as the run lives (the kernel drops it when the process dies, even on ``kill -9``: a lock file nobody holds
is stale and taken over). On file systems without ``flock`` the pid decides: a lock of a pid that no longer
runs on this host is stale; one from another host is never taken over.

A new run (``resume=none``) never writes into a folder that holds a run; ``resume=auto`` continues from the
newest checkpoint that verifies and never starts afresh over checkpoints that do not.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from hope.train import checkpoint as ckpt
from hope.train.errors import RunError
from hope.train.logging import count_records

LOCK_FILE = "run.lock"
# files only a run writes: a folder holding one of them holds a run
_RUN_FILES = ("config.yaml", "log.jsonl", "checkpoints")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _read_owner(path: Path) -> dict:
    try:
        owner = json.loads(path.read_text())
        return owner if isinstance(owner, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe(owner: dict) -> str:
    return f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')} (since {owner.get('started', '?')})"


class RunLock:
    """The lock of one run folder (``RunLock.acquire(folder)``; ``release()`` when the run ends)."""

    def __init__(self, path: Path, fd: int | None):
        self.path, self._fd = path, fd

    @classmethod
    def acquire(cls, folder) -> "RunLock":
        """Take ``<folder>/run.lock`` or raise RunError naming the live owner; warns when taking over a stale one."""
        path = Path(folder) / LOCK_FILE
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        for _ in range(5):  # retried only when the file was replaced under us
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RunError(f"run_dir {path.parent}: in use by the run of {_describe(_read_owner(path))} "
                               f"(lock {path}); wait for it to end or choose another folder (run_dir=...)") from None
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                return cls._acquire_without_flock(path, me)
            try:
                same_file = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same_file = False
            if not same_file:  # the previous owner removed it between our open and flock
                os.close(fd)
                continue
            previous = _read_owner(path)
            if previous:
                warnings.warn(f"run_dir {path.parent}: took over the stale lock of {_describe(previous)}: "
                              "that run has ended", stacklevel=2)
            cls._write(fd, me)
            return cls(path, fd)
        raise RunError(f"run_dir {path.parent}: could not take the lock {path} (it keeps being replaced)")

    @staticmethod
    def _write(fd: int, owner: dict) -> None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner).encode(), 0)
        os.fsync(fd)

    @classmethod
    def _acquire_without_flock(cls, path: Path, me: dict) -> "RunLock":
        for _ in range(5):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                owner = _read_owner(path)
                pid = owner.get("pid")
                if owner.get("host") != me["host"]:
                    raise RunError(f"run_dir {path.parent}: locked by the run of {_describe(owner)}, which cannot be "
                                   f"checked from here; if that run has ended, remove {path}") from None
                if isinstance(pid, int) and _pid_alive(pid):
                    raise RunError(f"run_dir {path.parent}: in use by the run of {_describe(owner)} (lock {path}); "
                                   "wait for it to end or choose another folder (run_dir=...)") from None
                warnings.warn(f"run_dir {path.parent}: took over the stale lock of {_describe(owner)}: "
                              "that process has ended", stacklevel=3)
                path.unlink(missing_ok=True)
                continue
            cls._write(fd, me)
            os.close(fd)
            return cls(path, None)
        raise RunError(f"run_dir {path.parent}: could not take the lock {path}")

    def release(self) -> None:
        """Remove the lock file (while still holding the lock, so no one can lock the old file meanwhile)."""
        if self.path is None:
            return
        try:
            if _read_owner(self.path).get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
        finally:
            if self._fd is not None:
                os.close(self._fd)
            self.path, self._fd = None, None

    @property
    def held(self) -> bool:
        return self.path is not None


@dataclass
class RunFolder:
    """Where the run writes (``path``), its lock, and the checkpoint it resumes from (None: a fresh run);
    ``skipped``: newer checkpoints passed over and why."""
    path: Path
    lock: RunLock | None = None
    resume_from: Path | None = None
    skipped: dict = field(default_factory=dict)


def _holds_a_run(folder: Path) -> list[str]:
    return [name for name in _RUN_FILES if (folder / name).exists()]


def _newest_run_with_checkpoints(out_dir: Path, name: str) -> Path | None:
    runs = [p for p in sorted(out_dir.glob(f"{name}-*")) if p.is_dir() and ckpt.has_checkpoints(p)]
    return runs[-1] if runs else None


def open_run_folder(cfg, stamp: str) -> RunFolder:
    """Pick the run folder of ``cfg`` (``<out_dir>/<name>-<stamp>`` when none is given), lock it and find the
    checkpoint to resume from. Raises RunError (lock released, nothing in the folder changed) when the folder is
    in use, holds a run and ``resume`` is none, or holds checkpoints of which none verifies."""
    if cfg.run_dir:
        path = Path(cfg.run_dir)
    elif cfg.resume == "auto" and (previous := _newest_run_with_checkpoints(Path(cfg.out_dir), cfg.name)):
        path = previous  # resume=auto without run_dir: the newest run of this name that has a checkpoint
    else:
        path = Path(cfg.out_dir) / f"{cfg.name}-{stamp}"
    path.mkdir(parents=True, exist_ok=True)
    lock = RunLock.acquire(path)
    try:
        folder = RunFolder(path, lock)
        if cfg.resume == "none":
            held = _holds_a_run(path)
            if held:
                raise RunError(f"run_dir {path}: holds a run already ({', '.join(held)}); continue it with "
                               "resume=auto, or start a new run in another folder (run_dir=<new folder>, or no "
                               "run_dir for a new timestamped folder under out_dir)")
        elif cfg.resume == "auto":
            folder.resume_from, folder.skipped = ckpt.select_checkpoint(path)
            if folder.resume_from is None and ckpt.has_checkpoints(path):
                raise RunError(f"run_dir {path}: no checkpoint verifies, not starting afresh over them: " +
                               "; ".join(f"{k}: {v}" for k, v in folder.skipped.items()) +
                               "; repair or move them away, or start a new run in another folder (run_dir=...)")
            if folder.resume_from is None and (records := count_records(path / "log.jsonl")):
                raise RunError(f"run_dir {path}: holds a run ({records} records in log.jsonl) but no checkpoint to "
                               "resume from; start a new run in another folder (run_dir=...)")
        else:
            try:
                folder.resume_from = ckpt.resolve_step_dir(cfg.resume, files=None)
            except (ckpt.CheckpointError, FileNotFoundError) as e:
                raise RunError(f"resume: {e}") from None
        return folder
    except BaseException:
        lock.release()
        raise


__all__ = ["RunLock", "RunFolder", "open_run_folder", "LOCK_FILE"]
