"""The two-node cluster's network is closed (its hosts reach each other only), and slurm/preprocess.sbatch across
two nodes: MPI (srun --mpi=pmi2, Slurm's PMI) spans the network namespaces and the datasets are byte for byte those
of the single-process tokenizer."""

import os
import subprocess

from tests.helpers.corpus import DOMAINS
from tests.slurm.test_sbatch import assert_same_datasets


def test_preprocess_sbatch_splits_across_two_nodes(net_jobs, tiny_corpus):
    data_dir = os.path.join(net_jobs.workdir, "preprocessed")
    job = net_jobs.submit("preprocess.sbatch", "--nodes=2", "--ntasks-per-node=1",
                          CORPUS_DIR=os.path.join(tiny_corpus["root"], "corpus"),
                          TOKENIZER_MODEL=tiny_corpus["tokenizer_model"], DATA_DIR=data_dir)
    info = net_jobs.wait_completed(job)
    assert info["NodeList"] == "node[1-2]", info
    log = net_jobs.log(info)
    # One 2-rank MPI world per domain, rank 0 on node1 and rank 1 on node2 (their parts sent over the network).
    assert log.count("rank 0/2:") == log.count("ranks on node1, node2") == len(DOMAINS), log
    assert_same_datasets(data_dir, tiny_corpus)


def test_the_hosts_reach_each_other_and_nothing_else(net_cluster):
    """Each host's only route is the hosts' own subnet (no default route: nothing beyond the bridge is reachable),
    the bridge has no address (the machine itself is not on their network), and names resolve inside the hosts
    without a line added to the machine's /etc/hosts."""
    fabric = net_cluster.fabric
    for host in fabric.hosts:
        routes = subprocess.run(["ip", "-n", fabric.namespace(host), "-4", "route", "show"], capture_output=True,
                                text=True, check=True).stdout.splitlines()
        assert len(routes) == 1 and routes[0].startswith("10.213.0.0/24 dev eth0"), (host, routes)
    bridge = subprocess.run(["ip", "-4", "addr", "show", "dev", fabric.bridge], capture_output=True, text=True,
                            check=True).stdout
    assert "inet " not in bridge, bridge
    with open("/etc/hosts") as handle:
        machine_hosts = handle.read()
    assert "10.213.0." not in machine_hosts and "node1" not in machine_hosts
    resolved = subprocess.run(fabric.argv("node2", ["getent", "hosts", "node1"]), capture_output=True, text=True,
                              check=True).stdout.split()
    assert resolved == ["10.213.0.11", "node1"], resolved
