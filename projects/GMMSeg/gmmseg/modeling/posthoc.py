"""Post-hoc models of a trained softmax model's penultimate features: fitting them, and what they add.

Two post-hoc models read the features that enter the head's classifier (``penultimate.py`` captures them):

- ``MahalanobisStats``: class means and a shared precision matrix, for the ``mahalanobis`` anomaly score
  (Lee et al. 2018; ``TEST.MAHALANOBIS_STATS``, fitted by ``tools/fit_mahalanobis.py``);
- ``PosthocGMM``: the paper's "GMM fitted after softmax training" ablation (``TEST.POSTHOC_GMM``, fitted by
  ``tools/fit_posthoc_gmm.py``): per class, a mixture of K diagonal Gaussians fitted by maximum-likelihood
  EM to the frozen features, which then replaces the softmax classifier (uniform class prior, class score
  = best component, as GMMSeg) and gives the same anomaly score ``-max_c log p(x|c)``. The paper reports
  31.6 vs 46.0 mIoU for this against GMMSeg on ADE20K: features trained for a linear softmax are not
  Gaussian per class.

Both say which per-window maps they give (``maps``, keys of ``anomaly_scores.MAPS``), whether they replace
the classifier, and compute those maps from the features (``window_maps``), so the meta-architecture runs
them alike. The fitting (``fit_mahalanobis``, ``class_feature_samples``, ``fit_posthoc_gmm``) is here too;
the tools only parse arguments and write files.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.data import build_detection_test_loader
from detectron2.modeling import build_model
from detectron2.structures import ImageList
from torch import Tensor

from gmmseg.gmm import diag_gaussian_log_prob, fit_gmm

from .anomaly_scores import CLASS_LIKELIHOOD, LOGITS, MAHALANOBIS
from .penultimate import PenultimateFeatures, penultimate_layer

__all__ = [
    "MahalanobisStats",
    "PosthocGMM",
    "class_feature_samples",
    "fit_mahalanobis",
    "fit_posthoc_gmm",
    "labelled_penultimate_features",
    "mahalanobis_score",
    "statistics_config",
    "training_set_features",
]


def _upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


class MahalanobisStats:
    """Class means (C, F) and the shared precision matrix (F, F) of penultimate features."""

    maps: ClassVar[tuple[str, ...]] = (MAHALANOBIS,)
    replaces_classifier: ClassVar[bool] = False

    def __init__(self, means: Tensor, precision: Tensor) -> None:
        if means.dim() != 2 or precision.shape != (means.shape[1], means.shape[1]):
            raise ValueError(
                f"expected means (C, F) and precision (F, F), got {tuple(means.shape)}, "
                f"{tuple(precision.shape)}"
            )
        self.means = means.double()
        self.precision = precision.double()

    @classmethod
    def load(cls, path: str) -> MahalanobisStats:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError) as err:
            raise ValueError(
                f"{path}: cannot read Mahalanobis statistics ({err}); create them with "
                "tools/fit_mahalanobis.py"
            ) from err
        return cls(state["means"], state["precision"])

    def save(self, path: str) -> None:
        torch.save({"means": self.means, "precision": self.precision}, path)

    @classmethod
    def from_sums(
        cls, sums: Tensor, counts: Tensor, outer_sum: Tensor, shrinkage: float = 1e-6
    ) -> MahalanobisStats:
        """From per-class feature sums (C, F), counts (C,) and the total outer product sum (F, F):
        shared covariance = (sum_i f_i f_i^T - sum_c n_c mu_c mu_c^T) / N, slightly regularised."""
        sums, counts, outer_sum = sums.double(), counts.double(), outer_sum.double()
        present = counts > 0
        means = torch.zeros_like(sums)
        means[present] = sums[present] / counts[present, None]
        total = counts.sum().clamp_min(1)
        cov = (outer_sum - (means.T * counts) @ means) / total
        cov = cov + shrinkage * cov.diagonal().mean().clamp_min(1e-12) * torch.eye(
            cov.shape[0], dtype=cov.dtype
        )
        means[~present] = float("nan")  # classes never seen are never the nearest
        return cls(means, torch.linalg.inv(cov))

    def window_maps(self, features: Tensor, size: tuple[int, int]) -> dict[str, Tensor]:
        """The ``mahalanobis`` map (N, *size) of (N, F, h, w) features: scored at the head's resolution,
        then upsampled."""
        dist = torch.stack([mahalanobis_score(f, self) for f in features])
        return {MAHALANOBIS: _upsample(dist[:, None], size)[:, 0]}


def mahalanobis_score(features: Tensor, stats: MahalanobisStats) -> Tensor:
    """``min_c (f - mu_c)^T P (f - mu_c)`` for (F, H, W) features: (H, W), computed as matrix products."""
    f, h, w = features.shape
    x = features.reshape(f, h * w).T.double()  # (N, F)
    means = stats.means.to(x.device)
    precision = stats.precision.to(x.device)
    valid = ~torch.isnan(means).any(dim=1)
    mu = means[valid]
    xp = x @ precision
    quad_x = (xp * x).sum(dim=1, keepdim=True)  # (N, 1)
    quad_mu = ((mu @ precision) * mu).sum(dim=1)  # (C,)
    dist = quad_x - 2.0 * xp @ mu.T + quad_mu  # (N, C)
    return dist.amin(dim=1).clamp_min(0).float().reshape(h, w)


class PosthocGMM:
    """Per-class mixtures (means, stds (C, K, F)) over a softmax model's penultimate features."""

    maps: ClassVar[tuple[str, ...]] = (LOGITS, CLASS_LIKELIHOOD)
    replaces_classifier: ClassVar[bool] = True

    def __init__(self, means: Tensor, stds: Tensor) -> None:
        if means.shape != stds.shape or means.dim() != 3:
            raise ValueError(
                f"means and stds must both be (C, K, F), got {tuple(means.shape)}, {tuple(stds.shape)}"
            )
        self.means, self.stds = means.float(), stds.float()

    @classmethod
    def load(cls, path: str) -> PosthocGMM:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            return cls(state["means"], state["stds"])
        except (OSError, KeyError, RuntimeError) as err:
            raise ValueError(
                f"{path}: not a post-hoc GMM file (tools/fit_posthoc_gmm.py writes one): {err}"
            ) from err

    def save(self, path: str) -> None:
        torch.save({"means": self.means, "stds": self.stds}, path)

    def class_scores(self, features: Tensor) -> Tensor:
        """Best-component log-likelihood of each class, ``log p(x|c)`` as GMMSeg scores classes:
        (N, F, h, w) features -> (N, C, h, w)."""
        num_classes, k, dim = self.means.shape
        n, f, h, w = features.shape
        if f != dim:
            raise ValueError(f"the post-hoc GMM has {dim}-d mixtures but the features have {f} channels")
        means, stds = self.means.to(features.device), self.stds.to(features.device)
        flat = features.permute(0, 2, 3, 1).reshape(-1, f).float()
        comp = diag_gaussian_log_prob(flat, means.reshape(-1, dim), stds.reshape(-1, dim))
        return comp.view(n, h, w, num_classes, k).amax(dim=-1).permute(0, 3, 1, 2)

    def window_maps(self, features: Tensor, size: tuple[int, int]) -> dict[str, Tensor]:
        """The classifier it replaces: logits ``log p(x|c)`` (N, C, *size), upsampled from the head's
        resolution, and their ``anomaly`` map ``-max_c log p(x|c)``."""
        logits = _upsample(self.class_scores(features), size)
        return {LOGITS: logits, CLASS_LIKELIHOOD: -logits.amax(dim=1)}


def fit_posthoc_gmm(
    features: list[Tensor], num_components: int, *, seed: int = 0, n_iters: int = 100, **kwargs: Any
) -> PosthocGMM:
    """Fit one K-component diagonal GMM (uniform weights, as GMMSeg's) per class to ``features[c]``
    (N_c, F) by maximum-likelihood EM; a class without features raises ValueError."""
    generator = torch.Generator().manual_seed(seed)
    means, stds = [], []
    for c, x in enumerate(features):
        if x.shape[0] < num_components:
            raise ValueError(
                f"class {c} has {x.shape[0]} features, fewer than the {num_components} components"
            )
        fit = fit_gmm(x, num_components, n_iters, learn_weights=False, generator=generator, **kwargs)
        means.append(fit.means)
        stds.append(fit.stds)
    return PosthocGMM(torch.stack(means), torch.stack(stds))


def fit_mahalanobis(features: Iterable[tuple[Tensor, Tensor]], num_classes: int) -> MahalanobisStats:
    """Mahalanobis statistics of (P, F) features with labels (P,), per image: accumulated in float64 as
    per-class sums and one outer-product sum, so memory does not grow with the dataset. ValueError when
    there is no labelled pixel."""
    sums = counts = outer = None
    for x, labels in features:
        if sums is None:
            f = x.shape[1]
            sums = torch.zeros(num_classes, f, dtype=torch.float64, device=x.device)
            counts = torch.zeros(num_classes, dtype=torch.float64, device=x.device)
            outer = torch.zeros(f, f, dtype=torch.float64, device=x.device)
        sums.index_add_(0, labels, x)
        counts += torch.bincount(labels, minlength=num_classes).double()
        outer += x.T @ x
    if sums is None or counts.sum() == 0:
        raise ValueError("no labelled pixels found in the training set")
    return MahalanobisStats.from_sums(sums.cpu(), counts.cpu(), outer.cpu())


def class_feature_samples(
    features: Iterable[tuple[Tensor, Tensor]],
    num_classes: int,
    per_image: int,
    max_per_class: int,
    seed: int = 0,
) -> list[Tensor]:
    """Random features of every class, for ``fit_posthoc_gmm``: of each image's (P, F) features with labels
    (P,), at most ``per_image`` random pixels per class, then at most ``max_per_class`` of those per class.
    A list of (N_c, F) float32 (a class never seen: (0, 1))."""
    generator = torch.Generator().manual_seed(seed)
    kept: list[list[Tensor]] = [[] for _ in range(num_classes)]
    for x, labels in features:
        x, labels = x.float().cpu(), labels.cpu()
        order = torch.randperm(len(labels), generator=generator)  # random pixels of each class
        x, labels = x[order], labels[order]
        sorted_labels, index = torch.sort(labels, stable=True)
        rank = torch.arange(len(labels)) - torch.searchsorted(sorted_labels, sorted_labels)
        take = index[rank < per_image]  # the first per_image pixels of each class, in random order
        for c in labels[take].unique().tolist():
            kept[c].append(x[take][labels[take] == c])
    out = []
    for parts in kept:
        feats = torch.cat(parts) if parts else torch.zeros(0, 1)
        if len(feats) > max_per_class:
            feats = feats[torch.randperm(len(feats), generator=generator)[:max_per_class]]
        out.append(feats)
    return out


def statistics_config(config_file: str, opts: list[str]) -> CfgNode:
    """The frozen, validated config of a trained softmax model whose statistics are to be fitted; the
    post-hoc test keys are cleared (the files they name are what is being made)."""
    from gmmseg import setup_cfg  # loads the glue (models); set-up registers the datasets

    cleared = ["TEST.ANOMALY_SCORES", "[]", "TEST.MAHALANOBIS_STATS", "", "TEST.POSTHOC_GMM", ""]
    return setup_cfg(config_file, [*opts, *cleared])


def training_set_features(cfg: CfgNode, max_images: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """``labelled_penultimate_features`` of the model ``cfg`` describes (weights ``MODEL.WEIGHTS``) over
    its first training set, read without augmentation."""
    from gmmseg.data.dataset_mapper import TrainLabelsMapper

    model = build_model(cfg)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    model.eval()
    mapper = TrainLabelsMapper(cfg, is_train=False)
    loader = build_detection_test_loader(cfg, cfg.DATASETS.TRAIN[0], mapper=mapper)
    head = cfg.MODEL.SEM_SEG_HEAD
    yield from labelled_penultimate_features(model, loader, head.NUM_CLASSES, head.IGNORE_VALUE, max_images)


def labelled_penultimate_features(
    model: torch.nn.Module, loader, num_classes: int, ignore_value: int, max_images: int | None = None
) -> Iterator[tuple[Tensor, Tensor]]:
    """For each image of ``loader`` (batches with ``sem_seg``), the features that enter the head's
    ``predictor`` layer at the head's resolution, (P, F) float64, and their labels (P,) (downsampled by
    nearest neighbour; ignored and out-of-range pixels dropped). ``model`` must be in eval mode."""
    layer = penultimate_layer(model.sem_seg_head)
    if layer is None:
        raise ValueError("the model's head has no `predictor` layer: post-hoc statistics need a softmax head")
    logger = logging.getLogger("gmmseg")
    with PenultimateFeatures(layer) as penultimate, torch.no_grad():
        seen = 0
        for index, batch in enumerate(loader):
            # the training forward's preprocessing: normalise, pad images and labels alike
            divisibility = model.backbone.size_divisibility
            images = [(x["image"].to(model.device) - model.pixel_mean) / model.pixel_std for x in batch]
            images = ImageList.from_tensors(images, divisibility)
            targets = [x["sem_seg"].to(model.device) for x in batch]
            targets = ImageList.from_tensors(targets, divisibility, pad_value=ignore_value).tensor
            model.sem_seg_head(model.backbone(images.tensor))
            for feats, target in zip(penultimate.pop(), targets):
                if max_images is not None and seen >= max_images:
                    return
                f, h, w = feats.shape
                labels = F.interpolate(target[None, None].float(), size=(h, w), mode="nearest")
                labels = labels.long().reshape(-1)
                keep = (labels >= 0) & (labels < num_classes)
                yield feats.reshape(f, h * w).T.double()[keep], labels[keep]
                seen += 1
            if index % 100 == 0:
                logger.info("penultimate features: %d images", seen)
