"""One run per workdir: a lock file, `<workdir>/run.lock`, held while a run works there.

`WorkdirLock(workdir)` (a context manager) opens the lock file and takes an exclusive, non-blocking
`fcntl.flock` on it, then writes who holds it (pid, host, start time, command) into it. A second
run on the same workdir finds the flock taken and raises `WorkdirBusy`, one line naming the
holder. The kernel drops a flock when its process dies, however it dies (SIGKILL, OOM killer, a
node reboot on NFSv4 once the server's lease expires), so a lock file left by a killed run is
stale: the next run gets the flock, warns that it took the lock over from that run, and goes on.

Where flock is not available (some FUSE and parallel file systems refuse it), the recorded holder
decides: on this host, whether its process still runs (pid and its start time in /proc); on
another host, whether its heartbeat (the lock file's modification time, touched every
`heartbeat_s` by a daemon thread) is younger than `stale_after_s`. The same heartbeat rule applies
when flock is granted but the file names a run on another host, since flock need not reach across
hosts on every file system.

Processes of one multi-host run lock `run.lock` (process 0) and `run.process_<i>.lock`.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import socket
import sys
import threading
import time

from lard_jax.errors import UserError

LOCK_NAME = "run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 180.0

try:
    import fcntl
except ImportError:  # not POSIX: the recorded holder decides alone
    fcntl = None


class WorkdirBusy(UserError):
    """Another live run holds the workdir."""


def lock_path(workdir: str, process_index: int = 0) -> str:
    return os.path.join(workdir, LOCK_NAME if process_index == 0 else f"run.process_{process_index}.lock")


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        pass
    now = _start_time(pid)
    return start is None or now is None or now == start  # a reused pid has another start time


def describe(record: dict) -> str:
    """'pid 123 on host h, started 2025-01-01 10:00:00 UTC: python -m experiments.restore ...'"""
    if not record:
        return "an unknown process (the lock file is empty)"
    text = f"pid {record.get('pid', '?')} on host {record.get('host', '?')}"
    if record.get("started"):
        text += f", started {record['started']}"
    if record.get("command"):
        text += f": {record['command']}"
    return text


class WorkdirLock:
    """The workdir's lock for this process; see the module docstring. `acquire()` returns the
    record of a stale holder it took over (None if the lock was free)."""

    def __init__(
        self,
        workdir: str,
        *,
        process_index: int = 0,
        what: str = "config.workdir",
        heartbeat_s: float = HEARTBEAT_S,
        stale_after_s: float = STALE_AFTER_S,
    ):
        self.workdir, self.what = workdir, what
        self.path = lock_path(workdir, process_index)
        self.process_index = process_index
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.taken_over: dict | None = None
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the holder's record
    def _record(self) -> dict:
        return {
            "pid": os.getpid(),
            "pid_start": _start_time(os.getpid()),
            "host": socket.gethostname(),
            "started": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300],
            "process_index": self.process_index,
        }

    @staticmethod
    def _read(fd: int) -> dict:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            data = b""
            while chunk := os.read(fd, 65536):
                data += chunk
            record = json.loads(data.decode() or "{}")
            return record if isinstance(record, dict) else {}
        except (OSError, ValueError):
            return {}

    def _alive_elsewhere(self, record: dict, flocked: bool | None) -> bool:
        """Whether `record`'s holder may still run although this process got here."""
        if not record:
            return False
        if record.get("host") == socket.gethostname():
            if flocked:  # the kernel dropped its flock: that process is gone
                return False
            return _pid_alive(int(record.get("pid", -1)), record.get("pid_start"))
        try:  # another host: trust its heartbeat
            age = time.time() - os.stat(self.path).st_mtime
        except OSError:
            return False
        return age < self.stale_after_s

    def _busy(self, record: dict) -> WorkdirBusy:
        return WorkdirBusy(
            f"{self.what}={self.workdir}: in use by another run ({describe(record)}); wait for it to finish or "
            f"stop it, or choose another {self.what} (its lock: {self.path})"
        )

    # -- flock
    @staticmethod
    def _flock(fd: int) -> bool | None:
        """True: taken; False: held by another open file; None: this file system has no flock."""
        if fcntl is None:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return None
            raise

    # -- public
    def acquire(self) -> dict | None:
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            flocked = self._flock(fd)
            if flocked is False:
                record = self._read(fd)
                os.close(fd)
                raise self._busy(record)
            try:  # a holder that released between our open and flock unlinked the file we hold
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            previous = self._read(fd)
            if self._alive_elsewhere(previous, flocked):
                os.close(fd)
                raise self._busy(previous)
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(self._record()) + "\n").encode())
            os.fsync(fd)
            self._fd = fd
            self.taken_over = previous or None
            self._thread = threading.Thread(target=self._heartbeat, name="workdir-lock-heartbeat", daemon=True)
            self._thread.start()
            return self.taken_over
        raise WorkdirBusy(
            f"{self.what}={self.workdir}: its lock file {self.path} keeps changing hands; another run is starting "
            "there; wait, or choose another workdir"
        )

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self._fd)
            except (OSError, TypeError):
                pass

    def release(self) -> None:
        if self._fd is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            if os.fstat(self._fd).st_ino == os.stat(self.path).st_ino:
                os.unlink(self.path)  # still holding the flock: nobody else has it open as theirs
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
