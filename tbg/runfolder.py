"""Run folders: one process at a time, a manifest of what defines the run, per-process temporary files
(docs/architecture.md, "Run folders", lists the files every job writes).

Every job that writes into an output folder (training, sampling, simulation, evaluation, refinement)
holds the folder's lock while it runs (``exclusive``): an advisory ``fcntl.flock`` on a lock file in the
folder, which the operating system drops when the process exits or dies, so a crash never leaves a stale
lock. A second process is refused with a message naming the holder (its pid and command, from the
kernel's lock table on Linux). Nothing is ever written to the lock file, so a refused run leaves the folder
as it was. The lock is re-entrant within a thread: a job that calls another job on the same folder keeps it.

A resumable job also records what defines its results in ``run.json`` (``claimed``): the molecule, the
checkpoint, the options that change results. A rerun compares its own record with the one on disk and
refuses a difference, naming the first field that differs, instead of mixing two runs in one folder. The
comparison runs once before the lock is taken (a refused run does not even create the lock file) and once
more under it (another process may have started a run meanwhile).

Files written while a job runs go to a temporary name that carries the process id (``temporary_path``)
and are renamed into place (``write_atomically``): a kill or a full disk never leaves half a file under
the real name, and two writers never share a temporary file.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shlex
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tbg.errors import InputError

log = logging.getLogger("tbg")

__all__ = ["LOCK_FILE", "MANIFEST_FILE", "FolderInUse", "arrays_sha256", "check_manifest", "claimed", "exclusive",
           "file_sha256",
           "read_json",
           "temporary_path", "write_atomically", "write_json"]

LOCK_FILE = ".tbg.lock"
MANIFEST_FILE = "run.json"
MANIFEST_VERSION = 1


class FolderInUse(InputError):
    """The output folder is held by another process (or another thread of this one)."""


# ---------------------------------------------------------------------------------------------------
# Files.

def temporary_path(path: str | Path) -> Path:
    """A hidden name beside ``path`` for this process's temporary copy, keeping the suffix (np.savez and
    mdtraj choose the format by it): run/samples.npz -> run/.samples.<pid>.tmp.npz."""
    path = Path(path)
    return path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")


def write_atomically(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """``write(tmp)`` to this process's temporary name, then rename it to ``path``; the temporary file is
    removed when writing fails (e.g. a full disk), leaving ``path`` as it was."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=1)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())

    return write_atomically(path, write)


def arrays_sha256(*arrays: Any) -> str:
    """SHA-256 of arrays (numpy, or anything np.asarray takes: CPU tensors), their dtypes and shapes included."""
    digest = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        digest.update(f"{a.dtype.str}{a.shape}".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: str | Path, what: str) -> Any:
    """The JSON in ``path``; InputError naming the file (and ``what`` it should be) when it is unreadable."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: not a readable {what} ({type(err).__name__}: {err}); restore it, or start "
                         f"over in a new folder") from err


# ---------------------------------------------------------------------------------------------------
# The lock.

@dataclass
class _Held:
    fd: int
    thread: int
    depth: int
    locked: bool = True  # False on a file system without locks (a warning said so)


_HELD: dict[Path, _Held] = {}
_HELD_GUARD = threading.Lock()


def _lock_holder(fd: int) -> str:
    """Who holds the flock on the open file ``fd``: found in /proc/locks (Linux) by the file's device and
    inode, with the holder's command line from /proc/<pid>/cmdline; "another process" where that fails."""
    st = os.fstat(fd)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return "another process"
    pids = [int(f[4]) for f in (line.split() for line in lines) if len(f) > 5 and f[1] == "FLOCK" and f[5] == key]
    if not pids:
        return "another process"
    if pids[0] == os.getpid():
        return "this process (another thread)"
    try:
        argv = Path(f"/proc/{pids[0]}/cmdline").read_bytes().rstrip(b"\0").decode(errors="replace").split("\0")
        command = shlex.join([Path(argv[0]).name, *argv[1:]])[:300]
    except (OSError, IndexError):
        command = ""
    return f"process {pids[0]}" + (f" ({command})" if command else "")


@contextmanager
def exclusive(folder: str | Path, lock_name: str = LOCK_FILE) -> Iterator[Path]:
    """Hold the lock ``folder/lock_name`` (creating the folder) while the block runs; FolderInUse if another
    process or thread holds it. ``lock_name`` lets one folder hold several runs (tbg.chem.md: one per
    molecule)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = (folder / lock_name).resolve()
    me = threading.get_ident()
    with _HELD_GUARD:
        held = _HELD.get(path)
        if held is not None and held.thread == me:
            held.depth += 1
    if held is None or held.thread != me:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise FolderInUse(f"{folder} is in use by {holder}; wait for it to finish, or choose another output "
                              f"folder") from None
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            log.warning("%s: the file system offers no locks (%s); nothing keeps a second process out of this "
                        "folder", folder, err)
            locked = False
        except BaseException:
            os.close(fd)
            raise
        held = _Held(fd, me, 1, locked)
        with _HELD_GUARD:
            _HELD[path] = held
    try:
        yield folder
    finally:
        with _HELD_GUARD:
            held.depth -= 1
            last = held.depth == 0
            if last:
                del _HELD[path]
        if last:
            if held.locked:
                fcntl.flock(held.fd, fcntl.LOCK_UN)
            os.close(held.fd)


# ---------------------------------------------------------------------------------------------------
# The manifest.

def _plain(obj: Any) -> Any:
    """``obj`` as JSON gives it back (tuples -> lists, ...), so that a fresh record compares equal to one read
    from disk."""
    return json.loads(json.dumps(obj))


def _first_difference(old: Any, new: Any, where: str = "") -> tuple[str, Any, Any] | None:
    """(dotted path, old value, new value) of the first difference between two JSON values, or None."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in [*old, *(k for k in new if k not in old)]:
            if key not in old or key not in new:
                return f"{where}{key}", old.get(key, "(absent)"), new.get(key, "(absent)")
            found = _first_difference(old[key], new[key], f"{where}{key}.")
            if found:
                return found
        return None
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            found = _first_difference(a, b, f"{where[:-1]}[{i}].")
            if found:
                return found
        return None
    return None if old == new else (where.rstrip("."), old, new)


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_manifest(folder: str | Path, kind: str, defines: Mapping[str, Any], *, work: Sequence[str] = ()) -> bool:
    """Whether ``folder`` holds a ``kind`` run defined by ``defines`` (True) or no run yet (False); raises
    InputError when it holds another run: a differing manifest, or ``work`` files (e.g. "checkpoints")
    without one. Reads only."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not path.is_file():
        found = [name for name in work if (folder / name).exists()]
        if found:
            raise InputError(f"{folder} holds {', '.join(found)} but no {MANIFEST_FILE} saying which run made "
                             f"them (an older tbg, or a copy); choose a new output folder")
        return False
    on_disk = read_json(path, "run manifest")
    if not isinstance(on_disk, dict) or not isinstance(on_disk.get("defines"), dict):
        raise InputError(f"{path}: not a tbg run manifest (no 'defines' entry); restore it, or start over in a "
                         f"new folder")
    if on_disk.get("kind") != kind:
        raise InputError(f"{folder} holds a {on_disk.get('kind')} run, not a {kind} run; choose another output "
                         f"folder")
    difference = _first_difference(on_disk["defines"], _plain(dict(defines)))
    if difference is not None:
        field, old, new = difference
        raise InputError(f"{folder} holds a {kind} run with other inputs: {field} is {_short(old)} there but "
                         f"{_short(new)} now; rerun with that run's inputs to resume it, or start a new run in "
                         f"another output folder")
    return True


@contextmanager
def claimed(folder: str | Path, kind: str, defines: Mapping[str, Any], *, info: Mapping[str, Any] | None = None,
            work: Sequence[str] = ()) -> Iterator[Path]:
    """Hold ``folder`` (``exclusive``) for a ``kind`` run defined by ``defines`` while the block runs: the
    manifest on disk must match (``check_manifest``; checked before the lock, so a refused run changes
    nothing, and again under it) or is written (with ``info``, which is recorded but not compared)."""
    folder = Path(folder)
    defines = _plain(dict(defines))
    check_manifest(folder, kind, defines, work=work)
    with exclusive(folder):
        if not check_manifest(folder, kind, defines, work=work):
            write_json(folder / MANIFEST_FILE, {"kind": kind, "version": MANIFEST_VERSION, "defines": defines,
                                                "info": _plain(dict(info or {}))})
        yield folder
