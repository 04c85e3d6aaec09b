"""One gateway per database file.

A gateway assumes it alone settles the tasks in its database: at start it
fails every task a crash left before upstream, and it tracks the rest in
memory. A second gateway started on the same file would fail the first one's
submits in flight and settle its tasks under it. An advisory lock on a file
next to the database, held for the process's life and dropped by the kernel
when it dies (kill -9 included), keeps the second one out.
"""

from __future__ import annotations

import fcntl
import os


class DatabaseLockError(RuntimeError):
    """The database's lock cannot be taken: serve stops with this message."""


class DatabaseInUse(DatabaseLockError):
    pass


class DatabaseLock:
    def __init__(self, db_path: str) -> None:
        self.path = db_path + ".lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            # Told apart from a busy port: a lock file left by another user
            # (a run as root) is the likely cause, and says so.
            raise DatabaseLockError(
                f"cannot open the database's lock file {self.path}: {exc.strerror}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DatabaseInUse(
                f"the database {self.path.removesuffix('.lock')} is in use by another "
                f"apixo-gateway (pid {holder}); one gateway per database"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            # Closing drops the lock; the file stays, so the next gateway
            # never races another over creating it.
            os.close(self._fd)
            self._fd = None
