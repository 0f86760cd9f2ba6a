"""Data layer: Megatron-compatible indexed datasets, tokenizer, GPT samples, blending, mixture sampler.

Submodules are imported explicitly (``from megadoremi.data.indexed_dataset import IndexedDataset``) so that
the offline tools never pay for torch or deepspeed imports.
"""
