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
