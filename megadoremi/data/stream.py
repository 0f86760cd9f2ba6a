"""The training sample stream: one recipe, one builder, used by the trainer and by the reference-loss cache.

``train_stream_spec`` turns the config (data and train sections, the batch size and the mixture policy) into a
``TrainStreamSpec``, everything that decides which sample sits at which position of the stream; ``identity()``
is that recipe as JSON, so a cache of per-position values (DoReMi's reference losses) is valid exactly when the
identities agree. ``build_train_stream`` builds the stream the spec describes:

- ``BlendedStream`` (static mixture): Megatron's greedy blend of the domains' training splits for fixed weights
  (``build_blended_dataset``); position p is sample p of the blend, random access, stateless.
- ``SampledStream`` (weights that may change between steps): each step's global batch is drawn by a
  ``MixtureSampler`` from the weights in force (``set_weights``) over one epoch of every domain's training split,
  with per-domain cursors (reshuffled on every later epoch); steps are drawn in order, and the sampler's state
  (cursors, generator, weights) goes into every checkpoint.

Both serve ``read(step, offsets)``: the samples at positions ``step * G + offset`` (G = global batch), each
``{"tokens": int64 (seq + 1,), "domain_id": int}``, and ``domain_ids(step)``: the domain of every sample of
step's global batch (G,) without reading tokens, so every rank knows the step's per-domain counts with no
communication.
"""

from dataclasses import asdict, dataclass

import numpy as np

from megadoremi.data.blending import build_blended_dataset, domain_document_range, domain_seed, load_domain_weights
from megadoremi.data.gpt_dataset import GPTSampleDataset
from megadoremi.data.indexed_dataset import IndexedDataset
from megadoremi.data.sampler import MixtureSampler

STREAM_KINDS = ("blend", "sampler")


@dataclass(frozen=True)
class TrainStreamSpec:
    """Everything that decides the training stream's samples (``cache_dir`` only says where indices are kept)."""

    domains: dict  # domain name -> dataset prefix, in domain-id order
    weights: tuple  # the mixture of step 0, one weight per domain
    mixture: dict  # the policy's description (``MixturePolicy.describe()``)
    kind: str  # blend: static Megatron blend | sampler: MixtureSampler draws
    sampler_mode: str | None  # MixtureSampler mode (kind sampler)
    num_samples: int  # steps x global batch
    global_batch_size: int
    seq_length: int
    seed: int
    split: str
    cache_dir: str | None = None

    @property
    def domain_names(self) -> list[str]:
        return list(self.domains)

    def identity(self) -> dict:
        """The recipe as plain JSON data (caches of per-position values must match it)."""
        identity = asdict(self)
        identity.pop("cache_dir")
        identity["weights"] = [float(w) for w in self.weights]
        return identity


def train_stream_spec(data, train, policy, global_batch_size: int, sampler_mode: str = "stratified"
                      ) -> TrainStreamSpec:
    """The spec for ``data`` (DataConfig), ``train`` (TrainConfig) and ``policy`` (a ``MixturePolicy``)."""
    kind = "sampler" if policy.dynamic else "blend"
    return TrainStreamSpec(
        domains=dict(data.domains), weights=tuple(float(w) for w in policy.initial_weights),
        mixture=policy.describe(), kind=kind, sampler_mode=sampler_mode if kind == "sampler" else None,
        num_samples=train.steps * global_batch_size, global_batch_size=global_batch_size,
        seq_length=train.seq_length, seed=train.seed, split=data.split, cache_dir=data.cache_dir)


class BlendedStream:
    """A static Megatron blend: position p is ``blend[p]``."""

    kind = "blend"

    def __init__(self, spec: TrainStreamSpec):
        self.spec = spec
        self.global_batch_size = spec.global_batch_size
        self.domain_names = spec.domain_names
        self.dataset = build_blended_dataset(spec.domains, list(spec.weights), spec.num_samples,
                                             seq_length=spec.seq_length, seed=spec.seed, split=spec.split,
                                             split_index=0, cache_dir=spec.cache_dir)

    def read(self, step: int, offsets) -> list[dict]:
        first = step * self.global_batch_size
        if first + self.global_batch_size > len(self.dataset):
            raise IndexError(f"step {step} needs samples beyond the training stream ({len(self.dataset)})")
        return [self.dataset[first + offset] for offset in offsets]

    def domain_ids(self, step: int) -> np.ndarray:
        """(G,) int64: the domain of every sample of step's global batch."""
        first = step * self.global_batch_size
        if first + self.global_batch_size > len(self.dataset):
            raise IndexError(f"step {step} needs samples beyond the training stream ({len(self.dataset)})")
        return np.asarray(self.dataset.domain_index[first:first + self.global_batch_size], dtype=np.int64)

    def set_weights(self, weights) -> None:
        raise RuntimeError("a static blend cannot change its weights (use a dynamic mixing.method)")

    def state_dict(self) -> dict:
        return {"kind": self.kind}

    def load_state_dict(self, state: dict, step: int) -> None:
        if state.get("kind", self.kind) != self.kind:
            raise ValueError(f"checkpoint holds a {state.get('kind')!r} training stream, this run uses a static blend")


class SampledStream:
    """Global batches drawn step by step by a ``MixtureSampler`` from the weights in force."""

    kind = "sampler"

    def __init__(self, spec: TrainStreamSpec):
        self.spec = spec
        self.global_batch_size = spec.global_batch_size
        self.domain_names = spec.domain_names
        self.datasets = []
        for d, (name, prefix) in enumerate(spec.domains.items()):
            indexed = IndexedDataset(prefix)
            self.datasets.append(GPTSampleDataset(
                indexed, document_range=domain_document_range(indexed, spec.split, 0), seq_length=spec.seq_length,
                num_samples=None, seed=domain_seed(spec.seed, d), cache_dir=spec.cache_dir, name=name))
        self.sampler = MixtureSampler(self.domain_names, [len(ds) for ds in self.datasets], list(spec.weights),
                                      spec.seed, mode=spec.sampler_mode)
        self.next_step = 0  # the step whose batch the sampler draws next
        self._drawn = None  # (step, domain_ids (G,), sample_indices (G,)) of the last drawn step

    def _draw(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        if self._drawn is not None and self._drawn[0] == step:
            return self._drawn[1], self._drawn[2]
        if step != self.next_step:
            raise RuntimeError(f"training stream: step {step} requested but the sampler is at step {self.next_step} "
                               "(steps are drawn in order; a resumed run restores the sampler's position)")
        domains, indices = self.sampler.next_indices(self.global_batch_size)
        self._drawn = (step, domains, indices)
        self.next_step = step + 1
        return domains, indices

    def read(self, step: int, offsets) -> list[dict]:
        domains, indices = self._draw(step)
        return [{"tokens": self.datasets[int(domains[o])][int(indices[o])], "domain_id": int(domains[o])}
                for o in offsets]

    def domain_ids(self, step: int) -> np.ndarray:
        """(G,) int64: the domain of every sample of step's global batch (draws the step if it is next)."""
        return np.asarray(self._draw(step)[0], dtype=np.int64)

    @property
    def weights(self) -> np.ndarray:
        """The normalised weights the next step is drawn with."""
        return self.sampler.probabilities

    def set_weights(self, weights) -> None:
        """Draw from the next undrawn step on with ``weights`` (k,)."""
        self.sampler.set_weights(load_domain_weights(weights, self.domain_names))

    def state_dict(self) -> dict:
        return {"kind": self.kind, "next_step": self.next_step, "sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict, step: int) -> None:
        """Continue at ``step`` (the checkpoint's step) from ``state``."""
        if state.get("kind") != self.kind:
            raise ValueError(f"checkpoint holds a {state.get('kind', 'blend')!r} training stream, this run draws "
                             "with a MixtureSampler (mixing.method changed?)")
        if state["next_step"] != step:
            raise ValueError(f"checkpoint of step {step} holds a sampler positioned at step {state['next_step']}")
        self.sampler.load_state_dict(state["sampler"])
        self.next_step, self._drawn = step, None


def build_train_stream(spec: TrainStreamSpec):
    """The stream ``spec`` describes: a ``BlendedStream`` or a ``SampledStream``."""
    if spec.kind not in STREAM_KINDS:
        raise ValueError(f"unknown training stream kind {spec.kind!r}; expected one of {STREAM_KINDS}")
    return BlendedStream(spec) if spec.kind == "blend" else SampledStream(spec)
