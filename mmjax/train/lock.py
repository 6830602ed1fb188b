"""One run per workdir: a second ``mmjax.train`` on the same directory stops at once, naming the first.

The lock is an exclusive ``flock`` on ``<workdir>/.mmjax.lock``, which holds the holder's pid, host
and start time for the message. The kernel drops the lock when the process ends however it ends
(SIGKILL included), so a stale file never blocks the next run. On several processes process 0
takes it for the run (they share the workdir).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time

from mmjax.train.setup import ConfigError

LOCK_FILE = ".mmjax.lock"


class WorkdirLock:
    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_FILE)
        self._fd = None

    def __enter__(self):
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            raise ConfigError(f"workdir {os.path.dirname(self.path)} is in use by another run ({holder}); wait for "
                              "it to end or give this one another --workdir") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def __exit__(self, *exc):
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _read_holder(fd) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {info['pid']} on {info['host']}, since {info['since']}"
    except (ValueError, KeyError, OSError):
        return "holder unknown"
