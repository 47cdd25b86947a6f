"""The anomaly-score contract: every registered score declares what it needs, the defaults per kind of
model, validation naming the key, the penultimate-feature helper, and costly maps computed only when read."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from torch import nn

from gmmseg import add_gmmseg_config, load_cfg, validate_gmmseg_config
from gmmseg.config_validation import ConfigValueError, lookup
from gmmseg.modeling import PosteriorSemanticSegmentor
from gmmseg.modeling.anomaly_scores import (
    ANOMALY_SCORES,
    CLASS_LIKELIHOOD,
    CLASS_LIKELIHOOD_FULLRES,
    CLASS_LIKELIHOOD_MAHALANOBIS,
    LOGITS,
    MAHALANOBIS,
    MAPS,
    MASK_CLASSIFICATION_MAPS,
    MASK_CLASSIFICATION_SOFTMAX_MAPS,
    SCORE_NAMES,
    compute_scores,
    default_scores,
    resolve_scores,
    scores_needing_more_than,
)
from gmmseg.modeling.penultimate import PenultimateFeatures
from gmmseg.modeling.posthoc import MahalanobisStats, PosthocGMM

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs" / "digitscapes"
PER_PIXEL_GMM_HEAD = frozenset(
    {LOGITS, CLASS_LIKELIHOOD, CLASS_LIKELIHOOD_FULLRES, CLASS_LIKELIHOOD_MAHALANOBIS}
)


def _maps(keys, c: int = 5, h: int = 4, w: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn((c, h, w) if k == LOGITS else (h, w), generator=g) for k in keys}


def test_the_registry_holds_every_score_of_the_config_comment():
    assert SCORE_NAMES == (
        "gmm",
        "gmm_fullres",
        "gmm_mahalanobis",
        "gmm_assigned",
        "msp",
        "entropy",
        "max_logit",
        "energy",
        "rba",
        "mahalanobis",
    )


@pytest.mark.parametrize("name", SCORE_NAMES)
def test_every_score_declares_its_needs_and_is_computed_from_them_alone(name):
    score = ANOMALY_SCORES[name]
    assert score.name == name and score.needs and set(score.needs) <= set(MAPS)
    out = score.compute(_maps(score.needs))  # only the maps it declares: a KeyError if it reads more
    assert out.shape == (4, 6) and torch.isfinite(out).all()
    if set(score.needs) != {LOGITS}:  # every model has logits; any other need can be missing
        assert repr(name) in score.requirement
        with pytest.raises(ValueError, match="^TEST.ANOMALY_SCORES: "):
            resolve_scores((name,), {LOGITS})
    if score.statistics is not None:
        key, tool = score.statistics
        cfg = get_cfg()
        add_gmmseg_config(cfg)
        assert lookup(cfg, key) == ""  # a config key, empty by default
        assert (REPO / "tools" / tool).is_file() and key in score.requirement


def test_scores_of_the_models_own_maps_are_those_maps():
    maps = _maps(MAPS)
    names = ("gmm", "gmm_fullres", "gmm_mahalanobis", "mahalanobis", "max_logit")
    scores = compute_scores(names, maps)
    assert list(scores) == list(names)
    assert scores["gmm"] is maps[CLASS_LIKELIHOOD] and scores["mahalanobis"] is maps[MAHALANOBIS]
    assert scores["gmm_fullres"] is maps[CLASS_LIKELIHOOD_FULLRES]
    assert scores["gmm_mahalanobis"] is maps[CLASS_LIKELIHOOD_MAHALANOBIS]
    torch.testing.assert_close(scores["max_logit"], -maps[LOGITS].amax(0))


@pytest.mark.parametrize(
    "available, expected",
    [
        ({LOGITS}, ("msp", "entropy", "max_logit", "energy")),  # per-pixel softmax head
        (MASK_CLASSIFICATION_SOFTMAX_MAPS, ("msp", "entropy", "max_logit", "energy", "rba")),  # Mask2Former
        ({LOGITS, MAHALANOBIS}, ("msp", "entropy", "max_logit", "energy", "mahalanobis")),
        (PER_PIXEL_GMM_HEAD, ("gmm",)),  # gmm_fullres, gmm_mahalanobis only when named
        (MASK_CLASSIFICATION_MAPS, ("gmm",)),  # GMMMaskFormer's query-likelihood score
        ({LOGITS, CLASS_LIKELIHOOD, MAHALANOBIS}, ("gmm",)),  # post-hoc GMM (+ Mahalanobis statistics)
    ],
)
def test_defaults_per_kind_of_model(available, expected):
    assert default_scores(available) == expected
    assert resolve_scores((), available) == expected
    assert resolve_scores(["energy", "msp"], available) == ("energy", "msp")  # as named, in that order


def test_resolution_errors_name_the_key():
    with pytest.raises(ValueError, match=r"^TEST.ANOMALY_SCORES: unknown anomaly scores \['nope'\]"):
        resolve_scores(("msp", "nope"), {LOGITS})
    with pytest.raises(ValueError, match="TEST.MAHALANOBIS_STATS"):
        resolve_scores(("mahalanobis",), {LOGITS})
    with pytest.raises(ValueError, match="'gmm' anomaly score needs a GMM head"):
        resolve_scores(("gmm",), {LOGITS, MAHALANOBIS})
    with pytest.raises(ValueError, match="gmm_fullres.*per-pixel GMM head"):
        resolve_scores(("gmm", "gmm_fullres"), MASK_CLASSIFICATION_MAPS)
    assert scores_needing_more_than(MASK_CLASSIFICATION_MAPS) == (
        "gmm_fullres",
        "gmm_mahalanobis",
        "mahalanobis",
    )


def _cfg(config: str, *opts):
    return load_cfg(CONFIGS / config, ["DATASETS.TRAIN", "()", "DATASETS.TEST", "()", *opts])


@pytest.mark.parametrize(
    "opts, key, expected",
    [
        (["TEST.ANOMALY_SCORES", "['msp', 'odin']"], "TEST.ANOMALY_SCORES", "distinct names among"),
        (["TEST.ANOMALY_SCORES", "['msp', 'msp']"], "TEST.ANOMALY_SCORES", "distinct names among"),
        (["TEST.ANOMALY_SCORES", "['mahalanobis']"], "TEST.MAHALANOBIS_STATS", "a statistics file"),
        (["TEST.MAHALANOBIS_STATS", "/no/such/stats.pth"], "TEST.MAHALANOBIS_STATS", "an existing file"),
        (["TEST.POSTHOC_GMM", "/no/such/gmm.pth"], "TEST.POSTHOC_GMM", "an existing file"),
    ],
)
def test_config_validation_names_the_key(opts, key, expected):
    cfg = _cfg("deeplabv3plus_R18_softmax.yaml", *opts)
    with pytest.raises(ConfigValueError, match=expected) as info:
        validate_gmmseg_config(cfg)
    assert info.value.key == key and str(info.value).startswith(key)


@pytest.mark.parametrize("score", ["gmm_fullres", "gmm_mahalanobis", "mahalanobis"])
def test_mask_classification_refuses_per_pixel_scores_by_the_key(score, tmp_path):
    pytest.importorskip("mask2former")
    stats = tmp_path / "stats.pth"
    MahalanobisStats(torch.zeros(4, 2), torch.eye(2)).save(str(stats))
    opts = ["TEST.MAHALANOBIS_STATS", str(stats)] if score == "mahalanobis" else []
    cfg = _cfg("mask2former_R18_gmmseg.yaml", "TEST.ANOMALY_SCORES", f"['gmm', '{score}']", *opts)
    with pytest.raises(ConfigValueError, match="'gmm_fullres', 'gmm_mahalanobis' or 'mahalanobis'") as info:
        validate_gmmseg_config(cfg)
    assert info.value.key == "TEST.ANOMALY_SCORES"


class _Identity(nn.Module):
    size_divisibility = 0

    def forward(self, x):
        return {"x": x}


class _PixelHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.predictor = nn.Conv2d(3, 5, 1)

    def forward(self, features, targets=None):
        return self.predictor(features["x"]), {}


class _HeadWithoutPredictor(_PixelHead):
    def __init__(self) -> None:
        super().__init__()
        self.classifier = self.predictor
        del self.predictor

    def forward(self, features, targets=None):
        return self.classifier(features["x"]), {}


def _model(head: nn.Module | None = None, **kwargs) -> PosteriorSemanticSegmentor:
    torch.manual_seed(0)
    return PosteriorSemanticSegmentor(
        backbone=_Identity(),
        sem_seg_head=head if head is not None else _PixelHead(),
        pixel_mean=[0.0, 0.0, 0.0],
        pixel_std=[1.0, 1.0, 1.0],
        **kwargs,
    ).eval()


def test_penultimate_features_are_kept_in_eval_only_and_handed_over_once():
    layer = nn.Conv2d(3, 2, 1)
    x = torch.rand(1, 3, 4, 4)
    with PenultimateFeatures(layer) as features:
        layer.train()(x)
        with pytest.raises(RuntimeError, match="not called"):
            features.pop()
        layer.eval()(x)
        assert torch.equal(features.pop(), x)
        with pytest.raises(RuntimeError, match="not called"):
            features.pop()  # not read twice
    layer(x)  # unhooked on leaving the block
    with pytest.raises(RuntimeError):
        features.pop()


def test_post_hoc_maps_are_computed_only_when_a_score_reads_them():
    stats = MahalanobisStats(torch.randn(2, 3).double(), torch.eye(3).double())
    image = {"image": torch.rand(3, 8, 8)}
    unread = _model(mahalanobis_stats=stats, anomaly_scores=("msp",))
    assert unread.posthoc_models == [] and unread._penultimate is None
    assert list(unread([image])[0]["anomaly_scores"]) == ["msp"]
    read = _model(mahalanobis_stats=stats, anomaly_scores=("msp", "mahalanobis"))
    assert read.posthoc_models == [stats]
    out = read([image])[0]["anomaly_scores"]
    torch.testing.assert_close(out["msp"], unread([image])[0]["anomaly_scores"]["msp"])
    # a post-hoc classifier always runs: the posteriors are its own
    gmm = PosthocGMM(torch.randn(5, 2, 3), torch.ones(5, 2, 3))
    posthoc = _model(posthoc_gmm=gmm, mahalanobis_stats=stats)
    assert posthoc.anomaly_score_names == ("gmm",) and posthoc.posthoc_models == [gmm]
    # the one map its gmm score reads, which the post-hoc model gives (a softmax head is never asked)
    assert posthoc.requested_head_maps == {"anomaly"}


def test_post_hoc_models_need_a_predictor_layer():
    stats = MahalanobisStats(torch.randn(2, 3).double(), torch.eye(3).double())
    with pytest.raises(ValueError, match="TEST.POSTHOC_GMM need a per-pixel softmax head"):
        _model(_HeadWithoutPredictor(), mahalanobis_stats=stats)
    _model(_HeadWithoutPredictor())  # without post-hoc models it needs none


@pytest.mark.parametrize(
    "config, opts, expected, head_maps",
    [
        ("deeplabv3plus_R18_softmax.yaml", [], ("msp", "entropy", "max_logit", "energy"), set()),
        ("deeplabv3plus_R18_gmmseg.yaml", [], ("gmm",), {"anomaly"}),
        (
            "fpn_R18_gmmseg.yaml",
            ["TEST.ANOMALY_SCORES", "['gmm_fullres', 'energy']"],
            ("gmm_fullres", "energy"),
            {"anomaly_fullres"},
        ),
        (
            "deeplabv3plus_R18_gmmseg.yaml",
            ["TEST.ANOMALY_SCORES", "['gmm', 'gmm_mahalanobis']"],
            ("gmm", "gmm_mahalanobis"),
            {"anomaly", "anomaly_mahalanobis"},
        ),
    ],
)
def test_built_models_get_their_defaults(config, opts, expected, head_maps):
    model = build_model(_cfg(config, *opts))
    assert model.anomaly_score_names == expected
    assert model.requested_head_maps == head_maps
