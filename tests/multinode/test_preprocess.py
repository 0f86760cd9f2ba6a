"""slurm/preprocess.sbatch across two nodes: MPI (srun --mpi=pmi2, Slurm's PMI) spans the network namespaces and
the datasets are byte for byte those of the single-process tokenizer."""

import os

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
