"""Post-hoc anomaly scores against independent references, and sliding-window inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import mahalanobis
from scipy.special import logsumexp, softmax
from scipy.stats import entropy
from torch import nn

from gmmseg.modeling import PosteriorSemanticSegmentor
from gmmseg.modeling.anomaly_scores import logit_scores
from gmmseg.modeling.posthoc import MahalanobisStats, mahalanobis_score


def test_logit_scores_match_scipy():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=5, size=(7, 4, 5))
    got = logit_scores(torch.from_numpy(logits))
    p = softmax(logits, axis=0)
    np.testing.assert_allclose(got["msp"].numpy(), -p.max(axis=0), rtol=1e-5)
    np.testing.assert_allclose(got["entropy"].numpy(), entropy(p, axis=0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got["max_logit"].numpy(), -logits.max(axis=0), rtol=1e-5)
    np.testing.assert_allclose(got["energy"].numpy(), -logsumexp(logits, axis=0), rtol=1e-5)
    with pytest.raises(ValueError, match="unknown"):
        logit_scores(torch.zeros(2, 1, 1), ["gmm"])


def test_mahalanobis_stats_and_score_match_numpy_and_scipy():
    rng = np.random.default_rng(1)
    num_classes, dim = 3, 4
    labels = rng.integers(0, num_classes, 500)
    feats = rng.normal(size=(500, dim)) + labels[:, None] * 3.0
    sums = np.zeros((num_classes, dim))
    np.add.at(sums, labels, feats)
    counts = np.bincount(labels, minlength=num_classes)
    stats = MahalanobisStats.from_sums(
        torch.from_numpy(sums), torch.from_numpy(counts), torch.from_numpy(feats.T @ feats), shrinkage=0.0
    )
    means = np.stack([feats[labels == c].mean(0) for c in range(num_classes)])
    centred = feats - means[labels]
    cov = centred.T @ centred / len(feats)
    np.testing.assert_allclose(stats.means.numpy(), means, rtol=1e-10)
    np.testing.assert_allclose(stats.precision.numpy(), np.linalg.inv(cov), rtol=1e-8)

    query = rng.normal(size=(dim, 2, 3)) * 4
    got = mahalanobis_score(torch.from_numpy(query).float(), stats).numpy()
    vi = np.linalg.inv(cov)
    expected = np.array(
        [[min(mahalanobis(query[:, i, j], m, vi) ** 2 for m in means) for j in range(3)] for i in range(2)]
    )
    np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_class_without_pixels_is_never_the_nearest():
    sums = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    stats = MahalanobisStats.from_sums(sums, torch.tensor([4.0, 0.0]), torch.eye(2) * 4)
    score = mahalanobis_score(torch.zeros(2, 1, 1), stats)
    assert torch.isfinite(score).all() and score.item() == pytest.approx(0.0, abs=1e-6)


class _Identity(nn.Module):
    size_divisibility = 0

    def forward(self, x):
        return {"x": x}


class _PixelHead(nn.Module):
    """A per-pixel head (1x1 convolution): its output at a pixel depends on that pixel only, so sliding
    windows must reproduce whole-image inference exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.predictor = nn.Conv2d(3, 5, 1)

    def forward(self, features, targets=None):
        return self.predictor(features["x"]), {}


def _model(**kwargs) -> PosteriorSemanticSegmentor:
    torch.manual_seed(0)
    return PosteriorSemanticSegmentor(
        backbone=_Identity(),
        sem_seg_head=_PixelHead(),
        pixel_mean=[0.0, 0.0, 0.0],
        pixel_std=[1.0, 1.0, 1.0],
        **kwargs,
    ).eval()


@pytest.mark.parametrize("window, stride", [((16, 16), (10, 10)), ((32, 48), (32, 48)), ((64, 64), (8, 8))])
def test_sliding_window_equals_whole_image_for_a_pixelwise_head(window, stride):
    image = torch.rand(3, 37, 53) * 255
    inputs = [{"image": image, "height": 74, "width": 106}]
    whole = _model().inference_outputs(inputs)[0]
    sliding = _model(sliding_window=window, sliding_stride=stride).inference_outputs(inputs)[0]
    assert sliding["logits"].shape == (5, 74, 106)
    torch.testing.assert_close(sliding["logits"], whole["logits"], rtol=1e-5, atol=1e-5)


def test_softmax_model_reports_logit_scores_and_mahalanobis():
    stats = MahalanobisStats(torch.randn(2, 3).double(), torch.eye(3).double())
    model = _model(mahalanobis_stats=stats)
    image = torch.rand(3, 8, 8)
    out = model([{"image": image}])[0]
    assert set(out["anomaly_scores"]) == {"msp", "entropy", "max_logit", "energy", "mahalanobis"}
    assert "anomaly" not in out and out["sem_seg"].shape == (5, 8, 8)
    # the penultimate features are the predictor's input: here the (normalised) image itself
    torch.testing.assert_close(out["anomaly_scores"]["mahalanobis"], mahalanobis_score(image, stats))
    with pytest.raises(ValueError, match="GMM head"):
        _model(anomaly_scores=("gmm",))([{"image": torch.rand(3, 8, 8)}])
