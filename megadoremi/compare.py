"""Mixing methods side by side: per (method, seed) results from the main runs' outputs, paired statistics against
the anchor (stratified) run of the same seed, the workflow's report.md (``render_report``) with its comparison
section, and a PNG of the validation-loss curves.

Differences between methods are judged against seed noise: for each method, the per-seed paired difference to
the anchor on the average and the worst-domain validation loss, their mean and standard error over seeds
(std / sqrt(seeds)); a difference counts only when it is at least two standard errors from zero ("better" or "worse"); otherwise, and with one
seed (no estimate of the noise), it is "within noise".
"""

import json
import math
import os
import statistics

from megadoremi.utils.fs import atomic_output

METHODS = ("stratified", "natural", "doremi", "ado", "odm")


def read_jsonl(path: str) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def run_result(run_dir: str) -> dict:
    """A finished run's final per-domain validation loss, average, worst, and its average-loss curve."""
    with open(os.path.join(run_dir, "final.json")) as handle:
        final = json.load(handle)["eval"]
    curve = [(record["step"], record["val_loss_avg"]) for record in read_jsonl(os.path.join(run_dir, "eval.jsonl"))
             if "val_loss_avg" in record]
    worst = max(final["val_loss"], key=final["val_loss"].get)
    return {"val_loss": final["val_loss"], "average": final["val_loss_avg"], "worst": final["val_loss_worst"],
            "worst_domain": worst, "curve": curve, "val_set_hash": final.get("val_set_hash"),
            "val_samples": final.get("val_samples"), "run_dir": run_dir}


def check_same_validation(results: dict) -> None:
    """Refuse to compare runs evaluated on different validation samples (their ``val_set_hash`` differ)."""
    hashes = {}
    for method, seeds in results.items():
        for seed, result in seeds.items():
            hashes.setdefault(result["val_set_hash"], []).append(f"{method} seed {seed} ({result['run_dir']})")
    if len(hashes) > 1 or None in hashes:
        groups = "; ".join(f"{h}: {', '.join(runs)}" for h, runs in hashes.items())
        raise ValueError("the runs were evaluated on different validation samples (or record none), so their "
                         f"losses cannot be compared: {groups}. Use the same data, split, sequence length, "
                         "eval.seed and eval.max_samples_per_domain")


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    """The first evaluated step whose average validation loss is at or below ``target`` (None: never)."""
    return next((step for step, value in curve if value <= target), None)


def speedup(curve: list[tuple[int, float]], baseline_curve: list[tuple[int, float]]) -> dict:
    """The paper's speed-up: the step at which ``curve`` (step, average validation loss) first reaches the
    baseline's final average loss, and the baseline's steps over that step.

    Between two evaluations the step is interpolated linearly (``interpolated``); reached at the first evaluation,
    the step is only known to be at most that one (``upper_bound``: the speed-up is at least the figure).
    ``step`` and ``speedup`` are None when the loss never gets there."""
    baseline_steps, target = baseline_curve[-1] if baseline_curve else (None, float("nan"))
    result = {"target": target, "baseline_steps": baseline_steps, "step": None, "speedup": None,
              "interpolated": False, "upper_bound": False}
    previous = None
    for step, value in curve:
        if value <= target:
            if previous is None or value == target:
                result.update(step=float(step), upper_bound=previous is None)
            else:
                (step0, value0) = previous
                result.update(step=step0 + (step - step0) * (value0 - target) / (value0 - value), interpolated=True)
            result["speedup"] = baseline_steps / result["step"] if result["step"] > 0 else None
            return result
        previous = (step, value)
    return result


def describe_speedup(figure: dict, name: str = "DoReMi") -> str:
    """One sentence for the report."""
    reached = f"the baseline's final average validation loss ({figure['target']:.4f} at step {figure['baseline_steps']})"
    if figure["baseline_steps"] is None:
        return f"{name}: no speed-up figure (the baseline has no evaluations in eval.jsonl)."
    if figure["step"] is None:
        return f"{name} does not reach {reached} within its {figure['baseline_steps']} steps: not reached."
    how = ("interpolated linearly between evaluations" if figure["interpolated"] else
           "at or before its first evaluation, so the speed-up is at least this" if figure["upper_bound"] else
           "at an evaluation")
    return (f"{name} reaches {reached} at step {figure['step']:.0f} ({how}): "
            f"**{figure['speedup']:.2f}x fewer steps**.")


def render_downstream(downstream: dict) -> list[str]:
    """The downstream table of the report: task, metric, baseline, DoReMi, difference (one seed)."""
    lines = ["## Downstream evaluation (lm-evaluation-harness, seed --seed)\n",
             "| task | metric | baseline | DoReMi | DoReMi - baseline |", "|---|---|---|---|---|"]
    baseline, doremi = downstream["baseline"], downstream["doremi"]
    for task in baseline:
        for metric, value in baseline[task].items():
            if metric.endswith("_stderr") or metric == "sample_len" or metric not in doremi.get(task, {}):
                continue
            other = doremi[task][metric]
            se = baseline[task].get(metric + "_stderr")
            note = f" (SE {se:.3g})" if isinstance(se, float) and math.isfinite(se) else ""
            lines.append(f"| {task} | {metric} | {value:.4g}{note} | {other:.4g} | {other - value:+.4g} |")
    return lines + ["", "acc on the megadoremi_cloze tasks is exact match of the greedy continuation (the document's "
                    "last word); perplexity is that of the target. One training seed: differences within a few "
                    "standard errors are noise.\n"]


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else float("nan")


def paired(results: dict, method: str, anchor: str, key: str, domain: str | None = None) -> dict:
    """Per-seed ``method - anchor`` of ``key`` (average or worst; or a domain's ``val_loss``), their mean, std and
    standard error."""
    def value(result):
        return result["val_loss"][domain] if domain is not None else result[key]

    differences = [value(results[method][seed]) - value(results[anchor][seed]) for seed in sorted(results[anchor])]
    return difference_stats(differences)


def difference_stats(differences: list[float]) -> dict:
    """Mean, std and standard error (std / sqrt(n)) of paired differences."""
    mean, std = mean_std(differences)
    se = std / math.sqrt(len(differences)) if len(differences) > 1 else float("nan")
    return {"differences": differences, "mean": mean, "std": std, "se": se}


def verdict(difference: dict) -> str:
    """Plain words for a paired difference (negative = lower loss than the anchor = better)."""
    if math.isnan(difference["se"]):
        return "within noise (one seed: no estimate of the noise)"
    if abs(difference["mean"]) < 2 * difference["se"] or difference["mean"] == 0:
        return "within noise"
    return "better" if difference["mean"] < 0 else "worse"


def results_lines(results: dict, anchor: str) -> list[dict]:
    """One line per (method, seed): per-domain validation loss, average, worst, steps to the anchor's final
    average loss (the anchor run of the same seed)."""
    lines = []
    for method, seeds in results.items():
        for seed, result in sorted(seeds.items()):
            target = results[anchor][seed]["average"]
            lines.append({"method": method, "seed": seed, "val_loss": result["val_loss"], "average": result["average"],
                          "worst": result["worst"], "worst_domain": result["worst_domain"],
                          "steps_to_anchor_final_average": steps_to_reach(result["curve"], target),
                          "speedup_over_anchor": speedup(result["curve"], results[anchor][seed]["curve"])["speedup"],
                          "anchor": anchor})
    return lines


def averaged_eval(results: dict) -> dict:
    """``{method: {domain: validation loss averaged over seeds}}``."""
    averaged = {}
    for method, seeds in results.items():
        domains = next(iter(seeds.values()))["val_loss"]
        averaged[method] = {d: statistics.fmean(r["val_loss"][d] for r in seeds.values()) for d in domains}
    return averaged


def _fmt(mean: float, std: float, digits: int = 4) -> str:
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def render_comparison(results: dict, anchor: str, weights: dict, names: list[str]) -> list[str]:
    """Markdown: methods x (average, worst, domains better than the anchor) as mean ± std over seeds, the paired
    differences with their standard errors and a verdict, steps to the anchor's final loss, the weights."""
    seeds = sorted(results[anchor])
    lines = [f"## Mixing methods compared ({len(seeds)} seed(s): {', '.join(map(str, seeds))})\n",
             f"Validation loss per token (nats) of the main models, mean ± std over seeds; differences are paired with "
             f"the `{anchor}` run of the same seed, mean ± standard error (std / sqrt(seeds)). A difference counts "
             "only when it is at least two standard errors from zero.\n",
             f"| method | average | worst | domains better than {anchor} | average - {anchor} | "
             f"worst - {anchor} | verdict (average) | steps to {anchor}'s final average |",
             "|---|---|---|---|---|---|---|---|"]
    for method, per_seed in results.items():
        average = mean_std([per_seed[s]["average"] for s in seeds])
        worst = mean_std([per_seed[s]["worst"] for s in seeds])
        steps = [steps_to_reach(per_seed[s]["curve"], results[anchor][s]["average"]) for s in seeds]
        steps_text = ", ".join("never" if step is None else str(step) for step in steps)
        if method == anchor:
            lines.append(f"| {method} | {_fmt(*average)} | {_fmt(*worst)} | - | - | - | anchor | {steps_text} |")
            continue
        better = mean_std([float(sum(per_seed[s]["val_loss"][d] < results[anchor][s]["val_loss"][d] for d in names))
                           for s in seeds])
        d_avg, d_worst = paired(results, method, anchor, "average"), paired(results, method, anchor, "worst")
        lines.append(f"| {method} | {_fmt(*average)} | {_fmt(*worst)} | {_fmt(*better, digits=1)} of {len(names)} | "
                     f"{_fmt(d_avg['mean'], d_avg['se'])} | {_fmt(d_worst['mean'], d_worst['se'])} | "
                     f"{verdict(d_avg)} | {steps_text} |")
    others = [m for m in results if m != anchor]
    lines += ["", f"Per-domain paired differences to {anchor} (mean ± standard error over seeds; negative = lower "
              "loss):\n", "| domain | " + " | ".join(others) + " |", "|---|" + "---|" * len(others)]
    for name in names:
        cells = [paired(results, m, anchor, "val_loss", domain=name) for m in others]
        lines.append(f"| {name} | " + " | ".join(f"{c['mean']:+.4f}" + ("" if math.isnan(c["se"]) else
                                                                      f" ± {c['se']:.4f}") for c in cells) + " |")
    spread = mean_std([results[anchor][s]["average"] for s in seeds])[1]
    lines += ["", f"Seed spread of the {anchor} run's average validation loss: std {spread:.4f} over {len(seeds)} "
              "seed(s) (the same validation samples for every run).\n"]
    lines += ["", "Final sampling weights (DoReMi: alpha_bar; ADO, ODM: the average over steps, mean over seeds):\n",
              "| domain | " + " | ".join(weights) + " |", "|---|" + "---|" * len(weights)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{weights[m][name]:.4f}" for m in weights) + " |")
    lines.append("")
    return lines


def plot_curves(results: dict, path: str) -> str | None:
    """Average validation loss against the step for every method (mean over seeds at each evaluated step)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, axis = plt.subplots(figsize=(8, 5))
    for method, seeds in results.items():
        steps = sorted({step for r in seeds.values() for step, _ in r["curve"]})
        means = [statistics.fmean(v for r in seeds.values() for s, v in r["curve"] if s == step) for step in steps]
        axis.plot(steps, means, marker="o", markersize=3, label=method)
    axis.set_xlabel("step")
    axis.set_ylabel("average validation loss (nats)")
    axis.set_title("mixing methods: validation loss (mean over seeds)")
    axis.legend()
    figure.tight_layout()
    with atomic_output(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=110)
    plt.close(figure)
    return path


def summarize(losses: dict[str, float]) -> tuple[float, float, str]:
    worst = max(losses, key=losses.get)
    return sum(losses.values()) / len(losses), losses[worst], worst


def render_report(names, rounds, baseline_weights, evaluation, args, anchor: str = "stratified",
                  runs: dict | None = None, comparison: list[str] | None = None, results: dict | None = None) -> str:
    """report.md: weights per round, per-domain validation loss of the baseline and DoReMi main models, average
    and worst, and (``comparison``) the mixing methods side by side over seeds."""
    final = rounds[-1]["alpha_bar"]
    lines = ["# DoReMi report\n",
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
        cell = paired(results, "doremi", anchor, "val_loss", domain=name)
        se = "" if math.isnan(cell["se"]) else f" ± {cell['se']:.4f}"
        lines.append(f"| {name} | {baseline[name]:.4f} | {doremi[name]:.4f} | {cell['mean']:+.4f}{se} |")
    average, worst = (paired(results, "doremi", anchor, key) for key in ("average", "worst"))
    base_avg, base_worst, base_worst_name = summarize(baseline)
    dor_avg, dor_worst, dor_worst_name = summarize(doremi)
    se_text = {key: "" if math.isnan(d["se"]) else f" ± {d['se']:.4f}" for key, d in (("avg", average),
                                                                                       ("worst", worst))}
    lines += [f"| **average** | {base_avg:.4f} | {dor_avg:.4f} | {average['mean']:+.4f}{se_text['avg']} |",
              f"| **worst** | {base_worst:.4f} ({base_worst_name}) | {dor_worst:.4f} ({dor_worst_name}) | "
              f"{worst['mean']:+.4f}{se_text['worst']} |", ""]
    figures = {seed: speedup(results["doremi"][seed]["curve"], results[anchor][seed]["curve"])
               for seed in sorted(results[anchor])}
    steps = [step for step, _ in results["doremi"][args.seed]["curve"]]
    every = f"evaluated at steps {', '.join(map(str, steps[:3]))}, ..., {steps[-1]}" if len(steps) > 3 else \
        f"evaluated at steps {', '.join(map(str, steps)) or 'none'}"
    lines += ["## Speed-up\n", "As in the paper: the step at which the DoReMi main model first reaches the "
              f"baseline's final average validation loss, from its `eval.jsonl` ({every}).\n"]
    lines += [("" if len(figures) == 1 else f"- seed {seed}: ") + describe_speedup(figure)
              for seed, figure in figures.items()] + [""]
    if evaluation.get("downstream"):
        lines += render_downstream(evaluation["downstream"])
    better_domains = sum(doremi[n] < baseline[n] for n in names)
    spread = mean_std([results[anchor][s]["average"] for s in sorted(results[anchor])])[1]
    lines += ["## Verdict\n",
              f"DoReMi against the baseline, paired by training seed ({args.seeds} seed(s); a difference counts at "
              f"two standard errors): average validation loss {dor_avg:.4f} vs {base_avg:.4f}: "
              f"**{verdict(average)}**; worst domain {dor_worst:.4f} vs {base_worst:.4f}: "
              f"**{verdict(worst)}**. DoReMi is lower on {better_domains} of {len(names)} domains. "
              f"Down-weighted relative to the baseline mixture: {', '.join(down) or 'none'}."
              + (f" Seed spread of the baseline's average: std {spread:.4f}." if args.seeds > 1 else
                 " One training seed: differences smaller than the seed-to-seed spread cannot be told from noise "
                 "(`--seeds 3` measures it).") + "\n"]
    return "\n".join(lines + (comparison or []))
