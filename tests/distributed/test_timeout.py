"""parallel.collective_timeout_s covers every process group: a rank whose peer stops answering leaves DeepSpeed's
data-parallel all-reduce (a group made by torch.distributed.new_group, which by default waits 30 min on gloo)
after the configured seconds, with gloo's timeout error. Two real processes over gloo."""

import json
import os
import time

import torch.multiprocessing as mp

from tests.helpers.launch import free_port

TIMEOUT_S = 3


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    from megadoremi.distributed.env import DistributedEnv, init_distributed

    init_distributed(DistributedEnv(rank, 2, rank, "127.0.0.1", port, "torch"), backend="gloo", timeout_s=TIMEOUT_S)
    group = dist.new_group([0, 1])  # as DeepSpeed makes its groups: no timeout argument
    done = os.path.join(out_dir, "rank0.json")
    if rank == 1:  # the peer that stops answering: never joins the all-reduce, leaves once rank 0 reported
        deadline = time.monotonic() + 60
        while not os.path.exists(done) and time.monotonic() < deadline:
            time.sleep(0.1)
        os._exit(0)
    start = time.monotonic()
    try:
        dist.all_reduce(torch.ones(4), group=group)
        error = ""
    except Exception as failure:  # gloo's timeout
        error = str(failure)
    with open(done + ".tmp", "w") as handle:
        json.dump({"seconds": time.monotonic() - start, "error": error}, handle)
    os.replace(done + ".tmp", done)
    os._exit(0)


def test_a_stalled_peer_fails_a_new_groups_all_reduce_after_the_configured_timeout(tmp_path):
    context = mp.start_processes(_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=False,
                                 start_method="fork")
    deadline = time.monotonic() + 120
    try:
        while not context.join(timeout=1):
            assert time.monotonic() < deadline, "rank 0 still waits in the all-reduce: the timeout did not apply"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    result = json.load(open(tmp_path / "rank0.json"))
    assert "Timed out" in result["error"], result
    assert TIMEOUT_S - 0.5 <= result["seconds"] < TIMEOUT_S + 10, result
