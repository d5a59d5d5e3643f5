"""Write certificate files so that readers never see a half-written set.

Single files go through temp file + fsync + rename. A *set* of files (certificate,
key, bundle) must change together, or a reader could pair a new certificate with an
old key; for that we use the layout Kubernetes uses for secret volumes (its
`AtomicWriter`): each version is a hidden directory, `..data` is a symlink to the
current one, and the visible names are stable symlinks through `..data`. Swapping
`..data` with rename(2) switches every file at once; a failure before the swap
leaves the previous version untouched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

DATA_LINK = "..data"
_VERSION_PREFIX = "..v"

PRIVATE_FILE_MODE = 0o600
PUBLIC_FILE_MODE = 0o644
PRIVATE_DIR_MODE = 0o700


def ensure_private_dir(directory: Path) -> Path:
    """Create `directory` (and parents) and make it 0700, the home of private keys."""
    directory = Path(directory)
    directory.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    if directory.stat().st_mode & 0o777 != PRIVATE_DIR_MODE:
        directory.chmod(PRIVATE_DIR_MODE)
    return directory


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fill(fd: int, data: bytes, mode: int) -> None:
    """Set `mode` exactly (the umask may have narrowed it), write `data`, fsync, close."""
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create `path` (which must not exist) with `mode` from its first byte, never wider."""
    _fill(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode & PRIVATE_FILE_MODE), data, mode)


def write_file_atomic(path: Path, data: bytes, mode: int) -> Path:
    """Replace one file atomically: temp file in the same directory, fsync, rename, fsync dir."""
    path = Path(path)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # created 0600
    try:
        _fill(fd, data, mode)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    _fsync_dir(path.parent)
    return path


def _point(link: Path, target: str) -> None:
    """Make `link` a symlink to `target`, replacing whatever is there in one rename."""
    if link.is_symlink() and os.readlink(link) == target:
        return
    temporary = link.with_name(f"{link.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temporary)
    os.symlink(target, temporary)
    os.replace(temporary, link)


def publish_files(
    directory: Path,
    files: Mapping[str, tuple[bytes, int]],
    *,
    check: Callable[[Path], None] | None = None,
) -> dict[str, Path]:
    """Atomically make `directory/<name>` hold `files` ({name: (content, mode)}) as one version.

    `check(version_directory)` runs on the complete new version before the swap: if it raises,
    the version is deleted and the previous one stays current (the loader has OpenSSL load it).
    Names of the previous version that the new one lacks are removed, so nothing stale
    stays behind (for example a key after a downgrade to TLS).
    """
    directory = ensure_private_dir(directory)
    version = Path(tempfile.mkdtemp(prefix=_VERSION_PREFIX, dir=directory))
    try:
        for name, (content, mode) in files.items():
            _write_new(version / name, content, mode)
        _fsync_dir(version)
        if check is not None:
            check(version)
        _point(directory / DATA_LINK, version.name)
    except BaseException:
        shutil.rmtree(version, ignore_errors=True)
        raise
    for name in files:
        _point(directory / name, f"{DATA_LINK}/{name}")
    for entry in directory.iterdir():
        if entry.is_symlink() and entry.name not in files and os.readlink(entry).startswith(f"{DATA_LINK}/"):
            entry.unlink()
        elif entry.name.startswith(_VERSION_PREFIX) and entry.name != version.name:
            shutil.rmtree(entry, ignore_errors=True)
    _fsync_dir(directory)
    return {name: directory / name for name in files}
