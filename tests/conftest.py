import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.dirname(sys.executable)


@pytest.fixture(scope="session")
def repo_root():
    return REPO_ROOT


def venv_executable(name: str) -> str:
    """Path of a console program installed next to the running interpreter (mpiexec, deepspeed, ...)."""
    return os.path.join(VENV_BIN, name)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """Demo-corpus domains, a 512-piece tokenizer and one indexed dataset per domain (built once)."""
    from tests.helpers.corpus import build_tiny_corpus

    return build_tiny_corpus(str(tmp_path_factory.mktemp("tiny_corpus")))
