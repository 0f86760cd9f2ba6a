import contextlib
import gzip
import hashlib
import io
import json
import logging
import os
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm

from megadoremi.data.demo_corpus import make_demo_corpus
from megadoremi.data.tokenizer import Tokenizer, resolve_domain_files, train_tokenizer
from megadoremi.utils.cli import UserError

VOCAB_SIZE = 1000


def write_jsonl(path, records):
    """Write records (dicts, or raw strings for malformed lines) one per line; .gz paths are gzipped."""
    lines = "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records)
    if str(path).endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(lines)
    else:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(lines)
    return str(path)


@contextlib.contextmanager
def captured_logs():
    """Records of the megadoremi logger (it does not propagate, so caplog cannot see them)."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("megadoremi")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("corpus")
    make_demo_corpus(str(outdir), seed=0, docs_per_domain=40)
    return str(outdir)


@pytest.fixture(scope="module")
def trained(corpus_dir, tmp_path_factory):
    prefix = os.path.join(str(tmp_path_factory.mktemp("tok")), "spm")
    return train_tokenizer(corpus_dir, prefix, VOCAB_SIZE, max_chars=300_000, seed=0)


@pytest.fixture(scope="module")
def tokenizer(trained):
    return Tokenizer(trained.model_path)


ROUND_TRIP_TEXTS = [
    "Hello, world!",
    "def f(x):\n    return x  +  1\n\n\tindented with a tab\r\n",
    "   leading and trailing spaces   ",
    "Ünïcödé: straße, ελληνικά, русский, 中文",
    "emoji 😀🚀 and rare CJK 𠀋𪚥 and a ligature ﬁ and full-width ＡＢＣ",  # not in the training data: bytes
    "\x00\x07 control characters \u2028 and a zero-width joiner \u200d",
    "12345678901234567890 = 2**64",
    "",
]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip_is_exact(tokenizer, text):
    ids = tokenizer.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text


@pytest.fixture(scope="module")
def processor(trained):
    return spm.SentencePieceProcessor(model_file=trained.model_path)


def test_unseen_characters_fall_back_to_bytes(tokenizer, processor):
    ids = tokenizer.encode("😀")
    pieces = [processor.id_to_piece(i) for i in ids]
    assert [p for p in pieces if p.startswith("<0x")] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    assert processor.unk_id() not in ids


def test_special_ids_and_properties(tokenizer, trained, processor):
    assert tokenizer.vocab_size == VOCAB_SIZE
    assert tokenizer.eod == 2
    assert [processor.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert tokenizer.model_path == trained.model_path
    with open(trained.model_path, "rb") as handle:
        assert tokenizer.fingerprint == hashlib.md5(handle.read()).hexdigest()
    assert tokenizer.eod not in tokenizer.encode("text ending a document </s>")


def test_encode_batch_matches_encode_and_decode_takes_numpy(tokenizer):
    texts = ROUND_TRIP_TEXTS * 3
    batch = tokenizer.encode_batch(texts)
    assert batch == [tokenizer.encode(t) for t in texts]
    assert tokenizer.encode_batch(texts, num_threads=1) == batch
    assert tokenizer.encode_batch([]) == []
    assert tokenizer.decode(np.array(batch[3], dtype=np.uint16)) == texts[3]


def test_vocab_file_lists_every_piece(trained):
    with open(trained.vocab_path, encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    assert len(lines) == VOCAB_SIZE
    assert lines[:3] == ["<unk>\t0", "<s>\t0", "</s>\t0"]


def test_no_temporary_files_left(trained):
    directory = os.path.dirname(trained.model_path)
    assert sorted(os.listdir(directory)) == ["spm.model", "spm.vocab"]


def test_training_is_deterministic(corpus_dir, trained, tmp_path):
    again = train_tokenizer(corpus_dir, str(tmp_path / "again"), VOCAB_SIZE, max_chars=300_000, seed=0)
    with open(trained.model_path, "rb") as a, open(again.model_path, "rb") as b:
        assert a.read() == b.read()
    with open(trained.vocab_path, "rb") as a, open(again.vocab_path, "rb") as b:
        assert a.read() == b.read()
    assert again.chars_per_domain == trained.chars_per_domain


def test_unigram_training_is_deterministic(corpus_dir, tmp_path):
    first, second = (
        train_tokenizer(corpus_dir, str(tmp_path / name), 600, max_chars=60_000, seed=3, model_type="unigram",
                        num_threads=2)
        for name in ("a", "b")
    )
    with open(first.model_path, "rb") as a, open(second.model_path, "rb") as b:
        assert a.read() == b.read()


def test_sampling_is_even_across_domains(tmp_path):
    folder = tmp_path / "domains"
    folder.mkdir()
    # "huge" has 20x the text of "medium"; "tiny" has less than its share.
    write_jsonl(folder / "huge.jsonl", [{"text": f"huge document {i} " + "alpha beta " * 100} for i in range(400)])
    write_jsonl(folder / "medium.jsonl", [{"text": f"medium doc {i} " + "gamma delta " * 100} for i in range(20)])
    write_jsonl(folder / "tiny.jsonl.gz", [{"text": "tiny epsilon " * 50}])
    result = train_tokenizer(str(folder), str(tmp_path / "even"), 300, max_chars=30_000, seed=0)
    assert list(result.chars_per_domain) == ["huge", "medium", "tiny"]
    assert result.chars_per_domain["huge"] == 10_000
    assert result.chars_per_domain["medium"] == 10_000
    assert result.chars_per_domain["tiny"] == len("tiny epsilon " * 50)


def test_large_file_is_sampled_across_its_length(tmp_path):
    path = write_jsonl(tmp_path / "big.jsonl", [{"text": f"doc {i} " + "word " * 40} for i in range(3000)])

    def sampled_ids(seed):
        result = train_tokenizer(path, str(tmp_path / f"big{seed}"), 280, max_chars=20_000, seed=seed)
        assert result.chars_per_domain == {"big": 20_000}
        return result

    first = sampled_ids(0)
    assert first.docs_per_domain == sampled_ids(0).docs_per_domain
    # With the file > 4x the budget, documents come from random offsets: check they span the file.
    from megadoremi.data.tokenizer import _sample_domain
    import random

    sample = _sample_domain(path, 20_000, random.Random("x"), "text")
    doc_numbers = [int(text.split()[1]) for text in sample.texts]
    assert min(doc_numbers) < 1000 and max(doc_numbers) > 2000
    assert len(set(doc_numbers)) == len(doc_numbers)


def test_malformed_lines_are_skipped_and_counted(tmp_path):
    good = [{"text": f"good line {i} " + "lorem ipsum " * 20} for i in range(30)]
    path = write_jsonl(tmp_path / "messy.jsonl", good[:10] + ["{not json", '{"other": "x"}', "[1, 2]", '{"text": 5}']
                       + good[10:])
    with captured_logs() as records:
        result = train_tokenizer(path, str(tmp_path / "messy"), 300, max_chars=1_000_000, seed=0)
    assert result.malformed_lines_per_domain == {"messy": 4}
    assert result.docs_per_domain == {"messy": 30}
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert any(path in message and "4 malformed" in message and "line 1" in message for message in warnings)


def test_input_errors_name_the_file(tmp_path):
    missing = str(tmp_path / "missing.jsonl")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        train_tokenizer(missing, str(tmp_path / "x"), 300)
    empty_folder = tmp_path / "empty"
    empty_folder.mkdir()
    with pytest.raises(FileNotFoundError, match="no .jsonl .*empty"):
        train_tokenizer(str(empty_folder), str(tmp_path / "x"), 300)
    with pytest.raises(FileNotFoundError, match="matched no files"):
        train_tokenizer(str(tmp_path / "nothing*.jsonl"), str(tmp_path / "x"), 300)
    wrong_key = write_jsonl(tmp_path / "wrong_key.jsonl", [{"content": "hello"}] * 3)
    with pytest.raises(ValueError, match=r"wrong_key\.jsonl: no usable text under key 'text'.*missing key"):
        train_tokenizer(wrong_key, str(tmp_path / "x"), 300)
    blank = write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}])
    with pytest.raises(ValueError, match="blank.jsonl: no usable text"):
        train_tokenizer(blank, str(tmp_path / "x"), 300)
    small = write_jsonl(tmp_path / "small.jsonl", [{"text": "abc def"}])
    with pytest.raises(ValueError, match="vocab_size=100000"):
        train_tokenizer(small, str(tmp_path / "x"), 100_000)
    assert not any(name.startswith(("x.", ".x")) for name in os.listdir(tmp_path))


def test_resolve_domain_files_handles_globs_folders_and_duplicates(tmp_path):
    for shard in ("a", "b"):
        (tmp_path / shard).mkdir()
        write_jsonl(tmp_path / shard / "web.jsonl", [{"text": "x"}])
    write_jsonl(tmp_path / "a" / "code.jsonl.gz", [{"text": "y"}])
    domains = resolve_domain_files([str(tmp_path / "a"), str(tmp_path / "*" / "web.jsonl")])
    assert list(domains)[:2] == ["code", "web"]
    assert len(domains) == 3  # a/web.jsonl is listed once; b/web.jsonl is told apart by its path


def test_tokenizer_file_errors_name_the_path(tmp_path):
    missing = str(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match="nope.model") as error:
        Tokenizer(missing)
    assert isinstance(error.value, UserError)  # a command reports it in one line and exits 2
    corrupt = tmp_path / "corrupt.model"
    corrupt.write_bytes(b"this is not a protobuf \xff\xfe")
    with pytest.raises(ValueError, match="corrupt.model") as error:
        Tokenizer(str(corrupt))
    assert isinstance(error.value, UserError)
    empty = tmp_path / "empty.model"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.model"):
        Tokenizer(str(empty))


def test_pickle_carries_the_model(tokenizer, trained, tmp_path):
    copy_path = tmp_path / "copy.model"
    copy_path.write_bytes(open(trained.model_path, "rb").read())
    original = Tokenizer(str(copy_path))
    data = pickle.dumps(original)
    os.remove(copy_path)  # a worker on another node may not see the file
    restored = pickle.loads(data)
    assert restored.model_path == str(copy_path)
    assert restored.fingerprint == tokenizer.fingerprint
    assert (restored.eod, restored.vocab_size) == (tokenizer.eod, tokenizer.vocab_size)
    text = ROUND_TRIP_TEXTS[4]
    assert restored.encode(text) == tokenizer.encode(text)


def train_foreign_model(tmp_path, name, **options):
    """A model "trained elsewhere": plain SentencePiece defaults plus the given options."""
    with open(os.__file__, encoding="utf-8") as handle:
        sentences = [line for line in handle.read().splitlines() if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, vocab_size=200,
                                   minloglevel=2, **options)
    path = tmp_path / f"{name}.model"
    path.write_bytes(model.getvalue())
    return path


def _varint(value):
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _piece_record(piece, score, piece_type):
    """A ModelProto.pieces entry (field 1) encoded by hand: piece=1 (string), score=2 (float), type=3 (enum)."""
    raw = piece.encode("utf-8")
    body = b"\x0a" + _varint(len(raw)) + raw + b"\x15" + struct.pack("<f", score) + b"\x18" + _varint(piece_type)
    return b"\x0a" + _varint(len(body)) + body


def test_eos_disabled_model_uses_endoftext_piece(tmp_path):
    path = train_foreign_model(tmp_path, "no_eos", eos_id=-1, user_defined_symbols=["<|endoftext|>"])
    tok = Tokenizer(str(path))
    processor = spm.SentencePieceProcessor(model_file=str(path))
    assert processor.eos_id() == -1
    assert tok.eod == processor.piece_to_id("<|endoftext|>")


def test_eos_disabled_model_without_fallback_piece_is_refused(tmp_path):
    path = train_foreign_model(tmp_path, "no_eod_at_all", eos_id=-1)
    with pytest.raises(ValueError, match="no_eod_at_all.model.*eos disabled"):
        Tokenizer(str(path))


def test_large_vocabulary_model_loads(tmp_path):
    base = train_foreign_model(tmp_path, "base", eos_id=-1, user_defined_symbols=["<eod>"]).read_bytes()
    # Append pieces to reach a 256k vocabulary (like Gemma's); protobuf merges repeated fields in order.
    extra = b"".join(_piece_record(f"▁extra{i}", -1000.0 - i, 1) for i in range(256_000 - 200 - 1))
    extra += _piece_record("<big_id_token>", 0.0, 4)  # USER_DEFINED: matched verbatim when encoding
    path = tmp_path / "large.model"
    path.write_bytes(base + extra)
    tok = Tokenizer(str(path))
    assert tok.vocab_size == 256_000
    assert tok.eod == spm.SentencePieceProcessor(model_file=str(path)).piece_to_id("<eod>")
    ids = tok.encode("words <big_id_token> words")
    assert 255_999 in ids
    assert tok.decode(ids) == "words <big_id_token> words"
    assert tok.decode([200_000]) == "extra199800"
    assert pickle.loads(pickle.dumps(tok)).encode("<big_id_token>") == tok.encode("<big_id_token>")


def test_cli_trains_and_reports_errors(corpus_dir, repo_root, tmp_path):
    prefix = str(tmp_path / "cli")
    command = [sys.executable, os.path.join(repo_root, "tools", "train_tokenizer.py"),
               "--input", os.path.join(corpus_dir, "arithmetic.jsonl"), os.path.join(corpus_dir, "stdlib_*.jsonl"),
               "--model-prefix", prefix, "--vocab-size", "500", "--max-chars", "40000", "--seed", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "stdlib_code" in done.stderr and "stdlib_docs" in done.stderr
    assert Tokenizer(prefix + ".model").vocab_size == 500
    missing = str(tmp_path / "absent.jsonl")
    done = subprocess.run(command[:2] + ["--input", missing, "--model-prefix", prefix], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2  # a user error: one line naming the file, no traceback
    assert done.stderr.strip().splitlines() == [f"train_tokenizer: error: input file not found: {missing}"]
