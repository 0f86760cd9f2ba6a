"""Workers that outlive their launcher stop: a thread watches the launcher process.

When ``torchrun`` or ``deepspeed`` is killed with SIGKILL, it cannot stop its workers, which would train on, unseen
(and hold the run directory). ``LauncherWatchdog`` finds the launcher among this process's ancestors (torchrun's
agent; DeepSpeed's ``launch.py`` and the ``deepspeed`` runner above it) and polls them; when one is gone it calls
``on_death`` (the trainer treats it like SIGTERM: checkpoint at the end of the step, then exit) and, if the
process is still alive ``grace_s`` later (a peer died too and a collective hangs), ends it with exit status 1.
A run started from a shell without a launcher is not watched: closing a terminal is SIGHUP's business.
"""

import os
import signal
import threading
import time

from megadoremi.utils.logging import get_logger

logger = get_logger(__name__)

# Substrings of a launcher's command line (/proc/PID/cmdline, NUL-separated arguments joined by spaces).
LAUNCHERS = ("torchrun", "torch.distributed.run", "torch/distributed/run.py", "deepspeed.launcher.launch",
             "deepspeed/launcher/launch.py", "bin/deepspeed", "deepspeed.launcher.runner")


class StopFlag:
    """Set by SIGUSR1 / SIGTERM (Slurm's warning before a time limit or preemption) or by the launcher watchdog;
    the trainer checkpoints at the end of the step and exits."""

    def __init__(self):
        self.raised = None

    def install(self) -> None:
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum, _frame):
        self.raised = signal.Signals(signum).name

    def request(self, reason: str) -> None:
        self.raised = reason


def _process(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, command line, start time in clock ticks) of a live process, or None."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            stat = handle.read()
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            cmdline = handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
    if fields[0] == "Z":
        return None  # a zombie has exited
    return int(fields[1]), cmdline, int(fields[19])


def launcher_chain(pid: int | None = None) -> list[tuple[int, int, str]]:
    """(pid, start time, command) of the launcher processes above ``pid`` (this process), nearest first: walks up
    while the ancestors are launchers."""
    chain = []
    info = _process(os.getpid() if pid is None else pid)
    while info is not None:
        parent = info[0]
        if parent <= 1:
            break
        parent_info = _process(parent)
        if parent_info is None or not any(name in parent_info[1] for name in LAUNCHERS):
            break
        chain.append((parent, parent_info[2], parent_info[1]))
        info = parent_info
    return chain


class LauncherWatchdog:
    def __init__(self, on_death, poll_s: float = 1.0, grace_s: float = 300.0):
        self.on_death, self.poll_s, self.grace_s = on_death, poll_s, grace_s
        self.chain = launcher_chain()
        self.parent = os.getppid()
        self.gone = None

    def start(self) -> bool:
        """Start watching; False when no launcher is above this process."""
        if not self.chain:
            return False
        threading.Thread(target=self._watch, name="megadoremi-launcher-watchdog", daemon=True).start()
        return True

    def _dead(self) -> tuple[int, str] | None:
        if os.getppid() != self.parent:
            return self.chain[0][0], self.chain[0][2]
        for pid, started, command in self.chain:
            info = _process(pid)
            if info is None or info[2] != started:
                return pid, command
        return None

    def _watch(self) -> None:
        while True:
            time.sleep(self.poll_s)
            dead = self._dead()
            if dead is not None:
                break
        pid, command = dead
        self.gone = f"launcher pid {pid} ({command[:80]}) is gone"
        logger.error("%s: stopping (checkpoint at the end of this step, then exit)", self.gone)
        self.on_death(self.gone)
        time.sleep(self.grace_s)
        logger.error("%s and this worker did not stop within %.0f s: exiting", self.gone, self.grace_s)
        os._exit(1)
