"""Where the offline tools write: output errors that name the path, and temporaries left by killed runs.

Outputs are written under hidden temporary names in the output's directory and renamed into place when complete
(``megadoremi.utils.fs``). A run killed by ``kill -9``, the OOM killer or a lost node cannot delete them, and on a
large corpus they are big. The next run on the same output removes those whose writing process is gone
(``remove_stale_temporaries``). The pid in a temporary's name only identifies a process on the host that wrote it,
so the temporaries this package names itself also carry that host (``host_temp_path``): a run never removes what
a live process on another host of a shared filesystem is writing. Names without a host (written through
``atomic_output``, or by an older version) are taken to come from this host.
"""

import contextlib
import errno
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterable

from megadoremi.utils.cli import UserError
from megadoremi.utils.fs import process_alive, temp_path_for
from megadoremi.utils.logging import get_logger

logger = get_logger(__name__)

# Write failures the user fixes (free space, raise the quota, pick another directory, fix permissions), by errno.
_USER_FIXABLE = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for this filesystem",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only filesystem",
    errno.ENOTDIR: "a parent of the path is not a directory",
}
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)

# .NAME.tmp-PID-HEX, then anything the writer appended (a rank, mkdtemp's letters), then @HOST when tagged.
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-[0-9a-f]{8}(?P<rest>[^@]*)(?:@(?P<host>[^@]+))?$")


class OutputWriteError(UserError, OSError):
    """An output cannot be written (no space, quota, permissions); the message names the path."""


def output_write_error(path: str, error: OSError) -> OSError:
    """``error`` as an OutputWriteError naming ``path`` when the user can fix its cause, else ``error`` itself."""
    if isinstance(error, OutputWriteError) or error.errno not in _USER_FIXABLE:
        return error
    hint = "; free space or write elsewhere" if error.errno in DISK_FULL_ERRNOS else ""
    converted = OutputWriteError(f"{path}: cannot write it: {_USER_FIXABLE[error.errno]} "
                                 f"[{errno.errorcode[error.errno]}]{hint}")
    converted.errno = error.errno  # (no filename: OSError's str would then replace the message)
    return converted


@contextlib.contextmanager
def writing(path: str):
    """Inside the block, an OSError the user can fix becomes an OutputWriteError naming ``path``."""
    try:
        yield
    except OSError as error:
        converted = output_write_error(path, error)
        if converted is error:
            raise
        raise converted from error


def this_host() -> str:
    """This machine's name as it appears in temporary names (no ``@`` or ``/``)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "localhost"


def host_temp_path(path: str) -> str:
    """``temp_path_for(path)`` tagged with this host: ``.NAME.tmp-PID-HEX@HOST`` beside ``path``."""
    return f"{temp_path_for(path)}@{this_host()}"


def make_host_temp_dir(root: str, name: str, label: str) -> str:
    """A new private directory ``.NAME.tmp-PID-HEX-LABEL-XXXXXXXX@HOST`` in ``root``."""
    os.makedirs(root, exist_ok=True)
    prefix = os.path.basename(temp_path_for(os.path.join(root, name)))
    return tempfile.mkdtemp(prefix=f"{prefix}-{label}-", suffix=f"@{this_host()}", dir=root)


def _size_bytes(path: str) -> int:
    if not os.path.isdir(path) or os.path.islink(path):
        return os.lstat(path).st_size
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(folder, name)).st_size
    return total


def remove_stale_temporaries(directory: str, names: Iterable[str]) -> int:
    """Delete the temporaries of ``names`` (base names of outputs) in ``directory`` whose writing process is no
    longer running on this host; each removal is logged with its size. Returns the bytes freed."""
    wanted = set(names)
    host = this_host()
    try:
        entries = list(os.scandir(directory))
    except OSError:  # no such directory yet, or not readable: nothing of ours can be there
        return 0
    freed = 0
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if match is None or match["name"] not in wanted:
            continue
        pid, writer_host = int(match["pid"]), match["host"]
        if (writer_host is not None and writer_host != host) or process_alive(pid):
            continue  # a live writer, or one on another host whose liveness cannot be checked from here
        try:
            size = _size_bytes(entry.path)
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.remove(entry.path)
        except FileNotFoundError:  # another process (a rank on this host) removed it first
            continue
        except OSError as error:
            logger.warning("could not remove the stale temporary %s: %s", entry.path, error)
            continue
        freed += size
        logger.warning("removed %s (%s), left by process %d%s, which is no longer running", entry.path,
                       _format_bytes(size), pid, f" on {writer_host}" if writer_host else "")
    return freed


def _format_bytes(num_bytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes} bytes"
