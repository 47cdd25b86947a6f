#!/usr/bin/env python
"""Fit the Mahalanobis anomaly baseline of a trained softmax model: per-class means of its penultimate
(pre-classifier) features and their shared covariance, over the training set.

    python tools/fit_mahalanobis.py --config-file configs/digitscapes/deeplabv3plus_R18_softmax.yaml \\
        --output output/digitscapes/deeplabv3plus_R18_softmax/mahalanobis.pth \\
        MODEL.WEIGHTS output/digitscapes/deeplabv3plus_R18_softmax/model_final.pth

Then evaluate with ``TEST.MAHALANOBIS_STATS <that file>``. Features are taken at the head's own
resolution, with labels downsampled (nearest) to it; statistics are accumulated in float64 (sums and one
outer-product sum), so memory does not grow with the dataset.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch
import torch.nn.functional as F
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import build_detection_test_loader
from detectron2.modeling import build_model
from detectron2.structures import ImageList
from detectron2.utils.logger import setup_logger

from gmmseg import SemanticDatasetMapper, add_gmmseg_config, validate_gmmseg_config
from gmmseg.modeling.anomaly_scores import MahalanobisStats


class _TrainLabelsMapper(SemanticDatasetMapper):
    """Test-time preprocessing (no augmentation), but with the label loaded and resized with the image."""

    def __call__(self, dataset_dict):
        self.is_train = True  # read and check the label ...
        try:
            return super().__call__(dataset_dict)
        finally:
            self.is_train = False


def fit(cfg, max_images: int | None = None) -> MahalanobisStats:
    model = build_model(cfg)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    model.eval()
    predictor = getattr(model.sem_seg_head, "predictor", None)
    if predictor is None:
        raise SystemExit("the model's head has no `predictor` layer: Mahalanobis needs a softmax head")
    captured: list[torch.Tensor] = []
    predictor.register_forward_pre_hook(lambda module, inputs: captured.append(inputs[0].detach()))
    mapper = _TrainLabelsMapper(cfg, is_train=False)
    loader = build_detection_test_loader(cfg, cfg.DATASETS.TRAIN[0], mapper=mapper)
    num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    ignore = cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
    sums = counts = outer = None
    logger = logging.getLogger("gmmseg")
    with torch.no_grad():
        for index, batch in enumerate(loader):
            if max_images is not None and index >= max_images:
                break
            captured.clear()
            # the training forward's preprocessing: normalise, pad images and labels alike
            divisibility = model.backbone.size_divisibility
            images = [(x["image"].to(model.device) - model.pixel_mean) / model.pixel_std for x in batch]
            images = ImageList.from_tensors(images, divisibility)
            targets = [x["sem_seg"].to(model.device) for x in batch]
            targets = ImageList.from_tensors(targets, divisibility, pad_value=ignore).tensor
            model.sem_seg_head(model.backbone(images.tensor))
            features = captured[-1]  # (N, F, h, w)
            for feats, target in zip(features, targets):
                f, h, w = feats.shape
                labels = (
                    F.interpolate(target[None, None].float(), size=(h, w), mode="nearest").long().reshape(-1)
                )
                x = feats.reshape(f, h * w).T.double()
                keep = (labels >= 0) & (labels < num_classes)
                x, labels = x[keep], labels[keep]
                if sums is None:
                    sums = torch.zeros(num_classes, f, dtype=torch.float64, device=x.device)
                    counts = torch.zeros(num_classes, dtype=torch.float64, device=x.device)
                    outer = torch.zeros(f, f, dtype=torch.float64, device=x.device)
                sums.index_add_(0, labels, x)
                counts += torch.bincount(labels, minlength=num_classes).double()
                outer += x.T @ x
            if index % 100 == 0:
                logger.info("fit_mahalanobis: %d images", index + 1)
    if sums is None or counts.sum() == 0:
        raise SystemExit("no labelled pixels found in the training set")
    return MahalanobisStats.from_sums(sums.cpu(), counts.cpu(), outer.cpu())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--output", required=True, help="where to write the statistics (.pth)")
    parser.add_argument("--max-images", type=int, default=None, help="use only the first N training images")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, e.g. MODEL.WEIGHTS path")
    args = parser.parse_args(argv)
    setup_logger(name="gmmseg")
    cfg = get_cfg()
    add_gmmseg_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.TEST.ANOMALY_SCORES = []
    cfg.TEST.MAHALANOBIS_STATS = ""
    validate_gmmseg_config(cfg)
    cfg.freeze()
    stats = fit(cfg, args.max_images)
    stats.save(args.output)
    print(f"wrote {args.output}: means {tuple(stats.means.shape)}, precision {tuple(stats.precision.shape)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
