"""One run per run directory: an exclusive lock held for the life of the run.

``RUN_DIR/run.lock`` is locked with ``flock`` by rank 0 and holds who took it (host, pid, start time, command).
The kernel (or the NFS server, when the client host dies) releases the lock with its holder, so liveness comes
from the lock itself: a second run finds it held and is refused with the holder's host and pid; a run that finds
the lock free but the file still naming a holder (it was killed, or its host died) logs that stale holder and
takes over. A clean exit empties the file before releasing.
"""

import fcntl
import json
import os
import socket
import sys
import time

import torch.distributed as dist

from megadoremi.utils.cli import UserError
from megadoremi.utils.fs import process_alive
from megadoremi.utils.logging import get_logger

logger = get_logger(__name__)

LOCK_FILE = "run.lock"


class RunDirectoryInUse(UserError):
    """Another live process holds the run directory."""


def _describe(holder: dict) -> str:
    started = holder.get("started")
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"host {holder.get('host', '?')} pid {holder.get('pid', '?')} (since {since})"


def _read_holder(fd: int) -> dict | None:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 1 << 16).decode(errors="replace").strip()
    if not text:
        return None
    try:
        holder = json.loads(text)
        return holder if isinstance(holder, dict) else {"raw": text}
    except ValueError:
        return {"raw": text[:200]}


class RunLock:
    """``acquire()`` or raise RunDirectoryInUse; ``release()`` (also at process exit, by the kernel)."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, LOCK_FILE)
        self._fd = None

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd) or {}
                os.close(fd)
                raise RunDirectoryInUse(
                    f"{os.path.dirname(self.path)} is in use by another run: {_describe(holder)} holds {self.path}."
                    " Wait for it or stop it, or give this run another run_dir") from None
            # The file may have been replaced between open and flock (a holder never deletes it, but a user may):
            # hold the lock only on the inode the path names now.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        stale = _read_holder(fd)
        if stale:
            alive = ""
            if stale.get("host") == socket.gethostname() and isinstance(stale.get("pid"), int):
                alive = " (that process no longer holds it" + \
                        ("; a process with its pid exists, a reuse of the number)" if process_alive(stale["pid"])
                         else " and is gone)")
            logger.warning("%s: taking over a stale lock left by %s%s, which ended without releasing it "
                           "(killed, or its host went down)", self.path, _describe(stale), alive)
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                  "command": " ".join(sys.argv)[:1000]}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(holder) + "\n").encode())
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # empty: released cleanly
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None


def lock_run_directory(run_dir: str, rank: int) -> RunLock | None:
    """Collective: rank 0 locks the run directory (returns the lock; other ranks None); every rank raises
    RunDirectoryInUse when it could not."""
    lock, refused = None, None
    if rank == 0:
        lock = RunLock(run_dir)
        try:
            lock.acquire()
        except RunDirectoryInUse as error:
            refused = str(error)
    if dist.is_initialized() and dist.get_world_size() > 1:
        holder = [refused]
        dist.broadcast_object_list(holder, src=0)
        refused = holder[0]
    if refused:
        raise RunDirectoryInUse(refused)
    return lock
