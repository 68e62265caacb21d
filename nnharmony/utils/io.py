"""Atomic writes: a file is either the old version or the complete new one, never half-written."""
from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

_DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_NEARLY_FULL_BYTES = 64 * 1024


class DiskFullError(OSError, ValueError):
    """No space left (ENOSPC, or a quota, EDQUOT) while writing a file; the previous version of the file is kept.
    One line that names the file. A ValueError too, so the command-line tools print it as ``error: ...``."""

    def __init__(self, path: str | os.PathLike, existed: bool):
        name = Path(path).name
        kept = f"previous {name} kept" if existed else f"no {name} written"
        self.message = f"no space left on device while writing {path}; {kept}"
        super().__init__(errno.ENOSPC, self.message)
        self.path = str(path)

    def __str__(self) -> str:
        return self.message


def disk_nearly_full(folder: str | os.PathLike) -> bool:
    """Whether the file system of ``folder`` has (almost) no space left for this process: the sign of a failed
    write when a writer does not report the error (SimpleITK's NIfTI writer only prints it; torch.save raises a
    RuntimeError without errno)."""
    try:
        if hasattr(os, "statvfs"):
            st = os.statvfs(folder)
            blocks = st.f_bfree if hasattr(os, "geteuid") and os.geteuid() == 0 else st.f_bavail  # root: reserve too
            return blocks * st.f_frsize < _NEARLY_FULL_BYTES
        import shutil

        return shutil.disk_usage(folder).free < _NEARLY_FULL_BYTES
    except OSError:
        return False


def is_disk_full_error(exc: BaseException, folder: str | os.PathLike) -> bool:
    """``exc`` (raised while writing into ``folder``) means the disk or quota is full. Call it before removing
    the partial file, while its space is still taken."""
    if isinstance(exc, DiskFullError):
        return True
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS:
        return True
    if "no space left on device" in str(exc).lower() or "disk quota exceeded" in str(exc).lower():
        return True
    return isinstance(exc, (OSError, RuntimeError)) and disk_nearly_full(folder)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` and move the result onto ``path`` in one rename.

    On any error the temporary file is removed and ``path`` is left as it was; a full disk (or quota) is
    reported as :class:`DiskFullError`, one line naming ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    existed = path.exists()
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:  # no inode / no block left for even an empty file
        if is_disk_full_error(e, path.parent):
            raise DiskFullError(path, existed) from e
        raise
    os.close(fd)
    try:
        write(tmp)
        _fsync_file(tmp)  # a write error the file system reports late (delayed allocation) surfaces here
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the permissions open() would
        os.replace(tmp, path)
    except BaseException as e:
        full = isinstance(e, Exception) and is_disk_full_error(e, path.parent)  # while the partial file exists
        if os.path.exists(tmp):
            os.remove(tmp)
        if full:
            raise DiskFullError(path, existed) from e
        raise


def _fsync_file(path: str) -> None:
    """Flush ``path`` to disk; errors other than a full disk or an I/O error (a file system without fsync) are
    ignored."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno in _DISK_FULL_ERRNOS or e.errno == errno.EIO:
            raise
    finally:
        os.close(fd)


def _read_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it; done once at import, before any threads start
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _json_default(o: Any) -> Any:
    """numpy scalars/arrays (as nnU-Net's planners produce them) become plain JSON values."""
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")


def save_json_atomic(obj: Any, path: str | os.PathLike, indent: int = 2) -> None:
    def _write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=indent, sort_keys=False, default=_json_default)
            f.write("\n")

    atomic_write(path, _write)


def load_json(path: str | os.PathLike) -> Any:
    """Load JSON with an error that names the file."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None


class _ErrorRecordingFile:
    """A binary file for torch.save that keeps the OSError of a failed write: torch turns it into a RuntimeError
    without errno ("unexpected pos ..."), which would hide a full disk."""

    def __init__(self, f):
        self.f = f
        self.error: OSError | None = None

    def write(self, b) -> int:
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        try:
            self.f.flush()
        except OSError as e:
            self.error = e
            raise


def save_torch_atomic(obj: Any, path: str | os.PathLike) -> None:
    """torch.save into a temporary file, then one rename (see :func:`atomic_write`); on a full disk the previous
    ``path`` is kept and :class:`DiskFullError` names it."""
    import torch

    def _write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            rec = _ErrorRecordingFile(f)
            try:
                torch.save(obj, rec)
            except RuntimeError as e:
                if rec.error is not None:
                    raise rec.error from e
                raise

    atomic_write(path, _write)
