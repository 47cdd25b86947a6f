"""The post-hoc GMM ablation: fitting per-class mixtures to frozen features, and the model using them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from torch.distributions import Independent, Normal

from gmmseg import add_gmmseg_config, validate_gmmseg_config
from gmmseg.config_validation import ConfigValueError
from gmmseg.modeling.posthoc import (
    MahalanobisStats,
    PosthocGMM,
    class_feature_samples,
    fit_mahalanobis,
    fit_posthoc_gmm,
)

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "digitscapes"


def test_fit_recovers_each_class_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[[0.0, 0.0], [10.0, 0.0]], [[0.0, 10.0], [10.0, 10.0]]])  # (C, K, F)
    features = [torch.cat([c + 0.5 * torch.randn(400, 2, generator=g) for c in centres[k]]) for k in range(2)]
    gmm = fit_posthoc_gmm(features, 2, seed=0)
    assert gmm.means.shape == (2, 2, 2)
    for c in range(2):
        found = sorted(gmm.means[c].tolist())
        assert torch.allclose(torch.tensor(found), centres[c], atol=0.2)
        assert torch.allclose(gmm.stds[c], torch.full((2, 2), 0.5), atol=0.1)
    with pytest.raises(ValueError, match="class 1 has 1 features"):
        fit_posthoc_gmm([features[0], torch.zeros(1, 2)], 2)


def _images(num: int = 3, pixels: int = 50, dim: int = 4, num_classes: int = 3):
    """Per image (P, F) float64 features and labels (P,) of classes 0 .. num_classes - 2 (the last unseen)."""
    g = torch.Generator().manual_seed(0)
    return [
        (
            torch.randn(pixels, dim, generator=g).double(),
            torch.randint(0, num_classes - 1, (pixels,), generator=g),
        )
        for _ in range(num)
    ]


def test_fit_mahalanobis_streams_the_statistics_of_all_images():
    images = _images()
    stats = fit_mahalanobis(iter(images), num_classes=3)
    x, labels = torch.cat([f for f, _ in images]), torch.cat([lab for _, lab in images])
    sums = torch.zeros(3, 4, dtype=torch.float64).index_add_(0, labels, x)
    reference = MahalanobisStats.from_sums(sums, torch.bincount(labels, minlength=3), x.T @ x)
    torch.testing.assert_close(stats.means, reference.means, equal_nan=True)
    torch.testing.assert_close(stats.precision, reference.precision)
    assert torch.isnan(stats.means[2]).all()  # never seen: never the nearest
    with pytest.raises(ValueError, match="no labelled pixels"):
        fit_mahalanobis(iter([]), num_classes=3)


def test_class_feature_samples_keep_at_most_per_image_then_per_class():
    images = _images()
    samples = class_feature_samples(iter(images), 3, per_image=5, max_per_class=12, seed=0)
    assert [tuple(s.shape) for s in samples] == [(12, 4), (12, 4), (0, 1)]  # 3 images x 5, then 12
    for c in range(2):  # features of that class only
        own = torch.cat([f[lab == c] for f, lab in images]).float()
        assert all((own == row).all(1).any() for row in samples[c])
        assert samples[c].dtype == torch.float32
    again = class_feature_samples(iter(images), 3, per_image=5, max_per_class=12, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(samples, again))  # seeded
    few = class_feature_samples(iter(images), 3, per_image=2, max_per_class=100, seed=0)
    assert [len(s) for s in few] == [6, 6, 0]


def _softmax_cfg(*opts):
    cfg = get_cfg()
    add_gmmseg_config(cfg)
    cfg.merge_from_file(str(CONFIGS / "deeplabv3plus_R18_softmax.yaml"))
    cfg.merge_from_list(["DATASETS.TRAIN", "()", "DATASETS.TEST", "()", *opts])
    return cfg


def test_model_classifies_and_scores_with_the_posthoc_mixtures(tmp_path):
    g = torch.Generator().manual_seed(0)
    dim = _softmax_cfg().MODEL.SEM_SEG_HEAD.CONVS_DIM  # the features the classifier reads
    num_classes, k = 12, 3
    gmm = PosthocGMM(
        torch.randn(num_classes, k, dim, generator=g), 0.5 + torch.rand(num_classes, k, dim, generator=g)
    )
    path = tmp_path / "posthoc.pth"
    gmm.save(str(path))
    cfg = _softmax_cfg("TEST.POSTHOC_GMM", str(path))
    validate_gmmseg_config(cfg)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    assert not any("posthoc" in k for k in model.state_dict())  # not part of the weights
    features = []
    model.sem_seg_head.predictor.register_forward_pre_hook(lambda m, inputs: features.append(inputs[0]))
    image = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        out = model([{"image": image, "height": 64, "width": 64}])[0]
        # reference: torch.distributions at the head's resolution, best component, then upsampled
        x = features[-1][0].permute(1, 2, 0)[..., None, None, :].double()  # (h, w, 1, 1, F)
        comp = Independent(Normal(gmm.means.double(), gmm.stds.double()), 1).log_prob(x)  # (h, w, C, K)
        scores = comp.amax(-1).permute(2, 0, 1)[None].float()
        logits = torch.nn.functional.interpolate(scores, size=(64, 64), mode="bilinear", align_corners=False)[
            0
        ]
    assert torch.allclose(out["sem_seg"], torch.softmax(logits, 0), atol=1e-4)
    assert list(out["anomaly_scores"]) == ["gmm"]
    assert torch.allclose(out["anomaly_scores"]["gmm"], -logits.amax(0), rtol=1e-4, atol=1e-2)


def test_posthoc_is_refused_for_gmm_heads(tmp_path):
    path = tmp_path / "posthoc.pth"
    PosthocGMM(torch.zeros(12, 2, 128), torch.ones(12, 2, 128)).save(str(path))
    cfg = _softmax_cfg("TEST.POSTHOC_GMM", str(path), "MODEL.SEM_SEG_HEAD.NAME", "GMMDeepLabV3PlusHead")
    with pytest.raises(ConfigValueError, match="TEST.POSTHOC_GMM"):
        validate_gmmseg_config(cfg)
    with pytest.raises(ValueError, match="not a post-hoc GMM file"):
        PosthocGMM.load(str(tmp_path / "missing.pth"))
