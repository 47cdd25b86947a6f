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
from gmmseg.modeling.posthoc import PosthocGMM, fit_posthoc_gmm

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
