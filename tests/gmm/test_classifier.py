"""GaussianMixtureClassifier against torch.distributions mixtures."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from gmmseg.gmm import FeatureMemory, GaussianMixtureClassifier, m_step, unfitted_std


def make_classifier(score: str = "wta", seed: int = 0) -> GaussianMixtureClassifier:
    clf = GaussianMixtureClassifier(4, 3, 8, score=score, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    means = F.normalize(torch.randn(4, 3, 8, generator=g), dim=-1)
    clf.update_parameters(means, 0.2 + torch.rand(4, 3, 8, generator=g))
    return clf


def inputs(n: int = 50, seed: int = 3) -> torch.Tensor:
    return F.normalize(torch.randn(n, 8, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_init_as_reference() -> None:
    clf = GaussianMixtureClassifier(5, 4, 16, generator=torch.Generator().manual_seed(0))
    assert clf.means.shape == clf.stds.shape == (5, 4, 16)
    torch.testing.assert_close(clf.means.norm(dim=-1), torch.ones(5, 4))
    assert torch.equal(clf.stds, torch.full((5, 4, 16), unfitted_std(16)))
    ones = GaussianMixtureClassifier(5, 4, 16, initial_std=1.0)  # the reference's value before its 1st M-step
    assert torch.equal(ones.stds, torch.ones(5, 4, 16))
    with pytest.raises(ValueError, match="initial_std"):
        GaussianMixtureClassifier(5, 4, 16, initial_std=0.0)
    raw = torch.empty(5, 4, 16)
    torch.nn.init.trunc_normal_(raw, std=0.02, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(clf.means, F.normalize(raw, dim=-1))
    assert 0.01 < raw.std() < 0.03
    other = GaussianMixtureClassifier(5, 4, 16, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(clf.means, other.means)


def test_parameters_are_buffers_without_gradient() -> None:
    clf = make_classifier()
    assert list(clf.parameters()) == []
    assert {"means", "stds"} <= set(dict(clf.named_buffers()))
    x = inputs().requires_grad_(True)
    clf(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert clf.means.grad is None and not clf.means.requires_grad


def test_component_log_prob_matches_distributions() -> None:
    clf = make_classifier()
    x = inputs()
    comp = clf.component_log_prob(x)
    assert comp.shape == (50, 4, 3)
    ref = Independent(Normal(clf.means.double(), clf.stds.double()), 1).log_prob(x.double()[:, None, None])
    torch.testing.assert_close(comp.double(), ref, rtol=1e-5, atol=1e-4)
    # leading dimensions are kept
    assert clf.component_log_prob(x.view(5, 10, 8)).shape == (5, 10, 4, 3)


def test_wta_and_mixture_scores() -> None:
    x = inputs()
    wta = make_classifier("wta")
    mix = make_classifier("mixture")
    comp = wta.component_log_prob(x)
    torch.testing.assert_close(wta(x), comp.amax(-1))
    mixture = MixtureSameFamily(
        Categorical(logits=torch.zeros(4, 3, dtype=torch.float64)),
        Independent(Normal(mix.means.double(), mix.stds.double()), 1),
    )
    torch.testing.assert_close(mix(x).double(), mixture.log_prob(x.double()[:, None]), rtol=1e-5, atol=1e-4)
    assert torch.all(mix(x) <= wta(x) + 1e-4) and torch.all(mix(x) >= wta(x) - math.log(3) - 1e-4)
    torch.testing.assert_close(mix.class_log_prob(x, component_log_prob=comp), mix(x))
    with pytest.raises(ValueError):
        GaussianMixtureClassifier(2, 2, 2, score="max")


def test_anomaly_score() -> None:
    clf = make_classifier()
    x = torch.cat([clf.means[2, 1][None], -clf.means[2, 1][None] * 3])
    score = clf.anomaly_score(x)
    torch.testing.assert_close(score, -clf(x).amax(-1))
    assert score[0] < score[1]


def test_update_parameters_and_state_dict_round_trip() -> None:
    """The M-step from a memory is ``OnlineGMM.maximise`` (tests/gmm/test_online_em.py); the classifier
    only stores what it is given."""
    clf = make_classifier()
    mem = FeatureMemory(4, 3, 8, capacity=20)
    g = torch.Generator().manual_seed(9)
    mem.enqueue(
        inputs(200, 4), torch.randint(0, 3, (200,), generator=g), torch.randint(0, 3, (200,), generator=g)
    )
    expected = m_step(mem, clf.means, clf.stds, mean_momentum=0.9)
    clf.update_parameters(*expected)
    assert torch.equal(clf.means, expected[0]) and torch.equal(clf.stds, expected[1])

    other = GaussianMixtureClassifier(4, 3, 8, score="wta")
    other.load_state_dict(clf.state_dict())
    assert torch.equal(other.means, clf.means) and torch.equal(other.stds, clf.stds)
    x = inputs()
    assert torch.equal(other(x), clf(x))
    with pytest.raises(ValueError):
        clf.update_parameters(torch.zeros(4, 3, 7), torch.ones(4, 3, 7))


def test_trainable_mixtures_are_parameters_scored_as_unit_means_and_floored_stds() -> None:
    """``trainable=True`` (discriminative GMMSeg): log-likelihoods equal torch.distributions' with the
    normalised means and floored stds, and the gradient reaches means and stds."""
    torch.manual_seed(0)
    clf = GaussianMixtureClassifier(3, 2, 4, trainable=True, min_std=0.2)
    assert {n for n, _ in clf.named_parameters()} == {"means", "stds"} and not list(clf.buffers())
    with torch.no_grad():
        clf.means.mul_(3.0)  # no longer unit length
        clf.stds.copy_(torch.rand(3, 2, 4) * 0.4)  # some below the floor
    x = torch.randn(5, 4, dtype=torch.float64)
    clf = clf.double()
    reference = Independent(
        Normal(F.normalize(clf.means.detach(), dim=-1), clf.stds.detach().clamp_min(0.2)), 1
    ).log_prob(x[:, None, None, :])
    out = clf.component_log_prob(x)
    assert torch.allclose(out, reference, atol=1e-9)
    out.sum().backward()
    assert clf.means.grad.abs().sum() > 0
    above = clf.stds.detach() > 0.2
    assert (clf.stds.grad[above] != 0).any() and (clf.stds.grad[~above] == 0).all()


@pytest.mark.parametrize("dim", [16, 64])
def test_unfitted_std_is_what_the_reference_m_step_gives_a_queue_of_random_unit_vectors(dim: int) -> None:
    """The reference starts its queues with random unit vectors; its M-step (float64, numpy here) on
    such a queue: mean = normalised sum, variance = mean squared deviation from it + 0.01."""
    rng = np.random.default_rng(0)
    queue = rng.standard_normal((32000, dim))
    queue /= np.linalg.norm(queue, axis=1, keepdims=True)
    mean = queue.sum(0) / np.linalg.norm(queue.sum(0))
    stds = np.sqrt(((queue - mean) ** 2).mean(0) + 0.01)
    assert abs(np.sqrt((stds**2).mean()) - unfitted_std(dim)) < 0.01 * unfitted_std(dim)
    assert unfitted_std(dim, var_floor=0.0) == pytest.approx(np.sqrt(2.0 / dim))
