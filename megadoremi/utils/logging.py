"""One rank-aware logger for the whole package.

Every process logs with its rank in the prefix; by default only rank 0 logs INFO, other ranks log WARNING and
above, so a SLURM log of an 8-rank job stays readable.
"""

import logging
import os
import sys

_RANK_VARS = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID")
_CONFIGURED = False


def process_rank() -> int:
    """The global rank of this process as the launcher announced it (0 when not launched in parallel)."""
    for var in _RANK_VARS:
        value = os.environ.get(var)
        if value is not None and value.strip().lstrip("-").isdigit():
            return int(value)
    return 0


def configure_logging(level: int = logging.INFO, all_ranks: bool = False, rank: int | None = None) -> None:
    """Set up the ``megadoremi`` logger: rank prefix, stderr, INFO on rank 0 only unless ``all_ranks``."""
    global _CONFIGURED
    rank = process_rank() if rank is None else rank
    logger = logging.getLogger("megadoremi")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s [megadoremi rank{rank}] %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    )
    logger.addHandler(handler)
    logger.setLevel(level if (rank == 0 or all_ranks) else max(level, logging.WARNING))
    logger.propagate = False
    _CONFIGURED = True


def get_logger(name: str = "megadoremi") -> logging.Logger:
    """A child of the ``megadoremi`` logger, configuring it on first use."""
    if not _CONFIGURED:
        configure_logging()
    if not name.startswith("megadoremi"):
        name = f"megadoremi.{name}"
    return logging.getLogger(name)
