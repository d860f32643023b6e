"""An exclusive advisory lock on a file (POSIX `flock`), released when the holder exits, even
on kill -9. The file records its holder (host, pid) so a refusal can name it."""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time


class FileLock:
  """`acquire(blocking)` -> True when held; `holder()` is whatever the file says."""

  def __init__(self, path: str):
    self.path = path
    self._fd: int | None = None

  def acquire(self, blocking: bool = False) -> bool:
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
      os.close(fd)
      return False
    self._fd = fd
    return True

  def holder(self) -> dict | None:
    """The holder recorded in the file (a previous holder if the lock is free), or None."""
    try:
      with open(self.path, encoding="utf-8") as f:
        return json.loads(f.read() or "null")
    except (OSError, ValueError):
      return None

  def record_holder(self) -> None:
    assert self._fd is not None
    text = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                       "since": time.strftime("%Y-%m-%d %H:%M:%S")})
    os.ftruncate(self._fd, 0)
    os.pwrite(self._fd, text.encode(), 0)
    os.fsync(self._fd)

  def release(self, clear: bool = True) -> None:
    if self._fd is None:
      return
    if clear:  # a free lock with no holder written means its last run ended cleanly
      os.ftruncate(self._fd, 0)
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None


def describe(holder: dict | None) -> str:
  if not holder:
    return "an unknown process"
  return f"pid {holder.get('pid')} on host {holder.get('host')} (since {holder.get('since')})"
