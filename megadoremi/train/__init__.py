"""Training: the DeepSpeed loop, checkpoints, LR schedule, metrics; ``python -m megadoremi.train CONFIG``."""
