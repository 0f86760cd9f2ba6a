"""The training stream: one recipe (TrainStreamSpec) and its identity, the static blend (exactly Megatron's
blend), and the sampled stream for weights that change between steps (weights take effect at the next step,
exact resume from the sampler's state, steps drawn in order)."""

import numpy as np
import pytest

from megadoremi.config import DataConfig, MixingConfig, TrainConfig
from megadoremi.data.batches import TrainBatches
from megadoremi.data.blending import build_blended_dataset
from megadoremi.data.indexed_dataset import IndexedDatasetWriter
from megadoremi.data.mixing import build_mixture_policy
from megadoremi.data.stream import build_train_stream, train_stream_spec
from megadoremi.distributed.plan import BatchPlan

NAMES = ["web", "code", "math"]
GLOBAL_BATCH = 12


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    """Three domains whose tokens lie in disjoint ranges (domain d: [100 d, 100 d + 100)), 40 documents each."""
    root = tmp_path_factory.mktemp("stream")
    rng = np.random.default_rng(0)
    prefixes = {}
    for d, name in enumerate(NAMES):
        prefix = str(root / name)
        with IndexedDatasetWriter(prefix, np.uint16) as writer:
            writer.add_documents(rng.integers(100 * d, 100 * d + 100, size=40 * 50), np.full(40, 50))
        prefixes[name] = prefix
    return {"prefixes": prefixes, "cache_dir": str(root / "index-cache")}


def make(domains, tmp_path, steps=10, weights=None, schedule=None, seed=3):
    data = DataConfig(domains=domains["prefixes"], weights=weights, split="90,10,0", cache_dir=domains["cache_dir"])
    mixing = MixingConfig()
    if schedule:
        path = tmp_path / "schedule.json"
        path.write_text(schedule)
        mixing = MixingConfig(method="schedule", schedule=str(path))
    train = TrainConfig(steps=steps, seq_length=16, seed=seed)
    policy = build_mixture_policy(mixing, data)
    return policy, train_stream_spec(data, train, policy, GLOBAL_BATCH, mixing.sampler)


def domain_of(sample) -> int:
    return int(sample["tokens"][0]) // 100


def test_static_stream_is_the_megatron_blend(domains, tmp_path):
    policy, spec = make(domains, tmp_path, weights={"web": 0.5, "code": 0.3, "math": 0.2})
    assert spec.kind == "blend" and spec.num_samples == 10 * GLOBAL_BATCH
    stream = build_train_stream(spec)
    blend = build_blended_dataset(domains["prefixes"], [0.5, 0.3, 0.2], 120, seq_length=16, seed=3,
                                  split="90,10,0", cache_dir=domains["cache_dir"])
    for step in (0, 4, 9):
        for offset, sample in enumerate(stream.read(step, range(GLOBAL_BATCH))):
            expected = blend[step * GLOBAL_BATCH + offset]
            np.testing.assert_array_equal(sample["tokens"], expected["tokens"])
            assert sample["domain_id"] == expected["domain_id"] == domain_of(sample)
    with pytest.raises(IndexError, match="beyond the training stream"):
        stream.read(len(blend.dataset_index) // GLOBAL_BATCH, range(1))
    with pytest.raises(RuntimeError, match="static blend"):
        stream.set_weights([1, 0, 0])


def test_identity_is_the_recipe(domains, tmp_path):
    _, spec = make(domains, tmp_path)
    identity = spec.identity()
    assert "cache_dir" not in identity and identity["kind"] == "blend" and identity["num_samples"] == 120
    assert identity["weights"] == [1 / 3] * 3 and identity["domains"] == domains["prefixes"]
    for other in (make(domains, tmp_path, seed=4)[1], make(domains, tmp_path, steps=11)[1],
                  make(domains, tmp_path, weights={"web": 2, "code": 1, "math": 1})[1],
                  make(domains, tmp_path, schedule='{"0": {"web": 1, "code": 1, "math": 1}}')[1]):
        assert other.identity() != identity


SCHEDULE = '{"0": {"web": 1, "code": 0, "math": 0}, "3": {"web": 0, "code": 1, "math": 1}}'


def run_steps(policy, stream, steps):
    """Draw ``steps`` global batches as the trainer does: read, then update the policy (no statistics needed)."""
    drawn = []
    for step in steps:
        samples = stream.read(step, range(GLOBAL_BATCH))
        drawn.append([(s["domain_id"], s["tokens"].tolist()) for s in samples])
        assert all(s["domain_id"] == domain_of(s) for s in samples)
        weights = policy.update(step, None)
        if weights is not None:
            stream.set_weights(weights)
    return drawn


def test_sampled_stream_changes_the_mixture_at_the_scheduled_step(domains, tmp_path):
    policy, spec = make(domains, tmp_path, schedule=SCHEDULE)
    assert spec.kind == "sampler" and spec.sampler_mode == "stratified"
    stream = build_train_stream(spec)
    drawn = run_steps(policy, stream, range(6))
    counts = [np.bincount([d for d, _ in batch], minlength=3).tolist() for batch in drawn]
    assert counts[:3] == [[12, 0, 0]] * 3
    assert counts[3:] == [[0, 6, 6]] * 3  # stratified: exactly the weights' shares of every global batch


def test_sampled_stream_resumes_exactly(domains, tmp_path):
    policy, spec = make(domains, tmp_path, schedule=SCHEDULE)
    stream = build_train_stream(spec)
    uninterrupted = run_steps(policy, stream, range(8))
    # Stop after step 2 (before the schedule's change at 3) and after step 5; resume a new stream from the state.
    for stop in (2, 5):
        policy, spec = make(domains, tmp_path, schedule=SCHEDULE)
        first = build_train_stream(spec)
        run_steps(policy, first, range(stop))
        saved = first.state_dict()
        policy, spec = make(domains, tmp_path, schedule=SCHEDULE)
        resumed = build_train_stream(spec)
        resumed.load_state_dict(saved, stop)
        assert run_steps(policy, resumed, range(stop, 8)) == uninterrupted[stop:]
        with pytest.raises(ValueError, match="positioned at step"):
            build_train_stream(spec).load_state_dict(saved, stop + 1)


def test_sampled_stream_is_read_in_order_and_splits_like_the_blend(domains, tmp_path):
    policy, spec = make(domains, tmp_path, schedule=SCHEDULE)
    stream = build_train_stream(spec)
    with pytest.raises(RuntimeError, match="step 1 requested but the sampler is at step 0"):
        stream.read(1, range(1))
    whole = stream.read(0, range(GLOBAL_BATCH))
    # Two data-parallel ranks x 2 accumulation steps of 3 see the same global batch.
    plan = BatchPlan(world_size=2, pipeline_stages=1, data_parallel_size=2, micro_batch_size=3, grad_accum=2,
                     global_batch_size=GLOBAL_BATCH, seq_length=16)
    rows = []
    for rank in range(2):
        for micro in TrainBatches(stream, plan, rank).micro_batches(0):
            rows += micro["tokens"].tolist()
            assert micro["positions"].tolist() == list(range(len(rows) - 3, len(rows)))
    assert rows == [sample["tokens"].tolist() for sample in whole]
    with pytest.raises(ValueError, match="global batches of 12"):
        TrainBatches(stream, BatchPlan(1, 1, 1, 4, 1, 4, 16), 0)


@pytest.mark.parametrize("kind", ["blend", "sampler"])
def test_micro_batches_carry_their_domain_counts_and_the_global_batch(domains, tmp_path, kind):
    """What the training step counts per domain without reading the device: every micro-batch's samples per
    domain, and the whole global batch's (all ranks), from ``stream.domain_ids(step)``."""
    policy, spec = make(domains, tmp_path, schedule=SCHEDULE) if kind == "sampler" else \
        make(domains, tmp_path, weights=[0.5, 0.3, 0.2])
    stream = build_train_stream(spec)
    assert stream.kind == kind
    plan = BatchPlan(world_size=2, pipeline_stages=1, data_parallel_size=2, micro_batch_size=3, grad_accum=2,
                     global_batch_size=GLOBAL_BATCH, seq_length=16)
    for step in range(3):
        ids = stream.domain_ids(step)
        assert ids.tolist() == [sample["domain_id"] for sample in stream.read(step, range(GLOBAL_BATCH))]
        total = np.zeros(3, dtype=np.int64)
        for rank in range(2):
            for micro in TrainBatches(stream, plan, rank).micro_batches(step):
                assert micro["domain_counts"].tolist() == np.bincount(micro["domain_ids"].numpy(), minlength=3).tolist()
                assert micro["step_domain_counts"].tolist() == np.bincount(ids, minlength=3).tolist()
                total += micro["domain_counts"]
        assert total.tolist() == np.bincount(ids, minlength=3).tolist() and total.sum() == GLOBAL_BATCH
        if kind == "sampler":
            run_steps(policy, stream, [step])  # the policy's weights for the next step (drawn in order)


def test_micro_batches_refuse_domain_ids_out_of_range(domains, tmp_path):
    _, spec = make(domains, tmp_path, weights=[0.5, 0.3, 0.2])
    stream = build_train_stream(spec)
    stream.dataset.domain_index = stream.dataset.domain_index.copy()
    stream.dataset.domain_index[GLOBAL_BATCH + 1] = 7  # step 1, one sample
    plan = BatchPlan(1, 1, 1, GLOBAL_BATCH, 1, GLOBAL_BATCH, 16)
    batches = TrainBatches(stream, plan, 0)
    assert batches.micro_batches(0)[0]["step_domain_counts"].sum() == GLOBAL_BATCH
    with pytest.raises(ValueError, match=r"step 1: domain ids must lie in \[0, 3\), got \[7\]"):
        batches.micro_batches(1)
