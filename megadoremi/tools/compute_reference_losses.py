"""Per-token reference losses for a DoReMi proxy run, computed once and memory-mapped during the proxy run.

    python tools/compute_reference_losses.py PROXY_CONFIG.yaml --output DIR/ref_losses [--section.key=value ...]
    torchrun --nproc-per-node 8 tools/compute_reference_losses.py ...      # rows split across ranks

Rows follow the proxy's training stream exactly (sample position = step x global batch + offset), so the proxy
can use the cache with any parallel layout: ``--doremi.reference_losses=DIR/ref_losses``. Writes
``ref_losses.npy`` (float32, samples x seq_length) and ``ref_losses.json`` (reference md5 + the training
stream's identity, from the same stream builder the trainer uses), under temporary names renamed at the end.
Exit status: 0; 2 on a mistake in the config, a dataset, a weights file or the reference model (one line naming
the file or field; ``--debug`` adds the traceback).
"""

import argparse
import sys

import torch

from megadoremi.utils.cli import run_cli


def main(argv=None) -> int:
    """Run the command line; returns the exit status."""
    return run_cli("compute_reference_losses", _main, argv)


def _main(argv) -> int:
    from megadoremi.config import ConfigError, load_config
    from megadoremi.distributed.engine import use_bf16
    from megadoremi.distributed.env import discover_environment, init_distributed, prepare_process_environment
    from megadoremi.distributed.plan import resolve_batch_plan
    from megadoremi.doremi.reference import write_reference_losses
    from megadoremi.train.build import build_stream_spec
    from megadoremi.utils.logging import configure_logging

    prepare_process_environment()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--output", required=True, help="path prefix: writes PREFIX.npy and PREFIX.json")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--proxy-world-size", type=int, default=None,
                        help="world size of the proxy run (sets its global batch); default: this run's")
    args, overrides = parser.parse_known_args(argv)
    env = discover_environment()
    configure_logging(rank=env.rank)
    config = load_config(args.config, overrides)
    if not config.doremi.reference_model:
        raise ConfigError("doremi.reference_model: required to compute reference losses")
    plan = resolve_batch_plan(config.train, config.parallel, args.proxy_world_size or env.world_size)
    spec = build_stream_spec(config, plan)
    distributed = env.world_size > 1
    if distributed:
        init_distributed(env, timeout_s=config.parallel.collective_timeout_s)
    try:
        write_reference_losses(spec, config.doremi.reference_model, args.output,
                               bf16=use_bf16(config.train, torch.cuda.is_available()), batch_size=args.batch_size)
    finally:
        if distributed:
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
