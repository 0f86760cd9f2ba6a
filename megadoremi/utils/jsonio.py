"""JSON that stays JSON: NaN and infinities become ``null`` (Python's json writes bare ``NaN``, which no other
JSON reader accepts), and writing a non-finite number by accident fails instead of producing such a file."""

import json
import math


def finite(value):
    """``value`` with every non-finite float (also inside dicts, lists and tuples) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value


def dumps(value, **kwargs) -> str:
    """``json.dumps`` of ``finite(value)``, refusing anything non-finite that is left."""
    return json.dumps(finite(value), allow_nan=False, **kwargs)


def dump(value, handle, **kwargs) -> None:
    json.dump(finite(value), handle, allow_nan=False, **kwargs)
