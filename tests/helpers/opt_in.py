"""Test folders that `make test` (pytest tests) skips because they need root and minutes: they run when their
environment variable is 1 or when the folder (or a file in it) is named on the pytest command line."""

import os

import pytest


def skip_unless_selected(config, items, folder: str, env_var: str, reason: str) -> None:
    """Mark every collected item under ``folder`` as skipped unless ``env_var`` is "1" or the command line names
    ``folder`` or a path inside it (for a conftest's ``pytest_collection_modifyitems``)."""
    if os.environ.get(env_var) == "1":
        return
    for arg in config.args:
        path = os.path.abspath(str(arg).split("::")[0])
        if path == folder or path.startswith(folder + os.sep):
            return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if str(item.path).startswith(folder + os.sep):
            item.add_marker(skip)
