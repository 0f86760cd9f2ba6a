"""Fixtures for the multi-node tests: a Slurm cluster of two nodes on network namespaces (tests/multinode/netns.py)
per session, and a job working directory on the shared filesystem.

They need root (network namespaces, Slurm's daemons), so `make test` (pytest tests) skips them: they run with
`make test-multinode`, `MEGADOREMI_MULTINODE_TESTS=1`, or when tests/multinode is named on the pytest command line.
There, a machine that cannot host them fails them (it does not skip them).
"""

import os

import pytest

from tests.helpers.opt_in import skip_unless_selected
from tests.multinode.netns import NetSlurmCluster
from tests.slurm.cluster import Jobs, SlurmError

HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(config, items):
    skip_unless_selected(config, items, HERE, "MEGADOREMI_MULTINODE_TESTS",
                         "multi-node tests run with `make test-multinode` (or `pytest tests/multinode`)")


@pytest.fixture(scope="session")
def net_cluster():
    """head (munged, slurmctld) + node1, node2 (one slurmd and one sshd each, CPUs=1), each host a network
    namespace; torn down at the end of the session, also after a failure or Ctrl-C."""
    try:
        cluster = NetSlurmCluster(num_nodes=2, cpus_per_node=1, ssh=True)
    except SlurmError as error:
        pytest.fail(str(error), pytrace=False)
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def net_jobs(net_cluster, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("multinode_jobs")
    os.chmod(workdir, 0o755)
    (workdir / "runs" / "logs").mkdir(parents=True)
    return Jobs(net_cluster, str(workdir))
