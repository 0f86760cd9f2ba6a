"""DomainStats, the one per-domain statistics class: what a micro-batch adds, and a real 2-process gloo reduction
(world group, an explicit group, a one-rank group, and the pipeline form where only the last stage counts)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megadoremi.distributed.stats import DomainStats, reduce_together
from megadoremi.doremi import excess_loss_stats
from tests.helpers.launch import free_port


def test_add_sums_rows_and_counts_tokens_and_samples():
    stats = DomainStats(3)
    losses = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.5, 0.5]], dtype=torch.float32)
    stats.add(losses, torch.tensor([2, 0, 2]))
    assert stats.sums.tolist() == [7.0, 0.0, 4.0] and stats.sums.dtype == torch.float64
    assert stats.tokens.tolist() == [2.0, 0.0, 4.0] and stats.samples.tolist() == [1.0, 0.0, 2.0]
    assert stats.mean() == pytest.approx(11.0 / 6.0)
    assert stats.domain_means(["a", "b", "c"]) == {"a": 3.5, "c": 1.0}  # b has no tokens: no entry, no 0/0
    assert stats.domain_samples(["a", "b", "c"]) == {"a": 1, "b": 0, "c": 2}
    # The host copy a reduction makes (one process: no collective) is shared by its readers, so it is read-only.
    sums, tokens, samples = stats.reduced().numpy()
    assert sums.tolist() == [7.0, 0.0, 4.0] and samples.tolist() == [1.0, 0.0, 2.0]
    assert not (sums.flags.writeable or tokens.flags.writeable or samples.flags.writeable)
    stats.reset()
    assert stats.sums.sum() == 0 and stats.tokens.sum() == 0 and stats.samples.sum() == 0
    with pytest.raises(ValueError, match="num_domains"):
        DomainStats(0)


def test_excess_statistics_added_per_micro_batch_equal_the_whole_batch():
    generator = torch.Generator().manual_seed(3)
    proxy, reference = torch.rand(6, 5, generator=generator) * 4, torch.rand(6, 5, generator=generator) * 4
    domain_ids, mask = torch.tensor([0, 2, 2, 1, 0, 2]), (torch.rand(6, 5, generator=generator) > 0.3)
    stats = DomainStats(3)
    for rows in (slice(0, 1), slice(1, 4), slice(4, 6)):
        sums, counts = excess_loss_stats(proxy[rows], reference[rows], domain_ids[rows], 3, loss_mask=mask[rows])
        stats.add_totals(sums, counts, torch.bincount(domain_ids[rows], minlength=3))
    reduced = stats.reduced()  # not distributed: a copy of the local vectors
    whole_sums, whole_counts = excess_loss_stats(proxy, reference, domain_ids, 3, loss_mask=mask)
    torch.testing.assert_close(reduced.sums, whole_sums, rtol=0, atol=1e-12)
    assert torch.equal(reduced.tokens, whole_counts) and reduced.samples.tolist() == [2.0, 1.0, 3.0]
    assert reduced.sums is not stats.sums


def _rank_losses(rank):
    """Two micro-batches of per-token losses per rank, 3 domains; domain 2 only on rank 1."""
    generator = torch.Generator().manual_seed(100 + rank)
    batches = []
    for _ in range(2):
        losses = torch.rand(3, 4, generator=generator, dtype=torch.float64) * 5
        domain_ids = torch.randint(0, 2, (3,), generator=generator) + (torch.tensor([0, 0, 1]) if rank else 0)
        batches.append((losses, domain_ids))
    return batches


def _local(rank) -> DomainStats:
    stats = DomainStats(3, "cpu")
    for losses, domain_ids in _rank_losses(rank):
        stats.add(losses, domain_ids)
    return stats


def _vectors(stats: DomainStats) -> tuple:
    return stats.sums.clone(), stats.tokens.clone(), stats.samples.clone()


def _gloo_worker(rank, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        stats = _local(rank)
        results = {"local": _vectors(stats), "world": _vectors(stats.reduced())}
        both = dist.new_group([0, 1])
        only_rank0 = dist.new_group([0])  # every rank must take part in creating a group
        results["explicit_group"] = _vectors(stats.reduced(group=both))
        if rank == 0:
            results["own_group"] = _vectors(stats.reduced(group=only_rank0))
        # Pipeline: rank 1 plays the last stage, rank 0 an earlier stage (its own numbers must not count).
        results["pipeline"] = _vectors(stats.reduced(contributes=rank == 1))
        results["local_after"] = _vectors(stats)
        # Two statistics of different sizes (the trainer's and an objective's) in one all-reduce; each result's
        # host copy (numpy) equals its device tensors.
        other = DomainStats(2, "cpu")
        other.add_totals(torch.tensor([1.0, 2.0 + rank]), torch.tensor([3.0, 4.0]), torch.tensor([1.0, 1.0]))
        together = reduce_together([stats, other])
        results["together"] = [_vectors(r) for r in together]
        results["together_host"] = [tuple(torch.from_numpy(a.copy()) for a in r.numpy()) for r in together]
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_reduction(tmp_path):
    # fork, not spawn: the children need nothing CUDA and skip re-importing torch (seconds per process).
    mp.start_processes(_gloo_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    local = [_vectors(_local(rank)) for rank in range(2)]
    expected = [a + b for a, b in zip(*local)]
    assert expected[1][2] > 0 and local[0][1][2] == 0
    for rank in range(2):
        results = torch.load(os.path.join(tmp_path, f"rank{rank}.pt"))
        for key in ("local", "local_after"):  # reductions return new tensors and leave the local ones alone
            for got, want in zip(results[key], local[rank]):
                torch.testing.assert_close(got, want, rtol=0, atol=0)
        for key in ("world", "explicit_group"):
            for got, want in zip(results[key], expected):
                torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        for got, want in zip(results["pipeline"], local[1]):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        first, second = results["together"]
        for got, want in zip(first, expected):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        assert [t.tolist() for t in second] == [[2.0, 5.0], [6.0, 8.0], [2.0, 2.0]]
        for device, host in zip(results["together"], results["together_host"]):
            for got, want in zip(host, device):
                assert torch.equal(got, want)
    own = torch.load(os.path.join(tmp_path, "rank0.pt"))["own_group"]
    for got, want in zip(own, local[0]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
