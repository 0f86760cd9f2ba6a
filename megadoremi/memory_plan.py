"""Per-GPU memory of a training layout: model states (DeepSpeed's accounting) plus activations.

Pure arithmetic on a ``GPTConfig`` and a ``Layout`` (GPUs, ZeRO stage, pipeline stages, micro-batch, ...); no
torch.distributed, no DeepSpeed import. Sizes are bytes here; the CLI (``tools/plan_memory.py``) prints GiB.

Model states, per parameter held by a GPU before partitioning (mixed precision bf16/fp16 with Adam), counted as
DeepSpeed's own estimators count them (``estimate_zero2_model_states_mem_needs`` and
``estimate_zero3_model_states_mem_needs`` in DeepSpeed's ``runtime/zero``; their "18" is rows 2-5 for ZeRO-2 and
rows 1 + 3 + 4 + 5 for ZeRO-3)::

    1  16-bit parameters                      2 B   partitioned by ZeRO-3
    2  16-bit gradients                       2 B   partitioned by ZeRO-2 and ZeRO-3
    3  fp32 gradient partition (opt. step)    4 B   partitioned by ZeRO-1, 2, 3
    4  fp32 master parameters                 4 B   partitioned by ZeRO-1, 2, 3
    5  Adam exp_avg + exp_avg_sq (fp32)       8 B   partitioned by ZeRO-1, 2, 3

partitioned = divided by the data-parallel size ``dp = GPUs / pipeline stages``. Reported as ``params`` (row 1),
``grads`` (rows 2-3: DeepSpeed's ZeRO optimizers step on an fp32 copy of their gradient partition) and
``optimizer`` (rows 4-5, the 12 B of master weights and Adam moments). Under ZeRO-3 the 16-bit gradient
partition is converted to fp32 sub-group by sub-group and released (``_prepare_fp32_grad_for_sub_group``), so
its gradients count max(2, 4) = 4 B, as DeepSpeed's ZeRO-3 estimator does; ZeRO-3 also gathers the largest layer
in full for its forward and backward: ``+ 2 B x largest_layer_params`` to params and to grads (DeepSpeed's
``largest_layer_memory = 4 * largest_layer_params``). So per GPU, P parameters held, L the largest layer::

    ZeRO-0: 20 P              ZeRO-1: 4 P + 16 P / dp
    ZeRO-2: 2 P + 18 P / dp   ZeRO-3: 18 P / dp + 4 L

ZeRO-2 and ZeRO-3 are DeepSpeed's ``gpu_mem`` without offload, term for term (DeepSpeed has no ZeRO-1 estimator;
ZeRO-1 is ZeRO-2 with unpartitioned 16-bit gradients). CPU / NVMe offload, the estimators' other rows (which move
model states to per-node CPU memory), is not modelled: every state here lives on the GPU. fp32 training: 4 B parameters, 4 B gradients, 8 B Adam
moments, plus a 4 B fp32 master partition under ZeRO-1/2 (DeepSpeed's stage 1/2 optimizer clones its partition
even in fp32); DeepSpeed has no estimator for that case.

Largest layer: the largest module's own parameters, as DeepSpeed's ``model_to_params`` counts them; with a big
vocabulary that is the embedding (padded vocab x d_model), e.g. 1.05B for the 8B preset at 256k.

Pipeline stages: the layers of ``megadoremi.model.pipeline`` (embedding, blocks 1..L, final norm, and with tied
embeddings the embedding again for the logits) are split by parameter count with DeepSpeed's own
``partition_balanced`` (``partition_method="parameters"``, reimplemented here and tested to agree). With tied
embeddings the first and the last stage each hold a full copy of the embedding (DeepSpeed all-reduces the two
gradients), so the end stages get fewer blocks. Every stage's model states use its own parameter count; the
per-GPU figure reported is the stage with the largest total.

Activations, per transformer layer, sequence s, micro-batch b, hidden h, heads a, FFN width f, 16-bit
activations. Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models") count
``s b h (34 + 5 a s / h)`` bytes for a GPT layer with f = 4h, dropout and materialised attention scores; their
MLP term is ``4 s b f`` in general, i.e. ``s b h (18 + 4 f / h) + 5 a s^2 b``. This model has no dropout (no
masks), runs attention through SDPA (flash / memory-efficient kernels on GPU: no s^2 term, but the output and
a fp32 log-sum-exp are kept) and applies rotary positions to q and k (two new tensors while v stays a view of
the fused qkv output). Counting the tensors autograd saves (tests/test_plan_memory.py measures them)::

    per layer = s b h (22 + 4 f / h)   GELU     (= 38 s b h for f = 4h; 46 s b h for the 8B preset's f = 6h)
              = s b h (22 + 8 f / h)   SwiGLU
              + 4 a s b  (fp32 log-sum-exp)  + 16 s b  (fp32 LayerNorm statistics)
              + 5 a s^2 b  only with ``attention="math"`` (scores materialised, Korthikanti's term)

(fp32 activations: twice the 16-bit terms.) With full activation checkpointing (every block recomputed in the
backward, as ``model.activation_checkpointing`` does) a layer keeps only its 16-bit input, ``2 s b h``, plus one
layer's full activations during its recomputation. Head: final-norm input and output ``4 s b h`` and the logits
``s b V x (2 + 4 + 4)``: the 16-bit logits the trainer holds until backward, the fp32 log-softmax that
cross-entropy keeps for backward, and one more fp32 ``s b V`` that exists transiently (the upcast copy in the
forward, the log-softmax gradient in the backward). V = padded vocabulary.

Pipelines (DeepSpeed's 1F1B ``TrainSchedule``): stage i keeps the activations of ``min(stages - i,
micro-batches)`` micro-batches in flight; the logits live on the last stage (one in flight).

Not counted: the CUDA context, NCCL and DeepSpeed communication buckets, allocator fragmentation, temporary
all-gather buffers beyond the largest layer. ``fits`` keeps ``HEADROOM_FRACTION`` of the device for them.
"""

import math
from dataclasses import dataclass, field

from megadoremi.model.gpt import GPTConfig

GIB = 2**30
HEADROOM_FRACTION = 0.10  # of device memory, kept for what the count leaves out (see the module docstring)
PRECISIONS = ("bf16", "fp16", "fp32")
ATTENTION_KINDS = ("flash", "math")


@dataclass
class Layout:
    """How a run is spread: GPUs, ZeRO stage, pipeline stages, batch shape, precision."""

    num_gpus: int
    zero_stage: int = 0
    pipeline_stages: int = 1
    micro_batch_size: int = 1
    grad_accum: int | None = None  # micro-batches per step (None: at least pipeline_stages, a full pipeline)
    seq_length: int = 1024
    activation_checkpointing: bool = False
    precision: str = "bf16"
    attention: str = "flash"

    def validate(self) -> None:
        """Raise ValueError naming the first impossible field."""
        for name in ("num_gpus", "pipeline_stages", "micro_batch_size", "seq_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.grad_accum is not None and self.grad_accum < 1:
            raise ValueError(f"grad_accum: must be >= 1, got {self.grad_accum}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage: must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.num_gpus % self.pipeline_stages:
            raise ValueError(f"pipeline_stages={self.pipeline_stages} does not divide num_gpus={self.num_gpus}")
        if self.pipeline_stages > 1 and self.zero_stage >= 2:
            raise ValueError(f"zero_stage={self.zero_stage} with pipeline_stages={self.pipeline_stages}: "
                             "DeepSpeed's pipeline engine supports ZeRO stage 0 or 1 only")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: must be one of {PRECISIONS}, got {self.precision!r}")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention: must be one of {ATTENTION_KINDS}, got {self.attention!r}")

    @property
    def data_parallel_size(self) -> int:
        return self.num_gpus // self.pipeline_stages

    @property
    def mixed_precision(self) -> bool:
        return self.precision in ("bf16", "fp16")


@dataclass
class StageMemory:
    """Bytes per GPU of one pipeline stage (the whole model when there is no pipeline)."""

    stage: int
    layer_names: list[str]
    num_params: int  # parameters this stage holds (a tied embedding counts on both end stages)
    num_blocks: int
    micro_batches_in_flight: int
    params_bytes: float
    grads_bytes: float
    optimizer_bytes: float
    activations_bytes: float

    @property
    def total_bytes(self) -> float:
        return self.params_bytes + self.grads_bytes + self.optimizer_bytes + self.activations_bytes


@dataclass
class MemoryPlan:
    """The per-stage figures of one model on one layout; ``worst`` is the per-GPU requirement."""

    model: GPTConfig
    layout: Layout
    num_params: int
    largest_layer_params: int
    stages: list[StageMemory] = field(default_factory=list)

    @property
    def worst(self) -> StageMemory:
        return max(self.stages, key=lambda stage: stage.total_bytes)

    def summary(self) -> dict:
        """The seven numbers of ``plan_memory --json``: counts, and GiB per GPU for the worst stage."""
        worst = self.worst
        return {
            "num_params": self.num_params,
            "largest_layer_params": self.largest_layer_params,
            "params_gb": worst.params_bytes / GIB,
            "grads_gb": worst.grads_bytes / GIB,
            "optimizer_gb": worst.optimizer_bytes / GIB,
            "activations_gb": worst.activations_bytes / GIB,
            "total_gb": worst.total_bytes / GIB,
        }

    def fits(self, device_memory_gb: float, headroom_fraction: float = HEADROOM_FRACTION) -> bool:
        """Whether the worst stage fits in ``device_memory_gb`` GiB less the headroom."""
        return self.worst.total_bytes / GIB <= device_memory_gb * (1.0 - headroom_fraction)


# --- parameter counts -------------------------------------------------------------------------------------


def _norm_params(model: GPTConfig) -> int:
    return model.d_model if model.norm == "rmsnorm" else 2 * model.d_model


def block_params(model: GPTConfig) -> int:
    """Parameters of one transformer block."""
    return (model.num_parameters(embedding=False) - _norm_params(model)) // model.num_layers


def pipeline_layer_params(model: GPTConfig) -> list[tuple[str, int]]:
    """(name, parameters) of each layer of ``pipeline_layer_specs(model)``, in order."""
    embedding = model.padded_vocab_size * model.d_model
    layers = [("embedding", embedding)]
    layers += [(f"block{i + 1}", block_params(model)) for i in range(model.num_layers)]
    layers.append(("final_norm" if model.tied_embeddings else "final_norm+head",
                   _norm_params(model) + (0 if model.tied_embeddings else embedding)))
    if model.tied_embeddings:
        layers.append(("tied_embedding(logits)", embedding))
    return layers


def largest_layer_params(model: GPTConfig) -> int:
    """Largest module's own parameters (DeepSpeed's ``model_to_params``): the embedding for big vocabularies."""
    d, inner, ffn = model.d_model, model.num_heads * model.head_dim, model.ffn_dim
    return max(model.padded_vocab_size * d, 3 * inner * d, inner * d, ffn * d, _norm_params(model))


def partition_uniform(num_items: int, num_parts: int) -> list[int]:
    """DeepSpeed's ``partition_uniform`` (used by ``partition_balanced`` when items <= parts)."""
    parts = [0] * (num_parts + 1)
    if num_items <= num_parts:
        for p in range(num_parts + 1):
            parts[p] = min(p, num_items)
        return parts
    chunksize = num_items // num_parts
    residual = num_items - (chunksize * num_parts)
    parts = [i * chunksize for i in range(num_parts + 1)]
    for i in range(residual):
        parts[i + 1:] = [p + 1 for p in parts[i + 1:]]
    return parts


def partition_balanced(weights: list[int], num_parts: int) -> list[int]:
    """DeepSpeed's ``partition_balanced``: stage boundaries minimising (heaviest - lightest) stage weight."""
    n, m = len(weights), num_parts
    if n <= m:
        return partition_uniform(n, m)
    inf = math.inf
    dp_max = [[inf] * (m + 1) for _ in range(n + 1)]
    dp_min = [[inf] * (m + 1) for _ in range(n + 1)]
    dp_cost = [[inf] * (m + 1) for _ in range(n + 1)]
    position = [[0] * (m + 1) for _ in range(n + 1)]
    prefix = [0.0] * (n + 1)
    for i, weight in enumerate(weights):
        prefix[i + 1] = prefix[i] + float(weight)
    dp_max[0][0] = 0
    dp_cost[0][0] = 0
    for i in range(1, n + 1):
        for j in range(1, min(i, m) + 1):
            for k in range(i):
                part = prefix[i] - prefix[k]
                max_sum, min_sum = max(dp_max[k][j - 1], part), min(dp_min[k][j - 1], part)
                cost = max_sum - min_sum
                if dp_cost[i][j] >= cost:
                    dp_cost[i][j], dp_max[i][j], dp_min[i][j], position[i][j] = cost, max_sum, min_sum, k
    parts = [n]
    for j in reversed(range(1, m + 1)):
        parts.append(position[parts[-1]][j])
    parts.reverse()
    return parts


# --- bytes ------------------------------------------------------------------------------------------------


def model_state_bytes(num_params: int, data_parallel_size: int, zero_stage: int, precision: str = "bf16",
                      largest_layer: int = 0) -> tuple[float, float, float]:
    """(params, grads, optimizer) bytes per GPU for ``num_params`` held parameters (see the module docstring)."""
    mixed = precision in ("bf16", "fp16")
    param_b, grad_b = (2, 2) if mixed else (4, 4)
    grad32_b = 4 if mixed else 0
    master_b = 4 if (mixed or zero_stage in (1, 2)) else 0
    adam_b = 8
    dp = data_parallel_size
    params = param_b * num_params / (dp if zero_stage >= 3 else 1)
    if zero_stage >= 3:  # the 16-bit partition becomes the fp32 one at the step (DeepSpeed's ZeRO-3 count)
        grads = max(grad_b, grad32_b) * num_params / dp
    else:
        grads = grad_b * num_params / (dp if zero_stage >= 2 else 1) + grad32_b * num_params / (dp if zero_stage else 1)
    optimizer = (master_b + adam_b) * num_params / (dp if zero_stage >= 1 else 1)
    if zero_stage >= 3:  # the largest layer gathered in full, and its full gradient before reduce-scatter
        params += param_b * largest_layer
        grads += grad_b * largest_layer
    return params, grads, optimizer


def layer_activation_bytes(model: GPTConfig, seq_length: int, micro_batch_size: int, precision: str = "bf16",
                           attention: str = "flash") -> float:
    """Bytes autograd keeps for one transformer block's backward (see the module docstring)."""
    s, b, h, a, f = seq_length, micro_batch_size, model.d_model, model.num_heads, model.ffn_dim
    scale = 1.0 if precision in ("bf16", "fp16") else 2.0  # 16-bit terms double in fp32
    mlp_terms = (8 if model.mlp == "swiglu" else 4) * f / h
    total = s * b * h * (22 + mlp_terms) * scale + 4 * a * s * b + 16 * s * b
    if attention == "math":
        total += 5 * a * s * s * b * scale
    return total


def head_activation_bytes(model: GPTConfig, seq_length: int, micro_batch_size: int, precision: str = "bf16") -> float:
    """Final norm and logits: 16-bit logits + fp32 log-softmax + one transient fp32 copy (batch, seq, vocab)."""
    s, b, h, vocab = seq_length, micro_batch_size, model.d_model, model.padded_vocab_size
    act_b = 2 if precision in ("bf16", "fp16") else 4
    return 2 * act_b * s * b * h + s * b * vocab * (act_b + 4 + 4)


def stage_activation_bytes(model: GPTConfig, layout: Layout, num_blocks: int, in_flight: int,
                           has_head: bool) -> float:
    """Activations of a stage holding ``num_blocks`` blocks with ``in_flight`` micro-batches outstanding."""
    s, b = layout.seq_length, layout.micro_batch_size
    full = layer_activation_bytes(model, s, b, layout.precision, layout.attention)
    act_b = 2 if layout.mixed_precision else 4
    if layout.activation_checkpointing:
        kept = in_flight * num_blocks * act_b * s * b * model.d_model  # each block's input
        kept += full if num_blocks else 0.0  # one block recomputed at a time in the backward
    else:
        kept = in_flight * num_blocks * full
    if has_head:
        kept += head_activation_bytes(model, s, b, layout.precision)
    return kept


def plan_memory(model: GPTConfig, layout: Layout) -> MemoryPlan:
    """Per-GPU memory of every pipeline stage (one stage without a pipeline)."""
    model.validate()
    layout.validate()
    stages, dp = layout.pipeline_stages, layout.data_parallel_size
    micro_batches = layout.grad_accum if layout.grad_accum is not None else stages
    plan = MemoryPlan(model, layout, model.num_parameters(), largest_layer_params(model))
    layers = pipeline_layer_params(model)
    bounds = partition_balanced([count for _, count in layers], stages) if stages > 1 else [0, len(layers)]
    for stage in range(stages):
        held = layers[bounds[stage]:bounds[stage + 1]]
        names = [name for name, _ in held]
        num_params = sum(count for _, count in held)
        if stages == 1:
            num_params = plan.num_params  # the tied embedding is one tensor without a pipeline
        num_blocks = sum(name.startswith("block") for name in names)
        in_flight = min(stages - stage, micro_batches)
        params, grads, optimizer = model_state_bytes(num_params, dp, layout.zero_stage, layout.precision,
                                                     plan.largest_layer_params)
        activations = stage_activation_bytes(model, layout, num_blocks, in_flight, has_head=stage == stages - 1)
        plan.stages.append(StageMemory(stage, names, num_params, num_blocks, in_flight, params, grads, optimizer,
                                       activations))
    return plan
