"""Seed-to-seed spread of the stratified run's average validation loss on the demo corpus, per setting.

For each setting (steps, learning rate, preset, micro-batch) it trains the stratified (uniform) mixture with
``--seeds`` training seeds, every run evaluated on the same validation samples (``eval.seed`` fixed, every
held-out sample up to ``--eval-samples`` per domain), and reports the standard deviation of the average
validation loss over seeds (the anchor: 0.03 nats, the spread below which a 3-seed comparison can see a 0.03-0.05
nats mixing effect), with the CPU time the setting costs. The demo corpus, tokenizer and datasets are built once
in WORKDIR by ``megadoremi-pipeline --skip-main`` (1 step); every run is a plain ``megadoremi.train``.

    python tools/bench_seed_spread.py --workdir /tmp/spread --settings 200:3e-3,200:1e-2,400:3e-3 [--seeds 3]
        [--nproc 2] [--preset tiny] [--micro-batch 8] [--decay exponential|cosine|constant] [--json out.json]

A setting is ``STEPS:LR[:PRESET[:MICRO_BATCH]]``.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import yaml

from megadoremi.data.demo_corpus import make_demo_corpus
from megadoremi.distributed.env import free_port


def prepare(workdir: str, nproc: int) -> dict:
    """The demo corpus, tokenizer and datasets; returns the reference phase's config as a template."""
    template = os.path.join(workdir, "runs", "round1", "reference", "phase_config.yaml")
    if not os.path.exists(template):
        corpus = os.path.join(workdir, "corpus")
        if not os.path.isdir(corpus):
            make_demo_corpus(corpus, seed=0)
        subprocess.run([sys.executable, "-m", "megadoremi.workflow", "--corpus", corpus, "--workdir", workdir,
                        "--steps", "1", "--skip-main", "--nproc", "1", "--launcher", "python"], check=True)
    with open(template) as handle:
        return yaml.safe_load(handle)


def run_one(template: dict, workdir: str, steps: int, lr: float, preset: str, micro_batch: int, seed: int,
            nproc: int, eval_samples: int, decay: str) -> tuple[float, float]:
    """(average validation loss, wall seconds) of one stratified run."""
    name = f"s{steps}_lr{lr:g}_{preset}_mb{micro_batch}_seed{seed}" + ("" if decay == "exponential" else f"_{decay}")
    run_dir = os.path.join(workdir, "spread", name)
    final = os.path.join(run_dir, "final.json")
    config = json.loads(json.dumps(template))
    config.update(run_dir=run_dir)
    config["model"]["preset"] = preset
    config["data"].pop("weights", None)  # uniform: stratified
    config["train"].update(steps=steps, lr=lr, min_lr=lr / 10, seed=seed, micro_batch_size=micro_batch,
                           log_interval=max(1, steps // 10), decay=decay)
    config["eval"] = {"interval": 0, "max_samples_per_domain": eval_samples}
    config["checkpoint"] = {"interval": 0, "keep_last": 1, "export_model": False}
    started = time.perf_counter()
    if not os.path.exists(final):
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, "bench_config.yaml")
        with open(path, "w") as handle:
            yaml.safe_dump(config, handle)
        bindir = os.path.dirname(sys.executable)
        command = [os.path.join(bindir, "torchrun"), "--nproc-per-node", str(nproc), "--master-port",
                   str(free_port()), "-m", "megadoremi.train", path] if nproc > 1 else \
            [sys.executable, "-m", "megadoremi.train", path]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(final) as handle:
        return json.load(handle)["eval"]["val_loss_avg"], time.perf_counter() - started


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--settings", default="200:3e-3,200:1e-2,400:3e-3")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--eval-samples", type=int, default=4096)
    parser.add_argument("--decay", default="exponential", choices=["exponential", "cosine", "constant"],
                        help="learning-rate decay after warm-up (train.decay)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    template = prepare(os.path.abspath(args.workdir), args.nproc)
    rows = []
    for setting in args.settings.split(","):
        parts = setting.split(":")
        steps, lr = int(parts[0]), float(parts[1])
        preset = parts[2] if len(parts) > 2 else args.preset
        micro_batch = int(parts[3]) if len(parts) > 3 else args.micro_batch
        results = [run_one(template, os.path.abspath(args.workdir), steps, lr, preset, micro_batch, 1234 + seed,
                           args.nproc, args.eval_samples, args.decay) for seed in range(args.seeds)]
        losses = [loss for loss, _ in results]
        row = {"steps": steps, "lr": lr, "preset": preset, "micro_batch": micro_batch, "decay": args.decay,
               "seeds": args.seeds,
               "mean": statistics.mean(losses), "std": statistics.stdev(losses) if len(losses) > 1 else None,
               "losses": losses, "wall_s_per_run": statistics.mean(s for _, s in results)}
        rows.append(row)
        print(f"steps {steps:5d} lr {lr:7.0e} {args.decay} {preset:6s} micro-batch {micro_batch:3d}: average val loss "
              f"{row['mean']:.4f}, seed std {row['std']:.4f} ({'below' if row['std'] < 0.03 else 'above'} 0.03), "
              f"{row['wall_s_per_run']:.0f} s per run", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
