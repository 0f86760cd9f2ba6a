"""A small tokenized multi-domain corpus for training tests, built once per test session."""

import os

from megadoremi.data.demo_corpus import make_demo_corpus, tokenize_demo_files
from megadoremi.data.tokenizer import Tokenizer, train_tokenizer

DOMAINS = ("stdlib_code", "licenses", "arithmetic", "boilerplate", "random_chars")


def build_tiny_corpus(root: str, bytes_per_domain: int = 120_000, vocab_size: int = 512) -> dict:
    """Demo corpus -> SentencePiece model -> one indexed dataset per domain; returns paths."""
    corpus_dir = os.path.join(root, "corpus")
    files = make_demo_corpus(corpus_dir, seed=0, target_bytes_per_domain=bytes_per_domain, domains=list(DOMAINS))
    model_prefix = os.path.join(root, "tokenizer")
    train_tokenizer(corpus_dir, model_prefix, vocab_size, max_chars=300_000, seed=0)
    tokenizer = Tokenizer(model_prefix + ".model")
    prefixes = tokenize_demo_files(files, model_prefix + ".model", os.path.join(root, "data"))
    return {"root": root, "tokenizer_model": model_prefix + ".model", "domains": prefixes,
            "vocab_size": tokenizer.vocab_size}
