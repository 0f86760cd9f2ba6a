"""A diverged run stops: non-finite loss or gradient norm for ``train.divergence_patience`` steps in a row.

Each step the trainer asks ``nonfinite(record, grad_norm, step_applied)`` (the step's all-reduced loss is the
same on every rank, and the flag is all-reduced with the stop flag besides), then ``observe``. While a streak
lasts no checkpoint is written, so the last complete checkpoint is the last good one. A step that DeepSpeed's
fp16 loss scaler skipped (overflow: inf gradients, no update) is not divergence. At the limit, rank 0 writes
``RUN_DIR/diverged.json`` (never ``final.json``) and every rank raises TrainingDiverged: the command exits with
status 3 (``megadoremi.utils.cli.EXIT_DIVERGED``).
"""

import math
import os

from megadoremi.utils import jsonio
from megadoremi.utils.fs import atomic_output
from megadoremi.utils.logging import get_logger

logger = get_logger(__name__)

DIVERGED_FILE = "diverged.json"


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm stayed non-finite for ``train.divergence_patience`` steps."""


def _number(value) -> str:
    return "none" if value is None else f"{value:.4g}"


class DivergenceGuard:
    def __init__(self, patience: int, run_dir: str, rank: int):
        self.patience, self.run_dir, self.rank = patience, run_dir, rank
        self.streak = 0

    @staticmethod
    def nonfinite(record: dict, grad_norm: float | None, step_applied: bool) -> bool:
        loss_bad = not math.isfinite(record["loss"])
        norm_bad = grad_norm is not None and not math.isfinite(grad_norm) and step_applied
        return loss_bad or norm_bad

    def observe(self, nonfinite: bool, record: dict, grad_norm: float | None, last_checkpoint: str | None,
                last_step: bool = False) -> bool:
        """Count the step; True while the run is in a non-finite streak (do not checkpoint). Raises
        TrainingDiverged (after writing diverged.json on rank 0) when the streak reaches the patience, or at once
        on the run's last step."""
        if not nonfinite:
            self.streak = 0
            return False
        self.streak += 1
        step = record["step"]
        domains = ", ".join(f"{name} {_number(loss)}" for name, loss in record.get("domain_loss", {}).items())
        where = (f"step {step}: loss {_number(record['loss'])}, gradient norm {_number(grad_norm)}"
                 + (f" (domain losses: {domains})" if domains else ""))
        if self.streak < self.patience and not last_step:
            logger.warning("non-finite %s; %d of train.divergence_patience=%d, no checkpoint meanwhile", where,
                           self.streak, self.patience)
            return True
        message = (f"training diverged: non-finite loss or gradient norm for {self.streak} step(s) in a row, at "
                   f"{where}. Last checkpoint, written before it: {last_checkpoint or 'none'}. Lower train.lr, raise "
                   "train.warmup_fraction or check the data of the domain that went first")
        if self.rank == 0:
            with atomic_output(os.path.join(self.run_dir, DIVERGED_FILE), "w") as handle:
                jsonio.dump({"status": "diverged", "step": step, "loss": record["loss"], "grad_norm": grad_norm,
                             "domain_loss": record.get("domain_loss"), "streak": self.streak,
                             "last_checkpoint": last_checkpoint, "message": message}, handle, indent=1)
        raise TrainingDiverged(message)
