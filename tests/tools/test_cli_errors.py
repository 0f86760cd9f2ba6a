"""Every console tool: a mistake in the user's input (a file, a dataset, a tokenizer, a config) exits 2 with one
line on stderr naming the file, and no traceback unless --debug asks for one."""

import os
import subprocess
import sys

import numpy as np
import pytest

from megadoremi.data.indexed_dataset import IndexedDatasetWriter

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _missing_input(root):
    return ["--input", f"{root}/missing.jsonl", "--model-prefix", f"{root}/tok"], f"{root}/missing.jsonl"


def _invalid_tokenizer(root):
    with open(f"{root}/good.jsonl", "w") as handle:
        handle.write('{"text": "a document"}\n')
    with open(f"{root}/lib.so", "wb") as handle:
        handle.write(b"\x7fELF\x02\x01\x01" + bytes(range(256)) * 4)
    return (["--input", f"{root}/good.jsonl", "--output-prefix", f"{root}/out/x", "--tokenizer-model",
             f"{root}/lib.so"], f"{root}/lib.so is not a valid SentencePiece model")


def _missing_dataset(root):
    with IndexedDatasetWriter(f"{root}/part", np.uint16) as writer:
        writer.add_document(np.arange(1, 9))
    return ["--input", f"{root}/part", f"{root}/missing", "--output-prefix", f"{root}/merged"], f"{root}/missing.bin"


def _foreign_dataset(root):
    for suffix in (".bin", ".idx"):
        with open(f"{root}/foreign{suffix}", "wb") as handle:
            handle.write(b"PK\x03\x04 not a Megatron index" * 3)
    return [f"{root}/foreign"], f"{root}/foreign.idx: not a Megatron index file"


def _outdir_under_a_file(root):
    with open(f"{root}/blocker", "w") as handle:
        handle.write("a file, not a folder")
    return [f"{root}/blocker/corpus", "--docs-per-domain", "1"], f"{root}/blocker/corpus: cannot write it"


def _missing_config(root):
    return ["--config", f"{root}/missing.yaml", "--gpus", "8"], f"{root}/missing.yaml: config file not found"


def _config_with_missing_dataset(root):
    with open(f"{root}/config.yaml", "w") as handle:
        handle.write(f"model:\n  preset: tiny\ndata:\n  domains:\n    web: {root}/missing_web\n"
                     f"doremi:\n  reference_model: {root}/reference.pt\n")
    return [f"{root}/config.yaml", "--output", f"{root}/ref"], f"{root}/missing_web.bin: data file not found"


CASES = {
    "train_tokenizer": _missing_input,
    "preprocess_data": _invalid_tokenizer,
    "merge_datasets": _missing_dataset,
    "inspect_dataset": _foreign_dataset,
    "make_demo_corpus": _outdir_under_a_file,
    "plan_memory": _missing_config,
    "compute_reference_losses": _config_with_missing_dataset,
}


@pytest.mark.parametrize("debug", [False, True], ids=["plain", "debug"])
@pytest.mark.parametrize("tool", sorted(CASES))
def test_user_error_is_one_line_and_exit_2(tmp_path, tool, debug):
    args, named = CASES[tool](str(tmp_path))
    command = [sys.executable, os.path.join(REPO_ROOT, "tools", f"{tool}.py"), *args, *(["--debug"] if debug else [])]
    env = {key: value for key, value in os.environ.items() if key != "MEGADOREMI_DEBUG"}
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(f"{tool}: error: ") and named in lines[-1], result.stderr
    if debug:
        assert "Traceback (most recent call last)" in result.stderr
    else:
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
