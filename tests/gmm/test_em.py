"""E-step, memory M-step and batch EM fit against direct computations and scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from sklearn.mixture import GaussianMixture

from gmmseg.gmm import FeatureMemory, e_step, fit_gmm, kmeans_plusplus, m_step, m_step_from_statistics


def dense_sinkhorn(logits: np.ndarray, epsilon: float = 0.05, n_iters: int = 3) -> np.ndarray:
    q = np.exp(logits / epsilon).T
    k, n = q.shape
    q = q / q.sum()
    for _ in range(n_iters):
        q = q / q.sum(axis=1, keepdims=True) / k
        q = q / q.sum(axis=0, keepdims=True) / n
    return (q * n).T


def filled_memory(num_c: int = 4, k: int = 3, dim: int = 6, cap: int = 11, steps: int = 8) -> FeatureMemory:
    mem = FeatureMemory(num_c, k, dim, capacity=cap, max_per_step=4)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        feats = F.normalize(torch.randn(50, dim, generator=g), dim=1)
        labels = torch.randint(0, num_c - 1, (50,), generator=g)  # the last class never appears
        mem.enqueue(feats, labels, torch.randint(0, k, (50,), generator=g))
    return mem


# --- E-step ----------------------------------------------------------------------------------------------


def test_e_step_sinkhorn_equals_per_class_reference() -> None:
    g = torch.Generator().manual_seed(1)
    n, num_c, k = 400, 5, 4
    log_probs = -100 * torch.rand(n, num_c, k, generator=g, dtype=torch.float64) - 20
    labels = torch.randint(0, num_c, (n,), generator=g)
    labels[::17] = 255
    resp, assign = e_step(log_probs, labels, hard=False)
    hard_resp, hard_assign = e_step(log_probs, labels)
    assert torch.equal(assign, hard_assign)
    for c in range(num_c):
        sel = labels == c
        own = log_probs[sel, c].numpy()
        ref = dense_sinkhorn(own / np.abs(own).max())  # the reference normalises per class
        np.testing.assert_allclose(resp[sel].numpy(), ref, rtol=1e-9, atol=1e-12)
        assert torch.equal(assign[sel], torch.from_numpy(ref.argmax(1)))
        assert torch.equal(hard_resp[sel], F.one_hot(assign[sel], k).double())
    assert torch.all(assign[labels == 255] == -1) and torch.all(resp[labels == 255] == 0)


def test_e_step_accepts_own_class_log_probs() -> None:
    g = torch.Generator().manual_seed(2)
    full = torch.randn(60, 3, 5, generator=g)
    labels = torch.randint(0, 3, (60,), generator=g)
    own = full[torch.arange(60), labels]
    a = e_step(full, labels, hard=False)
    b = e_step(own, labels, num_classes=3, hard=False)
    torch.testing.assert_close(a[0], b[0])
    assert torch.equal(a[1], b[1])
    # without labels: a single group
    single, _ = e_step(own, hard=False)
    ref = dense_sinkhorn((own / own.abs().max()).double().numpy())
    np.testing.assert_allclose(single.numpy(), ref, rtol=1e-4, atol=1e-6)


def test_e_step_vanilla_is_softmax() -> None:
    g = torch.Generator().manual_seed(3)
    log_probs = torch.randn(30, 2, 4, generator=g, dtype=torch.float64) * 5
    labels = torch.randint(0, 2, (30,), generator=g)
    resp, assign = e_step(log_probs, labels, method="vanilla", hard=False)
    own = log_probs[torch.arange(30), labels]
    expected = np.exp(own.numpy() - own.numpy().max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(resp.numpy(), expected, rtol=1e-12)
    assert torch.equal(assign, own.argmax(1))
    with pytest.raises(ValueError):
        e_step(log_probs, labels, method="bogus")


# --- M-step ----------------------------------------------------------------------------------------------


def direct_m_step(mem: FeatureMemory, means, stds, mean_momentum, cov_momentum, var_floor):
    means, stds = means.double().clone(), stds.double().clone()
    for c in range(mem.num_classes):
        for k in range(mem.num_components):
            q = mem.queue(c, k).double()
            if q.shape[0] == 0:
                continue
            f = q.sum(0)
            f = f / f.norm()
            m = mean_momentum * means[c, k] + (1 - mean_momentum) * f
            means[c, k] = m / m.norm()
            var = ((q - f) ** 2).mean(0) + var_floor
            stds[c, k] = cov_momentum * stds[c, k] + (1 - cov_momentum) * var.sqrt()
    return means, stds


@pytest.mark.parametrize("mean_momentum,cov_momentum", [(0.999, 0.0), (0.5, 0.3), (0.0, 0.0)])
@pytest.mark.parametrize("exact", [False, True])
def test_m_step_matches_direct_float64(mean_momentum: float, cov_momentum: float, exact: bool) -> None:
    mem = filled_memory()
    g = torch.Generator().manual_seed(5)
    means = F.normalize(torch.randn(4, 3, 6, generator=g), dim=-1)
    stds = torch.rand(4, 3, 6, generator=g) + 0.5
    new_means, new_stds = m_step(
        mem, means, stds, mean_momentum=mean_momentum, cov_momentum=cov_momentum, var_floor=0.01, exact=exact
    )
    ref_means, ref_stds = direct_m_step(mem, means, stds, mean_momentum, cov_momentum, 0.01)
    assert new_means.dtype == torch.float32
    torch.testing.assert_close(new_means.double(), ref_means, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(new_stds.double(), ref_stds, rtol=1e-6, atol=1e-7)
    # the class never seen keeps its parameters exactly
    assert torch.equal(new_means[3], means[3]) and torch.equal(new_stds[3], stds[3])
    torch.testing.assert_close(new_means.norm(dim=-1), torch.ones(4, 3))


def test_m_step_ignores_unfilled_slots() -> None:
    # one real feature in a large queue: the variance is the floor plus its spread around itself only
    mem = FeatureMemory(1, 1, 3, capacity=1000)
    f = F.normalize(torch.tensor([[1.0, 2.0, 2.0]]), dim=1)
    mem.enqueue(f, torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    means, stds = m_step(mem, torch.zeros(1, 1, 3), torch.ones(1, 1, 3), mean_momentum=0.0)
    torch.testing.assert_close(means[0, 0], f[0])
    torch.testing.assert_close(stds[0, 0], torch.full((3,), 0.1))


def test_m_step_from_statistics_is_vectorised_over_queues() -> None:
    sums = torch.tensor([[[3.0, 4.0]], [[0.0, 0.0]]], dtype=torch.float64)
    sq = torch.tensor([[[5.0, 8.0]], [[0.0, 0.0]]], dtype=torch.float64)
    counts = torch.tensor([[2], [0]])
    means = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    stds = torch.ones(2, 1, 2)
    new_means, new_stds = m_step_from_statistics(
        sums, sq, counts, means, stds, mean_momentum=0.0, var_floor=0.0
    )
    torch.testing.assert_close(new_means[0, 0], torch.tensor([0.6, 0.8]))
    # var = Q/n - 2 m S/n + m^2 = [2.5 - 1.8 + 0.36, 4 - 3.2 + 0.64]
    torch.testing.assert_close(new_stds[0, 0], torch.tensor([1.06, 1.44]).sqrt())
    assert torch.equal(new_means[1], means[1]) and torch.equal(new_stds[1], stds[1])


# --- batch EM fit ----------------------------------------------------------------------------------------


def separated_clusters(seed: int, k: int = 3, d: int = 4, n_per: int = 300):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * 8
    scales = rng.uniform(0.3, 1.5, size=(k, d))
    x = np.concatenate([c + s * rng.normal(size=(n_per, d)) for c, s in zip(centers, scales)])
    return x, centers


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_gmm_matches_sklearn(seed: int) -> None:
    x, centers = separated_clusters(seed)
    fit = fit_gmm(
        torch.from_numpy(x), 3, n_iters=200, tol=1e-10, generator=torch.Generator().manual_seed(seed)
    )
    gm = GaussianMixture(3, covariance_type="diag", random_state=seed, tol=1e-10, max_iter=500).fit(x)
    cost = np.linalg.norm(fit.means.numpy()[:, None] - gm.means_[None], axis=-1)
    rows, cols = linear_sum_assignment(cost)
    np.testing.assert_allclose(fit.means.numpy()[rows], gm.means_[cols], atol=1e-4)
    np.testing.assert_allclose(fit.stds.numpy()[rows] ** 2, gm.covariances_[cols], rtol=1e-3)
    np.testing.assert_allclose(fit.weights.numpy()[rows], gm.weights_[cols], atol=1e-4)
    assert abs(fit.log_likelihood - gm.score(x)) < 1e-6 * abs(gm.score(x)) + 1e-6
    assert fit.converged
    # and the recovered means are the true cluster centres
    assert np.abs(np.sort(fit.means.numpy(), 0) - np.sort(centers, 0)).max() < 0.5
    torch.testing.assert_close(fit.log_prob(torch.from_numpy(x)), torch.from_numpy(gm.score_samples(x)))


def test_fit_gmm_float32_and_uniform_weights() -> None:
    x, _ = separated_clusters(4)
    fit = fit_gmm(
        torch.from_numpy(x).float(), 3, learn_weights=False, generator=torch.Generator().manual_seed(0)
    )
    assert fit.means.dtype == torch.float32
    torch.testing.assert_close(fit.weights, torch.full((3,), 1 / 3))
    gm = GaussianMixture(3, covariance_type="diag", random_state=0).fit(x)
    assert abs(fit.log_likelihood - gm.score(x)) < 1e-3 * abs(gm.score(x))


def test_kmeans_plusplus_is_seeded() -> None:
    x = torch.from_numpy(separated_clusters(5)[0])
    a = kmeans_plusplus(x, 3, generator=torch.Generator().manual_seed(7))
    b = kmeans_plusplus(x, 3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(torch.bincount(a[1]), torch.tensor([300, 300, 300]))
