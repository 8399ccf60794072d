"""Write outputs so that a failure never leaves anything half-written.

Every file or directory is built under a temporary name beside its destination and renamed into
place only when complete (rename is atomic within one filesystem). Replacing a directory takes two
renames (old → ``.NAME.previous``, new → ``NAME``); a kill between them leaves only the previous
version, which ``restore_interrupted`` (called by every writer and by the checkpoint / artifact
readers) puts back, so an interrupted save never loses the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import socket
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator

from .errors import StampError


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _remove_orphans(directory: Path) -> None:
    """Delete the temporaries in ``directory`` left by killed writers on this host (their process is
    gone) — files and directories, whatever output they were for — so a run that is killed and
    restarted many times does not pile up checkpoint-sized directories, and a killed conversion's
    half-written dataset goes away at the next write beside it. Another host's temporaries are left
    alone: their process cannot be checked from here."""
    marker = f".tmp-{socket.gethostname()}-"
    with contextlib.suppress(OSError):
        for tmp in directory.glob(f".*{glob.escape(marker)}*"):
            pid = tmp.name.rpartition(marker)[2].split("-")[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                if tmp.is_dir() and not tmp.is_symlink():
                    shutil.rmtree(tmp, ignore_errors=True)
                else:
                    tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _previous(path: Path) -> Path:
    return path.with_name(f".{path.name}.previous")


def restore_interrupted(path: str | os.PathLike) -> None:
    """If a directory swap was killed between its two renames, move the previous version back."""
    path = Path(path)
    if not path.exists() and _previous(path).is_dir():
        os.replace(_previous(path), path)


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``out`` only if the block finishes without error."""
    out = Path(out)
    restore_interrupted(out)
    if out.exists() and not overwrite:
        raise StampError(f"output directory {out} already exists; choose another path or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(out.parent)
    tmp = _tmp_sibling(out)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        # Keep the old output until the new one is complete, then swap.
        old = _previous(out)
        shutil.rmtree(old, ignore_errors=True)  # left by a swap killed after its second rename
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    _fsync_dir(out.parent)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path; on success it is fsynced and renamed to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(path.parent)
    tmp = _tmp_sibling(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def check_writable(out: str | os.PathLike, what: str = "output directory", new: bool = True) -> None:
    """Fail now — before any compute — when ``out`` cannot be written: it exists (with ``new``), it or a
    parent is a file, or the location is read-only or full. Creates nothing that stays (a probe file is
    written and removed)."""
    out = Path(out)
    restore_interrupted(out)
    if new and out.exists():
        raise StampError(f"{what} {out} already exists; choose another path or remove it")
    existing = next(p for p in [out, *out.parents] if p.exists() or p == Path(p.anchor))
    if not existing.is_dir():
        raise StampError(f"cannot create {what} {out}: {existing} is a file, not a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".stamp-write-probe-") as f:
            f.write(b"\0" * 65536)  # some data, so that a full disk fails here rather than after the run
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise StampError(f"cannot write {what} {out}: {existing} is not writable ({e.strerror}); "
                         "free some space or choose another location") from None


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise StampError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StampError(f"{what} {path} is not valid JSON ({e}); regenerate it") from None
