"""The ``gmm_mahalanobis`` anomaly score: distance to the nearest component in its own stds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial.distance import mahalanobis
from torch.distributions import Independent, Normal

from gmmseg.gmm import GaussianMixtureClassifier
from gmmseg.modeling import GMMPredictor

C, K, D = 3, 2, 4


def _fitted_predictor() -> GMMPredictor:
    torch.manual_seed(0)
    predictor = GMMPredictor(8, C, embed_dim=D, num_components=K, norm="")
    predictor.gmm.update_parameters(F.normalize(torch.randn(C, K, D), dim=-1), 0.05 + torch.rand(C, K, D))
    return predictor.eval()


def test_half_mahalanobis_equals_scipy_and_drops_only_the_normaliser():
    gmm = _fitted_predictor().gmm
    x = F.normalize(torch.randn(7, D, dtype=torch.float64), dim=-1)
    comp64 = Independent(Normal(gmm.means.double(), gmm.stds.double()), 1).log_prob(x[:, None, None, :])
    got = gmm.half_mahalanobis(gmm.component_log_prob(x.float()))
    means, stds = gmm.means.double().numpy(), gmm.stds.double().numpy()
    expected = np.array(
        [
            [
                [0.5 * mahalanobis(p, means[c, k], np.diag(1.0 / stds[c, k] ** 2)) ** 2 for k in range(K)]
                for c in range(C)
            ]
            for p in x.numpy()
        ]
    )
    torch.testing.assert_close(got.double(), torch.from_numpy(expected), rtol=1e-4, atol=1e-4)
    # log N = -half_mahalanobis - sum log s - D/2 log 2 pi, in float64
    normaliser = -gmm.stds.double().log().sum(-1) - 0.5 * D * np.log(2 * np.pi)
    torch.testing.assert_close(gmm.half_mahalanobis(comp64), normaliser - comp64)


def test_broad_component_is_not_penalised_for_its_volume():
    """Two classes, the second's std 1.5 x the first's: a point at the same scaled distance from either
    mean has the same score, while its log-likelihood under the broad class is D log 1.5 lower."""
    gmm = GaussianMixtureClassifier(2, 1, D)
    means = torch.eye(D)[:2, None, :]
    stds = torch.stack([torch.full((1, D), 0.1), torch.full((1, D), 0.15)])
    gmm.update_parameters(means, stds)
    offset = torch.tensor([0.0, 0.0, 1.0, 0.0])
    x = torch.stack([means[0, 0] + 0.1 * offset, means[1, 0] + 0.15 * offset])
    comp = gmm.component_log_prob(x)
    half = gmm.half_mahalanobis(comp)
    torch.testing.assert_close(half[0, 0], half[1, 1])
    torch.testing.assert_close(comp[0, 0, 0] - comp[1, 1, 0], torch.tensor(D * np.log(1.5)).float())


@pytest.mark.parametrize("size", [(8, 12), (5, 7)])
def test_head_map_is_the_nearest_component_upsampled(size):
    """The head's map: the minimum over all C x K components on the embedding grid, then upsampled
    bilinearly as the logits and the paper's score are."""
    predictor = _fitted_predictor()
    emb = F.normalize(torch.randn(2, 4, 6, D, generator=torch.Generator().manual_seed(1)), dim=-1)
    outputs = predictor.score(emb)
    grid = predictor.mahalanobis_anomaly_map(outputs)
    gmm = predictor.gmm
    x = emb.double()[..., None, None, :]
    direct = (0.5 * ((x - gmm.means.double()) / gmm.stds.double()).square().sum(-1)).flatten(-2).amin(-1)
    torch.testing.assert_close(grid.double(), direct, rtol=1e-4, atol=1e-4)
    assert bool((grid >= 0).all())
