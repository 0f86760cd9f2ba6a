"""ZeRO-3 partitioning of the 8B preset's layers, on 2 CPU ranks (gloo), through deepspeed.zero.Init.

The model is the 8B preset's width (d_model 4096, FFN 24576, 32 heads of 128) at reduced depth (one layer: every
kind of parameter the 32 layers have) and a 32000-token vocabulary instead of the paper's 256k, so that a full fp32
copy is 0.40B parameters = 1.6 GB rather than 39 GB. Memory held: the two ranks' halves (one full copy together), one plain full copy on rank 0 for the
comparison, and one gathered parameter at a time (at most the 0.5 GB embedding) on each rank.

What is checked: every parameter is partitioned (``ds_numel`` = full size, ``ds_tensor`` = ceil(numel / 2) on each
rank, nothing else resident), each rank's partition is its slice of the gathered tensor, and GatheredParameters
reassembles exactly the tensors of a ``GPT`` built without zero.Init from the same seed. (zero.Init broadcasts each
parameter from rank 0 before partitioning it, so the equality shows that the model's per-layer seeded
initialisation is unchanged under zero.Init, and that the partitions put it back together.)

Run by pytest, which starts ``torchrun --nproc-per-node 2 tests/test_zero_init_8b.py OUT_DIR`` (the worker below);
each rank writes what it checked to OUT_DIR/rank{r}.json.
"""

import json
import math
import os
import subprocess
import sys

NUM_RANKS = 2
NUM_LAYERS = 1
VOCAB_SIZE = 32000
SEED = 1234


def _worker(out_dir: str) -> None:
    """One rank: build under zero.Init, check the partitions, gather each parameter and compare."""
    import time

    import deepspeed
    import torch
    import torch.distributed as dist

    from megadoremi.model.gpt import GPT
    from megadoremi.model.presets import gpt_config_from_preset

    started = time.perf_counter()
    deepspeed.init_distributed(dist_backend="gloo")
    timings = {"init_distributed_s": time.perf_counter() - started}
    rank, world = dist.get_rank(), dist.get_world_size()
    config = gpt_config_from_preset("8b", VOCAB_SIZE, 1024, num_layers=NUM_LAYERS)
    ds_config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}, "bf16": {"enabled": False}}
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = GPT(config, seed=SEED)
    timings["zero_init_build_s"] = time.perf_counter() - started - sum(timings.values())
    # The same model without zero.Init, from the same per-layer seeded generators (rank 0 only: one full copy).
    reference = dict(GPT(config, seed=SEED).named_parameters()) if rank == 0 else None
    timings["reference_build_s"] = time.perf_counter() - started - sum(timings.values())
    report = {"rank": rank, "world": world, "timings": timings, "params": {}, "local_elements": 0,
              "full_elements": 0}
    for name, param in model.named_parameters():
        full = int(param.ds_numel)
        local = int(param.ds_tensor.numel())
        report["local_elements"] += local
        report["full_elements"] += full
        entry = {"ds_numel": full, "ds_shape": list(param.ds_shape), "local": local,
                 "numel_outside_gather": param.numel(), "dtype": str(param.ds_tensor.dtype)}
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            gathered = param.data.detach().flatten()
            entry["gathered_shape"] = list(param.shape)
            # This rank's partition is its contiguous slice of the flattened tensor (the last one zero-padded).
            start = rank * local
            valid = max(0, min(local, full - start))
            own = param.ds_tensor.detach()[:valid]
            entry["own_slice_matches"] = bool(torch.equal(own, gathered[start:start + valid]))
            if reference is not None:
                expected = reference[name].detach()
                entry["reference_shape"] = list(expected.shape)
                entry["equals_reference"] = bool(torch.equal(param.data, expected))
            del gathered
        report["params"][name] = entry
    timings["gather_compare_s"] = time.perf_counter() - started - sum(timings.values())
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(report, handle)
    dist.barrier()
    dist.destroy_process_group()


def test_zero3_partitions_8b_width_model_across_two_ranks(tmp_path):
    from tests.helpers.launch import BIN, REPO_ROOT, clean_env, free_port

    out_dir = str(tmp_path)
    command = [os.path.join(BIN, "torchrun"), "--nproc-per-node", str(NUM_RANKS), "--master-port", str(free_port()),
               os.path.abspath(__file__), out_dir]
    result = subprocess.run(command, cwd=REPO_ROOT, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"workers failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    reports = [json.load(open(os.path.join(out_dir, f"rank{r}.json"))) for r in range(NUM_RANKS)]

    from megadoremi.model.presets import gpt_config_from_preset

    config = gpt_config_from_preset("8b", VOCAB_SIZE, 1024, num_layers=NUM_LAYERS)
    assert (config.d_model, config.ffn_dim, config.num_heads, config.head_dim) == (4096, 24576, 32, 128)
    expected_names = None
    for report in reports:
        assert report["world"] == NUM_RANKS
        params = report["params"]
        expected_names = expected_names or sorted(params)
        assert sorted(params) == expected_names
        assert report["full_elements"] == config.num_parameters()  # every parameter seen once, at full size
        for name, entry in params.items():
            assert entry["ds_numel"] == math.prod(entry["ds_shape"]), name
            assert entry["local"] == math.ceil(entry["ds_numel"] / NUM_RANKS), name  # half, padded up
            assert entry["numel_outside_gather"] == 0, name  # nothing but the partition stays resident
            assert entry["gathered_shape"] == entry["ds_shape"], name
            assert entry["own_slice_matches"], name
            assert entry["dtype"] == "torch.float32", name
        # each rank holds (about) half of the model
        assert abs(report["local_elements"] - config.num_parameters() / NUM_RANKS) <= len(params)
    # the 8B-width matrices really are there, at full size
    shapes = reports[0]["params"]
    assert shapes["blocks.0.mlp.up.weight"]["ds_shape"] == [24576, 4096]
    assert shapes["blocks.0.attn.qkv.weight"]["ds_shape"] == [3 * 4096, 4096]
    assert shapes["embedding.weight"]["ds_shape"] == [VOCAB_SIZE, 4096]
    # gathered == the plain model built from the same seed, every parameter (compared on rank 0)
    for name, entry in reports[0]["params"].items():
        assert entry["reference_shape"] == entry["ds_shape"], name
        assert entry["equals_reference"], name


if __name__ == "__main__":
    _worker(sys.argv[1])
