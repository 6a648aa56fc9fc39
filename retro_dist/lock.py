"""One job per directory: an exclusive lock on a run directory (train) or a dataset directory (prepare).

    lock = hold_directory(run_dir, "training")   # LockHeld (one line naming the holder) if another job has it
    ...                                          # keep `lock` referenced: the lock lasts as long as the process

The lock is a POSIX record lock (fcntl F_SETLK through fcntl.lockf) on `DIR/.lock`, so it disappears with its
holder, however that dies (kill -9, node reboot): there is no stale lock to clean by hand. A record lock belongs to
the process, not to the open file: a forked child (a DataLoader worker) does not inherit it and cannot keep it alive
after the holder died, as it would keep an flock(2) lock. Its one trap, that closing any descriptor of the file
releases the lock, is avoided by opening the file only here. The file itself stays (removing it would let two jobs
lock two different files of one name); it holds the holder's host, pid, start time and command, which a refused
job prints.

Shared filesystems: NFS (v4, or v3 with lockd) arbitrates record locks on the server, so the lock holds between
nodes. Lustre grants them across clients only when mounted with `-o flock`; with `-o localflock` the lock is local
to each node (two jobs on two nodes both get it), and with neither the call fails with ENOSYS. Where locking is
unsupported we fall back to the holder record: a holder on this host whose pid is alive refuses the job, one on
another host cannot be checked and is taken over with a warning.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import os
import socket
import sys
from pathlib import Path

LOCK_NAME = ".lock"


class LockHeld(RuntimeError):
    """Another job holds the directory: one line naming it."""


class DirectoryLock:
    """An open, locked lock file; closing it (or the process ending) releases the lock."""

    def __init__(self, fd: int, path: Path, *, enforced: bool):
        self.fd, self.path, self.enforced = fd, path, enforced

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def holder_record() -> str:
    try:  # the whole command line, `python -m ...` included, which sys.argv loses
        argv = Path("/proc/self/cmdline").read_bytes().decode(errors="replace").rstrip("\0").split("\0")
    except OSError:
        argv = [sys.executable, *sys.argv]
    command = " ".join([os.path.basename(argv[0]), *argv[1:]])
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"host {socket.gethostname()}, pid {os.getpid()}, started {started}, command `{command[:300]}`"


def pid_alive(pid: int) -> bool:
    """Whether a process of this pid exists on this host (a pid of another user's process counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def hold_directory(directory: str | Path, job: str) -> DirectoryLock:
    """Take the exclusive lock of `directory` (created if missing) for `job` ("training", "prepare"), or raise
    LockHeld naming the job that has it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    enforced = True
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):  # EAGAIN or EACCES: another process holds it
        holder = _read(fd) or "a job that is still starting"
        os.close(fd)
        raise LockHeld(f"{directory} is in use by another {job} job ({holder}): wait for it to finish or stop it; "
                       f"the lock goes away when that process exits") from None
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            os.close(fd)
            raise
        enforced = False
        _check_record(fd, directory, job)
    os.ftruncate(fd, 0)
    os.pwrite(fd, (holder_record() + "\n").encode(), 0)
    return DirectoryLock(fd, path, enforced=enforced)


def _read(fd: int) -> str:
    return os.pread(fd, 4096, 0).decode(errors="replace").strip()


def _check_record(fd: int, directory: Path, job: str) -> None:
    """The fallback without file locks: refuse when the recorded holder runs on this host; warn when it is elsewhere."""
    record = _read(fd)
    fields = dict(part.split(" ", 1) for part in record.split(", ")[:2] if " " in part)
    if not record or fields.get("host") is None or not fields.get("pid", "").isdigit():
        return
    if fields["host"] == socket.gethostname():
        if int(fields["pid"]) != os.getpid() and pid_alive(int(fields["pid"])):
            os.close(fd)
            raise LockHeld(f"{directory} is in use by another {job} job ({record}): wait for it to finish or stop it")
        return
    print(f"warning: the filesystem of {directory} does not support file locks, so the lock cannot be checked across "
          f"nodes; it was last held by {record}: make sure that job has ended", file=sys.stderr, flush=True)
