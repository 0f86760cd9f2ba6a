"""Per-token reference losses for a DoReMi proxy run, computed once and memory-mapped during the proxy run.

    python tools/compute_reference_losses.py PROXY_CONFIG.yaml --output DIR/ref_losses [--section.key=value ...]
    torchrun --nproc-per-node 8 tools/compute_reference_losses.py ...      # rows split across ranks

Rows follow the proxy's training stream exactly (sample position = step x global batch + offset), so the proxy
can use the cache with any parallel layout: ``--doremi.reference_losses=DIR/ref_losses``. Writes
``ref_losses.npy`` (float32, samples x seq_length) and ``ref_losses.json`` (reference md5 + stream identity),
under temporary names renamed at the end.
"""

import argparse
import json
import os
import sys

import numpy as np
import torch


def main(argv=None) -> int:
    from megadoremi.config import ConfigError, load_config
    from megadoremi.data.blending import build_blended_dataset, load_domain_weights
    from megadoremi.distributed.env import discover_environment, init_distributed
    from megadoremi.doremi.reference import (
        CACHE_FORMAT_VERSION, LiveReference, file_md5, reference_model_path, stream_identity)
    from megadoremi.train.data import collate
    from megadoremi.train.plan import resolve_batch_plan
    from megadoremi.utils.fs import atomic_output, remove_quietly, temp_path_for
    from megadoremi.utils.logging import configure_logging, get_logger

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--output", required=True, help="path prefix: writes PREFIX.npy and PREFIX.json")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--proxy-world-size", type=int, default=None,
                        help="world size of the proxy run (sets its global batch); default: this run's")
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    env = discover_environment()
    configure_logging(rank=env.rank)
    logger = get_logger("megadoremi.reference_losses")
    try:
        config = load_config(args.config, overrides)
        if not config.doremi.reference_model:
            raise ConfigError("doremi.reference_model: required to compute reference losses")
        plan = resolve_batch_plan(config, args.proxy_world_size or env.world_size)
    except ConfigError as error:
        print(f"compute_reference_losses: config error: {error}", file=sys.stderr)
        return 2
    distributed = env.world_size > 1
    if distributed:
        init_distributed(env)
    data, train = config.data, config.train
    names = list(data.domains)
    weights = load_domain_weights(data.weights, names) if data.weights is not None else [1 / len(names)] * len(names)
    num_samples = train.steps * plan.global_batch_size
    dataset = build_blended_dataset(dict(data.domains), [float(w) for w in weights], num_samples,
                                    seq_length=train.seq_length, seed=train.seed, split=data.split, split_index=0,
                                    cache_dir=data.cache_dir)
    from megadoremi.train.export import load_exported_model

    model_path = reference_model_path(config.doremi.reference_model)
    model_config, _ = load_exported_model(model_path)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.bfloat16 if torch.cuda.is_available() and train.precision != "fp32" else torch.float32
    reference = LiveReference(model_path, model_config, device, dtype)
    npy_path, meta_path = args.output + ".npy", args.output + ".json"
    tmp_npy = temp_path_for(npy_path) if env.rank == 0 else None
    if distributed:
        names_box = [tmp_npy]
        torch.distributed.broadcast_object_list(names_box, src=0)
        tmp_npy = names_box[0]
    try:
        if env.rank == 0:
            os.makedirs(os.path.dirname(os.path.abspath(npy_path)), exist_ok=True)
            np.lib.format.open_memmap(tmp_npy, mode="w+", dtype=np.float32, shape=(num_samples, train.seq_length))
        if distributed:
            torch.distributed.barrier()
        rows = np.lib.format.open_memmap(tmp_npy, mode="r+")
        share = -(-num_samples // env.world_size)
        first, last = env.rank * share, min(num_samples, (env.rank + 1) * share)
        for start in range(first, last, args.batch_size):
            positions = range(start, min(last, start + args.batch_size))
            batch = collate([dataset[i] for i in positions], positions)
            rows[start:start + len(positions)] = reference.losses(batch).cpu().numpy()
            if (start - first) // args.batch_size % 50 == 0:
                logger.info("reference losses: rows %d-%d of %d", start, positions[-1], num_samples)
        rows.flush()
        del rows
        if distributed:
            torch.distributed.barrier()
        if env.rank == 0:
            os.replace(tmp_npy, npy_path)
            meta = {"version": CACHE_FORMAT_VERSION, "reference_md5": file_md5(model_path),
                    "reference_model": os.path.abspath(model_path),
                    "stream": json.loads(json.dumps(stream_identity(config, plan.global_batch_size))),
                    "shape": [num_samples, train.seq_length]}
            with atomic_output(meta_path, "w") as handle:
                json.dump(meta, handle, indent=1)
            logger.info("wrote %s (%d samples x %d tokens)", npy_path, num_samples, train.seq_length)
    except BaseException:
        if env.rank == 0 and tmp_npy:
            remove_quietly(tmp_npy)
        raise
    finally:
        if distributed:
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
