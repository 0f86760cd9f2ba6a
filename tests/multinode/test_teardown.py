"""Nothing is left behind: a cluster on network namespaces (daemons, sshd, a running 2-node job) interrupted with
Ctrl-C (SIGINT) or failing after its start removes its namespaces, links, hosts files and every process it
started; one killed with SIGKILL (no chance to clean up) is removed by the next run's sweep."""

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers.launch import REPO_ROOT
from tests.multinode.netns import PREFIX, leftovers, sweep_leftovers


def hold(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.multinode.netns", "--hold", *args], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_ready(process: subprocess.Popen) -> tuple[str, list[int]]:
    """The holder's tag once its job runs, and every pid in its namespaces then."""
    line = process.stdout.readline()
    assert line.startswith("ready "), (line, process.stderr.read() if process.poll() is not None else "")
    tag = line.split()[1]
    pids = []
    for namespace in leftovers(tag)["namespaces"]:
        pids += [int(pid) for pid in subprocess.run(["ip", "netns", "pids", namespace], capture_output=True,
                                                     text=True).stdout.split()]
    assert len(pids) >= 8, pids  # munged, slurmctld, 2 x (slurmd, sshd), the job's batch shell, srun, sleeps
    return tag, pids


def alive(pids: list[int]) -> list[int]:
    left = []
    for pid in pids:
        try:
            os.kill(pid, 0)
            with open(f"/proc/{pid}/stat") as handle:
                if handle.read().split(")")[-1].split()[0] != "Z":
                    left.append(pid)
        except (ProcessLookupError, FileNotFoundError):
            pass
    return left


@pytest.mark.parametrize("how", ["ctrl-c", "failure"])
def test_interrupted_or_failed_cluster_leaves_nothing(how):
    process = hold() if how == "ctrl-c" else hold("--fail")
    try:
        if how == "ctrl-c":
            tag, pids = wait_ready(process)
            process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    if how == "failure":
        assert process.returncode != 0 and "failing on purpose after start" in stderr, stderr
        tag = f"{PREFIX}{process.pid:x}"
    else:
        assert process.returncode != 0 and "KeyboardInterrupt" in stderr, stderr
        assert alive(pids) == []
    assert leftovers(tag) == {"namespaces": [], "links": [], "folders": []}


def test_a_killed_owner_is_swept_by_the_next_run():
    process = hold()
    try:
        tag, pids = wait_ready(process)
        process.kill()
        process.wait(timeout=30)
    finally:
        process.kill()
    left = leftovers(tag)
    assert left["namespaces"] and left["links"] and len(left["folders"]) == 2  # no chance to clean up
    assert alive(pids)
    removed = sweep_leftovers()
    assert all(set(left[key]) <= set(removed[key]) for key in left), (left, removed)
    assert leftovers(tag) == {"namespaces": [], "links": [], "folders": []}
    deadline = time.monotonic() + 30
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert alive(pids) == []
