"""Data layer: Megatron-compatible indexed datasets, tokenizer, preprocessing, GPT samples, blending, the mixture
sampler, mixture policies, the training-stream builder and the micro-batches of a rank.

Submodules are imported explicitly (``from megadoremi.data.indexed_dataset import IndexedDataset``) so that
the offline tools never pay for torch or deepspeed imports.
"""
