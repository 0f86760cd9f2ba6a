"""SentencePiece tokenizer: a picklable wrapper for encoding, and deterministic training from jsonl domains.

Models trained here are byte-level lossless: identity normalization, whitespace kept as is, newlines learnt as
ordinary characters (code indentation and line breaks survive), digits split, and bytes as the fallback for any
character outside the learnt alphabet, so ``decode(encode(text)) == text`` for every string. Special ids are
SentencePiece's defaults: unk=0, bos=1, eos=2 (eos is the end-of-document token appended by preprocessing), and
no pad (GPT training packs documents and never pads).

Training reads at most ``max_chars`` characters, split evenly across domains (one jsonl file = one domain) so a
large domain cannot crowd small ones out of the vocabulary. For the same inputs, seed and ``num_threads`` the
``.model`` file is byte-identical. ``num_threads`` is part of the contract: the model records it, and the unigram
trainer's result depends on it (BPE's pieces do not).
"""

import dataclasses
import glob
import gzip
import hashlib
import io
import json
import os
import random
import time
import zlib
from collections.abc import Iterable, Iterator

import sentencepiece as spm

from megadoremi.data.output_files import remove_stale_temporaries, writing
from megadoremi.utils.cli import UserError
from megadoremi.utils.fs import atomic_output
from megadoremi.utils.logging import get_logger

logger = get_logger(__name__)

EOD_FALLBACK_PIECES = ("<|endoftext|>", "</s>", "<eod>")
DEFAULT_MAX_CHARS = 20_000_000
# Fixed, not os.cpu_count(): the thread count changes the model bytes (and unigram's pieces), so a default that
# followed the machine would make "same seed, same model" false across machines.
DEFAULT_NUM_THREADS = 4
# Documents are fed to the trainer in pieces of at most this many characters; SentencePiece silently skips
# sentences longer than max_sentence_length bytes, which we set to 4 bytes per character.
MAX_SENTENCE_CHARS = 4096
# A plain file up to this many times the domain's budget is read whole and sampled by shuffled order; a larger
# one is sampled by seeking to random offsets, which reads only about the budget.
_READ_WHOLE_FACTOR = 4
# Consecutive random offsets that land on an already taken document before seek sampling gives up.
_MAX_SEEK_MISSES = 1000


class TokenizerError(UserError, ValueError):
    """An invalid tokenizer model, unusable training input or training setting; the message names the file
    or value."""


class TokenizerFileNotFoundError(UserError, FileNotFoundError):
    """A tokenizer model or training input that does not exist; the message names it."""


class Tokenizer:
    """A SentencePiece model: ``encode``/``encode_batch``/``decode``, the end-of-document id and a fingerprint."""

    def __init__(self, model_path: str | os.PathLike):
        self._model_path = os.fspath(model_path)
        try:
            with open(self._model_path, "rb") as handle:
                proto = handle.read()
        except FileNotFoundError:
            raise TokenizerFileNotFoundError(f"SentencePiece model file not found: {self._model_path}") from None
        except IsADirectoryError:
            raise TokenizerError(f"SentencePiece model path is a directory, not a .model file: "
                                 f"{self._model_path}") from None
        except OSError as error:
            raise TokenizerError(f"{self._model_path}: cannot read the SentencePiece model "
                                 f"({error.strerror or error})") from None
        self._load(proto)

    def _load(self, proto: bytes) -> None:
        processor = spm.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(proto)
        except RuntimeError as error:
            raise TokenizerError(f"{self._model_path} is not a valid SentencePiece model ({len(proto)} bytes): "
                                 f"{str(error).strip()}") from None
        self._processor = processor
        self._proto = proto
        self._fingerprint = hashlib.md5(proto).hexdigest()
        self._eod = _find_eod_id(processor, self._model_path)

    # Pickle the serialized model, not the path: workers on other nodes need not see the same filesystem.
    def __getstate__(self) -> dict:
        return {"model_path": self._model_path, "proto": self._proto}

    def __setstate__(self, state: dict) -> None:
        self._model_path = state["model_path"]
        self._load(state["proto"])

    def __repr__(self) -> str:
        return f"Tokenizer({self._model_path!r}, vocab_size={self.vocab_size}, eod={self.eod})"

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no bos/eos added)."""
        return self._processor.encode(text)

    def encode_batch(self, texts: list[str], num_threads: int = -1) -> list[list[int]]:
        """Token ids of each text, encoded by SentencePiece's thread pool (-1: all cores; 1 inside worker pools)."""
        if not texts:
            return []
        return self._processor.encode(list(texts), num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of a sequence of token ids (a list or a numpy array)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else [int(token) for token in ids]
        return self._processor.decode(ids)

    @property
    def eod(self) -> int:
        """The end-of-document id appended after every document."""
        return self._eod

    @property
    def vocab_size(self) -> int:
        """Number of pieces in the model (ids are ``0 .. vocab_size - 1``)."""
        return self._processor.vocab_size()

    @property
    def model_path(self) -> str:
        """The path the model was loaded from."""
        return self._model_path

    @property
    def fingerprint(self) -> str:
        """md5 (hex) of the model file's bytes; keys caches so a retrained tokenizer invalidates them."""
        return self._fingerprint


def _find_eod_id(processor: spm.SentencePieceProcessor, model_path: str) -> int:
    """The model's eos id, or for models with eos disabled a piece conventionally used as end of document."""
    eos = processor.eos_id()
    if eos >= 0:
        return eos
    for piece in EOD_FALLBACK_PIECES:
        piece_id = processor.piece_to_id(piece)
        # piece_to_id answers unk for unknown pieces, so check the round trip.
        if processor.id_to_piece(piece_id) == piece:
            return piece_id
    raise TokenizerError(f"{model_path}: the SentencePiece model has eos disabled and none of the pieces "
                         f"{list(EOD_FALLBACK_PIECES)}; cannot tell which id ends a document")


# ----------------------------------------------------------------------------------------------------- training


@dataclasses.dataclass(frozen=True)
class TokenizerTrainingResult:
    """What ``train_tokenizer`` wrote and how much text each domain contributed."""

    model_path: str
    vocab_path: str
    domain_files: dict[str, str]
    chars_per_domain: dict[str, int]
    docs_per_domain: dict[str, int]
    malformed_lines_per_domain: dict[str, int]
    num_sentences: int
    seconds: float


@dataclasses.dataclass
class _DomainSample:
    texts: list[str] = dataclasses.field(default_factory=list)
    num_chars: int = 0
    num_malformed: int = 0
    first_problem: str | None = None


def train_tokenizer(
    inputs: str | os.PathLike | Iterable[str | os.PathLike],
    model_prefix: str | os.PathLike,
    vocab_size: int,
    *,
    max_chars: int = DEFAULT_MAX_CHARS,
    seed: int = 0,
    json_key: str = "text",
    model_type: str = "bpe",
    character_coverage: float = 0.9999,
    num_threads: int = DEFAULT_NUM_THREADS,
) -> TokenizerTrainingResult:
    """Train SentencePiece on an even per-domain sample of jsonl inputs; writes ``{model_prefix}.model`` / ``.vocab``."""
    if vocab_size <= 0:
        raise TokenizerError(f"vocab_size must be > 0, got {vocab_size}")
    if max_chars <= 0:
        raise TokenizerError(f"max_chars must be > 0, got {max_chars}")
    if model_type not in ("bpe", "unigram"):
        raise TokenizerError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    if num_threads <= 0:
        raise TokenizerError(f"num_threads must be > 0, got {num_threads}")
    started = time.perf_counter()
    domain_files = resolve_domain_files(inputs)
    budget_per_domain = max(1, max_chars // len(domain_files))

    sentences: list[str] = []
    chars_per_domain, docs_per_domain, malformed_per_domain = {}, {}, {}
    for domain, path in domain_files.items():
        rng = random.Random(f"megadoremi-tokenizer:{seed}:{domain}")
        try:
            sample = _sample_domain(path, budget_per_domain, rng, json_key)
        except (OSError, EOFError, zlib.error) as error:  # unreadable, or a corrupt .gz
            raise TokenizerError(f"{path}: cannot read it ({getattr(error, 'strerror', None) or error})") from None
        if sample.num_malformed:
            logger.warning("%s: skipped %d malformed line(s); first: %s", path, sample.num_malformed,
                           sample.first_problem)
        if not sample.texts:
            detail = ""
            if sample.num_malformed:
                detail = f" ({sample.num_malformed} malformed line(s); first: {sample.first_problem})"
            raise TokenizerError(f"{path}: no usable text under key {json_key!r}{detail}")
        for text in sample.texts:
            sentences.extend(_split_sentences(text))
        chars_per_domain[domain] = sample.num_chars
        docs_per_domain[domain] = len(sample.texts)
        malformed_per_domain[domain] = sample.num_malformed
        logger.info("tokenizer sample: %-24s %9d chars from %6d docs (%s)", domain, sample.num_chars,
                    len(sample.texts), path)

    model_prefix = os.fspath(model_prefix)
    model_path, vocab_path = f"{model_prefix}.model", f"{model_prefix}.vocab"
    model_dir = os.path.dirname(os.path.abspath(model_prefix))
    with writing(model_path):
        os.makedirs(model_dir, exist_ok=True)
    remove_stale_temporaries(model_dir, [os.path.basename(model_path), os.path.basename(vocab_path)])
    logger.info("training %s tokenizer: vocab %d on %d chars (%d sentences), %d thread(s)", model_type, vocab_size,
                sum(chars_per_domain.values()), len(sentences), num_threads)
    proto = _train_sentencepiece(sentences, vocab_size, seed=seed, model_type=model_type,
                                 character_coverage=character_coverage, num_threads=num_threads)

    # The model comes back in memory (model_writer) rather than from a temporary model_prefix, because the
    # trainer records model_prefix inside the model: a random temporary name would make every run's bytes differ.
    processor = spm.SentencePieceProcessor()
    processor.LoadFromSerializedProto(proto)
    vocab_lines = (f"{_escape_piece(processor.id_to_piece(i))}\t{processor.get_score(i):g}\n"
                   for i in range(processor.vocab_size()))
    with writing(vocab_path), atomic_output(vocab_path, "wb") as handle:
        handle.write("".join(vocab_lines).encode("utf-8"))
    with writing(model_path), atomic_output(model_path, "wb") as handle:
        handle.write(proto)
    seconds = time.perf_counter() - started
    logger.info("wrote %s (%d pieces, md5 %s) in %.1f s", model_path, processor.vocab_size(),
                hashlib.md5(proto).hexdigest(), seconds)
    return TokenizerTrainingResult(
        model_path=model_path,
        vocab_path=vocab_path,
        domain_files=dict(domain_files),
        chars_per_domain=chars_per_domain,
        docs_per_domain=docs_per_domain,
        malformed_lines_per_domain=malformed_per_domain,
        num_sentences=len(sentences),
        seconds=seconds,
    )


def _escape_piece(piece: str) -> str:
    """A piece for the .vocab file, which otherwise follows SentencePiece's format (piece, tab, score as %g).

    Pieces here can hold newlines and tabs, which would break the one-piece-per-line format, so backslash,
    newline, carriage return and tab are backslash-escaped.
    """
    return piece.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def _train_sentencepiece(sentences: list[str], vocab_size: int, *, seed: int, model_type: str,
                         character_coverage: float, num_threads: int) -> bytes:
    """Run the SentencePiece trainer on in-memory sentences; returns the serialized model."""
    # SentencePiece's randomness (its own sentence shuffling, off here) draws from a process-wide seed: pin it
    # so that no trainer option can make two runs differ.
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            byte_fallback=True,
            split_digits=True,
            # Lossless: no NFKC, keep runs of spaces (code indentation), allow pieces made only of spaces.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            max_sentence_length=4 * MAX_SENTENCE_CHARS,
            # The sample is already bounded and in a seeded order: let the trainer take all of it as given.
            input_sentence_size=0,
            shuffle_input_sentence=False,
            num_threads=num_threads,
            minloglevel=1,
        )
    except RuntimeError as error:
        raise TokenizerError(f"SentencePiece training failed (vocab_size={vocab_size}, model_type={model_type}): "
                             f"{str(error).strip()}") from None
    return model.getvalue()


def resolve_domain_files(inputs: str | os.PathLike | Iterable[str | os.PathLike]) -> dict[str, str]:
    """``{domain: path}`` from files, folders of ``<domain>.jsonl[.gz]`` and glob patterns, in the given order."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    paths: list[str] = []
    for item in inputs:
        item = os.fspath(item)
        if os.path.isdir(item):
            found = sorted(os.path.join(item, name) for name in os.listdir(item)
                           if name.endswith((".jsonl", ".jsonl.gz")) and not name.startswith("."))
            if not found:
                raise TokenizerFileNotFoundError(f"no .jsonl or .jsonl.gz files in input folder {item}")
            paths.extend(found)
        elif os.path.exists(item):
            paths.append(item)
        elif glob.has_magic(item):
            found = sorted(path for path in glob.glob(item) if os.path.isfile(path))
            if not found:
                raise TokenizerFileNotFoundError(f"input pattern matched no files: {item}")
            paths.extend(found)
        else:
            raise TokenizerFileNotFoundError(f"input file not found: {item}")
    if not paths:
        raise TokenizerError("no tokenizer training inputs given")

    domain_files: dict[str, str] = {}
    seen = set()
    for path in paths:
        real = os.path.realpath(path)
        if real in seen:
            continue
        seen.add(real)
        domain = _domain_name(path)
        # Same file name in two folders (shard_0/train.jsonl, shard_1/train.jsonl): tell them apart by path.
        if domain in domain_files:
            domain = os.path.normpath(path)
        domain_files[domain] = path
    return domain_files


def _domain_name(path: str) -> str:
    """``a/b/wiki.jsonl.gz`` -> ``wiki``."""
    name = os.path.basename(path)
    for suffix in (".gz", ".jsonl", ".json"):
        name = name.removesuffix(suffix)
    return name


def _sample_domain(path: str, budget_chars: int, rng: random.Random, json_key: str) -> _DomainSample:
    """Up to ``budget_chars`` characters of documents from one jsonl file, chosen with ``rng``.

    Small plain files are read whole and taken in a seeded order; large plain files are sampled by seeking to
    random offsets (the document after each offset), so the sample spans the file but costs about the budget to
    read. Gzip files cannot seek and are read from the start. The last document is truncated to the budget.
    """
    sample = _DomainSample()
    if path.endswith(".gz"):
        with gzip.open(path, "rb") as handle:
            _take_documents(sample, ((f"line {number}", line) for number, line in enumerate(handle, 1)),
                            budget_chars, json_key)
        return sample
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        if size <= _READ_WHOLE_FACTOR * budget_chars:
            lines = [(f"line {number}", line) for number, line in enumerate(handle, 1)]
            rng.shuffle(lines)
            _take_documents(sample, iter(lines), budget_chars, json_key)
        else:
            _take_documents(sample, _seek_sample_lines(handle, size, rng), budget_chars, json_key)
    return sample


def _seek_sample_lines(handle, size: int, rng: random.Random) -> Iterator[tuple[str, bytes]]:
    """Lines starting after random byte offsets, each line at most once, until offsets keep hitting taken ones."""
    taken_starts = set()
    misses = 0
    while misses < _MAX_SEEK_MISSES:
        offset = rng.randrange(size)
        # The line containing byte offset-1 ends at or after offset-1; the next line starts after it.
        if offset:
            handle.seek(offset - 1)
            handle.readline()
        else:
            handle.seek(0)
        start = handle.tell()
        if start >= size or start in taken_starts:
            misses += 1
            continue
        misses = 0
        taken_starts.add(start)
        yield f"the line at byte {start}", handle.readline()


def _take_documents(sample: _DomainSample, lines: Iterator[tuple[str, bytes]], budget_chars: int,
                    json_key: str) -> None:
    """Parse lines into ``sample`` until it holds ``budget_chars`` characters; malformed lines are counted."""
    for where, line in lines:
        if sample.num_chars >= budget_chars:
            return
        if not line.strip():
            continue
        text, problem = _parse_line(line, json_key)
        if problem is not None:
            sample.num_malformed += 1
            if sample.first_problem is None:
                sample.first_problem = f"{where}: {problem}"
            continue
        if not text:
            continue
        text = text[:budget_chars - sample.num_chars]
        sample.texts.append(text)
        sample.num_chars += len(text)


def _parse_line(line: bytes, json_key: str) -> tuple[str | None, str | None]:
    """``(text, None)`` for a good jsonl line, ``(None, reason)`` for a malformed one."""
    try:
        record = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        return None, f"invalid JSON ({error})"
    if not isinstance(record, dict):
        return None, f"expected a JSON object, got {type(record).__name__}"
    if json_key not in record:
        return None, f"missing key {json_key!r} (keys: {sorted(record)[:10]})"
    text = record[json_key]
    if not isinstance(text, str):
        return None, f"key {json_key!r} holds {type(text).__name__}, not a string"
    return text, None


def _split_sentences(text: str) -> Iterator[str]:
    """``text`` in pieces of at most MAX_SENTENCE_CHARS, cut after a newline (or space) where possible."""
    start = 0
    while len(text) - start > MAX_SENTENCE_CHARS:
        end = start + MAX_SENTENCE_CHARS
        cut = text.rfind("\n", start, end) + 1
        if cut <= start:
            cut = text.rfind(" ", start, end) + 1
        if cut <= start:
            cut = end
        yield text[start:cut]
        start = cut
    if start < len(text):
        yield text[start:]
