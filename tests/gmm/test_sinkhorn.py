"""Log-domain Sinkhorn against a dense float64 implementation of the reference algorithm."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from gmmseg.gmm import normalize_by_max_abs, sinkhorn


def dense_reference(logits: np.ndarray, epsilon: float = 0.05, n_iters: int = 3) -> np.ndarray:
    """GMMSeg's ``distributed_sinkhorn_wograd`` (without the one-hot), plain numpy float64."""
    q = np.exp(logits.astype(np.float64) / epsilon).T  # K x N
    k, n = q.shape
    q = q / q.sum()
    for _ in range(n_iters):
        q = q / q.sum(axis=1, keepdims=True)
        q = q / k
        q = q / q.sum(axis=0, keepdims=True)
        q = q / n
    return (q * n).T


def moderate(n: int, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, k)) * rng.uniform(1, 100)
    return x / np.abs(x).max()  # as the caller does: values in [-1, 1]


@pytest.mark.parametrize("n,k", [(1, 5), (3, 5), (17, 5), (200, 5), (64, 2), (50, 8)])
@pytest.mark.parametrize("n_iters", [1, 3, 10])
def test_matches_dense_reference(n: int, k: int, n_iters: int) -> None:
    logits = moderate(n, k, seed=n * 31 + k)
    ref = dense_reference(logits, n_iters=n_iters)
    ours64 = sinkhorn(torch.from_numpy(logits), n_iters=n_iters)
    np.testing.assert_allclose(ours64.numpy(), ref, rtol=1e-9, atol=1e-12)
    ours32 = sinkhorn(torch.from_numpy(logits).float(), n_iters=n_iters)
    assert ours32.dtype == torch.float32
    np.testing.assert_allclose(ours32.double().numpy(), ref, rtol=1e-4, atol=1e-6)


def test_marginals_after_convergence() -> None:
    logits = torch.from_numpy(moderate(120, 5, seed=3))
    q = sinkhorn(logits, epsilon=0.5, n_iters=500)
    torch.testing.assert_close(q.sum(1), torch.ones(120, dtype=torch.float64))
    torch.testing.assert_close(q.sum(0), torch.full((5,), 120 / 5, dtype=torch.float64))


def test_equipartition_changes_the_argmax() -> None:
    # every sample prefers component 0, but equipartition spreads them over all components
    logits = torch.zeros(100, 4)
    logits[:, 0] = 1.0
    logits[:, 1:] = torch.linspace(0, 0.9, 100)[:, None] * torch.tensor([1.0, 0.5, 0.25])
    hard = sinkhorn(logits, n_iters=3).argmax(1)
    assert len(torch.unique(hard)) > 1
    assert torch.all(logits.argmax(1) == 0)


def test_groups_equal_independent_problems() -> None:
    rng = np.random.default_rng(0)
    groups = torch.from_numpy(rng.integers(0, 4, 300))
    logits = torch.from_numpy(rng.normal(size=(300, 5)))
    ours = sinkhorn(logits, groups=groups, num_groups=6, normalize=True)
    for g in range(4):
        sel = groups == g
        ref = dense_reference((logits[sel] / logits[sel].abs().max()).numpy())
        np.testing.assert_allclose(ours[sel].numpy(), ref, rtol=1e-9, atol=1e-12)
    # the group count can also be inferred
    torch.testing.assert_close(sinkhorn(logits, groups=groups, normalize=True), ours)


def test_normalize_by_max_abs() -> None:
    x = torch.tensor([[1.0, -4.0], [2.0, 0.5], [0.0, 0.0], [3.0, -6.0]])
    torch.testing.assert_close(normalize_by_max_abs(x), x / 6.0)
    groups = torch.tensor([0, 0, 1, 2])
    expected = torch.stack([x[0] / 4, x[1] / 4, x[2], x[3] / 6])
    torch.testing.assert_close(normalize_by_max_abs(x, groups), expected)


def test_empty_input_and_invalid_arguments() -> None:
    out = sinkhorn(torch.zeros(0, 5))
    assert out.shape == (0, 5)
    assert sinkhorn(torch.zeros(0, 5), groups=torch.zeros(0, dtype=torch.long)).shape == (0, 5)
    with pytest.raises(ValueError):
        sinkhorn(torch.zeros(3, 2), epsilon=0.0)
    with pytest.raises(ValueError):
        sinkhorn(torch.zeros(3))


def test_half_input_returns_float32() -> None:
    x = torch.from_numpy(moderate(20, 5, seed=1)).half()
    out = sinkhorn(x)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), dense_reference(x.float().numpy()), rtol=1e-4, atol=1e-6)


finite32 = st.floats(allow_nan=False, allow_infinity=False, width=32)
finite64 = st.floats(allow_nan=False, allow_infinity=False)


def extreme(dtype: type) -> st.SearchStrategy[float]:
    info = np.finfo(dtype)
    values = [0.0, 1.0, -1.0, info.tiny, -info.tiny, 1e30, -1e30, info.max, -info.max, info.max / 2]
    return st.sampled_from([float(dtype(v)) for v in values])


@st.composite
def logits_arrays(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    n = draw(st.integers(0, 12))
    k = draw(st.integers(1, 6))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    elems = draw(st.sampled_from(["finite", "extreme", "constant_rows"]))
    if elems == "constant_rows":
        col = draw(arrays(dtype, (n, 1), elements=finite32))
        x = np.repeat(col, k, axis=1)
    else:
        strategy = extreme(dtype) if elems == "extreme" else (finite32 if dtype == np.float32 else finite64)
        x = draw(arrays(dtype, (n, k), elements=strategy))
    groups = draw(arrays(np.int64, (n,), elements=st.integers(0, 2)))
    return x, groups


F32_MAX = float(np.finfo(np.float32).max)


@settings(max_examples=60, deadline=None)
@given(logits_arrays(), st.booleans(), st.booleans(), st.sampled_from([0.05, 1.0, 3.0]))
@example((np.array([[F32_MAX, 1.0], [0.0, 0.0]], np.float32), np.zeros(2, np.int64)), False, False, 0.05)
@example((np.array([[F32_MAX, -F32_MAX, 0.0]], np.float32), np.zeros(1, np.int64)), True, False, 1.0)
@example((np.array([[1.7e308, -1.7e308], [-1.7e308, 1.7e308]]), np.array([0, 1])), True, False, 0.05)
def test_finite_with_unit_rows_for_any_finite_input(
    data, use_groups: bool, normalize: bool, eps: float
) -> None:
    x, groups = data
    t = torch.from_numpy(x)
    g = torch.from_numpy(groups) if use_groups else None
    q = sinkhorn(t, epsilon=eps, groups=g, num_groups=3 if use_groups else None, normalize=normalize)
    assert q.shape == x.shape and q.dtype == t.dtype
    assert torch.isfinite(q).all()
    assert torch.all(q >= 0)
    if x.shape[0] > 0:
        torch.testing.assert_close(q.sum(1), torch.ones(x.shape[0], dtype=q.dtype), rtol=0, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 10), st.integers(1, 6), st.floats(-1e6, 1e6, allow_nan=False))
def test_constant_rows_give_uniform_assignment(n: int, k: int, value: float) -> None:
    q = sinkhorn(torch.full((n, k), value, dtype=torch.float64))
    torch.testing.assert_close(q, torch.full((n, k), 1.0 / k, dtype=torch.float64))
