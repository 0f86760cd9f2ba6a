"""Training: the one loop (``trainer.py``) with its two seams, the loss objective (``objective.py``) and the data
mixture (``megadoremi.data.mixing``); evaluation, checkpoints, metrics, export; ``python -m megadoremi.train
CONFIG``. See docs/architecture.md."""
