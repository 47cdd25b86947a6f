#!/usr/bin/env python
"""Fit the Mahalanobis anomaly baseline of a trained softmax model: per-class means of its penultimate
(pre-classifier) features and their shared covariance, over the training set.

    python tools/fit_mahalanobis.py --config-file configs/digitscapes/deeplabv3plus_R18_softmax.yaml \\
        --output output/digitscapes/deeplabv3plus_R18_softmax/mahalanobis.pth \\
        MODEL.WEIGHTS output/digitscapes/deeplabv3plus_R18_softmax/model_final.pth

Then evaluate with ``TEST.MAHALANOBIS_STATS <that file>``. Features are taken at the head's own
resolution, with labels downsampled (nearest) to it; statistics are accumulated in float64 (sums and one
outer-product sum), so memory does not grow with the dataset (``gmmseg.modeling.posthoc.fit_mahalanobis``).
"""

from __future__ import annotations

from gmmseg.reproducibility import pin_mkl_branch

# first, before anything loads torch: MKL reads MKL_CBWR at its first call (gmmseg/reproducibility.py)
pin_mkl_branch()
# ruff: noqa: E402  (the imports below must follow pin_mkl_branch())

import argparse
import sys

from detectron2.utils.logger import setup_logger

from gmmseg.modeling.posthoc import fit_mahalanobis, statistics_config, training_set_features


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
    cfg = statistics_config(args.config_file, args.opts)
    features = training_set_features(cfg, args.max_images)
    try:
        stats = fit_mahalanobis(features, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)
    except ValueError as err:
        raise SystemExit(str(err)) from err
    stats.save(args.output)
    print(f"wrote {args.output}: means {tuple(stats.means.shape)}, precision {tuple(stats.precision.shape)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
