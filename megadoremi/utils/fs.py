"""Atomic file output and inter-process locks.

Outputs are written under a temporary name in the same directory and renamed into place only on success, so a
crash or Ctrl-C never leaves a complete-looking file behind.
"""

import contextlib
import fcntl
import os
import uuid


def temp_path_for(path: str) -> str:
    """A unique temporary sibling of ``path`` (same directory, so the final rename is atomic)."""
    directory, base = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{base}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def remove_quietly(path: str) -> None:
    """Delete ``path`` if it exists."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def process_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (one of another user counts; so does a zombie)."""
    if pid <= 0:
        return True  # not a pid we can reason about: assume it is alive (the safe side)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_output(path: str, mode: str = "wb"):
    """Open a temporary file for writing; on success fsync and rename it to ``path``, on error delete it."""
    tmp = temp_path_for(path)
    try:
        with open(tmp, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise


@contextlib.contextmanager
def file_lock(lock_path: str):
    """Exclusive advisory lock (fcntl.flock) held for the duration of the block; blocks until acquired."""
    os.makedirs(os.path.dirname(os.path.abspath(lock_path)) or ".", exist_ok=True)
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def drop_page_cache() -> bool:
    """Flush and drop the OS page cache (Linux, root only), for benchmarks timed on a cold cache; False when the
    OS does not allow it."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("1\n")
        return True
    except OSError:
        return False
