"""Downstream evaluation of a run with lm-evaluation-harness: ``megadoremi-eval``.

    megadoremi-eval RUN_DIR --tasks megadoremi_cloze[,lambada_openai,...] [--num-fewshot 1] [--limit N]

Exports the run to Hugging Face format (``RUN_DIR/hf``, cached: made again only when the run's model changed;
``downstream.json`` is reused likewise when the tasks and settings are the same),
then runs lm-eval's ``simple_evaluate`` with its ``hf`` model in this process (CPU or GPU, float32 by default)
and writes ``RUN_DIR/downstream.json``: per task the metrics lm-eval reports (e.g. ``acc``, ``perplexity``,
``exact_match``) with their standard errors, the sample counts, and how it ran. ``megadoremi_cloze`` (the group)
and ``megadoremi_cloze_<domain>`` are the local per-domain cloze tasks (``tools/make_eval_tasks.py``), made from
the run's held-out documents into ``RUN_DIR/eval_tasks`` when asked for. lm-eval's registry tasks (``triviaqa``,
``nq_open``, ``squadv2``, ``lambada_openai``, ...) work where their datasets are already in the local Hugging Face
cache: nothing is downloaded (``HF_DATASETS_OFFLINE`` and ``HF_HUB_OFFLINE`` are set), and a task whose data is
not there fails with a message that says so.
"""

import argparse
import json
import os
import time

from megadoremi.utils.cli import UserError, run_cli
from megadoremi.utils.fs import atomic_output
from megadoremi.utils.logging import get_logger

logger = get_logger(__name__)

DOWNSTREAM_FILE = "downstream.json"
EXPORT_DIR = "hf"
TASKS_DIR = "eval_tasks"


def cached_export(run_dir: str) -> str:
    """RUN_DIR/hf, exported again when the run's model.pt is newer than the export (or it is missing)."""
    from megadoremi.model.io import MODEL_FILE
    from megadoremi.tools.export_hf import export

    model = os.path.join(run_dir, MODEL_FILE)
    if not os.path.isfile(model):
        raise UserError(f"{run_dir}: no {MODEL_FILE} (downstream evaluation needs a finished run)")
    out = os.path.join(run_dir, EXPORT_DIR)
    stamp = os.path.join(out, "megadoremi_export.json")
    if os.path.isfile(stamp) and os.path.getmtime(stamp) >= os.path.getmtime(model):
        return out
    export(run_dir, out, force=True)
    return out


def evaluate_downstream(run_dir: str, tasks: list[str], num_fewshot: int | None = None, limit: int | None = None,
                        batch_size: int = 8, device: str | None = None, tasks_dir: str | None = None,
                        seed: int = 1234) -> dict:
    """Run lm-eval on the run's export; writes and returns ``downstream.json``'s content."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not tasks:
        raise UserError("--tasks: name at least one task")
    started = time.perf_counter()
    model_dir = cached_export(run_dir)
    previous = os.path.join(run_dir, DOWNSTREAM_FILE)
    if os.path.isfile(previous) and os.path.getmtime(previous) >= os.path.getmtime(os.path.join(model_dir,
                                                                                               "model.safetensors")):
        with open(previous) as handle:
            summary = json.load(handle)
        settings = (tasks, num_fewshot, limit, tasks_dir and os.path.abspath(tasks_dir), seed)
        if (summary.get("requested"), summary.get("num_fewshot"), summary.get("limit"), summary.get("tasks_dir"),
                summary.get("seed")) == settings:
            logger.info("downstream: %s is up to date (same model, tasks and settings), reusing it", previous)
            return summary
    include = []
    if any(task.startswith("megadoremi_cloze") for task in tasks):
        from megadoremi.tools.make_eval_tasks import make_eval_tasks, run_config_data

        local = tasks_dir or os.path.join(run_dir, TASKS_DIR)
        if tasks_dir is None:
            make_eval_tasks(*run_config_data(run_dir), local)
        include.append(local)
    elif tasks_dir:
        include.append(tasks_dir)

    import torch
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    # lm-eval's own registry (about 15k task files, ~15 s to index) only when a task outside the local ones is asked
    registry = any(not task.startswith("megadoremi_cloze") for task in tasks)
    manager = TaskManager(include_path=include or None, include_defaults=registry)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise UserError(f"--tasks: unknown to lm-eval: {', '.join(unknown)} (local tasks: {', '.join(include) or 'none'})")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with open(os.path.join(model_dir, "config.json")) as handle:
        max_length = json.load(handle)["max_position_embeddings"]
    try:
        output = simple_evaluate(model="hf", model_args={"pretrained": model_dir, "dtype": "float32",
                                                         "max_length": max_length},
                                 tasks=tasks, num_fewshot=num_fewshot, limit=limit, batch_size=batch_size,
                                 device=device, task_manager=manager, random_seed=seed, numpy_random_seed=seed,
                                 torch_random_seed=seed, fewshot_random_seed=seed)
    except (ConnectionError, OSError) as error:
        raise UserError(f"lm-eval could not load a task's data offline ({' '.join(str(error).split())[:300]}); "
                        "registry tasks need their datasets in the local Hugging Face cache") from None
    results = {}
    for task, metrics in output["results"].items():
        values = {}
        for key, value in metrics.items():
            if key == "alias" or not isinstance(value, int | float):
                continue
            metric, _, name = key.partition(",")
            values[metric if name in ("", "none") else f"{metric},{name}"] = value  # keep a task's filters apart
        results[task] = values
    summary = {"run_dir": os.path.abspath(run_dir), "model": os.path.abspath(model_dir), "tasks": results,
               "requested": tasks, "num_fewshot": num_fewshot, "limit": limit, "device": device, "seed": seed,
               "tasks_dir": tasks_dir and os.path.abspath(tasks_dir),
               "samples": {task: counts.get("effective", counts.get("original"))
                           for task, counts in output.get("n-samples", {}).items()},
               "lm_eval_version": _version("lm_eval"), "seconds": time.perf_counter() - started}
    with atomic_output(os.path.join(run_dir, DOWNSTREAM_FILE), "w") as handle:
        json.dump(summary, handle, indent=1)
    logger.info("downstream: %s", " | ".join(f"{task} " + " ".join(f"{k} {v:.4g}" for k, v in m.items()
                                                                       if not k.endswith("_stderr"))
                                             for task, m in results.items()))
    return summary


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _main(argv) -> int:
    parser = argparse.ArgumentParser(prog="megadoremi-eval", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("run_dir")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task or group names")
    parser.add_argument("--num-fewshot", type=int, default=None)
    parser.add_argument("--limit", type=int, default=None, help="at most this many examples per task")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--tasks-dir", default=None, help="task YAMLs to include (default for megadoremi_cloze: "
                                                          "made from the run's held-out documents)")
    args = parser.parse_args(argv)
    summary = evaluate_downstream(args.run_dir, [t for t in args.tasks.split(",") if t], args.num_fewshot,
                                  args.limit, args.batch_size, args.device, args.tasks_dir)
    print(json.dumps(summary["tasks"], indent=1))
    return 0


def main(argv=None) -> int:
    return run_cli("megadoremi-eval", _main, argv)
