"""Small file helpers: atomic writes so an interrupted run never leaves a half-written artifact."""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path


def cache_root() -> Path:
    """spd's cache folder: $SPD_CACHE_DIR, else $XDG_CACHE_HOME/spd, else ~/.cache/spd."""
    if os.environ.get("SPD_CACHE_DIR"):
        return Path(os.environ["SPD_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "spd"


@contextlib.contextmanager
def atomic_dir(target: Path):
    """Yield a temporary folder beside ``target``; on success it is renamed to ``target`` in one step."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        if target.exists():  # another process finished first: keep theirs
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(target: Path, mode: str = "wb"):
    """Yield a file object on a temporary path beside ``target``; renamed over ``target`` on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def write_if_changed(path: str | Path, data: bytes) -> bool:
    """Write ``data`` to ``path`` atomically unless it already holds these bytes. Returns whether it wrote."""
    path = Path(path)
    if path.is_file() and path.read_bytes() == data:
        return False
    with atomic_file(path, "wb") as fh:
        fh.write(data)
    return True
