"""One writer per index folder: an exclusive, non-blocking ``flock`` on ``INDEX_DIR/writer.lock``.

The lock file is made with the index and never removed, so taking the lock changes nothing on disk
(a refused run leaves the folder as it was). The kernel drops the lock when its holder exits, even
on ``kill -9``, so a crashed indexer never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from vitrina.errors import UserError

LOCK_FILE = "writer.lock"


class WriterLock:
    """``with WriterLock(index_dir):`` holds the index's writer lock, or raises ``UserError`` at once."""

    def __init__(self, index_dir: Path, *, what: str = "vitrina index") -> None:
        self.path = Path(index_dir) / LOCK_FILE
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> WriterLock:
        """Take the lock (creating the lock file if an older index lacks it); ``UserError`` if it is held."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(
                f"{self.path.parent}: another writer (`vitrina index`, `versions`, or `import`) is working on this "
                f"index; wait for it to finish and run `{self.what}` again"
            ) from None
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (closing the file drops it)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
