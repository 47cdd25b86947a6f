"""The anomaly-score contract: every per-pixel anomaly score (higher = more anomalous) in one registry.

A score is computed per image from the maps a model gives at the input's resolution (the keys of
``PosteriorSemanticSegmentor.inference_outputs``), all from the same forward pass, so all models are
compared on exactly the same pixels:

- ``logits`` (C, H, W): every model (``log s_c`` for mask classification);
- ``anomaly`` (H, W): ``-max_c log p(x|c)`` of a generative classifier: a per-pixel GMM head (scored on its
  stride-4 grid, then upsampled, as the paper), GMMMaskFormer (query likelihoods under the pixels'
  ownership) or a post-hoc GMM fitted to a softmax model's penultimate features (``TEST.POSTHOC_GMM``);
- ``anomaly_fullres`` (H, W): the same scored per input pixel, on the embeddings upsampled and put back on
  the unit sphere (``GMMPredictor.fullres_anomaly_map``): per-pixel GMM heads, computed only when asked;
- ``anomaly_mahalanobis`` (H, W): ``min_{c,k} 0.5 ||(x - mu_ck) / s_ck||^2``, the class likelihood without
  the components' log-determinant terms (``GMMPredictor.mahalanobis_anomaly_map``): per-pixel GMM heads,
  computed only when asked;
- ``anomaly_assigned`` (H, W): GMMMaskFormer's query likelihood of the one query that claims each pixel
  (hard ownership, ``mask_anomaly.assigned_query_anomaly``);
- ``rba`` (H, W): "Rejected by All" of a Mask2Former's class scores (``mask_anomaly.rejected_by_all``);
- ``mahalanobis`` (H, W): the Mahalanobis distance of the penultimate features to the nearest class mean
  under a shared covariance (Lee et al. 2018), from statistics fitted on the training set
  (``TEST.MAHALANOBIS_STATS``, ``tools/fit_mahalanobis.py``; ``posthoc.MahalanobisStats``).

Each ``AnomalyScore`` declares the maps it needs, how it is computed from them, which models get it when
``TEST.ANOMALY_SCORES`` is empty, and the statistics file it needs, if any. ``resolve_scores`` is the one
place a model's scores are chosen (defaults) and checked (unknown names, scores the model cannot give);
``gmmseg.config_validation`` reads the same declarations to check a config before anything is built.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ANOMALY_SCORES",
    "CLASS_LIKELIHOOD",
    "CLASS_LIKELIHOOD_ASSIGNED",
    "CLASS_LIKELIHOOD_FULLRES",
    "CLASS_LIKELIHOOD_MAHALANOBIS",
    "DISCRIMINATIVE",
    "GENERATIVE",
    "LOGITS",
    "LOGIT_SCORES",
    "MAHALANOBIS",
    "MAPS",
    "MASK_CLASSIFICATION_MAPS",
    "MASK_CLASSIFICATION_SOFTMAX_MAPS",
    "REJECTED_BY_ALL",
    "SCORE_NAMES",
    "AnomalyScore",
    "compute_scores",
    "default_scores",
    "logit_scores",
    "maps_needed",
    "resolve_scores",
    "scores_needing_more_than",
]

LOGITS = "logits"
CLASS_LIKELIHOOD = "anomaly"
CLASS_LIKELIHOOD_FULLRES = "anomaly_fullres"
CLASS_LIKELIHOOD_ASSIGNED = "anomaly_assigned"
CLASS_LIKELIHOOD_MAHALANOBIS = "anomaly_mahalanobis"
REJECTED_BY_ALL = "rba"
MAHALANOBIS = "mahalanobis"
# the maps a score may need, and what gives each (the module docstring says more)
MAPS: dict[str, str] = {
    LOGITS: "every model",
    CLASS_LIKELIHOOD: "a GMM head, GMMMaskFormer or TEST.POSTHOC_GMM",
    CLASS_LIKELIHOOD_FULLRES: "a per-pixel GMM head, when asked",
    CLASS_LIKELIHOOD_MAHALANOBIS: "a per-pixel GMM head, when asked",
    CLASS_LIKELIHOOD_ASSIGNED: "GMMMaskFormer, when asked",
    REJECTED_BY_ALL: "a Mask2Former (PosteriorMaskFormer, GMMMaskFormer), when asked",
    MAHALANOBIS: "a softmax head's penultimate features and TEST.MAHALANOBIS_STATS",
}
# the most a mask-classification model gives (GMMMaskFormer): it has no per-pixel embeddings nor a
# per-pixel classifier; the softmax one (PosteriorMaskFormer) has no class likelihoods either
MASK_CLASSIFICATION_MAPS = frozenset({LOGITS, CLASS_LIKELIHOOD, CLASS_LIKELIHOOD_ASSIGNED, REJECTED_BY_ALL})
MASK_CLASSIFICATION_SOFTMAX_MAPS = frozenset({LOGITS, REJECTED_BY_ALL})

# Kinds of model, for the defaults: a model with class likelihoods is scored by them alone (the paper's
# GMMSeg score); a discriminative one by every post-hoc score it can give.
GENERATIVE = "generative"
DISCRIMINATIVE = "discriminative"


@dataclass(frozen=True)
class AnomalyScore:
    """One anomaly score: ``compute(maps)`` -> (H, W) from the per-image ``needs`` maps.

    ``default_for``: the model kinds that get it when ``TEST.ANOMALY_SCORES`` is empty (when they can give
    it); ``requirement``: the error when a model that cannot give it is asked for it; ``statistics``: the
    config key of the fitted statistics it needs and the tool that writes them, checked with the config.
    """

    name: str
    needs: tuple[str, ...]
    compute: Callable[[Mapping[str, Tensor]], Tensor]
    default_for: tuple[str, ...] = ()
    requirement: str = ""
    statistics: tuple[str, str] | None = None


ANOMALY_SCORES: dict[str, AnomalyScore] = {}


def _register(score: AnomalyScore) -> None:
    """Add ``score`` to the registry; its name must be new and its needs maps of ``MAPS``."""
    if score.name in ANOMALY_SCORES:
        raise ValueError(f"anomaly score {score.name!r} is already registered")
    unknown = [m for m in score.needs if m not in MAPS]
    if not score.needs or unknown:
        raise ValueError(
            f"anomaly score {score.name!r} needs {unknown or 'nothing'}; expected some of {list(MAPS)}"
        )
    ANOMALY_SCORES[score.name] = score


def _log_posterior(maps: Mapping[str, Tensor]) -> Tensor:
    return F.log_softmax(maps[LOGITS].float(), dim=0)


def _msp(maps: Mapping[str, Tensor]) -> Tensor:
    return -_log_posterior(maps).exp().amax(dim=0)


def _entropy(maps: Mapping[str, Tensor]) -> Tensor:
    log_p = _log_posterior(maps)
    return -(log_p.exp() * log_p).sum(dim=0)


def _max_logit(maps: Mapping[str, Tensor]) -> Tensor:
    return -maps[LOGITS].float().amax(dim=0)


def _energy(maps: Mapping[str, Tensor]) -> Tensor:  # Liu et al. 2020
    return -torch.logsumexp(maps[LOGITS].float(), dim=0)


def _map(key: str) -> Callable[[Mapping[str, Tensor]], Tensor]:
    """A score that is a map the model computes itself (it needs the model's internals)."""
    return lambda maps: maps[key]


# The registry is this table, complete when the module is imported: the config's rules and the derived
# names below are read from it then. A new score is one more entry here (and a map in MAPS if it needs one).
_GMM_HEADS = "GMMDeepLabV3PlusHead, GMMSemSegFPNHead"
# Mask2Former's scores (mask_anomaly.py): the GMMSeg paper prescribes none for it; "gmm" (soft ownership)
# stays GMMMaskFormer's default, "gmm_assigned" only when named; "rba" is post-hoc, so it joins the
# softmax models' defaults (every post-hoc score a discriminative model can give).
for _score in (
    AnomalyScore(
        "gmm",
        (CLASS_LIKELIHOOD,),
        _map(CLASS_LIKELIHOOD),
        default_for=(GENERATIVE,),
        requirement=f"the 'gmm' anomaly score needs a GMM head ({_GMM_HEADS}, GMMMaskFormer) or "
        "TEST.POSTHOC_GMM",
    ),
    AnomalyScore(
        "gmm_fullres",
        (CLASS_LIKELIHOOD_FULLRES,),
        _map(CLASS_LIKELIHOOD_FULLRES),
        requirement=f"the 'gmm_fullres' anomaly score needs a per-pixel GMM head ({_GMM_HEADS})",
    ),
    # not the paper's score: an option for classes whose fitted volumes differ (README, the anomaly gap)
    AnomalyScore(
        "gmm_mahalanobis",
        (CLASS_LIKELIHOOD_MAHALANOBIS,),
        _map(CLASS_LIKELIHOOD_MAHALANOBIS),
        requirement=f"the 'gmm_mahalanobis' anomaly score needs a per-pixel GMM head ({_GMM_HEADS})",
    ),
    AnomalyScore(
        "gmm_assigned",
        (CLASS_LIKELIHOOD_ASSIGNED,),
        _map(CLASS_LIKELIHOOD_ASSIGNED),
        requirement="the 'gmm_assigned' anomaly score needs GMMMaskFormer (the query likelihood of the "
        "query that claims each pixel)",
    ),
    AnomalyScore("msp", (LOGITS,), _msp, default_for=(DISCRIMINATIVE,)),
    AnomalyScore("entropy", (LOGITS,), _entropy, default_for=(DISCRIMINATIVE,)),
    AnomalyScore("max_logit", (LOGITS,), _max_logit, default_for=(DISCRIMINATIVE,)),
    AnomalyScore("energy", (LOGITS,), _energy, default_for=(DISCRIMINATIVE,)),
    AnomalyScore(
        "rba",
        (REJECTED_BY_ALL,),
        _map(REJECTED_BY_ALL),
        default_for=(DISCRIMINATIVE,),
        requirement="the 'rba' anomaly score needs a mask-classification model (PosteriorMaskFormer or "
        "GMMMaskFormer: per-query class probabilities and masks)",
    ),
    AnomalyScore(
        "mahalanobis",
        (MAHALANOBIS,),
        _map(MAHALANOBIS),
        default_for=(DISCRIMINATIVE,),
        requirement="the 'mahalanobis' score needs TEST.MAHALANOBIS_STATS (tools/fit_mahalanobis.py)",
        statistics=("TEST.MAHALANOBIS_STATS", "fit_mahalanobis.py"),
    ),
):
    _register(_score)

SCORE_NAMES = tuple(ANOMALY_SCORES)
LOGIT_SCORES = tuple(s.name for s in ANOMALY_SCORES.values() if s.needs == (LOGITS,))


def default_scores(available: Collection[str]) -> tuple[str, ...]:
    """The scores of a model that gives the maps ``available`` when ``TEST.ANOMALY_SCORES`` is empty: a
    generative model's own ``gmm``; for a discriminative one every post-hoc score it can give."""
    kind = GENERATIVE if CLASS_LIKELIHOOD in available else DISCRIMINATIVE
    return tuple(
        s.name for s in ANOMALY_SCORES.values() if kind in s.default_for and set(s.needs) <= set(available)
    )


def resolve_scores(requested: Sequence[str], available: Collection[str]) -> tuple[str, ...]:
    """The scores a model giving ``available`` maps reports for ``TEST.ANOMALY_SCORES = requested`` (empty:
    ``default_scores``). ValueError for an unknown name or a score the model cannot give."""
    if not requested:
        return default_scores(available)
    unknown = sorted(set(requested) - set(ANOMALY_SCORES))
    if unknown:
        raise ValueError(
            f"TEST.ANOMALY_SCORES: unknown anomaly scores {unknown}; expected some of {SCORE_NAMES}"
        )
    for name in requested:
        score = ANOMALY_SCORES[name]
        missing = set(score.needs) - set(available)
        if missing:
            raise ValueError(
                f"TEST.ANOMALY_SCORES: {score.requirement or f'{name!r} needs {sorted(missing)}'}"
            )
    return tuple(requested)


def maps_needed(names: Sequence[str]) -> frozenset[str]:
    """The maps the scores ``names`` are computed from (a model computes costly maps only when needed)."""
    return frozenset(m for name in names for m in ANOMALY_SCORES[name].needs)


def scores_needing_more_than(maps: Collection[str]) -> tuple[str, ...]:
    """The scores that a model giving at most ``maps`` can never give."""
    return tuple(s.name for s in ANOMALY_SCORES.values() if not set(s.needs) <= set(maps))


def compute_scores(names: Sequence[str], maps: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``{name: (H, W)}`` for one image's maps, in the order of ``names``."""
    return {name: ANOMALY_SCORES[name].compute(maps) for name in names}


def logit_scores(logits: Tensor, names: Sequence[str] = LOGIT_SCORES) -> dict[str, Tensor]:
    """The logit-based scores of (C, H, W) logits; each (H, W). A name that is not one raises ValueError."""
    unknown = [n for n in names if n not in LOGIT_SCORES]
    if unknown:
        raise ValueError(f"unknown logit-based anomaly score {unknown[0]!r}; expected one of {LOGIT_SCORES}")
    return compute_scores(names, {LOGITS: logits})
