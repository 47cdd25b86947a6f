"""FeatureMemory.fill_random (MODEL.GMM.MEMORY_INIT random): the reference's queues full of random unit
vectors, FIFO displacement from slot 0, and the M-step over all slots against a looped float64 reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gmmseg.gmm import FeatureMemory
from gmmseg.gmm.em import m_step


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float16, 2e-3)])
def test_fill_random_gives_unit_vectors_full_counts_and_exact_sums(dtype: torch.dtype, tol: float) -> None:
    mem = FeatureMemory(3, 2, 5, capacity=11, dtype=dtype)
    mem.fill_random(_gen(3))
    norms = mem.features.double().norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=tol)
    assert torch.all(mem.count == 11) and torch.all(mem.ptr == 0) and mem.filled_mask().all()
    for c in range(3):
        for k in range(2):
            slots = mem.features[c, k].double()
            torch.testing.assert_close(mem.sums[c, k], slots.sum(0), rtol=0, atol=1e-12)
            torch.testing.assert_close(mem.sq_sums[c, k], slots.square().sum(0), rtol=0, atol=1e-12)


def test_fill_random_is_the_reference_draw_and_depends_only_on_the_seed() -> None:
    num_c, k, dim, cap = 3, 2, 4, 9

    def filled(seed: int, **kw) -> torch.Tensor:
        mem = FeatureMemory(num_c, k, dim, capacity=cap)
        mem.fill_random(_gen(seed), **kw)
        return mem.features.clone()

    # the reference: normalize(torch.randn(C*K, D, capacity), dim=1), slot-major per queue
    ref = F.normalize(torch.randn(num_c * k, dim, cap, generator=_gen(7)), dim=1)
    assert torch.equal(filled(7), ref.transpose(1, 2).reshape(num_c, k, cap, dim))
    assert torch.equal(filled(7), filled(7))
    assert not torch.equal(filled(7), filled(8))
    chunked = filled(7, max_chunk_bytes=1)  # one queue per block: still seeded, still unit vectors
    assert torch.equal(chunked, filled(7, max_chunk_bytes=1))
    torch.testing.assert_close(chunked.norm(dim=-1), torch.ones(num_c, k, cap))


def test_real_features_displace_random_ones_fifo_from_slot_zero() -> None:
    mem = FeatureMemory(2, 2, 3, capacity=10, max_per_step=0)
    mem.fill_random(_gen(0))
    orig = mem.features.clone()
    first = torch.randn(4, 3, generator=_gen(1))
    mem.enqueue(first, torch.ones(4, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    assert torch.equal(mem.features[1, 0, :4], first)
    assert torch.equal(mem.features[1, 0, 4:], orig[1, 0, 4:])
    assert torch.equal(mem.features[0], orig[0]) and torch.equal(mem.features[1, 1], orig[1, 1])
    assert int(mem.ptr[1, 0]) == 4 and torch.all(mem.count == 10)
    # 8 more: slots 4..9, then wrap to 0..1; slots 2..3 still hold the first batch's last two
    second = torch.randn(8, 3, generator=_gen(2))
    mem.enqueue(second, torch.ones(8, dtype=torch.long), torch.zeros(8, dtype=torch.long))
    assert torch.equal(mem.features[1, 0, 4:], second[:6])
    assert torch.equal(mem.features[1, 0, :2], second[6:])
    assert torch.equal(mem.features[1, 0, 2:4], first[2:])
    assert int(mem.ptr[1, 0]) == 2 and torch.all(mem.count == 10)
    sums, sq_sums = mem.compute_statistics()  # running sums subtracted the displaced random vectors
    torch.testing.assert_close(mem.sums, sums, rtol=0, atol=1e-12)
    torch.testing.assert_close(mem.sq_sums, sq_sums, rtol=0, atol=1e-12)


def _looped_reference_m_step(
    queues: torch.Tensor, means: torch.Tensor, momentum: float, var_floor: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's M-step over every slot of every queue (C, K, capacity, D), in float64 loops."""
    num_c, k, cap, dim = queues.shape
    out_means = torch.zeros(num_c, k, dim, dtype=torch.float64)
    out_stds = torch.zeros(num_c, k, dim, dtype=torch.float64)
    for c in range(num_c):
        for j in range(k):
            s = [0.0] * dim
            for n in range(cap):
                for d in range(dim):
                    s[d] += float(queues[c, j, n, d])
            norm = sum(v * v for v in s) ** 0.5
            new_mean = [v / norm for v in s]
            mixed = [momentum * float(means[c, j, d]) + (1 - momentum) * new_mean[d] for d in range(dim)]
            mixed_norm = sum(v * v for v in mixed) ** 0.5
            for d in range(dim):
                out_means[c, j, d] = mixed[d] / mixed_norm
                var = sum((float(queues[c, j, n, d]) - new_mean[d]) ** 2 for n in range(cap)) / cap
                out_stds[c, j, d] = (var + var_floor) ** 0.5
    return out_means, out_stds


def test_m_step_reads_all_slots_random_and_real_as_the_reference() -> None:
    num_c, k, dim, cap = 3, 2, 4, 16
    mem = FeatureMemory(num_c, k, dim, capacity=cap, max_per_step=5)
    mem.fill_random(_gen(4))
    means = F.normalize(torch.randn(num_c, k, dim, generator=_gen(5), dtype=torch.float64), dim=-1)
    stds = torch.ones(num_c, k, dim, dtype=torch.float64)

    def check() -> None:
        new_means, new_stds = m_step(mem, means, stds, mean_momentum=0.9, cov_momentum=0.0, var_floor=0.01)
        ref_means, ref_stds = _looped_reference_m_step(mem.features.double(), means, 0.9, 0.01)
        torch.testing.assert_close(new_means, ref_means, rtol=0, atol=1e-12)
        torch.testing.assert_close(new_stds, ref_stds, rtol=0, atol=1e-12)

    check()  # random vectors only: every queue updated, stds near sqrt(1/D + 0.01)
    # real features into some queues of classes 0 and 1 only, partly displacing their random vectors
    g = _gen(6)
    for _ in range(2):
        feats = F.normalize(torch.randn(40, dim, generator=g), dim=-1) + 0.5
        labels = torch.randint(0, 2, (40,), generator=g)
        mem.enqueue(feats, labels, torch.zeros(40, dtype=torch.long))
    assert (mem.ptr[:2, 0] > 0).all() and (mem.ptr[:2, 0] < cap).all() and (mem.ptr[:, 1] == 0).all()
    check()
