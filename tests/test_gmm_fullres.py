"""The ``gmm_fullres`` anomaly score: -max_c log p(x|c) on upsampled, re-normalised embeddings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from torch.distributions import Independent, Normal

from gmmseg import add_gmmseg_config, validate_gmmseg_config
from gmmseg.modeling import GMMPredictor

REPO = Path(__file__).resolve().parent.parent
C, K, D = 3, 2, 4


def _fitted_predictor(score: str = "wta") -> GMMPredictor:
    torch.manual_seed(0)
    predictor = GMMPredictor(8, C, embed_dim=D, num_components=K, norm="", class_score=score)
    predictor.gmm.update_parameters(F.normalize(torch.randn(C, K, D), dim=-1), 0.1 + torch.rand(C, K, D))
    return predictor


def _direct(predictor: GMMPredictor, embeddings: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Upsample (N, h, w, D) embeddings with F.interpolate, renormalise, score with torch.distributions."""
    up = F.interpolate(embeddings.permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=False)
    x = F.normalize(up.permute(0, 2, 3, 1).double(), dim=-1)
    gmm = predictor.gmm
    comp = Independent(Normal(gmm.means.double(), gmm.stds.double()), 1).log_prob(x[..., None, None, :])
    if gmm.score == "wta":
        return -comp.amax(-1).amax(-1)
    return -(torch.logsumexp(comp, -1) - torch.log(torch.tensor(float(K)))).amax(-1)


@pytest.mark.parametrize("score", ["wta", "mixture"])
@pytest.mark.parametrize("size", [(12, 20), (13, 7), (3, 5)])
def test_fullres_score_equals_upsample_renormalise_and_torch_distributions(score, size):
    predictor = _fitted_predictor(score)
    emb = F.normalize(torch.randn(2, 3, 5, D, generator=torch.Generator().manual_seed(1)), dim=-1)
    expected = _direct(predictor, emb, size).float()
    got = predictor.fullres_anomaly_map(emb, size)
    assert got.shape == (2, *size)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # bands of a single output row give the same map
    banded = -predictor.fullres_class_log_prob(emb, size, max_over_classes=True, max_elements=1)
    torch.testing.assert_close(banded, got)
    classes = predictor.fullres_class_log_prob(emb, size)
    assert classes.shape == (2, *size, C)
    torch.testing.assert_close(-classes.amax(-1), got)


def test_interpolated_unit_vectors_are_shorter_until_renormalised():
    """Why the score renormalises: a blend of two unit vectors at 90 degrees has length cos(45 deg)."""
    emb = torch.tensor([[[[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]]])  # (1, 1, 2, D)
    up = F.interpolate(emb.permute(0, 3, 1, 2), size=(1, 4), mode="bilinear", align_corners=False)
    assert up.norm(dim=1)[0, 0, 1].item() < 0.8  # 0.25/0.75 blend: sqrt(0.625) = 0.79
    predictor = _fitted_predictor()
    torch.testing.assert_close(
        predictor.fullres_anomaly_map(emb, (1, 4)), _direct(predictor, emb, (1, 4)).float()
    )


def _cfg(*opts: str):
    cfg = get_cfg()
    add_gmmseg_config(cfg)
    cfg.merge_from_file(str(REPO / "configs" / "digitscapes" / "deeplabv3plus_R18_gmmseg.yaml"))
    cfg.merge_from_list(["DATASETS.TRAIN", "()", "DATASETS.TEST", "()", *opts])
    validate_gmmseg_config(cfg)
    return cfg


def _model(*opts: str):
    torch.manual_seed(0)
    model = build_model(_cfg(*opts)).eval()
    gmm = model.sem_seg_head.gmm_predictor.gmm  # unequal stds: every class's log-det term differs
    gmm.update_parameters(gmm.means, 0.1 + torch.rand(gmm.stds.shape))
    return model


def _inputs(height: int = 64, width: int = 96):
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.randint(0, 256, (3, height, width), generator=g, dtype=torch.uint8)}]


@pytest.fixture(scope="module")
def both_scores():
    model = _model("TEST.ANOMALY_SCORES", "('gmm', 'gmm_fullres')")
    captured = []
    handle = model.sem_seg_head.gmm_predictor.register_forward_hook(
        lambda module, inputs, outputs: captured.append(outputs["embeddings"])
    )
    with torch.no_grad():
        out = model(_inputs())[0]
    handle.remove()
    return model, out, captured[0]


def test_model_reports_gmm_fullres_from_its_own_embeddings(both_scores):
    model, out, embeddings = both_scores
    assert list(out["anomaly_scores"]) == ["gmm", "gmm_fullres"]
    expected = _direct(model.sem_seg_head.gmm_predictor, embeddings, (64, 96))[0].float()
    torch.testing.assert_close(out["anomaly_scores"]["gmm_fullres"], expected, rtol=1e-4, atol=1e-3)
    # it differs from the stride-4 score, but not by much on a smooth random model
    assert not torch.allclose(out["anomaly_scores"]["gmm_fullres"], out["anomaly_scores"]["gmm"])


def test_gmm_score_is_unchanged_by_asking_for_gmm_fullres(both_scores):
    _, out, _ = both_scores
    with torch.no_grad():
        default = _model()(_inputs())[0]
    assert list(default["anomaly_scores"]) == ["gmm"]  # still the default, and alone
    torch.testing.assert_close(out["anomaly_scores"]["gmm"], default["anomaly_scores"]["gmm"])
    torch.testing.assert_close(out["anomaly_scores"]["gmm"], default["anomaly"])


def test_sliding_window_inference_carries_gmm_fullres(both_scores):
    _, whole, _ = both_scores
    opts = ["TEST.ANOMALY_SCORES", "('gmm', 'gmm_fullres')", "TEST.SLIDING_WINDOW.ENABLED", "True"]
    one = _model(*opts, "TEST.SLIDING_WINDOW.SIZE", "(64, 96)", "TEST.SLIDING_WINDOW.STRIDE", "(64, 96)")
    several = _model(*opts, "TEST.SLIDING_WINDOW.SIZE", "(64, 64)", "TEST.SLIDING_WINDOW.STRIDE", "(32, 32)")
    with torch.no_grad():
        single, overlapping = one(_inputs())[0], several(_inputs())[0]
    # one window covering the image is whole-image inference
    torch.testing.assert_close(
        single["anomaly_scores"]["gmm_fullres"], whole["anomaly_scores"]["gmm_fullres"]
    )
    fullres = overlapping["anomaly_scores"]["gmm_fullres"]
    assert fullres.shape == (64, 96) and torch.isfinite(fullres).all()


def test_gmm_fullres_needs_a_per_pixel_gmm_head():
    cfg = _cfg()
    cfg.merge_from_file(str(REPO / "configs" / "digitscapes" / "deeplabv3plus_R18_softmax.yaml"))
    cfg.TEST.ANOMALY_SCORES = ["entropy", "gmm_fullres"]
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (), ()  # no dataset needed to check the scores
    validate_gmmseg_config(cfg)  # a valid name; the model says which heads have it
    with pytest.raises(ValueError, match="gmm_fullres.*per-pixel GMM head"):
        build_model(cfg)
