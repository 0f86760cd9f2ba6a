"""Fixtures for the Slurm script tests: one one-node cluster per session, a job working directory, submission.

These tests take minutes and need root to install Slurm, so `make test` (pytest tests) skips them: they run with
`make test-slurm`, `MEGADOREMI_SLURM_TESTS=1`, or when tests/slurm is named on the pytest command line. There, a
machine without Slurm fails them (it does not skip them).
"""

import os

import pytest

from tests.helpers.opt_in import skip_unless_selected
from tests.slurm.cluster import Jobs, SlurmCluster, SlurmError

HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(config, items):
    skip_unless_selected(config, items, HERE, "MEGADOREMI_SLURM_TESTS",
                         "Slurm tests run with `make test-slurm` (or `pytest tests/slurm`)")


@pytest.fixture(scope="session")
def slurm_cluster():
    """munged + slurmctld + slurmd on this machine (CPUs=2), stopped by pid at the end of the session."""
    try:
        cluster = SlurmCluster(num_cpus=2)
    except SlurmError as error:
        problem = str(error)
    else:
        problem = None
    if problem:  # a failure, not a skip: `make test-slurm` must not pass where Slurm is missing
        pytest.fail(problem, pytrace=False)
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def slurm_jobs(slurm_cluster, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("slurm_jobs")
    (workdir / "runs" / "logs").mkdir(parents=True)
    return Jobs(slurm_cluster, str(workdir))
