"""Per-domain cloze tasks for lm-evaluation-harness from held-out documents, so every run gets a downstream signal
per domain with no download.

    python tools/make_eval_tasks.py RUN_DIR_OR_CONFIG OUT_DIR [--max-docs 200] [--max-context-chars 1000]

For each domain of the run's config (``data.domains``, ``data.split``, ``data.tokenizer_model``), the documents of
the held-out part of the split (the validation documents, which training never reads) are decoded with the run's
tokenizer and cut LAMBADA-style: the context is the document up to its last word, the target is the whitespace
character before that word and the word (context + target = the document without trailing whitespace). The
context keeps its last ``--max-context-chars`` characters, cut at whitespace. Documents of fewer than 2 words
are skipped; the first ``--max-docs`` that remain are kept, in document order (deterministic).

Writes, per domain d, ``megadoremi_cloze_d.jsonl`` (``{"context", "target", "document"}``) and
``megadoremi_cloze_d.yaml`` (``output_type: loglikelihood``; metrics ``acc``, whether the target is the model's
greedy continuation, i.e. exact match, and ``perplexity`` of the target), and the group ``megadoremi_cloze.yaml``
(the mean ``acc`` over domains). Pass OUT_DIR to lm-eval as ``--include_path`` (``megadoremi-eval`` does).
"""

import argparse
import json
import os
import re

from megadoremi.utils.cli import UserError, run_cli
from megadoremi.utils.fs import atomic_output

TASK_PREFIX = "megadoremi_cloze"
GROUP = TASK_PREFIX
_LAST_WORD = re.compile(r"(\s+)(\S+)\s*$")


def cloze(text: str, max_context_chars: int) -> dict | None:
    """{"context", "target"} of one document (None with fewer than 2 words)."""
    match = _LAST_WORD.search(text)
    if match is None or not text[:match.start(1)].strip():
        return None
    separator, word = match.group(1), match.group(2)
    context = text[:match.start(1)] + separator[:-1]
    if len(context) > max_context_chars:
        cut = context[-max_context_chars:]
        space = re.search(r"\s", cut)
        context = cut[space.start() + 1:] if space and cut[space.start() + 1:].strip() else cut
    return {"context": context, "target": separator[-1] + word}


def task_name(domain: str) -> str:
    return f"{TASK_PREFIX}_{re.sub(r'[^0-9A-Za-z_]', '_', domain)}"


def _task_yaml(name: str, data_file: str) -> str:
    return "\n".join([
        f"task: {name}", "tag:", f"  - {GROUP}_tasks", "dataset_path: json", "dataset_kwargs:", "  data_files:",
        f"    test: {json.dumps(os.path.abspath(data_file))}", "test_split: test", "output_type: loglikelihood",
        'doc_to_text: "{{context}}"', 'doc_to_target: "{{target}}"', 'target_delimiter: ""',
        'fewshot_delimiter: "\\n\\n"', "metric_list:", "  - metric: acc",
        "    aggregation: mean", "    higher_is_better: true", "  - metric: perplexity",
        "    aggregation: perplexity", "    higher_is_better: false", "metadata:", "  version: 1.0", ""])


def make_eval_tasks(domains: dict, split: str, tokenizer_model: str, out_dir: str, max_docs: int = 200,
                    max_context_chars: int = 1000) -> dict:
    """Write the tasks; returns {domain: {"task", "documents", "file"}}."""
    from megadoremi.data.blending import domain_document_range
    from megadoremi.data.indexed_dataset import IndexedDataset
    from megadoremi.data.tokenizer import Tokenizer

    if max_docs < 1 or max_context_chars < 1:
        raise UserError(f"--max-docs and --max-context-chars must be >= 1, got {max_docs} and {max_context_chars}")
    names = {}
    for domain in domains:
        names.setdefault(task_name(domain), []).append(domain)
    clashes = [same for same in names.values() if len(same) > 1]
    if clashes:
        raise UserError(f"domains {clashes[0]} give the same task name {task_name(clashes[0][0])!r}; rename one")
    tokenizer = Tokenizer(tokenizer_model)
    os.makedirs(out_dir, exist_ok=True)
    written = {}
    for domain, prefix in domains.items():
        indexed = IndexedDataset(prefix)
        start, end = domain_document_range(indexed, split, 1)
        if end <= start:
            raise UserError(f"domain {domain!r} ({prefix}): the split {split!r} holds out no documents; use a "
                            "split with a validation part (e.g. 95,5,0)")
        records = []
        for index in range(start, end):
            tokens = [int(t) for t in indexed[index] if int(t) != tokenizer.eod]
            item = cloze(tokenizer.decode(tokens), max_context_chars)
            if item is not None:
                records.append({**item, "document": index})
            if len(records) == max_docs:
                break
        if not records:
            raise UserError(f"domain {domain!r}: none of its {end - start} held-out documents has 2 words")
        name = task_name(domain)
        data_file = os.path.join(out_dir, name + ".jsonl")
        with atomic_output(data_file, "w") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        with atomic_output(os.path.join(out_dir, name + ".yaml"), "w") as handle:
            handle.write(_task_yaml(name, data_file))
        written[domain] = {"task": name, "documents": len(records), "file": data_file}
    group = [f"group: {GROUP}", "task:"] + [f"  - {item['task']}" for item in written.values()] + [
        "aggregate_metric_list:", "  - metric: acc", "    aggregation: mean", "    weight_by_size: false",
        "metadata:", "  version: 1.0", ""]
    with atomic_output(os.path.join(out_dir, GROUP + ".yaml"), "w") as handle:
        handle.write("\n".join(group))
    return written


def run_config_data(source: str) -> tuple[dict, str, str]:
    """(domains, split, tokenizer model) from a run directory's config.yaml or an experiment YAML."""
    from megadoremi.config import load_config

    path = os.path.join(source, "config.yaml") if os.path.isdir(source) else source
    if not os.path.isfile(path):
        raise UserError(f"{source}: neither a run directory with config.yaml nor a config file")
    data = load_config(path).data
    if not data.tokenizer_model:
        raise UserError(f"{path}: data.tokenizer_model is not set (the documents must be decoded to text)")
    return dict(data.domains), data.split, data.tokenizer_model


def _main(argv) -> int:
    parser = argparse.ArgumentParser(prog="make_eval_tasks", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("source", help="a run directory (its config.yaml) or an experiment YAML")
    parser.add_argument("out_dir")
    parser.add_argument("--max-docs", type=int, default=200, help="documents per domain (default %(default)s)")
    parser.add_argument("--max-context-chars", type=int, default=1000)
    args = parser.parse_args(argv)
    domains, split, tokenizer_model = run_config_data(args.source)
    written = make_eval_tasks(domains, split, tokenizer_model, args.out_dir, args.max_docs, args.max_context_chars)
    print(json.dumps(written, indent=1))
    return 0


def main(argv=None) -> int:
    return run_cli("make_eval_tasks", _main, argv)
