import json
import os
import subprocess
import sys
import zlib

import pytest

from megadoremi.data.demo_corpus import (
    DEFAULT_TARGET_BYTES_PER_DOMAIN,
    DOMAINS,
    MAX_DOC_CHARS,
    MIN_DOC_CHARS,
    make_demo_corpus,
)


def read_docs(path):
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line)["text"] for line in handle]


def read_bytes(path):
    with open(path, "rb") as handle:
        return handle.read()


@pytest.fixture(scope="module")
def default_corpus(tmp_path_factory):
    outdir = str(tmp_path_factory.mktemp("demo"))
    return outdir, make_demo_corpus(outdir, seed=0)


def test_every_domain_is_written_and_sized(default_corpus):
    outdir, paths = default_corpus
    assert list(paths) == list(DOMAINS)
    assert sorted(os.listdir(outdir)) == sorted(f"{domain}.jsonl" for domain in DOMAINS)  # no temp files
    for domain, path in paths.items():
        assert path == os.path.join(outdir, f"{domain}.jsonl")
        docs = read_docs(path)
        num_text_bytes = sum(len(doc.encode("utf-8")) for doc in docs)
        # The target is reached and passed by at most one document (<= 4 UTF-8 bytes per character).
        assert 0 <= num_text_bytes - DEFAULT_TARGET_BYTES_PER_DOMAIN < 4 * 2 * MAX_DOC_CHARS
        lengths = [len(doc) for doc in docs]
        assert min(lengths) >= MIN_DOC_CHARS, domain
        assert max(lengths) <= 4000, domain
        assert len(set(docs)) > 0.9 * len(docs), domain


def test_same_seed_gives_identical_bytes(default_corpus, tmp_path):
    _, first = default_corpus
    second = make_demo_corpus(str(tmp_path), seed=0)
    for domain in DOMAINS:
        assert read_bytes(first[domain]) == read_bytes(second[domain]), domain


def test_other_seed_gives_other_documents(tmp_path):
    a = make_demo_corpus(str(tmp_path / "a"), seed=0, docs_per_domain=10)
    b = make_demo_corpus(str(tmp_path / "b"), seed=1, docs_per_domain=10)
    for domain in DOMAINS:
        assert read_bytes(a[domain]) != read_bytes(b[domain]), domain


def test_domains_are_independent_of_the_selection(default_corpus, tmp_path):
    _, full = default_corpus
    subset = make_demo_corpus(str(tmp_path), seed=0, domains=["random_chars", "stdlib_docs"])
    assert sorted(subset) == ["random_chars", "stdlib_docs"]
    for domain, path in subset.items():
        assert read_bytes(path) == read_bytes(full[domain])


def test_docs_per_domain_is_exact(tmp_path):
    paths = make_demo_corpus(str(tmp_path), seed=3, docs_per_domain=7)
    assert {domain: len(read_docs(path)) for domain, path in paths.items()} == {domain: 7 for domain in DOMAINS}


def test_difficulty_follows_design(default_corpus):
    """Compressibility orders the synthetic domains: boilerplate < arithmetic < random characters."""
    _, paths = default_corpus

    def compression_ratio(domain):
        text = "\n".join(read_docs(paths[domain])[:100]).encode("utf-8")
        return len(zlib.compress(text, 9)) / len(text)

    ratios = {domain: compression_ratio(domain) for domain in DOMAINS}
    assert ratios["boilerplate"] < 0.05
    assert ratios["boilerplate"] < ratios["licenses"] < ratios["stdlib_code"] < ratios["random_chars"]
    assert ratios["arithmetic"] < ratios["random_chars"]
    assert ratios["random_chars"] > 0.7


def test_content_looks_like_its_domain(default_corpus):
    _, paths = default_corpus
    code = "\n".join(read_docs(paths["stdlib_code"]))
    assert "def " in code and "return" in code and "\n    " in code
    for line in read_docs(paths["arithmetic"])[0].splitlines():
        left, result = line.split(" = ")
        assert eval(left) == int(result)  # noqa: S307 - digits and one operator, written by the generator
    assert "Permission" in "\n".join(read_docs(paths["licenses"]))


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown demo corpus domain.*'nope'"):
        make_demo_corpus(str(tmp_path), domains=["arithmetic", "nope"])
    with pytest.raises(ValueError, match="docs_per_domain"):
        make_demo_corpus(str(tmp_path), docs_per_domain=0)
    assert os.listdir(tmp_path) == []


def test_cli(repo_root, tmp_path):
    outdir = str(tmp_path / "out")
    command = [sys.executable, os.path.join(repo_root, "tools", "make_demo_corpus.py"), outdir,
               "--docs-per-domain", "5", "--seed", "2", "--domains", "arithmetic", "boilerplate"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(outdir)) == ["arithmetic.jsonl", "boilerplate.jsonl"]
    assert len(read_docs(os.path.join(outdir, "arithmetic.jsonl"))) == 5
    assert read_bytes(os.path.join(outdir, "boilerplate.jsonl")) == read_bytes(
        make_demo_corpus(str(tmp_path / "lib"), seed=2, docs_per_domain=5, domains=["boilerplate"])["boilerplate"]
    )
