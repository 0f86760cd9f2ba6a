"""Reference per-token losses for the proxy: a frozen reference model run forward on each batch (live), or a
cache computed once (``tools/compute_reference_losses.py``) and memory-mapped during the proxy run.

The cache is one float32 array (samples, seq_length) indexed by the sample's position in the proxy's training
stream (step x global batch + offset), so it serves any parallel layout. Its JSON description records the
reference model's md5 and the training stream's identity (``TrainStreamSpec.identity()``, from the same builder
the trainer uses); a mismatch is an error, never a silent reuse.
"""

import hashlib
import json
import os

import numpy as np
import torch

from megadoremi.data.batches import collate
from megadoremi.data.stream import TrainStreamSpec, build_train_stream
from megadoremi.model.gpt import GPT, GPTConfig, token_losses
from megadoremi.model.io import load_exported_model, model_file_path
from megadoremi.utils.cli import UserError
from megadoremi.utils.fs import atomic_output, remove_quietly, temp_path_for
from megadoremi.utils.logging import get_logger

logger = get_logger(__name__)

CACHE_FORMAT_VERSION = 2  # 2: the stream identity is TrainStreamSpec.identity()


def file_md5(path: str, chunk_bytes: int = 1 << 24) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()



class ReferenceInputError(UserError, ValueError):
    """A reference model or reference-loss cache that does not fit this run; the message names the file."""


def check_reference_config(reference: GPTConfig, proxy: GPTConfig, path: str) -> None:
    """The reference must have the proxy's vocabulary and shape; say which field differs."""
    if reference.vocab_size != proxy.vocab_size:
        raise ReferenceInputError(
            f"doremi.reference_model: {path} has vocabulary size {reference.vocab_size}, this run's tokenizer has "
            f"{proxy.vocab_size}; excess losses (and DoReMi weights) do not transfer across vocabularies"
        )
    for field in ("num_layers", "num_heads", "head_dim", "d_model", "ffn_dim", "mlp", "norm", "tied_embeddings"):
        if getattr(reference, field) != getattr(proxy, field):
            raise ReferenceInputError(
                f"doremi.reference_model: {path} has {field}={getattr(reference, field)!r}, the proxy has "
                f"{getattr(proxy, field)!r}; train the reference with the proxy's model preset"
            )


class LiveReference:
    """A frozen reference GPT on this rank (ZeRO-3 partitioned when the proxy is)."""

    def __init__(self, path: str, proxy_config: GPTConfig, device, dtype, zero3_ds_config: dict | None = None):
        path = model_file_path(path)
        config, state = load_exported_model(path)
        check_reference_config(config, proxy_config, path)
        self.device, self.engine = device, None
        if zero3_ds_config is not None:
            import deepspeed

            with deepspeed.zero.Init(config_dict_or_path=zero3_ds_config):
                model = GPT(config)
            with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
                if torch.distributed.get_rank() == 0:
                    model.load_state_dict(state)
            model.requires_grad_(False)
            inference_config = {key: zero3_ds_config[key] for key in
                                ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
                                 "bf16", "zero_optimization") if key in zero3_ds_config}
            self.engine, _, _, _ = deepspeed.initialize(model=model, config=inference_config)
            self.engine.eval()
            self.model = self.engine
        else:
            model = GPT(config)
            model.load_state_dict(state)
            self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)

    @torch.no_grad()
    def losses(self, batch: dict) -> torch.Tensor:
        """Per-token reference losses (batch, seq) in float32."""
        tokens = batch["tokens"].to(self.device)
        return token_losses(self.model(tokens[:, :-1]), tokens[:, 1:]).float()


class CachedReference:
    """Memory-mapped per-token reference losses, rows = positions in the proxy's training stream."""

    def __init__(self, path: str, expected_identity: dict, reference_md5: str | None):
        meta_path = path + ".json"
        if not os.path.exists(meta_path) or not os.path.exists(path + ".npy"):
            raise ReferenceInputError(f"doremi.reference_losses: {path}.npy/.json not found (compute it with "
                                      "tools/compute_reference_losses.py)")
        with open(meta_path) as handle:
            meta = json.load(handle)
        if meta.get("version") != CACHE_FORMAT_VERSION:
            raise ReferenceInputError(f"doremi.reference_losses: {meta_path}: cache version {meta.get('version')} "
                                      f"(this version reads {CACHE_FORMAT_VERSION}); recompute it")
        expected = json.loads(json.dumps(expected_identity))
        if expected != meta["stream"]:
            diff = sorted(k for k in set(expected) | set(meta["stream"]) if meta["stream"].get(k) != expected.get(k))
            raise ReferenceInputError(f"doremi.reference_losses: {path} was computed for another training "
                                      f"stream (differs in {diff}); recompute it")
        if reference_md5 is not None and meta["reference_md5"] != reference_md5:
            raise ReferenceInputError(f"doremi.reference_losses: {path} was computed with another reference "
                                      f"model (md5 {meta['reference_md5']}, doremi.reference_model has "
                                      f"{reference_md5})")
        self.losses_array = np.load(path + ".npy", mmap_mode="r")

    def losses(self, batch: dict) -> torch.Tensor:
        positions = batch["positions"].numpy()
        if positions.max() >= self.losses_array.shape[0]:
            raise IndexError(f"reference-loss cache has {self.losses_array.shape[0]} rows, position "
                             f"{positions.max()} requested")
        return torch.from_numpy(np.ascontiguousarray(self.losses_array[positions], dtype=np.float32))


def build_reference(doremi, model_config: GPTConfig, stream_identity: dict, device, dtype,
                    zero3_ds_config: dict | None, computes_losses: bool):
    """The reference of a proxy run (``doremi``: a DoReMiConfig): a ``CachedReference`` when
    ``doremi.reference_losses`` is set (validated against ``stream_identity`` and the reference model's md5),
    else a ``LiveReference``; None on ranks that compute no losses (pipeline stages before the last)."""
    reference_md5 = None
    if doremi.reference_model:
        path = model_file_path(doremi.reference_model)
        if not os.path.exists(path):
            raise ReferenceInputError(f"doremi.reference_model: {path} not found (a finished reference run "
                                      "writes RUN_DIR/model.pt)")
        reference_md5 = file_md5(path)
    if doremi.reference_losses:
        return CachedReference(doremi.reference_losses, stream_identity, reference_md5)
    if not computes_losses:
        return None
    return LiveReference(doremi.reference_model, model_config, device, dtype, zero3_ds_config)


def write_reference_losses(spec: TrainStreamSpec, reference_model: str, output: str, bf16: bool = False,
                           batch_size: int = 16) -> str:
    """Compute the cache for a proxy run whose training stream is ``spec``; returns ``OUTPUT.npy``.

    ``reference_model``: a reference run directory or its ``model.pt``; ``bf16``: run the reference in bf16 (on
    a GPU). Collective when torch.distributed is initialised: the rows are split across the ranks, each writes its
    share into one memory-mapped file under a temporary name, and rank 0 renames it and writes ``OUTPUT.json``
    last (a cache without its ``.json`` is refused). Ranks on several nodes need a filesystem whose shared-file
    writes are coherent (Lustre, GPFS); over NFS run it on one node.
    """

    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if distributed else 0
    world_size = torch.distributed.get_world_size() if distributed else 1
    if not reference_model:
        raise ValueError("doremi.reference_model: required to compute reference losses")
    if spec.kind != "blend":
        raise ValueError("reference-loss caches need a static mixture (mixing.method=static): the rows of a "
                         "dynamic mixture depend on training")
    stream = build_train_stream(spec)
    num_samples, seq_length, global_batch = spec.num_samples, spec.seq_length, spec.global_batch_size
    model_path = model_file_path(reference_model)
    model_config, _ = load_exported_model(model_path)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    reference = LiveReference(model_path, model_config, device, torch.bfloat16 if bf16 else torch.float32)
    npy_path, meta_path = output + ".npy", output + ".json"
    tmp_npy = temp_path_for(npy_path) if rank == 0 else None
    if distributed:
        holder = [tmp_npy]
        torch.distributed.broadcast_object_list(holder, src=0)
        tmp_npy = holder[0]

    def agree(error: BaseException | None, what: str) -> None:
        """Collective: every rank learns whether any rank failed ``what``, and all stop together (no rank is left
        waiting in a barrier for one that died); the temporary file is removed."""
        failed = torch.tensor([0.0 if error is None else 1.0], device=device)
        if distributed:
            torch.distributed.all_reduce(failed, op=torch.distributed.ReduceOp.MAX)
        if failed.item() == 0:
            return
        if rank == 0:
            remove_quietly(tmp_npy)
        if error is not None:
            raise error
        raise RuntimeError(f"reference losses: another rank failed while {what}; see its error")

    error = None
    if rank == 0:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(npy_path)), exist_ok=True)
            np.lib.format.open_memmap(tmp_npy, mode="w+", dtype=np.float32, shape=(num_samples, seq_length))
        except BaseException as caught:  # noqa: BLE001 - re-raised by agree()
            error = caught
    agree(error, "creating the cache file")
    try:
        rows = np.lib.format.open_memmap(tmp_npy, mode="r+")
        share = -(-num_samples // world_size)
        first, last = rank * share, min(num_samples, (rank + 1) * share)
        for start in range(first, last, batch_size):
            positions = range(start, min(last, start + batch_size))
            batch = collate([stream.read(p // global_batch, [p % global_batch])[0] for p in positions], positions)
            rows[start:start + len(positions)] = reference.losses(batch).cpu().numpy()
            if (start - first) // batch_size % 50 == 0:
                logger.info("reference losses: rows %d-%d of %d", start, positions[-1], num_samples)
        rows.flush()
        del rows
    except BaseException as caught:  # noqa: BLE001 - re-raised by agree()
        error = caught
    agree(error, "computing its rows")
    if rank == 0:
        try:
            remove_quietly(meta_path)  # never pair new rows with an old description
            os.replace(tmp_npy, npy_path)
            meta = {"version": CACHE_FORMAT_VERSION, "reference_md5": file_md5(model_path),
                    "reference_model": os.path.abspath(model_path),
                    "stream": json.loads(json.dumps(spec.identity())),
                    "shape": [num_samples, seq_length]}
            with atomic_output(meta_path, "w") as handle:
                json.dump(meta, handle, indent=1)
            logger.info("wrote %s (%d samples x %d tokens)", npy_path, num_samples, seq_length)
        except BaseException as caught:  # noqa: BLE001 - re-raised by agree()
            error = caught
    agree(error, "writing the cache's description")  # and no rank opens the cache before it exists
    return npy_path
