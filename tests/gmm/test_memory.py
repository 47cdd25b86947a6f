"""FeatureMemory: FIFO order, wrap-around, per-step caps, fill counts, statistics, state, distributed."""

from __future__ import annotations

from collections import deque
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gmmseg.gmm import FeatureMemory, linspace_indices


class LoopedReferenceMemory:
    """GMMSeg's ``_dequeue_and_enqueue_k`` as written in the reference (loops over classes/components),
    plus the fill counts the reference lacks. Needs at most ``capacity`` pushes per queue per call."""

    def __init__(self, num_classes: int, num_components: int, dim: int, capacity: int, max_per_step: int):
        self.k, self.cap, self.max = num_components, capacity, max_per_step
        self.queue = torch.zeros(num_classes * num_components, capacity, dim)
        self.ptr = torch.zeros(num_classes * num_components, dtype=torch.long)
        self.count = torch.zeros(num_classes * num_components, dtype=torch.long)
        self.num_classes = num_classes

    def enqueue(self, feats: torch.Tensor, labels: torch.Tensor, assign: torch.Tensor) -> None:
        for c in labels.unique().tolist():
            if not 0 <= c < self.num_classes:
                continue
            embs, cluster = feats[labels == c], assign[labels == c]
            for q_index in range(self.k):
                q = c * self.k + q_index
                ptr = int(self.ptr[q])
                sel = cluster == q_index
                if sel.sum() == 0:
                    continue
                q_embs = embs[sel]
                n = q_embs.shape[0]
                if self.max != -1 and n > self.max:
                    q_embs = q_embs[torch.linspace(0, n - 1, self.max, dtype=torch.int64)]
                    n = self.max
                if ptr + n >= self.cap:
                    fir = self.cap - ptr
                    self.queue[q, ptr:] = q_embs[:fir]
                    self.queue[q, : n - fir] = q_embs[fir:]
                else:
                    self.queue[q, ptr : ptr + n] = q_embs
                self.ptr[q] = (ptr + n) % self.cap
                self.count[q] = min(int(self.count[q]) + n, self.cap)


def random_batch(n: int, num_classes: int, k: int, dim: int, seed: int, ignore_frac: float = 0.1):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, dim, generator=g)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignore_frac] = 255
    assign = torch.randint(0, k, (n,), generator=g)
    return feats, labels, assign


def assert_same_memory(a: FeatureMemory, b: FeatureMemory) -> None:
    for name, buf in a.state_dict().items():
        assert torch.equal(buf, b.state_dict()[name]), name


def test_linspace_indices_match_torch_linspace() -> None:
    g = torch.Generator().manual_seed(0)
    pairs = [(n, m) for m in range(1, 33) for n in range(m + 1, m + 60)]
    pairs += [
        (int(n), int(m))
        for n, m in zip(
            torch.randint(2, 10**6, (300,), generator=g), torch.randint(1, 200, (300,), generator=g)
        )
    ]
    for n, m in pairs:
        if m > n:
            continue
        j = torch.arange(m)
        ours = linspace_indices(j, torch.full_like(j, n), torch.full_like(j, m))
        assert torch.equal(ours, torch.linspace(0, n - 1, m, dtype=torch.int64)), (n, m)


def test_matches_looped_reference_over_many_steps() -> None:
    num_c, k, dim, cap, limit = 4, 3, 5, 37, 6
    ours = FeatureMemory(num_c, k, dim, capacity=cap, max_per_step=limit)
    ref = LoopedReferenceMemory(num_c, k, dim, cap, limit)
    for step in range(25):
        batch = random_batch(40 + 13 * (step % 5), num_c, k, dim, seed=step)
        written = ours.enqueue(*batch)
        ref.enqueue(*batch)
        assert written > 0
        assert torch.equal(ours.features.view(num_c * k, cap, dim), ref.queue)
        assert torch.equal(ours.ptr.view(-1), ref.ptr)
        assert torch.equal(ours.count.view(-1), ref.count)


def test_fifo_order_wraparound_and_counts() -> None:
    mem = FeatureMemory(2, 2, 1, capacity=5, max_per_step=0)
    expected = deque(maxlen=5)
    value = 0.0
    for n in [2, 1, 3, 4, 0, 2]:
        feats = torch.arange(value, value + n).reshape(-1, 1)
        mem.enqueue(feats, torch.ones(n, dtype=torch.long), torch.zeros(n, dtype=torch.long))
        expected.extend(feats.view(-1).tolist())
        value += n
        assert mem.queue(1, 0).view(-1).tolist() == list(expected)
        assert int(mem.count[1, 0]) == len(expected)
        assert int(mem.ptr[1, 0]) == int(value) % 5
    # other queues untouched and their slots still zero
    assert mem.count.sum() == 5 and torch.all(mem.features[0] == 0) and torch.all(mem.features[1, 1] == 0)


def test_more_than_capacity_in_one_call_keeps_the_last() -> None:
    mem = FeatureMemory(1, 1, 2, capacity=3, max_per_step=0)
    mem.enqueue(torch.full((1, 2), -1.0), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    feats = torch.arange(16.0).reshape(8, 2)
    written = mem.enqueue(feats, torch.zeros(8, dtype=torch.long), torch.zeros(8, dtype=torch.long))
    assert written == 3
    assert torch.equal(mem.queue(0, 0), feats[-3:])
    assert int(mem.ptr[0, 0]) == (1 + 8) % 3 and int(mem.count[0, 0]) == 3
    torch.testing.assert_close(mem.sums[0, 0], feats[-3:].double().sum(0))


def test_per_step_cap_uniform_is_evenly_spaced() -> None:
    mem = FeatureMemory(2, 1, 1, capacity=100, max_per_step=7)
    n = 50
    feats = torch.arange(float(n)).reshape(-1, 1)
    labels = torch.tensor([0, 1] * (n // 2))
    mem.enqueue(feats, labels, torch.zeros(n, dtype=torch.long))
    for c in range(2):
        cand = feats[labels == c]
        expected = cand[torch.linspace(0, len(cand) - 1, 7, dtype=torch.int64)]
        assert torch.equal(mem.queue(c, 0), expected)
    assert mem.count.view(-1).tolist() == [7, 7]


def test_per_step_cap_random() -> None:
    def run(seed: int) -> torch.Tensor:
        mem = FeatureMemory(1, 2, 1, capacity=100, max_per_step=5, sampling="random")
        feats = torch.arange(40.0).reshape(-1, 1)
        assign = torch.tensor([0, 1, 1, 1] * 10)
        mem.enqueue(
            feats, torch.zeros(40, dtype=torch.long), assign, generator=torch.Generator().manual_seed(seed)
        )
        assert mem.count.view(-1).tolist() == [5, 5]
        q0 = mem.queue(0, 0).view(-1)
        assert set(q0.tolist()) <= set(feats[assign == 0].view(-1).tolist()) and len(set(q0.tolist())) == 5
        assert set(mem.queue(0, 1).view(-1).tolist()) <= set(feats[assign == 1].view(-1).tolist())
        return mem.features.clone()

    assert torch.equal(run(1), run(1))
    assert not all(torch.equal(run(1), run(s)) for s in range(2, 6))


def test_skips_ignored_labels_and_components() -> None:
    mem = FeatureMemory(2, 2, 3, capacity=10)
    feats = torch.randn(6, 3)
    labels = torch.tensor([0, 255, 1, -1, 2, 1])
    assign = torch.tensor([1, 0, -1, 0, 0, 0])
    assert mem.enqueue(feats, labels, assign) == 2
    assert mem.count.tolist() == [[0, 1], [1, 0]]
    assert torch.equal(mem.queue(0, 1), feats[0:1]) and torch.equal(mem.queue(1, 0), feats[5:6])
    assert mem.enqueue(feats[:0], labels[:0], assign[:0]) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_running_statistics_match_recomputed(dtype: torch.dtype) -> None:
    mem = FeatureMemory(3, 2, 4, capacity=9, max_per_step=4, dtype=dtype)
    for step in range(30):
        mem.enqueue(*random_batch(30, 3, 2, 4, seed=step))
    sums, sq_sums = mem.compute_statistics()
    # direct float64 computation from the queues
    for c in range(3):
        for k in range(2):
            q = mem.queue(c, k).double()
            torch.testing.assert_close(sums[c, k], q.sum(0), rtol=0, atol=1e-12)
            torch.testing.assert_close(sq_sums[c, k], q.square().sum(0), rtol=0, atol=1e-12)
    if dtype == torch.float16:  # sums of halves are exact in float64
        assert torch.equal(mem.sums, sums)
    torch.testing.assert_close(mem.sums, sums, rtol=0, atol=1e-12)
    torch.testing.assert_close(mem.sq_sums, sq_sums, rtol=0, atol=1e-12)
    mem.sums.zero_()
    mem.recompute_statistics()
    assert torch.equal(mem.sums, sums)


def test_statistics_use_only_filled_slots() -> None:
    mem = FeatureMemory(2, 2, 3, capacity=6, max_per_step=0)
    feats = torch.randn(10, 3)
    mem.enqueue(feats, torch.tensor([0] * 6 + [1] * 4), torch.zeros(10, dtype=torch.long))
    mem.features[1, 0, 4:] = 100.0  # garbage beyond the fill count must be ignored
    mem.features[0, 1] = 100.0  # an empty queue
    sums, sq_sums = mem.compute_statistics(max_chunk_bytes=1)  # one queue per chunk
    torch.testing.assert_close(sums[0, 0], feats[:6].double().sum(0))
    torch.testing.assert_close(sums[1, 0], feats[6:].double().sum(0))
    torch.testing.assert_close(sq_sums[1, 0], feats[6:].double().square().sum(0))
    assert torch.all(sums[:, 1] == 0) and torch.all(sq_sums[:, 1] == 0)
    torch.testing.assert_close(mem.compute_statistics()[0], sums)  # all queues in one chunk


def test_half_storage_and_module_casts() -> None:
    mem = FeatureMemory(2, 2, 4, capacity=8, dtype=torch.float16)
    assert mem.features.dtype == torch.float16
    assert mem.features.element_size() * mem.features.numel() == 2 * 2 * 8 * 4 * 2
    mem.float()
    mem.double()
    assert (
        mem.features.dtype == torch.float16
        and mem.sums.dtype == torch.float64
        and mem.ptr.dtype == torch.long
    )
    feats = torch.randn(5, 4)
    mem.enqueue(feats, torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.long))
    assert torch.equal(mem.queue(0, 0), feats.half())


def test_state_dict_round_trip() -> None:
    a = FeatureMemory(3, 2, 4, capacity=7, max_per_step=3)
    for step in range(6):
        a.enqueue(*random_batch(25, 3, 2, 4, seed=step))
    b = FeatureMemory(3, 2, 4, capacity=7, max_per_step=3)
    b.load_state_dict(a.state_dict())
    assert_same_memory(a, b)
    assert set(a.state_dict()) == {"features", "ptr", "count", "sums", "sq_sums"}
    batch = random_batch(25, 3, 2, 4, seed=99)
    a.enqueue(*batch)
    b.enqueue(*batch)
    assert_same_memory(a, b)
    b.reset()
    assert b.count.sum() == 0 and torch.all(b.features == 0) and torch.all(b.sums == 0)


def test_filled_mask() -> None:
    mem = FeatureMemory(1, 2, 1, capacity=4)
    mem.enqueue(torch.ones(3, 1), torch.zeros(3, dtype=torch.long), torch.tensor([0, 0, 1]))
    assert mem.filled_mask().tolist() == [[[True, True, False, False], [True, False, False, False]]]


# --- distributed gather: 2 processes with different batch sizes ----------------------------------------

DIST_SHAPE = dict(num_classes=3, num_components=2, dim=4, capacity=16, max_per_step=5)


def _dist_batch(rank: int, step: int):
    return random_batch(30 + 17 * rank + 4 * step, 3, 2, 4, seed=1000 * rank + step)


def _dist_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mem = FeatureMemory(**DIST_SHAPE)
        for step in range(3):
            mem.enqueue(*_dist_batch(rank, step))
        torch.save(mem.state_dict(), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_distributed_gather_gives_identical_memory(tmp_path: Path) -> None:
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single = FeatureMemory(**DIST_SHAPE)
    for step in range(3):
        parts = [_dist_batch(r, step) for r in range(2)]
        single.enqueue(*(torch.cat([p[i] for p in parts]) for i in range(3)))
    assert single.count.sum() > 0
    for state in states:
        for name, buf in single.state_dict().items():
            assert torch.equal(state[name], buf), name
