"""``python -m megadoremi.train CONFIG.yaml [--section.key=value ...] [--dry-run] [--resume auto|none|DIR]``.

The same command runs under ``deepspeed --module``, ``torchrun -m``, ``srun`` and ``mpiexec``.
"""

import argparse
import json
import logging
import os
import sys
import traceback

import yaml

# Exit statuses (megadoremi.utils.cli): 2 a user-input error (one line), 3 the run diverged, 75 checkpointed after
# SIGUSR1/SIGTERM, "not finished, run me again" (slurm/common.sh requeues the job on it; the requeued job resumes
# from the checkpoint with --resume auto).
from megadoremi.utils.cli import EXIT_DIVERGED, EXIT_REQUEUE, UserError, debug_requested


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="megadoremi-train", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="experiment YAML")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and DeepSpeed JSON, exit")
    parser.add_argument("--resume", help="auto (the newest sound complete checkpoint), none, a step number, or a "
                                         "checkpoint directory")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a user-input error too")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    overrides = []
    for item in rest:
        if not item.startswith("--") or "=" not in item:
            parser.error(f"unrecognised argument {item!r} (overrides are --section.key=value)")
        overrides.append(item)
    if args.resume is not None:
        overrides.append(f"--checkpoint.resume={args.resume}")
    return args, overrides


def main(argv=None) -> int:
    from megadoremi.config import ConfigError, load_config
    from megadoremi.distributed.engine import build_ds_config
    from megadoremi.distributed.env import discover_environment, prepare_process_environment
    from megadoremi.distributed.plan import resolve_batch_plan

    prepare_process_environment()
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    debug = args.debug or debug_requested([])[0]
    try:
        config = load_config(args.config, overrides)
        env = discover_environment()
        plan = resolve_batch_plan(config.train, config.parallel, env.world_size)
        if args.dry_run:
            import torch

            if env.rank == 0:
                print("# resolved config")
                print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
                print("# batch plan")
                print(json.dumps(plan.to_dict(), indent=2))
                print("# DeepSpeed config")
                print(json.dumps(build_ds_config(config.train, config.parallel, plan, torch.cuda.is_available()),
                                 indent=2))
            return 0
    except ConfigError as error:
        print(f"megadoremi-train: config error: {error}", file=sys.stderr)
        return 2

    from megadoremi.distributed.env import init_distributed
    from megadoremi.train.health import TrainingDiverged
    from megadoremi.train.trainer import Trainer
    from megadoremi.utils.logging import configure_logging

    configure_logging(rank=env.rank)
    import torch.distributed as dist

    try:
        init_distributed(env, timeout_s=config.parallel.collective_timeout_s)
        summary = Trainer(config, env, plan).run()
        # Every rank gets here before any tears down its connections: a peer closing its sockets while another
        # still talks to it makes gloo abort the process ("terminate called without an active exception").
        dist.barrier()
    except ConfigError as error:
        return _leave(f"megadoremi-train: config error: {error}", 2, error if debug else None)
    except UserError as error:
        return _leave(f"megadoremi-train: error: {error}", 2, error if debug else None)
    except TrainingDiverged as error:
        return _leave(f"megadoremi-train: {error}", EXIT_DIVERGED, error if debug else None)
    except Exception as error:  # a crash: a peer lost, a collective timed out, a bug; say which rank and where
        from megadoremi.distributed.env import describe_rank_failure

        return _leave(f"megadoremi-train: {describe_rank_failure(error, env, config.parallel.collective_timeout_s)}",
                      1, error)
    if summary["status"] == "stopped" and summary.get("signal"):
        code = EXIT_REQUEUE
    else:
        code = 0 if summary["status"] in ("completed", "stopped") else 1
    # Everything is written and closed. Leave without running C++ static destructors: tearing down gloo's
    # process group at interpreter exit still aborted a rank now and then (std::terminate from a joinable
    # thread), turning a finished run into a failure.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _leave(message: str, code: int, error: BaseException | None) -> int:
    """Report a user error or divergence in one line (with its traceback under --debug) and leave at once: the
    other ranks raised the same error, and tearing down gloo at interpreter exit can abort (see above)."""
    if error is not None:
        traceback.print_exception(error)
    print(message, file=sys.stderr)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
