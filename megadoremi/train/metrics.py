"""Run outputs: metrics.jsonl, eval.jsonl, TensorBoard events, and the human-readable progress line."""

import json
import math
import os

from megadoremi.utils import jsonio
from megadoremi.utils.logging import get_logger

logger = get_logger(__name__)


class MetricsWriter:
    """Rank 0 appends one JSON object per line; other ranks write nothing."""

    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.run_dir = run_dir
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
            except ImportError:
                logger.warning("tensorboard is not installed: no TensorBoard events (metrics.jsonl is written)")

    def _append(self, name: str, record: dict) -> None:
        with open(os.path.join(self.run_dir, name), "a") as handle:
            handle.write(jsonio.dumps(record) + "\n")

    def _scalars(self, prefix: str, record: dict, step: int) -> None:
        if self._tb is None:
            return
        for key, value in record.items():
            if key == "step":
                continue
            if isinstance(value, dict):
                for sub, number in value.items():
                    if isinstance(number, (int, float)) and math.isfinite(number):
                        self._tb.add_scalar(f"{prefix}/{key}/{sub}", number, step)
            elif isinstance(value, (int, float)) and math.isfinite(value):
                self._tb.add_scalar(f"{prefix}/{key}", value, step)

    def train(self, record: dict) -> None:
        if self.enabled:
            self._append("metrics.jsonl", record)
            self._scalars("train", record, record["step"])

    def eval(self, record: dict) -> None:
        if self.enabled:
            self._append("eval.jsonl", record)
            self._scalars("eval", record, record["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


def truncate_jsonl(path: str, max_step: int) -> None:
    """Drop records after ``max_step`` (a resumed run rewrites the steps after its checkpoint)."""
    if not os.path.exists(path):
        return
    with open(path) as handle:
        kept = [line for line in handle if line.strip() and json.loads(line).get("step", 0) <= max_step]
    tmp = path + ".tmp"
    with open(tmp, "w") as handle:
        handle.writelines(kept)
    os.replace(tmp, path)
