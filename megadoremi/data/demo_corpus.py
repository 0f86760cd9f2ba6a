"""A deterministic multi-domain demo corpus built from the local Python installation and seeded generators.

Nothing is downloaded. Each domain is one ``<domain>.jsonl`` file of ``{"text": ...}`` lines, and the domains are
chosen so that their difficulty is known in advance, which is what a DoReMi demo needs to show the weights moving:

- ``stdlib_code``: source of standard-library modules that exist in every CPython 3.10+ install, in top-level
  blocks (functions, classes) packed into documents. Natural, learnable.
- ``stdlib_docs``: ``pydoc_data.topics`` (the language reference ``help()`` shows) and module/class/function
  docstrings of the same modules, read with ``ast`` (nothing is imported). Natural prose.
- ``licenses``: paragraphs of the interpreter's LICENSE file when present, plus license headers generated from a
  few short templates with seeded holders, years and comment styles. Repetitive, easy.
- ``arithmetic``: ``"37 + 48 = 85"`` lines. Learnable rule, moderate entropy.
- ``boilerplate``: a handful of fixed templates with tiny slots. Very low entropy, learnt almost at once.
- ``random_chars``: uniformly random characters in random-length "words". High entropy, unlearnable.

Output is byte-identical for the same seed on the same Python installation (the stdlib-based domains follow the
installed Python's sources). Every domain has its own ``random.Random`` keyed by (seed, domain), so selecting a
subset of domains does not change the others.
"""

import ast
import json
import os
import random
import re
import string
import sys
import sysconfig
from collections.abc import Callable, Iterable, Iterator

from megadoremi.data.output_files import remove_stale_temporaries, writing
from megadoremi.utils.cli import UserError
from megadoremi.utils.fs import atomic_output
from megadoremi.utils.logging import get_logger

logger = get_logger(__name__)


class DemoCorpusError(UserError, ValueError):
    """A demo corpus setting that cannot be honoured; the message names it and the value."""


DOMAINS = ("stdlib_code", "stdlib_docs", "licenses", "arithmetic", "boilerplate", "random_chars")
DEFAULT_TARGET_BYTES_PER_DOMAIN = 750_000
MIN_DOC_CHARS = 200
MAX_DOC_CHARS = 3000

# Modules present (as .py source) in every CPython 3.10 to 3.13 install; none are deprecated for removal.
# Some became packages over time (zipfile 3.12, pathlib 3.13): _stdlib_source_path() finds either form.
STDLIB_MODULES = (
    "_pydecimal", "_pyio", "argparse", "ast", "base64", "bisect", "calendar", "codecs", "collections",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "difflib", "dis", "enum",
    "fileinput", "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "hashlib",
    "heapq", "hmac", "html.parser", "http.client", "http.server", "inspect", "ipaddress", "json.decoder",
    "json.encoder", "locale", "logging", "mailbox", "mimetypes", "ntpath", "numbers", "operator", "optparse",
    "os", "pathlib", "pickle", "platform", "posixpath", "pprint", "queue", "random", "re", "shlex", "shutil",
    "smtplib", "socket", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
    "timeit", "tokenize", "traceback", "types", "typing", "unittest.case", "urllib.parse", "uuid", "warnings",
    "weakref", "zipfile",
)


def make_demo_corpus(
    outdir: str,
    seed: int = 0,
    target_bytes_per_domain: int = DEFAULT_TARGET_BYTES_PER_DOMAIN,
    docs_per_domain: int | None = None,
    domains: Iterable[str] | None = None,
) -> dict[str, str]:
    """Write one ``<domain>.jsonl`` per domain under ``outdir``; returns ``{domain: path}``.

    Each domain gets documents until its text reaches ``target_bytes_per_domain`` UTF-8 bytes, or exactly
    ``docs_per_domain`` documents when that is given (natural domains may have fewer; a warning says so).
    """
    domains = list(DOMAINS if domains is None else domains)
    unknown = sorted(set(domains) - set(DOMAINS))
    if unknown:
        raise DemoCorpusError(f"unknown demo corpus domain(s) {unknown}; choose from {list(DOMAINS)}")
    if not domains:
        raise DemoCorpusError("no demo corpus domains selected")
    if docs_per_domain is None and target_bytes_per_domain <= 0:
        raise DemoCorpusError(f"target_bytes_per_domain must be > 0, got {target_bytes_per_domain}")
    if docs_per_domain is not None and docs_per_domain <= 0:
        raise DemoCorpusError(f"docs_per_domain must be > 0, got {docs_per_domain}")

    with writing(outdir):
        os.makedirs(outdir, exist_ok=True)
    remove_stale_temporaries(outdir, [f"{domain}.jsonl" for domain in domains])
    sources = _StdlibSources()
    generators: dict[str, Callable[[random.Random], Iterator[str]]] = {
        "stdlib_code": lambda rng: _shuffled(_stdlib_code_docs(sources.modules()), rng),
        "stdlib_docs": lambda rng: _shuffled(_stdlib_docs_docs(sources.modules()), rng),
        "licenses": lambda rng: _license_docs(rng, sources.license_text()),
        "arithmetic": _arithmetic_docs,
        "boilerplate": _boilerplate_docs,
        "random_chars": _random_char_docs,
    }
    paths = {}
    for domain in domains:
        rng = random.Random(f"megadoremi-demo-corpus:{seed}:{domain}")
        docs = _take(generators[domain](rng), target_bytes_per_domain, docs_per_domain)
        if not docs:
            raise RuntimeError(f"demo corpus domain {domain!r} produced no documents on this Python installation")
        if docs_per_domain is not None and len(docs) < docs_per_domain:
            logger.warning("demo corpus: domain %s has only %d documents (asked for %d)", domain, len(docs),
                           docs_per_domain)
        path = os.path.join(outdir, f"{domain}.jsonl")
        num_bytes = _write_jsonl(path, docs)
        logger.info("demo corpus: %s: %d documents, %.2f MB -> %s", domain, len(docs), num_bytes / 1e6, path)
        paths[domain] = path
    return paths


def _take(docs: Iterator[str], target_bytes: int, max_docs: int | None) -> list[str]:
    """The first documents of ``docs`` up to ``max_docs`` documents, or else up to ``target_bytes`` of text."""
    taken, num_bytes = [], 0
    for doc in docs:
        if max_docs is not None:
            if len(taken) >= max_docs:
                break
        elif num_bytes >= target_bytes:
            break
        taken.append(doc)
        num_bytes += len(doc.encode("utf-8"))
    return taken


def _write_jsonl(path: str, docs: list[str]) -> int:
    """Write ``{"text": doc}`` lines atomically; returns the number of bytes written."""
    num_bytes = 0
    with writing(path), atomic_output(path, "wb") as handle:
        for doc in docs:
            # ensure_ascii=False keeps real UTF-8; U+2028/U+2029 stay escaped so no reader sees a line break.
            line = json.dumps({"text": doc}, ensure_ascii=False)
            line = line.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
            data = (line + "\n").encode("utf-8")
            handle.write(data)
            num_bytes += len(data)
    return num_bytes


def _shuffled(docs: list[str], rng: random.Random) -> Iterator[str]:
    """The documents in a seeded order (the candidate list itself is built in sorted, deterministic order)."""
    docs = list(docs)
    rng.shuffle(docs)
    return iter(docs)


# ---------------------------------------------------------------------------------------------- packing helpers


def _split_long(text: str, max_chars: int) -> list[str]:
    """Cut ``text`` at line boundaries into pieces of at most ``max_chars`` (hard cut for a longer single line)."""
    if len(text) <= max_chars:
        return [text]
    pieces, current = [], ""
    for line in text.splitlines(keepends=True):
        while len(line) > max_chars:
            if current:
                pieces.append(current)
                current = ""
            pieces.append(line[:max_chars])
            line = line[max_chars:]
        if len(current) + len(line) > max_chars:
            pieces.append(current)
            current = ""
        current += line
    if current:
        pieces.append(current)
    return [piece.strip("\n") for piece in pieces if piece.strip()]


def _pack(blocks: Iterable[str], sep: str, max_chars: int = MAX_DOC_CHARS) -> list[str]:
    """Join consecutive blocks with ``sep`` into documents of at most ``max_chars``; drop ones under MIN_DOC_CHARS."""
    docs, current = [], ""
    for block in blocks:
        for piece in _split_long(block, max_chars):
            if current and len(current) + len(sep) + len(piece) > max_chars:
                docs.append(current)
                current = piece
            else:
                current = f"{current}{sep}{piece}" if current else piece
    if current:
        docs.append(current)
    return [doc for doc in docs if len(doc) >= MIN_DOC_CHARS]


# ----------------------------------------------------------------------------------------- stdlib-based domains


class _StdlibSources:
    """Reads the stdlib files once per corpus build, in a fixed order."""

    def __init__(self):
        self._modules: list[tuple[str, str]] | None = None

    def modules(self) -> list[tuple[str, str]]:
        """``(module name, source text)`` for every module of STDLIB_MODULES found on this installation."""
        if self._modules is None:
            self._modules = []
            for name in STDLIB_MODULES:
                path = _stdlib_source_path(name)
                if path is None:
                    logger.debug("demo corpus: no source for stdlib module %s", name)
                    continue
                with open(path, "rb") as handle:
                    self._modules.append((name, handle.read().decode("utf-8", errors="replace")))
            if not self._modules:
                # Some embedded/frozen Pythons ship bytecode only: fall back to this package's own sources.
                self._modules = _package_sources()
                logger.warning("demo corpus: no stdlib sources found; using megadoremi's own sources instead")
        return self._modules

    @staticmethod
    def license_text() -> str:
        """The interpreter's LICENSE file if installed, else the always-present ``sys.copyright``."""
        stdlib = sysconfig.get_paths()["stdlib"]
        for directory in (stdlib, sys.base_prefix, os.path.join(sys.base_prefix, "share", "doc", "python3")):
            for name in ("LICENSE.txt", "LICENSE"):
                path = os.path.join(directory, name)
                if os.path.isfile(path):
                    with open(path, "rb") as handle:
                        return handle.read().decode("utf-8", errors="replace")
        return sys.copyright


def _stdlib_source_path(module: str) -> str | None:
    """Path of a stdlib module's source (``a/b.py`` or ``a/b/__init__.py``) without importing it."""
    base = os.path.join(sysconfig.get_paths()["stdlib"], *module.split("."))
    for path in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(path):
            return path
    return None


def _package_sources() -> list[tuple[str, str]]:
    """``(module name, source)`` of megadoremi's own .py files, sorted by path."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs.sort()
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                with open(path, "rb") as handle:
                    found.append((os.path.relpath(path, root), handle.read().decode("utf-8", errors="replace")))
    return found


_TOP_LEVEL_BREAK = re.compile(r"\n[ \t]*\n(?=\S)")


def _stdlib_code_docs(modules: list[tuple[str, str]]) -> list[str]:
    """Source files split at top-level statements (blank line then column 0) and packed per file."""
    docs = []
    for _, source in modules:
        docs.extend(_pack(_TOP_LEVEL_BREAK.split(source.strip("\n")), sep="\n\n"))
    return docs


def _stdlib_docs_docs(modules: list[tuple[str, str]]) -> list[str]:
    """pydoc topics (when installed) and module/class/function docstrings, packed into documents."""
    docs = []
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions package pydoc_data separately
        topics = {}
    for name in sorted(topics):
        docs.extend(_pack(topics[name].strip().split("\n\n"), sep="\n\n"))
    for module, source in modules:
        docs.extend(_pack(_docstrings(module, source), sep="\n\n\n"))
    return docs


def _docstrings(module: str, source: str) -> list[str]:
    """``"qualified.name\\n\\ndocstring"`` blocks for the module and every class and function, in source order."""
    try:
        tree = ast.parse(source)
    except SyntaxError:  # a newer Python's stdlib parsed by an older one cannot happen, but stay safe
        return []
    blocks = []

    def visit(node: ast.AST, prefix: str) -> None:
        doc = ast.get_docstring(node, clean=True)
        if doc:
            blocks.append(f"{prefix}\n\n{doc}")
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                visit(child, f"{prefix}.{child.name}")

    visit(tree, module)
    return blocks


# ------------------------------------------------------------------------------------------------------ licenses

_LICENSE_TEMPLATES = (
    "Copyright (c) {year} {holder}\n\nPermission is hereby granted, free of charge, to any person obtaining a copy "
    "of this software and associated documentation files (the \"Software\"), to deal in the Software without "
    "restriction, including without limitation the rights to use, copy, modify, merge, publish, distribute, "
    "sublicense, and/or sell copies of the Software, and to permit persons to whom the Software is furnished to do "
    "so, subject to the following conditions:\n\nThe above copyright notice and this permission notice shall be "
    "included in all copies or substantial portions of the Software.\n\nTHE SOFTWARE IS PROVIDED \"AS IS\", WITHOUT "
    "WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, "
    "FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT.",
    "Copyright (c) {year}, {holder}\nAll rights reserved.\n\nRedistribution and use in source and binary forms, with "
    "or without modification, are permitted provided that the following conditions are met:\n\n1. Redistributions "
    "of source code must retain the above copyright notice, this list of conditions and the following disclaimer.\n"
    "2. Redistributions in binary form must reproduce the above copyright notice, this list of conditions and the "
    "following disclaimer in the documentation and/or other materials provided with the distribution.\n3. Neither "
    "the name of {project} nor the names of its contributors may be used to endorse or promote products derived "
    "from this software without specific prior written permission.",
    "Copyright {year} {holder}\n\nLicensed under the Apache License, Version 2.0 (the \"License\"); you may not use "
    "this file except in compliance with the License. You may obtain a copy of the License at\n\n"
    "    http://www.apache.org/licenses/LICENSE-2.0\n\nUnless required by applicable law or agreed to in writing, "
    "software distributed under the License is distributed on an \"AS IS\" BASIS, WITHOUT WARRANTIES OR CONDITIONS "
    "OF ANY KIND, either express or implied. See the License for the specific language governing permissions and "
    "limitations under the License.",
    "{project} - copyright (c) {year} {holder}.\n\nPermission to use, copy, modify, and/or distribute this software "
    "for any purpose with or without fee is hereby granted, provided that the above copyright notice and this "
    "permission notice appear in all copies.\n\nTHE SOFTWARE IS PROVIDED \"AS IS\" AND THE AUTHOR DISCLAIMS ALL "
    "WARRANTIES WITH REGARD TO THIS SOFTWARE INCLUDING ALL IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS.",
)
_FIRST_NAMES = ("Ada", "Alan", "Grace", "Linus", "Guido", "Barbara", "Ken", "Margaret", "Dennis", "Frances")
_LAST_NAMES = ("Lovelace", "Turing", "Hopper", "Torvalds", "van Rossum", "Liskov", "Thompson", "Hamilton", "Ritchie")
_PROJECTS = ("libfoo", "quickparse", "tinyhttp", "datakit", "fastgrid", "pyrope", "matrixlab", "logwise")
_ORG_SUFFIXES = ("Inc.", "LLC", "Foundation", "Project Authors", "Contributors")


def _license_docs(rng: random.Random, license_text: str) -> Iterator[str]:
    """Generated license headers in source-comment form, with the installed LICENSE paragraphs mixed in."""
    natural = _pack(license_text.strip().split("\n\n"), sep="\n\n")
    rng.shuffle(natural)
    while True:
        if natural and rng.random() < 0.1:
            yield natural.pop()
            continue
        project = rng.choice(_PROJECTS)
        if rng.random() < 0.5:
            holder = f"{rng.choice(_FIRST_NAMES)} {rng.choice(_LAST_NAMES)}"
        else:
            holder = f"The {project} {rng.choice(_ORG_SUFFIXES)}"
        first_year = rng.randint(1995, 2024)
        year = str(first_year) if rng.random() < 0.5 else f"{first_year}-{rng.randint(first_year, 2025)}"
        text = rng.choice(_LICENSE_TEMPLATES).format(year=year, holder=holder, project=project)
        style = rng.randrange(3)
        if style == 0:
            yield "\n".join(f"# {line}".rstrip() for line in text.splitlines())
        elif style == 1:
            yield "\n".join(f"// {line}".rstrip() for line in text.splitlines())
        else:
            yield "/*\n" + "\n".join(f" * {line}".rstrip() for line in text.splitlines()) + "\n */"


# ------------------------------------------------------------------------------------------------ synthetic domains


def _arithmetic_docs(rng: random.Random) -> Iterator[str]:
    """Documents of 20 to 150 lines like ``"37 + 48 = 85"`` (+ and - up to 999, * up to 99)."""
    while True:
        lines = []
        for _ in range(rng.randint(20, 150)):
            op = rng.choice("+-*")
            if op == "*":
                a, b = rng.randint(0, 99), rng.randint(0, 99)
                lines.append(f"{a} * {b} = {a * b}")
            else:
                a, b = rng.randint(0, 999), rng.randint(0, 999)
                if op == "-":
                    a, b = max(a, b), min(a, b)
                lines.append(f"{a} {op} {b} = {a + b if op == '+' else a - b}")
        yield "\n".join(lines)


_BOILERPLATE_TEMPLATES = (
    "Dear {name},\n\nThank you for contacting customer support. Your request has been received and a member of our "
    "team will respond within {days} business days.\n\nBest regards,\nThe Support Team",
    "NOTICE: This message and any attachments are confidential and intended solely for {name}. If you have "
    "received this message in error, please notify the sender immediately and delete it.",
    "Order update for {name}: your order has shipped and will arrive in {days} days. Thank you for shopping with us.",
)
_BOILERPLATE_NAMES = ("Alex", "Sam", "Jordan", "Taylor")


def _boilerplate_docs(rng: random.Random) -> Iterator[str]:
    """3 to 12 messages from three fixed templates with two tiny slots: very low entropy."""
    while True:
        messages = [
            rng.choice(_BOILERPLATE_TEMPLATES).format(name=rng.choice(_BOILERPLATE_NAMES), days=rng.randint(2, 5))
            for _ in range(rng.randint(3, 12))
        ]
        yield "\n\n".join(messages)


# ASCII letters, digits and punctuation plus some Greek, Cyrillic and CJK, so the tokenizer sees multi-byte UTF-8.
_RANDOM_ALPHABET = string.ascii_letters + string.digits + string.punctuation + "αβγδεζηθλμπσφψωжщэюя中文字符数据混合"


def _random_char_docs(rng: random.Random) -> Iterator[str]:
    """400 to 3000 uniformly random characters in "words" of 1 to 10 characters: high entropy, unlearnable."""
    while True:
        num_chars = rng.randint(400, 3000)
        chars = rng.choices(_RANDOM_ALPHABET, k=num_chars)
        words, start = [], 0
        while start < num_chars:
            length = rng.randint(1, 10)
            words.append("".join(chars[start:start + length]))
            start += length
        yield " ".join(words)



def tokenize_demo_files(files: dict[str, str], tokenizer_model: str, output_dir: str) -> dict[str, str]:
    """Encode each domain's jsonl (``{"text": ...}`` per line) with the SentencePiece model into an indexed dataset
    ``OUTPUT_DIR/<domain>_text_document`` (one document per line, EOD appended, as ``tools/preprocess_data.py
    --append-eod`` writes it); returns the prefixes. A small in-process path for tests and benchmarks."""
    import numpy as np

    from megadoremi.data.indexed_dataset import IndexedDatasetWriter, best_dtype
    from megadoremi.data.tokenizer import Tokenizer

    tokenizer = Tokenizer(tokenizer_model)
    prefixes = {}
    for name, path in files.items():
        prefix = os.path.join(output_dir, f"{name}_text_document")
        with open(path) as handle, IndexedDatasetWriter(prefix, best_dtype(tokenizer.vocab_size)) as writer:
            for line in handle:
                writer.add_document(np.asarray(tokenizer.encode(json.loads(line)["text"]) + [tokenizer.eod]))
        prefixes[name] = prefix
    return prefixes
