"""The DoReMi workflow end to end from a folder of per-domain jsonl files (console script ``megadoremi-pipeline``).

    megadoremi-pipeline --corpus DIR --workdir DIR [--preset tiny] [--nproc 2] [--steps N] [--rounds R]
                        [--skip-main] [--methods stratified,natural,doremi,ado,odm] [--seeds N]
                        [--downstream-tasks megadoremi_cloze,...] [--debug]

Phases, each a normal training run in its own run directory (resumable, launched with torchrun / mpiexec /
deepspeed):
  tokenizer -> preprocess every domain -> per round r: reference on alpha_ref, DRO proxy -> alpha_bar
  (round r+1 uses alpha_bar as its alpha_ref; stops early when max |alpha_bar - alpha_ref| < 1e-3)
  -> main models with the same budget, one per method and seed (``runs/main/METHOD/seedS``): the baseline (the
  first alpha_ref: stratified = uniform, or natural = token shares) and every method of ``--methods`` (doremi:
  the last alpha_bar; ado, odm: online mixing in the main run, ``--set mixing.KEY=VALUE`` reaches them)
  -> WORKDIR/eval.json, results.jsonl, report.md, validation_curves.png (``--skip-main``: stop after the
  weights; report.md has them). The DoReMi weights are computed once and reused for every seed. With
  ``--downstream-tasks``, lm-eval on the baseline and DoReMi main models (``megadoremi.tools.evaluate``), in
  eval.json's ``downstream`` and the report. The report gives the paper's speed-up figure.

The corpus folder holds one ``<domain>.jsonl[.gz]`` per domain; a domain name with whitespace is refused (a
Megatron ``--data-path`` line splits on it) and every other entry of the folder is listed in a warning.

Reuse. Every phase records a fingerprint of its inputs next to its outputs (``megadoremi.phases``): the
tokenizer (WORKDIR/tokenizer.fingerprint.json: the corpus files' sizes and mtimes, the vocabulary size), each
domain's dataset (data/DOMAIN_text_document.fingerprint.json: that domain's corpus files, the tokenizer's sha256,
the preprocessing settings), each training run (RUN_DIR/phase_fingerprint.json: every field of the phase config
as written, the number of ranks, the sha256 of the tokenizer and weights files, the datasets' fingerprints, and
for a proxy the identity of its reference run). A phase is reused (or, unfinished, resumed from its checkpoint)
only when its recorded inputs equal the current ones; otherwise it is redone, and so is every phase downstream
(their inputs include what it wrote), and the log says which inputs changed. A tokenizer or dataset is rebuilt
in place. A training run directory whose inputs changed is moved aside to ``RUN_DIR.stale-YYYYmmdd-HHMMSS``,
never deleted and never resumed from (delete it once you do not need it). A run directory without a fingerprint
(a workdir from an older megadoremi, or one made by hand) cannot be shown to match, so it is treated as changed:
moved aside and retrained; older tokenizers and datasets are rebuilt.

Each training phase's output (every rank's log lines) is appended to RUN_DIR/launch.log as it is echoed.

Exit status: 0; 2 for a user-input error (corpus, tokenizer, options, ``--set``, a phase config the trainer would
refuse), one line on stderr (``--debug``: with the traceback). A failed phase stops the workflow before any later
phase with one line naming its run directory, and megadoremi-pipeline exits with the phase's own status: 3 when
it diverged (non-finite loss or gradient norm: the trainer exited 3 or wrote RUN_DIR/diverged.json), 75 when it
checkpointed and stopped on a signal (rerun to resume), 128 + N when killed by signal N, else the trainer's status
(1: it crashed; its traceback is in launch.log). When the launcher exits 1 for any failed rank (torchrun), the
rank's status is read from the launcher's failure summary.
"""

import argparse
import json
import logging
import os
import sys

import yaml

from megadoremi import compare, phases
from megadoremi.config import ConfigError, config_from_dict
from megadoremi.data.blending import natural_weights
from megadoremi.data.indexed_dataset import IndexedDataset
from megadoremi.distributed.env import free_port
from megadoremi.phases import PhaseFailed
from megadoremi.utils.cli import UserError, run_cli
from megadoremi.utils.fs import atomic_output, remove_quietly
from megadoremi.utils.logging import get_logger

logger = get_logger(__name__)
CONVERGENCE_TOLERANCE = 1e-3
CORPUS_SUFFIXES = (".jsonl.gz", ".jsonl")
_MAX_IGNORED_SHOWN = 10


class WorkflowError(UserError):
    """A problem with the workflow's inputs (corpus, tokenizer, options, ``--set``); the message names it."""


def domain_name(filename: str) -> str | None:
    """``web.jsonl`` / ``web.jsonl.gz`` -> ``web``; None for a name the workflow does not read (hidden, other)."""
    if filename.startswith("."):
        return None
    for suffix in CORPUS_SUFFIXES:
        if filename.endswith(suffix):
            return filename[:-len(suffix)] or None
    return None


def find_domains(corpus_dir: str) -> dict[str, list[str]]:
    """``<domain>.jsonl[.gz]`` files of the corpus folder (several files may share a domain prefix)."""
    if not os.path.isdir(corpus_dir):
        raise WorkflowError(f"--corpus {corpus_dir}: not a folder")
    domains: dict[str, list[str]] = {}
    ignored = []
    for entry in sorted(os.listdir(corpus_dir)):
        path = os.path.join(corpus_dir, entry)
        name = domain_name(entry) if os.path.isfile(path) else None
        if name is None:
            ignored.append(entry + ("/" if os.path.isdir(path) else ""))
            continue
        if any(char.isspace() for char in name):
            raise WorkflowError(f"{path}: the domain name {name!r} contains whitespace, which a Megatron --data-path "
                                "line (data_path.txt) splits on; rename the file")
        domains.setdefault(name, []).append(path)
    if ignored:
        more = f" and {len(ignored) - _MAX_IGNORED_SHOWN} more" if len(ignored) > _MAX_IGNORED_SHOWN else ""
        logger.warning("--corpus %s: ignoring %d entr%s not named <domain>.jsonl[.gz] (hidden files, other names, "
                       "folders): %s%s", corpus_dir, len(ignored), "y" if len(ignored) == 1 else "ies",
                       ", ".join(ignored[:_MAX_IGNORED_SHOWN]), more)
    if len(domains) < 2:
        found = ", ".join(domains) or "none"
        raise WorkflowError(f"--corpus {corpus_dir}: DoReMi needs at least two domains (<domain>.jsonl[.gz] files); "
                            f"found {len(domains)} ({found})")
    return domains


def _write_json(path: str, data) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_output(path, "w") as handle:
        json.dump(data, handle, indent=1)


def read_json(path: str):
    with open(path) as handle:
        return json.load(handle)


def check_config(config: dict, where: str) -> None:
    """Validate a phase config as the trainer will (``megadoremi.config``); WorkflowError naming the field."""
    try:
        config_from_dict(json.loads(json.dumps(config)))
    except ConfigError as error:
        raise WorkflowError(f"{where}: {error}") from None


def parse_override(override: str) -> tuple[list[str], object]:
    """``SECTION.KEY=VALUE`` -> (["SECTION", "KEY"], the YAML value); WorkflowError naming the override."""
    key, equals, text = override.lstrip("-").partition("=")
    path = key.split(".")
    if not equals or not all(part.strip() for part in path):
        raise WorkflowError(f"--set {override}: expected SECTION.KEY=VALUE")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise WorkflowError(f"--set {override}: the value is not valid YAML ({' '.join(str(error).split())})") from None
    return path, value


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    """``SECTION.KEY=VALUE`` overrides (YAML values) applied to a nested config dict, in place; returns it."""
    for override in overrides:
        (*parents, leaf), value = parse_override(override)
        node = config
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise WorkflowError(f"--set {override}: {part} is not a section")
        node[leaf] = value
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
        if args.downstream_tasks and (args.skip_main or "doremi" not in self.methods):
            raise WorkflowError("--downstream-tasks evaluates the baseline and DoReMi main models: it needs doremi in "
                                "--methods and no --skip-main")
        comparing = self.methods != ["doremi"] or args.seeds > 1
        self.eval_interval = args.eval_interval if args.eval_interval is not None else \
            (max(1, args.steps // 10) if comparing else 0)
        if args.nproc < 1:
            raise WorkflowError(f"--nproc: must be >= 1, got {args.nproc}")
        if args.launcher == "python" and args.nproc != 1:
            raise WorkflowError(f"--launcher python starts one process; --nproc {args.nproc} needs torchrun, "
                                "mpiexec or deepspeed")
        launcher = self.launcher_executable()
        if not os.path.exists(launcher):
            raise WorkflowError(f"--launcher {args.launcher}: {launcher} not found (not installed in this environment)")
        for override in args.set:
            parse_override(override)
        self.workdir = os.path.abspath(args.workdir)
        self.domains = find_domains(args.corpus)
        self.names = list(self.domains)
        self.anchor = "stratified" if args.reference_weights == "uniform" else "natural"
        self.check_settings()

    def check_settings(self) -> None:
        """Validate every kind of phase config the options and ``--set`` give, with placeholder paths, before
        anything runs: a bad value fails now as one line, not after the tokenizer and preprocessing."""
        base = self.base_config("tokenizer.model", {name: f"{name}_text_document" for name in self.names})
        weights = os.path.join(self.workdir, "weights.json")
        configs = {"reference": self.reference_config(base, weights),
                   "proxy": self.proxy_config(base, weights, os.path.join(self.workdir, "reference"))}
        if not self.args.skip_main:
            main_base = self.main_base(base)
            for method in dict.fromkeys([self.anchor, *self.methods]):
                configs[f"main {method}"] = self.method_config(method, main_base, weights)
        for phase, config in configs.items():
            check_config({**config, "run_dir": self.workdir}, f"the {phase} runs' config (from the options and --set)")

    # --- data ----------------------------------------------------------------------------------------------

    def tokenizer(self) -> str:
        """The tokenizer model: ``--tokenizer-model``, or one trained on the corpus (retrained when it changed)."""
        if self.args.tokenizer_model:
            if not os.path.isfile(self.args.tokenizer_model):
                raise WorkflowError(f"--tokenizer-model {self.args.tokenizer_model}: not found")
            return os.path.abspath(self.args.tokenizer_model)
        from megadoremi.data.tokenizer import train_tokenizer

        prefix = os.path.join(self.workdir, "tokenizer")
        model, record = prefix + ".model", prefix + ".fingerprint.json"
        files = [path for paths in self.domains.values() for path in paths]
        inputs = {**phases.corpus_inputs(files), "vocab_size": self.args.vocab_size, "seed": 0}
        reason = phases.stale_reason(record, inputs) if os.path.exists(model) else "not trained yet"
        if reason is None:
            logger.info("phase tokenizer: complete, reusing %s", model)
            return model
        level = logging.WARNING if os.path.exists(model) else logging.INFO
        logger.log(level, "phase tokenizer: %s, training %d pieces on %s", reason, self.args.vocab_size,
                   self.args.corpus)
        remove_quietly(record)  # an interrupted training must not leave a matching record behind
        try:
            train_tokenizer(files, prefix, self.args.vocab_size, seed=0)
        except (UserError, OSError) as error:  # a TokenizerError, an unreadable corpus file
            raise WorkflowError(f"phase tokenizer (--corpus {self.args.corpus}, --vocab-size "
                                f"{self.args.vocab_size}): {' '.join(str(error).split())}") from None
        phases.write_record(record, inputs)
        return model

    def preprocess(self, tokenizer_model: str) -> dict[str, str]:
        """One indexed dataset per domain, re-tokenized when its corpus files or the tokenizer changed."""
        from megadoremi.data.preprocess import PreprocessConfig
        from megadoremi.data.preprocess_mpi import run_preprocess

        tokenizer_sha256 = phases.file_sha256(tokenizer_model)
        prefixes = {}
        for name, files in self.domains.items():
            output_prefix = os.path.join(self.workdir, "data", name)
            prefix = f"{output_prefix}_text_document"
            record = f"{prefix}.fingerprint.json"
            inputs = {**phases.corpus_inputs(files), "tokenizer_model sha256": tokenizer_sha256, "json_keys": ["text"],
                      "append_eod": True}
            reason = phases.stale_reason(record, inputs) if IndexedDataset.exists(prefix) else "not tokenized yet"
            if reason is not None:
                level = logging.WARNING if IndexedDataset.exists(prefix) else logging.INFO
                logger.log(level, "phase preprocess %s: %s, tokenizing %d file(s)", name, reason, len(files))
                remove_quietly(record)
                try:
                    run_preprocess(PreprocessConfig(inputs=files, output_prefix=output_prefix,
                                                    tokenizer_model=tokenizer_model, append_eod=True,
                                                    workers=self.args.workers, distributed="off"))
                except (UserError, OSError) as error:  # bad or empty input (a worker that died is a bug)
                    raise WorkflowError(f"phase preprocess {name}: {' '.join(str(error).split())}") from None
                phases.write_record(record, inputs)
            prefixes[name] = prefix
        return prefixes

    def natural_weights(self, prefixes: dict[str, str]) -> dict[str, float]:
        """Token shares of the domains' training splits (the same definition as ``mixing.prior: natural``)."""
        return dict(zip(prefixes, natural_weights(prefixes, self.args.split).tolist()))

    # --- phase configs ---------------------------------------------------------------------------------

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

    @staticmethod
    def reference_config(base: dict, weights_file: str) -> dict:
        return {**base, "data": {**base["data"], "weights": weights_file}}

    def proxy_config(self, base: dict, weights_file: str, reference_dir: str) -> dict:
        return {**base, "data": {**base["data"], "weights": weights_file},
                "doremi": {"enabled": True, "reference_model": reference_dir, "step_size": self.args.step_size,
                           "smoothing": self.args.smoothing}}

    def main_base(self, base: dict) -> dict:
        """The main models' base config: ``--main-preset`` (default: the proxy's preset)."""
        return {**base, "model": {**base["model"], "preset": self.args.main_preset or base["model"]["preset"]}}

    def method_config(self, method: str, main_base: dict, weights_file: str | None) -> dict:
        """The main-run config of one mixing method (the seed is set by the caller); ``weights_file``: the fixed
        mixture of stratified, natural and doremi."""
        if method in ("stratified", "natural", "doremi"):
            config = {**main_base, "data": {**main_base["data"], "weights": weights_file}}
        else:
            mixing = {"method": method}
            if method == "odm":
                mixing["odm"] = {"smoothing": 0.5}  # the authors' later (paper) runs; --set overrides it
            config = {**main_base, "mixing": mixing}
        mixing_overrides = [o for o in self.args.set if o.lstrip("-").startswith("mixing.")]
        return apply_overrides(json.loads(json.dumps(config)), mixing_overrides)

    def method_weights_file(self, method: str, prefixes: dict, final_weights: str) -> str | None:
        """The weights file of a fixed-mixture method (written for stratified and natural); None: online."""
        if method in ("stratified", "natural"):
            path = os.path.join(self.workdir, "runs", "main", f"{method}_weights.json")
            weights = {n: 1.0 / len(self.names) for n in self.names} if method == "stratified" else \
                self.natural_weights(prefixes)
            _write_json(path, weights)
            return path
        return final_weights if method == "doremi" else None

    # --- training phases -------------------------------------------------------------------------------

    def launch(self, run_dir: str, config: dict | None) -> dict:
        """Run one training phase (or reuse it when finished with the same inputs); returns its final.json.
        ``config`` None: the phase must already be complete (the round-1 reference as the baseline)."""
        name = os.path.relpath(run_dir, self.workdir)
        final = os.path.join(run_dir, "final.json")
        if config is None:
            if not os.path.exists(final):
                raise RuntimeError(f"phase {run_dir}: expected a finished run ({final} is missing)")
            return read_json(final)
        config = {**config, "run_dir": run_dir}
        check_config(config, f"phase {name}")
        inputs = phases.training_inputs(config, self.args.nproc)
        record = os.path.join(run_dir, phases.RECORD_NAME)
        if os.path.isdir(run_dir) and os.listdir(run_dir):
            reason = phases.stale_reason(record, inputs)
            if reason is None and os.path.exists(final):
                logger.info("phase %s: complete, reusing", name)
                return read_json(final)
            if reason is None:
                logger.info("phase %s: unfinished with the same inputs, resuming from its last checkpoint", name)
            else:
                aside = phases.set_aside(run_dir)
                logger.warning("phase %s: %s, retraining; the previous run is kept in %s", name, reason,
                               os.path.relpath(aside, self.workdir))
        os.makedirs(run_dir, exist_ok=True)
        config_path = os.path.join(run_dir, "phase_config.yaml")
        with atomic_output(config_path, "w") as handle:
            yaml.safe_dump(config, handle, sort_keys=False)
        phases.write_record(record, inputs)
        command = self.command(config_path) + ["--resume", "auto"]
        logger.info("phase %s: %s", name, " ".join(command))
        # One intra-op thread per usable core and rank unless the user chose (torchrun's default of 1 leaves a
        # single rank on a many-core node with one core).
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = os.environ.get("OMP_NUM_THREADS", str(max(1, cores // self.args.nproc)))
        diverged_before = phases.file_version(os.path.join(run_dir, phases.DIVERGED_FILE))
        returncode, output = phases.run_logged(command, {**os.environ, "OMP_NUM_THREADS": threads},
                                               os.path.join(run_dir, phases.LAUNCH_LOG))
        status = phases.phase_exit_status(returncode, output)
        if status == 0 and os.path.exists(final):
            return read_json(final)
        raise phases.phase_failure(run_dir, status, phases.new_divergence(run_dir, diverged_before))

    def launcher_executable(self) -> str:
        """The launcher program of ``--launcher``, from this environment."""
        if self.args.launcher == "python":
            return sys.executable
        return os.path.join(os.path.dirname(sys.executable), self.args.launcher)

    def command(self, config_path: str) -> list[str]:
        """The launcher's command line for one training phase."""
        launcher, nproc = self.launcher_executable(), str(self.args.nproc)
        if self.args.launcher == "torchrun":
            return [launcher, "--nproc-per-node", nproc, "--master-port", str(free_port()), "-m", "megadoremi.train",
                    config_path]
        if self.args.launcher == "mpiexec":
            return [launcher, "-n", nproc, sys.executable, "-m", "megadoremi.train", config_path]
        if self.args.launcher == "deepspeed":
            return [launcher, "--num_gpus", nproc, "--master_port", str(free_port()), "--module", "megadoremi.train",
                    config_path]
        return [launcher, "-m", "megadoremi.train", config_path]

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
            self.launch(reference_dir, self.reference_config(base, ref_weights_path))
            proxy = self.launch(proxy_dir, self.proxy_config(base, ref_weights_path, reference_dir))
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
            report = compare.render_report(self.names, rounds, baseline_weights, None, args)
            with atomic_output(os.path.join(self.workdir, "report.md"), "w") as handle:
                handle.write(report)
            return {"rounds": rounds, "eval": None, "report": report}
        return self.main_runs(base, prefixes, rounds, baseline_weights)

    def main_runs(self, base: dict, prefixes: dict, rounds: list, baseline_weights: dict) -> dict:
        """One main model per method and seed, the same budget each; eval.json, results.jsonl, report.md."""
        args = self.args
        main_base = self.main_base(base)
        anchor = self.anchor
        methods = [anchor] + [m for m in self.methods if m != anchor]
        seeds = [args.seed + i for i in range(args.seeds)]
        results, run_dirs = {}, {}
        for method in methods:
            weights_file = self.method_weights_file(method, prefixes, rounds[-1]["weights_file"])
            config = self.method_config(method, main_base, weights_file)
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
        if args.downstream_tasks and "doremi" in run_dirs:
            evaluation["downstream"] = self.downstream({"baseline": run_dirs[anchor][args.seed],
                                                        "doremi": run_dirs["doremi"][args.seed]})
            _write_json(os.path.join(self.workdir, "eval.json"), evaluation)
        weights = self.final_weights(methods, run_dirs, prefixes, rounds)
        report = compare.render_report(self.names, rounds, baseline_weights, evaluation, args, anchor=anchor,
                               runs={m: run_dirs[m][args.seed] for m in run_dirs}, results=results,
                               comparison=compare.render_comparison(results, anchor, weights, self.names)
                               if len(methods) > 2 or len(seeds) > 1 else None)
        with atomic_output(os.path.join(self.workdir, "report.md"), "w") as handle:
            handle.write(report)
        return {"rounds": rounds, "eval": evaluation, "report": report, "results": results}

    def downstream(self, runs: dict) -> dict:
        """lm-eval on each named main model (``megadoremi-eval``): {name: {task: {metric: value}}}."""
        from megadoremi.tools.evaluate import evaluate_downstream

        tasks = [task for task in self.args.downstream_tasks.split(",") if task]
        return {name: evaluate_downstream(run_dir, tasks, limit=self.args.downstream_limit)["tasks"]
                for name, run_dir in runs.items()}

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
    parser.add_argument("--eval-samples", type=int, default=4096,
                        help="validation samples per domain: every held-out sample up to this many (default "
                             "%(default)s, the trainer's eval.max_samples_per_domain: a standard error of a domain's "
                             "mean loss below 0.01 nats for a per-sample spread up to 0.64 nats)")
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
    parser.add_argument("--downstream-tasks", default=None, metavar="T1,T2",
                        help="lm-eval tasks for the baseline and DoReMi main models (seed --seed): megadoremi_cloze "
                             "(per-domain cloze tasks from held-out documents, no download) or lm-eval registry "
                             "tasks whose data is in the local Hugging Face cache")
    parser.add_argument("--downstream-limit", type=int, default=None,
                        help="at most this many examples per downstream task (default: all)")
    parser.add_argument("--skip-main", action="store_true",
                        help="stop after the DoReMi weights (no baseline / DoReMi main models, no eval.json)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a user-input error too")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="extra config override for every phase (repeatable); mixing.* keys reach only the main "
                             "models")
    return parser


def run_pipeline(argv: list[str], prog: str = "megadoremi-pipeline") -> int:
    """Parse ``argv`` and run the workflow; a failed phase is one line on stderr and the phase's exit status."""
    args = build_parser().parse_args(argv)
    try:
        result = Workflow(args).run()
    except PhaseFailed as failure:
        print(f"{prog}: error: {failure}", file=sys.stderr)
        return failure.exit_status
    print(result["report"])
    return 0


def main(argv=None) -> int:
    """``megadoremi-pipeline``: user-input errors are one line and exit 2 (``--debug``: with the traceback)."""
    return run_cli("megadoremi-pipeline", run_pipeline, argv)


if __name__ == "__main__":
    sys.exit(main())
