"""Tensor-backed FIFO feature memory: one queue per (class, component), updated in one vectorised call.

Differences from the GMMSeg reference (which keeps ``queue`` (C*K, D, capacity) filled with random vectors
at start and always reads the whole capacity):

- fill counts are tracked and only real features are ever used; slots at or beyond ``count`` stay zero
  (``fill_random`` gives the reference's start instead: every slot a random unit vector, all counted);
- ``enqueue`` writes a whole batch (all classes and components) without Python loops over queues;
- running float64 sums of the stored features and of their squares are kept up to date on every write
  (the overwritten features are subtracted), so the M-step reads O(C*K*D) statistics instead of the whole
  O(C*K*capacity*D) buffer. They are float64 (the features' sums are even exact for half storage), so
  their round-off stays ~1e-16 relative per update; ``recompute_statistics`` rebuilds them from the buffer.

The memory is meant to be identical on every process: ``enqueue`` gathers the batch from all processes
first (``torch.distributed``), so wrap the owning model with ``DistributedDataParallel(...,
broadcast_buffers=False)`` (Detectron2's default) rather than broadcasting the buffer every step.
"""

from __future__ import annotations

from typing import Callable, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .precision import float32_region

__all__ = ["FeatureMemory", "gather_from_all_processes", "linspace_indices"]


def _dist_world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


@torch.no_grad()
def gather_from_all_processes(*tensors: Tensor) -> Tuple[Tensor, ...]:
    """Concatenate (in rank order) each tensor's rows from every process; identity without distributed.

    Batches may have different sizes on different processes: sizes are exchanged first and every tensor
    is padded to the largest size for ``all_gather``. All tensors must share the first dimension and
    device (CUDA tensors for NCCL).
    """
    world = _dist_world_size()
    if world == 1:
        return tensors
    device = tensors[0].device
    n_local = torch.tensor([tensors[0].shape[0]], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(n_local) for _ in range(world)]
    dist.all_gather(sizes, n_local)
    sizes_list = [int(s.item()) for s in sizes]
    n_max = max(sizes_list)
    out = []
    for t in tensors:
        padded = t.new_zeros((n_max,) + tuple(t.shape[1:]))
        padded[: t.shape[0]] = t
        chunks = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(chunks, padded.contiguous())
        out.append(torch.cat([c[:s] for c, s in zip(chunks, sizes_list)], dim=0))
    return tuple(out)


def linspace_indices(j: Tensor, n: Tensor, m: Tensor) -> Tensor:
    """``torch.linspace(0, n - 1, m, dtype=torch.int64)[j]``, elementwise for tensors ``j``, ``n``, ``m``.

    This is the reference's evenly spaced subsample (``rnd_sample(..., _uniform=True)``), vectorised over
    many queues at once. It reproduces PyTorch's integer linspace exactly (on CPU): the step is computed in
    double precision, the first half of the points counts up from the start and the second half down from
    the end, and the double values are truncated.
    """
    nf = (n - 1).to(torch.float64)
    mf = m.to(torch.float64)
    jf = j.to(torch.float64)
    step = nf / (mf - 1).clamp_min(1)
    up = step * jf
    down = nf - step * (mf - 1 - jf)
    val = torch.where(j < m // 2, up, down).to(torch.long)
    return torch.where(m > 1, val, torch.zeros_like(val))


class FeatureMemory(nn.Module):
    """FIFO queues of features per (class, component) with write pointers, fill counts and running sums.

    Buffers (all saved by ``state_dict``): ``features`` (C, K, capacity, D) in the storage dtype, ``ptr``
    and ``count`` (C, K) int64, ``sums`` and ``sq_sums`` (C, K, D) float64. Module-wide dtype casts
    (``model.half()``) do not touch these buffers; device moves do.

    Two tallies for monitoring (``gmm.diagnostics``), not saved and not emptied by ``reset``: ``offered``
    (C, K) counts every candidate ``enqueue`` was given for a queue, ``pushed`` those it wrote (at most
    ``max_per_step`` per queue and call), both since the memory was built.
    """

    features: Tensor
    ptr: Tensor
    count: Tensor
    sums: Tensor
    sq_sums: Tensor
    offered: Tensor
    pushed: Tensor

    def __init__(
        self,
        num_classes: int,
        num_components: int,
        dim: int,
        capacity: int = 32000,
        max_per_step: int = 20,
        sampling: str = "uniform",
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ) -> None:
        """``max_per_step <= 0`` means no per-step cap; ``sampling`` is "uniform" (the reference's evenly
        spaced subsample) or "random"; ``dtype`` is the storage dtype (float16 halves the memory)."""
        super().__init__()
        if sampling not in ("uniform", "random"):
            raise ValueError(f"sampling must be 'uniform' or 'random', got {sampling!r}")
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.num_classes = num_classes
        self.num_components = num_components
        self.dim = dim
        self.capacity = capacity
        self.max_per_step = max_per_step
        self.sampling = sampling
        shape = (num_classes, num_components)
        self.register_buffer("features", torch.zeros(shape + (capacity, dim), dtype=dtype, device=device))
        self.register_buffer("ptr", torch.zeros(shape, dtype=torch.long, device=device))
        self.register_buffer("count", torch.zeros(shape, dtype=torch.long, device=device))
        self.register_buffer("sums", torch.zeros(shape + (dim,), dtype=torch.float64, device=device))
        self.register_buffer("sq_sums", torch.zeros(shape + (dim,), dtype=torch.float64, device=device))
        tally = torch.zeros(shape, dtype=torch.long, device=device)
        self.register_buffer("offered", tally, persistent=False)
        self.register_buffer("pushed", tally.clone(), persistent=False)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, num_components={self.num_components}, dim={self.dim}, "
            f"capacity={self.capacity}, max_per_step={self.max_per_step}, sampling={self.sampling!r}, "
            f"dtype={self.features.dtype}"
        )

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> FeatureMemory:
        # keep the storage and statistics dtypes fixed; only follow device moves
        for name, buf in self._buffers.items():
            if buf is None:
                continue
            moved = fn(buf)
            if moved.dtype != buf.dtype:
                moved = buf.to(device=moved.device)
            self._buffers[name] = moved
        return self

    @torch.no_grad()
    def reset(self) -> None:
        """Empty every queue (also undoes ``fill_random``)."""
        for buf in (self.features, self.ptr, self.count, self.sums, self.sq_sums):
            buf.zero_()

    @float32_region
    @torch.no_grad()
    def fill_random(self, generator: torch.Generator | None = None, max_chunk_bytes: int = 1 << 26) -> None:
        """Start as the reference does: every slot of every queue a random unit vector, all of them counted.

        The reference's queue is ``normalize(torch.randn(C*K, D, capacity), dim=1)``; we draw the same
        layout from ``generator`` (a CPU generator; default: a new one seeded 0) in consecutive blocks of
        queues (one block, i.e. the reference's exact call, up to ``max_chunk_bytes`` of float32), so the
        result depends only on the seed and the shape, never on the buffer's device, and the CPU peak stays
        one block. ``count = capacity`` and ``ptr = 0``: the M-step reads every slot, random or real, and
        real features displace the random ones oldest first from slot 0, as the reference's pointer does.
        """
        gen = generator if generator is not None else torch.Generator(device="cpu").manual_seed(0)
        if gen.device.type != "cpu":
            raise ValueError("fill_random needs a CPU generator (device-independent results)")
        num_q, cap, dim = self.num_classes * self.num_components, self.capacity, self.dim
        flat = self.features.view(num_q, cap, dim)
        step = max(1, max_chunk_bytes // (cap * dim * 4))
        for q0 in range(0, num_q, step):  # blocks of queues bound the CPU temporaries
            q1 = min(num_q, q0 + step)
            block = F.normalize(torch.randn(q1 - q0, dim, cap, generator=gen), dim=1)
            flat[q0:q1] = block.transpose(1, 2).to(device=flat.device, dtype=flat.dtype)
        self.count.fill_(cap)
        self.ptr.zero_()
        self.recompute_statistics()

    def queue(self, class_id: int, component: int) -> Tensor:
        """Stored features of one queue, oldest first: ``(count, D)``."""
        feats = self.features[class_id, component]
        n = int(self.count[class_id, component])
        if n < self.capacity:
            return feats[:n]
        p = int(self.ptr[class_id, component])
        return torch.cat([feats[p:], feats[:p]], dim=0)

    def filled_mask(self) -> Tensor:
        """``(C, K, capacity)`` bool, True where a slot holds a real feature."""
        slots = torch.arange(self.capacity, device=self.count.device)
        return slots < self.count[..., None]

    @float32_region
    @torch.no_grad()
    def enqueue(
        self,
        features: Tensor,
        labels: Tensor,
        assignments: Tensor,
        *,
        gather: bool = True,
        generator: torch.Generator | None = None,
    ) -> int:
        """Push a whole batch into the queues; returns the number of slots written.

        Args:
            features: ``(N, D)`` features.
            labels: ``(N,)`` class ids; entries outside ``[0, C)`` (e.g. 255 = ignore) are skipped.
            assignments: ``(N,)`` component ids; entries outside ``[0, K)`` (e.g. -1 for pixels the
                caller excludes, like the reference's misclassified ones) are skipped.
            gather: first concatenate the batches of all processes (rank order) when
                ``torch.distributed`` is initialised, so every process writes the same features.
            generator: random source for ``sampling="random"`` (seed it identically on all processes).

        Each queue takes at most ``max_per_step`` of its candidates (in batch order): the reference's
        evenly spaced ``linspace`` subset, or a random subset. A queue offered more than ``capacity``
        features keeps the last ``capacity`` of them, exactly as pushing them one by one would.
        """
        num_c, num_k, cap = self.num_classes, self.num_components, self.capacity
        dev = self.features.device
        labels = labels.reshape(-1).to(device=features.device, dtype=torch.long)
        assignments = assignments.reshape(-1).to(device=features.device, dtype=torch.long)
        if features.dim() != 2 or features.shape[1] != self.dim or features.shape[0] != labels.shape[0]:
            raise ValueError(
                f"expected features (N, {self.dim}) and labels (N,), got {tuple(features.shape)}"
            )
        valid = (labels >= 0) & (labels < num_c) & (assignments >= 0) & (assignments < num_k)
        queue_ids = (labels * num_k + assignments)[valid]
        feats = features.detach()[valid]
        if gather:
            feats, queue_ids = gather_from_all_processes(feats, queue_ids)
        feats = feats.to(dev)
        queue_ids = queue_ids.to(dev)
        n = queue_ids.shape[0]
        if n == 0:
            return 0
        limit = self.max_per_step
        if self.sampling == "random" and limit > 0:
            perm = torch.randperm(n, generator=generator, device=generator.device if generator else "cpu")
            perm = perm.to(dev)
            feats, queue_ids = feats[perm], queue_ids[perm]

        num_q = num_c * num_k
        sorted_ids, order = torch.sort(queue_ids, stable=True)
        sizes = torch.bincount(sorted_ids, minlength=num_q)  # candidates per queue
        starts = torch.cumsum(sizes, 0) - sizes
        take = sizes.clamp(max=limit) if limit > 0 else sizes  # pushed this step
        skip = (take - cap).clamp_min(0)  # pushes overwritten within this same step
        write = take - skip
        total = int(write.sum().item())
        # one row per slot written: its queue q and its push position j in [skip_q, take_q)
        q = torch.repeat_interleave(torch.arange(num_q, device=dev), write, output_size=total)
        first = torch.cumsum(write, 0) - write
        j = torch.arange(total, device=dev) - first[q] + skip[q]
        n_q, m_q = sizes[q], take[q]
        if self.sampling == "uniform":
            rank = torch.where(n_q > m_q, linspace_indices(j, n_q, m_q), j)
        else:
            rank = j  # candidates are already in random order
        src = order[starts[q] + rank]
        c_idx, k_idx = q // num_k, q % num_k
        slot = (self.ptr.view(-1)[q] + j) % cap
        was_filled = (slot < self.count.view(-1)[q]).to(torch.float64)[:, None]

        old = self.features[c_idx, k_idx, slot].to(torch.float64) * was_filled
        new = feats[src].to(self.features.dtype)
        self.features.index_put_((c_idx, k_idx, slot), new)
        new64 = new.to(torch.float64)
        self.sums.index_put_((c_idx, k_idx), new64 - old, accumulate=True)
        self.sq_sums.index_put_((c_idx, k_idx), new64.square_().sub_(old.square_()), accumulate=True)

        take2 = take.view(num_c, num_k)
        self.offered.add_(sizes.view(num_c, num_k))
        self.pushed.add_(take2)
        self.ptr.copy_((self.ptr + take2) % cap)
        self.count.copy_((self.count + take2).clamp(max=cap))
        return total

    @float32_region
    @torch.no_grad()
    def compute_statistics(self, max_chunk_bytes: int = 1 << 24) -> Tuple[Tensor, Tensor]:
        """Sums and sums of squares of the stored features, recomputed from the buffer in float64.

        Reads only the filled slots and streams over chunks of queues (``max_chunk_bytes`` of float64
        temporaries each, ~one full queue by default, which keeps the chunk cache-resident); used to
        verify or rebuild the running statistics, not on the per-step path.
        """
        num_q, cap, dim = self.num_classes * self.num_components, self.capacity, self.dim
        flat = self.features.view(num_q, cap, dim)
        counts = self.count.view(-1)
        counts_list = counts.tolist()
        sums = torch.zeros_like(self.sums).view(num_q, dim)
        sq_sums = torch.zeros_like(self.sq_sums).view(num_q, dim)
        step = max(1, max_chunk_bytes // max(1, cap * dim * 8))
        for q0 in range(0, num_q, step):
            q1 = min(num_q, q0 + step)
            n_max = max(counts_list[q0:q1])
            if n_max == 0:
                continue
            block = flat[q0:q1, :n_max].to(torch.float64)
            if min(counts_list[q0:q1]) < n_max:  # partly filled queues: zero their unfilled slots
                filled = torch.arange(n_max, device=block.device) < counts[q0:q1, None]
                block.mul_(filled[..., None])
            sums[q0:q1] = block.sum(dim=1)
            sq_sums[q0:q1] = block.square_().sum(dim=1)
        return sums.view_as(self.sums), sq_sums.view_as(self.sq_sums)

    @torch.no_grad()
    def recompute_statistics(self) -> None:
        """Rebuild the running sums from the stored features (e.g. after editing ``features`` by hand)."""
        sums, sq_sums = self.compute_statistics()
        self.sums.copy_(sums)
        self.sq_sums.copy_(sq_sums)

    def statistics(self, exact: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
        """``(sums, sq_sums, count)`` of every queue: running values, or recomputed if ``exact``."""
        if exact:
            sums, sq_sums = self.compute_statistics()
            return sums, sq_sums, self.count.clone()
        return self.sums, self.sq_sums, self.count
