"""The DoReMi workflow end to end from a folder of per-domain jsonl files (console script ``megadoremi-pipeline``).

    megadoremi-pipeline --corpus DIR --workdir DIR [--preset tiny] [--nproc 2] [--steps N] [--rounds R]
                        [--skip-main] [--methods stratified,natural,doremi,ado,odm] [--seeds N]

Phases, each a normal training run in its own run directory (resumable, launched with torchrun / mpiexec /
deepspeed), each skipped when its outputs are complete:
  tokenizer -> preprocess every domain -> per round r: reference on alpha_ref, DRO proxy -> alpha_bar
  (round r+1 uses alpha_bar as its alpha_ref; stops early when max |alpha_bar - alpha_ref| < 1e-3)
  -> main models with the same budget, one per method and seed (``runs/main/METHOD/seedS``): the baseline (the
  first alpha_ref: stratified = uniform, or natural = token shares) and every method of ``--methods`` (doremi:
  the last alpha_bar; ado, odm: online mixing in the main run, ``--set mixing.KEY=VALUE`` reaches them)
  -> WORKDIR/eval.json, results.jsonl, report.md, validation_curves.png (``--skip-main``: stop after the
  weights; report.md has them). The DoReMi weights are computed once and reused for every seed.
"""

import argparse
import glob
import json
import math
import os
import subprocess
import sys

import yaml

from megadoremi import compare
from megadoremi.data.blending import natural_weights
from megadoremi.data.indexed_dataset import IndexedDataset
from megadoremi.distributed.env import free_port
from megadoremi.utils.fs import atomic_output
from megadoremi.utils.logging import get_logger

logger = get_logger(__name__)
CONVERGENCE_TOLERANCE = 1e-3


class WorkflowError(RuntimeError):
    """A problem with the workflow's inputs, found before any training starts."""


def find_domains(corpus_dir: str) -> dict[str, list[str]]:
    """``<domain>.jsonl[.gz]`` files of the corpus folder (several files may share a domain prefix)."""
    if not os.path.isdir(corpus_dir):
        raise WorkflowError(f"--corpus {corpus_dir}: not a folder")
    domains: dict[str, list[str]] = {}
    for path in sorted(glob.glob(os.path.join(corpus_dir, "*.jsonl")) + glob.glob(os.path.join(corpus_dir, "*.jsonl.gz"))):
        name = os.path.basename(path).split(".jsonl")[0]
        domains.setdefault(name, []).append(path)
    if len(domains) < 2:
        found = ", ".join(domains) or "none"
        raise WorkflowError(f"--corpus {corpus_dir}: DoReMi needs at least two domains (<domain>.jsonl[.gz] files); "
                            f"found {len(domains)} ({found})")
    return domains


def _write_json(path: str, data) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_output(path, "w") as handle:
        json.dump(data, handle, indent=1)


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    """``SECTION.KEY=VALUE`` overrides (YAML values) applied to a nested config dict, in place; returns it."""
    for override in overrides:
        key, _, value = override.partition("=")
        node = config
        *parents, leaf = key.lstrip("-").split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return config


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in compare.METHODS]
    if unknown or not methods:
        raise WorkflowError(f"--methods {text}: unknown method(s) {unknown}; choose from {', '.join(compare.METHODS)}")
    return list(dict.fromkeys(methods))


class Workflow:
    def __init__(self, args):
        self.args = args
        self.methods = parse_methods(args.methods)
        if args.seeds < 1:
            raise WorkflowError(f"--seeds: must be >= 1, got {args.seeds}")
        comparing = self.methods != ["doremi"] or args.seeds > 1
        self.eval_interval = args.eval_interval if args.eval_interval is not None else \
            (max(1, args.steps // 10) if comparing else 0)
        if args.nproc < 1:
            raise WorkflowError(f"--nproc: must be >= 1, got {args.nproc}")
        if args.launcher == "python" and args.nproc != 1:
            raise WorkflowError(f"--launcher python starts one process; --nproc {args.nproc} needs torchrun, "
                                "mpiexec or deepspeed")
        self.workdir = os.path.abspath(args.workdir)
        self.domains = find_domains(args.corpus)
        self.names = list(self.domains)

    # --- data ----------------------------------------------------------------------------------------------

    def tokenizer(self) -> str:
        if self.args.tokenizer_model:
            if not os.path.exists(self.args.tokenizer_model):
                raise WorkflowError(f"--tokenizer-model {self.args.tokenizer_model}: not found")
            return os.path.abspath(self.args.tokenizer_model)
        model = os.path.join(self.workdir, "tokenizer.model")
        if not os.path.exists(model):
            from megadoremi.data.tokenizer import train_tokenizer

            logger.info("phase tokenizer: training %d pieces on %s", self.args.vocab_size, self.args.corpus)
            train_tokenizer(self.args.corpus, os.path.join(self.workdir, "tokenizer"), self.args.vocab_size, seed=0)
        return model

    def preprocess(self, tokenizer_model: str) -> dict[str, str]:
        from megadoremi.data.preprocess import PreprocessConfig
        from megadoremi.data.preprocess_mpi import run_preprocess
        from megadoremi.data.tokenizer import Tokenizer

        fingerprint = Tokenizer(tokenizer_model).fingerprint
        stamp_path = os.path.join(self.workdir, "data", "datasets.json")
        stamp = json.load(open(stamp_path)) if os.path.exists(stamp_path) else {}
        prefixes = {}
        for name, files in self.domains.items():
            output_prefix = os.path.join(self.workdir, "data", name)
            prefix = f"{output_prefix}_text_document"
            done = stamp.get(name) == fingerprint and IndexedDataset.exists(prefix)
            if not done:
                logger.info("phase preprocess: %s (%d file(s))", name, len(files))
                run_preprocess(PreprocessConfig(inputs=files, output_prefix=output_prefix,
                                                tokenizer_model=tokenizer_model, append_eod=True,
                                                workers=self.args.workers, distributed="off"))
                stamp[name] = fingerprint
                _write_json(stamp_path, stamp)
            prefixes[name] = prefix
        return prefixes

    def natural_weights(self, prefixes: dict[str, str]) -> dict[str, float]:
        """Token shares of the domains' training splits (the same definition as ``mixing.prior: natural``)."""
        return dict(zip(prefixes, natural_weights(prefixes, self.args.split).tolist()))

    # --- training phases -------------------------------------------------------------------------------

    def base_config(self, tokenizer_model: str, prefixes: dict[str, str]) -> dict:
        args = self.args
        config = {
            "model": {"preset": args.preset},
            "data": {"tokenizer_model": tokenizer_model, "domains": prefixes, "split": args.split,
                     "cache_dir": os.path.join(self.workdir, "index-cache")},
            "train": {"steps": args.steps, "micro_batch_size": args.micro_batch_size, "grad_accum": 1,
                      "seq_length": args.seq_length, "lr": args.lr, "min_lr": args.lr / 10, "seed": args.seed,
                      "log_interval": max(1, args.steps // 20)},
            "parallel": {"zero_stage": args.zero_stage, "pipeline_stages": 1},
            "eval": {"interval": self.eval_interval, "max_samples_per_domain": args.eval_samples},
            "checkpoint": {"interval": max(1, args.steps // 4), "keep_last": 1},
        }
        return apply_overrides(config, [o for o in args.set if not o.lstrip("-").startswith("mixing.")])

    def launch(self, run_dir: str, config: dict | None) -> dict:
        """Run one training phase (or reuse it when finished); returns its final.json. ``config`` None: the
        phase must already be complete."""
        final = os.path.join(run_dir, "final.json")
        if os.path.exists(final):
            logger.info("phase %s: complete, reusing", os.path.relpath(run_dir, self.workdir))
            with open(final) as handle:
                return json.load(handle)
        if config is None:
            raise RuntimeError(f"phase {run_dir}: expected a finished run ({final} is missing)")
        os.makedirs(run_dir, exist_ok=True)
        config = {**config, "run_dir": run_dir}
        config_path = os.path.join(run_dir, "phase_config.yaml")
        with atomic_output(config_path, "w") as handle:
            yaml.safe_dump(config, handle, sort_keys=False)
        bindir = os.path.dirname(sys.executable)
        nproc = self.args.nproc
        if self.args.launcher == "torchrun":
            command = [os.path.join(bindir, "torchrun"), "--nproc-per-node", str(nproc), "--master-port",
                       str(free_port()), "-m", "megadoremi.train", config_path]
        elif self.args.launcher == "mpiexec":
            command = [os.path.join(bindir, "mpiexec"), "-n", str(nproc), sys.executable, "-m", "megadoremi.train",
                       config_path]
        elif self.args.launcher == "deepspeed":
            command = [os.path.join(bindir, "deepspeed"), "--num_gpus", str(nproc), "--master_port",
                       str(free_port()), "--module", "megadoremi.train", config_path]
        else:
            command = [sys.executable, "-m", "megadoremi.train", config_path]
        logger.info("phase %s: %s", os.path.relpath(run_dir, self.workdir), " ".join(command))
        # One intra-op thread per usable core and rank unless the user chose (torchrun's default of 1 leaves a
        # single rank on a many-core node with one core).
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = os.environ.get("OMP_NUM_THREADS", str(max(1, cores // nproc)))
        env = {**os.environ, "OMP_NUM_THREADS": threads}
        result = subprocess.run(command + ["--resume", "auto"], env=env)
        if result.returncode != 0 or not os.path.exists(final):
            raise RuntimeError(f"phase {run_dir} failed (exit status {result.returncode}); see its output above. "
                               "Rerunning the workflow resumes it from its last checkpoint.")
        return json.load(open(final))

    def run(self) -> dict:
        args = self.args
        tokenizer_model = self.tokenizer()
        prefixes = self.preprocess(tokenizer_model)
        base = self.base_config(tokenizer_model, prefixes)
        if args.reference_weights == "natural":
            alpha_ref = self.natural_weights(prefixes)
        else:
            alpha_ref = {name: 1.0 / len(self.names) for name in self.names}
        baseline_weights = dict(alpha_ref)
        rounds = []
        for round_index in range(1, args.rounds + 1):
            round_dir = os.path.join(self.workdir, "runs", f"round{round_index}")
            ref_weights_path = os.path.join(round_dir, "alpha_ref.json")
            _write_json(ref_weights_path, alpha_ref)
            reference_dir = os.path.join(round_dir, "reference")
            proxy_dir = os.path.join(round_dir, "proxy")
            self.launch(reference_dir, {**base, "data": {**base["data"], "weights": ref_weights_path}})
            proxy = self.launch(proxy_dir, {
                **base, "data": {**base["data"], "weights": ref_weights_path},
                "doremi": {"enabled": True, "reference_model": reference_dir, "step_size": args.step_size,
                           "smoothing": args.smoothing},
            })
            alpha_bar = proxy["domain_weights"]
            change = max(abs(alpha_bar[name] - alpha_ref[name]) for name in self.names)
            rounds.append({"round": round_index, "alpha_ref": alpha_ref, "alpha_bar": alpha_bar,
                           "max_change": change, "weights_file": os.path.join(proxy_dir, "domain_weights.json")})
            logger.info("round %d: max |alpha_bar - alpha_ref| = %.4g", round_index, change)
            if change < CONVERGENCE_TOLERANCE:
                logger.info("DoReMi converged after %d round(s)", round_index)
                break
            alpha_ref = alpha_bar
        if args.skip_main:
            report = render_report(self.names, rounds, baseline_weights, None, args)
            with atomic_output(os.path.join(self.workdir, "report.md"), "w") as handle:
                handle.write(report)
            return {"rounds": rounds, "eval": None, "report": report}
        return self.main_runs(base, prefixes, rounds, baseline_weights)

    def method_config(self, method: str, main_base: dict, prefixes: dict, final_weights: str) -> dict:
        """The main-run config of one mixing method (the seed is set by the caller)."""
        weights_dir = os.path.join(self.workdir, "runs", "main")
        if method in ("stratified", "natural"):
            path = os.path.join(weights_dir, f"{method}_weights.json")
            weights = {n: 1.0 / len(self.names) for n in self.names} if method == "stratified" else \
                self.natural_weights(prefixes)
            _write_json(path, weights)
            config = {**main_base, "data": {**main_base["data"], "weights": path}}
        elif method == "doremi":
            config = {**main_base, "data": {**main_base["data"], "weights": final_weights}}
        else:
            mixing = {"method": method}
            if method == "odm":
                mixing["odm"] = {"smoothing": 0.5}  # the authors' later (paper) runs; --set overrides it
            config = {**main_base, "mixing": mixing}
        mixing_overrides = [o for o in self.args.set if o.lstrip("-").startswith("mixing.")]
        return apply_overrides(json.loads(json.dumps(config)), mixing_overrides)

    def main_runs(self, base: dict, prefixes: dict, rounds: list, baseline_weights: dict) -> dict:
        """One main model per method and seed, the same budget each; eval.json, results.jsonl, report.md."""
        args = self.args
        main_base = {**base, "model": {**base["model"], "preset": args.main_preset or base["model"]["preset"]}}
        anchor = "stratified" if args.reference_weights == "uniform" else "natural"
        methods = [anchor] + [m for m in self.methods if m != anchor]
        seeds = [args.seed + i for i in range(args.seeds)]
        results, run_dirs = {}, {}
        for method in methods:
            config = self.method_config(method, main_base, prefixes, rounds[-1]["weights_file"])
            for seed in seeds:
                run_dir = os.path.join(self.workdir, "runs", "main", method, f"seed{seed}")
                if method == anchor and seed == args.seed and main_base["model"] == base["model"]:
                    # Same preset, mixture (round 1's alpha_ref), steps, seed and settings as the round-1 reference:
                    # the same (deterministic) training run, so it is not trained twice.
                    run_dir = os.path.join(self.workdir, "runs", "round1", "reference")
                    logger.info("%s main model, seed %d = the round-1 reference run (identical configuration)",
                                method, seed)
                    self.launch(run_dir, None)
                else:
                    self.launch(run_dir, {**config, "train": {**config["train"], "seed": seed}})
                results.setdefault(method, {})[seed] = compare.run_result(run_dir)
                run_dirs.setdefault(method, {})[seed] = run_dir
        try:
            compare.check_same_validation(results)
        except ValueError as error:
            raise WorkflowError(str(error)) from None
        evaluation = compare.averaged_eval(results)
        evaluation = {"baseline": evaluation[anchor], **({"doremi": evaluation["doremi"]} if "doremi" in evaluation
                                                         else {}), **evaluation}
        _write_json(os.path.join(self.workdir, "eval.json"), evaluation)
        with atomic_output(os.path.join(self.workdir, "results.jsonl"), "w") as handle:
            for line in compare.results_lines(results, anchor):
                handle.write(json.dumps(line) + "\n")
        compare.plot_curves(results, os.path.join(self.workdir, "validation_curves.png"))
        weights = self.final_weights(methods, run_dirs, prefixes, rounds)
        report = render_report(self.names, rounds, baseline_weights, evaluation, args, anchor=anchor,
                               runs={m: run_dirs[m][args.seed] for m in run_dirs}, results=results,
                               comparison=compare.render_comparison(results, anchor, weights, self.names)
                               if len(methods) > 2 or len(seeds) > 1 else None)
        with atomic_output(os.path.join(self.workdir, "report.md"), "w") as handle:
            handle.write(report)
        return {"rounds": rounds, "eval": evaluation, "report": report, "results": results}

    def final_weights(self, methods, run_dirs, prefixes, rounds) -> dict:
        """Each method's sampling weights for the report: fixed ones, or the online methods' seed-mean average."""
        weights = {}
        for method in methods:
            if method == "stratified":
                weights[method] = {n: 1.0 / len(self.names) for n in self.names}
            elif method == "natural":
                weights[method] = self.natural_weights(prefixes)
            elif method == "doremi":
                weights[method] = rounds[-1]["alpha_bar"]
            else:
                runs = [json.load(open(os.path.join(d, "mixing_weights.json"))) for d in run_dirs[method].values()]
                weights[method] = {n: sum(r[n] for r in runs) / len(runs) for n in self.names}
        return weights


def summarize(losses: dict[str, float]) -> tuple[float, float, str]:
    worst = max(losses, key=losses.get)
    return sum(losses.values()) / len(losses), losses[worst], worst


def render_report(names, rounds, baseline_weights, evaluation, args, anchor: str = "stratified",
                  runs: dict | None = None, comparison: list[str] | None = None, results: dict | None = None) -> str:
    """report.md: weights per round, per-domain validation loss of the baseline and DoReMi main models, average
    and worst, and (``comparison``) the mixing methods side by side over seeds."""
    final = rounds[-1]["alpha_bar"]
    lines = [f"# DoReMi report\n",
             f"Proxy and reference: `{args.preset}`; main models: `{args.main_preset or args.preset}`; "
             f"{args.steps} steps each, {args.nproc} ranks, sequence length {args.seq_length}. "
             f"Reference mixture: {args.reference_weights}. Rounds run: {len(rounds)}.\n",
             "## Domain weights\n",
             "| domain | baseline (alpha_ref, round 1) | " + " | ".join(
                 f"round {r['round']} alpha_bar" for r in rounds) + " |",
             "|---|---|" + "---|" * len(rounds)]
    for name in names:
        lines.append(f"| {name} | {baseline_weights[name]:.4f} | " + " | ".join(
            f"{r['alpha_bar'][name]:.4f}" for r in rounds) + " |")
    down = [n for n in names if final[n] < baseline_weights[n]]
    lines += ["", "Round convergence (max |alpha_bar - alpha_ref|): " + ", ".join(
        f"round {r['round']}: {r['max_change']:.4g}" for r in rounds) + "\n",
              f"Weights file: `{rounds[-1]['weights_file']}`; Megatron `--data-path` line: "
              f"`{os.path.join(os.path.dirname(rounds[-1]['weights_file']), 'data_path.txt')}`.\n"]
    if evaluation is None:
        lines += [f"Down-weighted relative to the baseline mixture: {', '.join(down) or 'none'}. "
                  "Main models not trained (--skip-main).\n"]
        return "\n".join(lines)
    if "doremi" not in evaluation:
        return "\n".join(lines + (comparison or []))
    baseline, doremi = evaluation["baseline"], evaluation["doremi"]
    seeds = f" (mean over {args.seeds} seeds)" if args.seeds > 1 else ""
    lines += [f"## Validation loss of the main models (per token, nats){seeds}\n"]
    if runs:
        same = os.path.basename(runs[anchor]) == "reference"
        lines += [f"Runs (seed {args.seed}): baseline = {anchor} `{runs[anchor]}`" + (
            " (the round-1 reference: with the same preset, mixture, steps and seed the baseline main model is "
            "the same training run, so it is not trained twice)" if same else "")
            + f", DoReMi `{runs['doremi']}`.\n"]
    lines += ["| domain | baseline | DoReMi | DoReMi - baseline (paired over seeds: mean ± SE) |", "|---|---|---|---|"]
    for name in names:
        cell = compare.paired(results, "doremi", anchor, "val_loss", domain=name)
        se = "" if math.isnan(cell["se"]) else f" ± {cell['se']:.4f}"
        lines.append(f"| {name} | {baseline[name]:.4f} | {doremi[name]:.4f} | {cell['mean']:+.4f}{se} |")
    average, worst = (compare.paired(results, "doremi", anchor, key) for key in ("average", "worst"))
    base_avg, base_worst, base_worst_name = summarize(baseline)
    dor_avg, dor_worst, dor_worst_name = summarize(doremi)
    se_text = {key: "" if math.isnan(d["se"]) else f" ± {d['se']:.4f}" for key, d in (("avg", average),
                                                                                       ("worst", worst))}
    lines += [f"| **average** | {base_avg:.4f} | {dor_avg:.4f} | {average['mean']:+.4f}{se_text['avg']} |",
              f"| **worst** | {base_worst:.4f} ({base_worst_name}) | {dor_worst:.4f} ({dor_worst_name}) | "
              f"{worst['mean']:+.4f}{se_text['worst']} |", ""]
    better_domains = sum(doremi[n] < baseline[n] for n in names)
    spread = compare.mean_std([results[anchor][s]["average"] for s in sorted(results[anchor])])[1]
    lines += ["## Verdict\n",
              f"DoReMi against the baseline, paired by training seed ({args.seeds} seed(s); a difference counts at "
              f"two standard errors): average validation loss {dor_avg:.4f} vs {base_avg:.4f}: "
              f"**{compare.verdict(average)}**; worst domain {dor_worst:.4f} vs {base_worst:.4f}: "
              f"**{compare.verdict(worst)}**. DoReMi is lower on {better_domains} of {len(names)} domains. "
              f"Down-weighted relative to the baseline mixture: {', '.join(down) or 'none'}."
              + (f" Seed spread of the baseline's average: std {spread:.4f}." if args.seeds > 1 else
                 " One training seed: differences smaller than the seed-to-seed spread cannot be told from noise "
                 "(`--seeds 3` measures it).") + "\n"]
    return "\n".join(lines + (comparison or []))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megadoremi-pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", required=True, help="folder with one <domain>.jsonl[.gz] per domain")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--preset", default="tiny", help="reference and proxy model preset")
    parser.add_argument("--main-preset", default=None, help="main models' preset (default: --preset)")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--launcher", default="torchrun", choices=["torchrun", "mpiexec", "deepspeed", "python"])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--tokenizer-model", default=None, help="use this SentencePiece model instead of training one")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=2, help="preprocessing workers")
    parser.add_argument("--reference-weights", default="uniform", choices=["uniform", "natural"])
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--split", default="95,5,0")
    parser.add_argument("--zero-stage", type=int, default=0)
    parser.add_argument("--eval-samples", type=int, default=64, help="validation samples per domain")
    parser.add_argument("--step-size", type=float, default=1.0, help="DoReMi eta")
    parser.add_argument("--smoothing", type=float, default=1e-3, help="DoReMi c")
    parser.add_argument("--methods", default="doremi",
                        help="comma-separated mixing methods for the main models, each compared with the baseline "
                             "(stratified or natural, the reference mixture): " + ", ".join(compare.METHODS)
                             + " (default: %(default)s)")
    parser.add_argument("--seeds", type=int, default=1,
                        help="training seeds per method: --seed, --seed + 1, ... (default: %(default)s)")
    parser.add_argument("--eval-interval", type=int, default=None,
                        help="steps between validations (default: steps / 10 when comparing methods or seeds, "
                             "else only at the end)")
    parser.add_argument("--skip-main", action="store_true",
                        help="stop after the DoReMi weights (no baseline / DoReMi main models, no eval.json)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="extra config override for every phase (repeatable); mixing.* keys reach only the main "
                             "models")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = Workflow(args).run()
    except WorkflowError as error:
        print(f"megadoremi-pipeline: error: {error}", file=sys.stderr)
        return 2
    print(result["report"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
