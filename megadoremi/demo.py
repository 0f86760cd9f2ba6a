"""``make demo``: the built-in demo corpus end to end on CPU.

Phases (each skipped when its outputs are complete, so a rerun resumes): generate the demo corpus, train a
SentencePiece tokenizer, preprocess every domain into a Megatron indexed dataset (2 workers), then train the
``tiny`` GPT on the uniform mixture with 2 ranks and print per-domain validation losses.
"""

import argparse
import json
import os
import subprocess
import sys

from megadoremi.data.demo_corpus import make_demo_corpus
from megadoremi.data.indexed_dataset import IndexedDataset
from megadoremi.data.preprocess import PreprocessConfig, run_preprocess
from megadoremi.data.tokenizer import Tokenizer, train_tokenizer
from megadoremi.utils.logging import get_logger

logger = get_logger("megadoremi.demo")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def prepare_data(workdir: str, vocab_size: int, workers: int) -> dict:
    """Corpus -> tokenizer -> one dataset per domain; returns {"tokenizer_model", "domains": {name: prefix}}."""
    corpus_dir = os.path.join(workdir, "corpus")
    files = {name[: -len(".jsonl")]: os.path.join(corpus_dir, name)
             for name in sorted(os.listdir(corpus_dir))} if os.path.isdir(corpus_dir) else {}
    if not files:
        files = make_demo_corpus(corpus_dir, seed=0)
    model = os.path.join(workdir, "tokenizer.model")
    if not os.path.exists(model):
        train_tokenizer(corpus_dir, os.path.join(workdir, "tokenizer"), vocab_size, seed=0)
    domains = {}
    for name, path in sorted(files.items()):
        output_prefix = os.path.join(workdir, "data", name)
        prefix = f"{output_prefix}_text_document"
        if not IndexedDataset.exists(prefix):
            run_preprocess(PreprocessConfig(inputs=[path], output_prefix=output_prefix, tokenizer_model=model,
                                            append_eod=True, workers=workers, distributed="off"))
        domains[name] = prefix
    return {"tokenizer_model": model, "domains": domains}


def print_data_table(data: dict) -> None:
    tokenizer = Tokenizer(data["tokenizer_model"])
    print(f"\ntokenizer: {data['tokenizer_model']} ({tokenizer.vocab_size} pieces)")
    print(f"{'domain':<14} {'documents':>10} {'tokens':>10}")
    for name, prefix in data["domains"].items():
        ds = IndexedDataset(prefix)
        print(f"{name:<14} {ds.num_documents:>10,} {ds.num_tokens:>10,}")


def train_baseline(workdir: str, data: dict, nproc: int, steps: int) -> dict:
    run_dir = os.path.join(workdir, "runs", "tiny-main")
    final = os.path.join(run_dir, "final.json")
    if not os.path.exists(final):
        domains = json.dumps(data["domains"])
        command = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc-per-node", str(nproc),
                   "-m", "megadoremi.train", os.path.join(REPO_ROOT, "configs", "tiny", "main.yaml"),
                   f"--run_dir={run_dir}", f"--data.tokenizer_model={data['tokenizer_model']}",
                   f"--data.domains={domains}", f"--data.cache_dir={os.path.join(workdir, 'index-cache')}",
                   f"--train.steps={steps}", "--resume", "auto"]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        subprocess.run(command, check=True, env=env)
    with open(final) as handle:
        return json.load(handle)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="demo_workdir")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    data = prepare_data(args.workdir, args.vocab_size, args.workers)
    print_data_table(data)
    summary = train_baseline(args.workdir, data, args.nproc, args.steps)
    val = summary["eval"]["val_loss"]
    print(f"\ntiny GPT, {args.nproc} ranks, uniform mixture, {summary['step']} steps:")
    print(f"{'domain':<14} {'val loss':>9}")
    for name, loss in val.items():
        print(f"{name:<14} {loss:>9.3f}")
    print(f"{'average':<14} {summary['eval']['val_loss_avg']:>9.3f}\n{'worst':<14} "
          f"{summary['eval']['val_loss_worst']:>9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
