"""One run per run directory: an OS advisory lock (flock) on `RUN_DIR/.loraforge.lock`.

The writer process (rank 0) takes the lock before any work; a second `loraforge train` on the same
directory stops at once with one line naming the directory and the holder (pid, host, since when).
The lock is the kernel's: it goes away with the process that holds it, however it ends (SIGKILL,
OOM-kill, node reboot on a local disk), so a crashed run never leaves the directory stuck; the file's
content (holder pid/host/time) is only there to be shown.

What is guaranteed where:
- one machine, any local filesystem: exclusive, released by the kernel on exit;
- NFS (v3 with lockd, v4): Linux maps flock onto NFS byte-range locks, so it holds across nodes; a
  holder's node that dies is released when the server's lease/lock recovery expires it (NFSv4: ~90 s);
- Lustre needs the `flock` mount option (with `localflock` the lock is per node only; without either
  flock fails and loraforge says so); GPFS/Spectrum Scale and BeeGFS (`tuneUseGlobalFileLocks`) hold
  across nodes; any filesystem where flock is node-local gives a per-node guarantee only.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from loraforge import checkpoints
from loraforge.errors import UserError
from loraforge.rundir import LOCK_FILE

MIN_FREE = 64 << 20  # below this, not even the run's metadata and first checkpoint fit: stop before any work

_held: dict[str, "RunLock"] = {}  # realpath -> lock held by this process (re-entrant within one process)


class RunLock:
    def __init__(self, run_dir: Path, fd: int, created_dir: bool):
        self.run_dir, self.fd, self.created_dir, self.depth = run_dir, fd, created_dir, 1

    @property
    def path(self) -> Path:
        return self.run_dir / LOCK_FILE


def holder_text(info: dict) -> str:
    """'pid 123 on host since 2026-01-01 10:00:00 UTC' from the lock file's content."""
    if not info:
        return "another process (it is starting up)"
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info["since"])) if info.get("since") else "?"
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')} since {since}"


def _read_info(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _make_dir(run_dir: Path) -> bool:
    """Create the run directory (and parents); True if it did not exist. Path problems are user errors."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"output_dir: {run_dir} is an existing file, not a directory; set output_dir to a directory path")
    for parent in run_dir.parents:
        if parent.exists() and not parent.is_dir():
            raise UserError(f"output_dir: {parent} (a parent of {run_dir}) is a file; set output_dir elsewhere")
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except PermissionError:
        raise UserError(f"output_dir: cannot create {run_dir} (permission denied); choose a writable location") from None
    except OSError as e:
        raise UserError(f"output_dir: cannot create {run_dir} ({e.strerror}); choose another location") from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise UserError(f"output_dir: {run_dir} is not writable; choose a writable location or fix its permissions")
    return created


def acquire(run_dir: str | Path) -> RunLock:
    """Take the run directory's lock (creating the directory), or raise a UserError naming the holder."""
    import fcntl

    run_dir = Path(run_dir).expanduser()
    key = os.path.realpath(run_dir)
    if key in _held:
        _held[key].depth += 1
        return _held[key]
    created = _make_dir(run_dir)
    path = run_dir / LOCK_FILE
    for _ in range(20):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"output_dir: cannot write {path} ({e.strerror}); choose a writable location") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UserError(
                    f"{run_dir}: another loraforge run is using this directory ({holder_text(_read_info(path))}); "
                    "wait for it to finish or stop it, or set output_dir to another directory"
                ) from None
            raise UserError(
                f"{run_dir}: this filesystem does not support file locks ({e.strerror}); on Lustre mount with "
                "-o flock, or put output_dir on a filesystem that does"
            ) from None
        try:  # the holder before us may have removed the file after we opened it: lock the file that is there
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    else:
        raise UserError(f"{run_dir}: could not take the run lock {path}; retry")
    info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        if checkpoints.free_bytes(run_dir) < MIN_FREE:
            raise OSError(errno.ENOSPC, "No space left on device")
    except OSError as e:
        os.close(fd)
        path.unlink(missing_ok=True)
        if created:
            run_dir.rmdir()
        raise UserError(f"output_dir: cannot write to {run_dir} ({e.strerror}); free some space or choose another location") from None
    lock = RunLock(run_dir, fd, created)
    _held[key] = lock
    return lock


def release(lock: RunLock) -> None:
    """Drop the lock; remove the lock file, and the run directory if this run created it and left it empty."""
    lock.depth -= 1
    if lock.depth > 0:
        return
    _held.pop(os.path.realpath(lock.run_dir), None)
    try:
        lock.path.unlink(missing_ok=True)  # while still holding it: a waiter re-checks the inode (acquire)
    finally:
        os.close(lock.fd)
    if lock.created_dir:
        try:
            lock.run_dir.rmdir()  # only if empty: a run stopped by a user error before writing anything
        except OSError:
            pass


@contextmanager
def hold(run_dir: str | Path, enabled: bool = True):
    """`with hold(output_dir, enabled=is_writer):` — the lock for the body's duration (no-op when not enabled)."""
    if not enabled:
        yield None
        return
    lock = acquire(run_dir)
    try:
        yield lock
    finally:
        release(lock)
