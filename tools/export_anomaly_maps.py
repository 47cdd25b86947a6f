#!/usr/bin/env python
"""Write a model's anomaly maps as SegmentMeIfYouCan submission files, or evaluate a folder of such files.

Export, one HDF5 file per frame of each test set (the format: ``gmmseg/evaluation/smiyc_files.py``)::

    python tools/export_anomaly_maps.py --config-file configs/cityscapes/<config>.yaml \\
        --output outputs --method GMMSeg --dataset AnomalyTrack-validation \\
        MODEL.WEIGHTS <model_final.pth>
    # -> outputs/anomaly_p/GMMSeg/AnomalyTrack-all/validation0000.hdf5 ...

Evaluate such files (ours, or a method's run elsewhere) with our ``AnomalyEvaluator`` and the config's
settings (aggregation, component metrics, size filters), on exactly the pixels ``train_net.py
--eval-only`` scores::

    python tools/export_anomaly_maps.py --config-file configs/cityscapes/<config>.yaml \\
        --evaluate-folder outputs --method GMMSeg --dataset AnomalyTrack-validation

``--output`` / ``--evaluate-folder`` is the benchmark's ``DIR_OUTPUTS`` (default ``$DIR_OUTPUTS``, else
``OUTPUT_DIR/smiyc``), ``--method`` its method name (default: the config file's stem). Datasets:
``--dataset`` (repeatable), else ``DATASETS.TEST``. ``--score`` picks the exported score (default: the
model's first, ``gmm`` for GMM models) and labels the evaluated rows (default: the method name). The
evaluation prints train_net's results table and writes ``OUTPUT_DIR/evaluate_folder/<method>/metrics.json``
(and each dataset's ``anomaly_evaluation.json`` and plots beside it).
"""

from __future__ import annotations

from gmmseg.reproducibility import pin_mkl_branch

# first, before anything loads torch: MKL reads MKL_CBWR at its first call (gmmseg/reproducibility.py)
pin_mkl_branch()
# ruff: noqa: E402  (the imports below must follow pin_mkl_branch())

import argparse
import json
import os
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from detectron2.config import CfgNode
from torch import nn


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--output", help="where to write anomaly_p/<method>/... (the benchmark's DIR_OUTPUTS)")
    mode.add_argument("--evaluate-folder", help="evaluate the files under this DIR_OUTPUTS instead")
    parser.add_argument("--method", help="the benchmark's method name (default: the config file's stem)")
    parser.add_argument(
        "--dataset", action="append", help="a registered test set (repeatable; default: DATASETS.TEST)"
    )
    parser.add_argument("--score", help="anomaly score to export (default: the model's first) / row label")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, e.g. MODEL.WEIGHTS path")
    return parser


def build_cfg(args: argparse.Namespace) -> CfgNode:
    """The validated config; the training sets are not needed, ``--dataset`` replaces ``DATASETS.TEST``."""
    from gmmseg import setup_cfg

    opts = ["DATASETS.TRAIN", "()", *args.opts]
    if args.dataset:
        opts += ["DATASETS.TEST", repr(tuple(args.dataset))]
    if args.score and not args.evaluate_folder:  # the model computes the maps that score needs
        opts += ["TEST.ANOMALY_SCORES", repr((args.score,))]
    cfg = setup_cfg(args.config_file, opts)
    if not cfg.DATASETS.TEST:
        raise ValueError("no dataset: give --dataset or a config with DATASETS.TEST")
    return cfg


def _score_map(output: dict[str, Any], score: str, file_name: str) -> torch.Tensor:
    if "anomaly_scores" in output:
        return output["anomaly_scores"][score]
    if "anomaly" in output:
        return output["anomaly"]
    raise KeyError(f"the model's output for {file_name} has no anomaly map")


@torch.no_grad()
def export_anomaly_maps(
    model: nn.Module, cfg: CfgNode, dataset_name: str, storage: str | os.PathLike, method: str, score: str
) -> list[Path]:
    """Run ``model`` on the test loader of ``dataset_name`` and write each frame's ``score`` map."""
    from detectron2.data import DatasetCatalog
    from detectron2.evaluation.evaluator import inference_context
    from tqdm import tqdm

    from gmmseg.engine import GMMSegTrainer
    from gmmseg.evaluation.smiyc_files import anomaly_map_path, frame_paths, write_anomaly_map

    frame_paths(storage, method, dataset_name, DatasetCatalog.get(dataset_name))  # unique frame ids
    loader = GMMSegTrainer.build_test_loader(cfg, dataset_name)
    written = []
    with inference_context(model):
        for inputs in tqdm(loader, total=len(loader), desc=dataset_name, unit="image"):
            for input_, output in zip(inputs, model(inputs)):
                path = anomaly_map_path(storage, method, dataset_name, input_)
                scores = _score_map(output, score, input_["file_name"]).detach().float().cpu().numpy()
                write_anomaly_map(path, scores)
                written.append(path)
    return written


def evaluate_folder(
    cfg: CfgNode,
    dataset_name: str,
    storage: str | os.PathLike,
    method: str,
    label: str,
    output_dir: str | None = None,
) -> OrderedDict:
    """Read every frame's map of ``method`` and score it with the anomaly evaluator ``train_net`` builds."""
    from detectron2.data import DatasetCatalog
    from tqdm import tqdm

    from gmmseg.engine import GMMSegTrainer
    from gmmseg.evaluation.smiyc_files import frame_paths, read_anomaly_map

    records = DatasetCatalog.get(dataset_name)
    paths = frame_paths(storage, method, dataset_name, records)
    missing = [p for p in paths if not p.is_file()]
    if missing:
        listed = ", ".join(map(str, missing[:3])) + (" ..." if len(missing) > 3 else "")
        raise FileNotFoundError(
            f"{dataset_name}: {len(missing)} of {len(paths)} anomaly maps missing: {listed}"
        )
    evaluator = GMMSegTrainer.build_anomaly_evaluator(cfg, dataset_name, output_dir, distributed=False)
    evaluator.reset()
    for record, path in tqdm(zip(records, paths), total=len(paths), desc=dataset_name, unit="image"):
        shape = (record["height"], record["width"]) if "height" in record and "width" in record else None
        scores = torch.from_numpy(read_anomaly_map(path, shape))
        evaluator.process([record], [{"anomaly_scores": {label: scores}}])
    return evaluator.evaluate()


def _storage(args: argparse.Namespace, cfg: CfgNode) -> str:
    return (
        args.evaluate_folder
        or args.output
        or os.environ.get("DIR_OUTPUTS")
        or os.path.join(cfg.OUTPUT_DIR, "smiyc")
    )


def run(args: argparse.Namespace, model: nn.Module | None = None) -> dict[str, Any]:
    """Export (``model``, else built from the config and ``MODEL.WEIGHTS``) or evaluate; returns the
    written files per dataset, or the metrics per dataset."""
    from detectron2.utils.logger import setup_logger

    cfg = build_cfg(args)
    setup_logger(name="gmmseg")
    method = args.method or Path(args.config_file).stem
    storage = _storage(args, cfg)
    if args.evaluate_folder:
        if not (Path(storage) / "anomaly_p" / method).is_dir():
            raise FileNotFoundError(
                f"{Path(storage) / 'anomaly_p' / method}: no such folder (<dir>/anomaly_p/<method>)"
            )
        return _evaluate_all(cfg, storage, method, args.score or method)
    if model is None:
        from detectron2.checkpoint import DetectionCheckpointer
        from detectron2.modeling import build_model

        model = build_model(cfg)
        DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    from gmmseg.export import exported_score

    score = exported_score(model, args.score)
    written = {}
    for name in cfg.DATASETS.TEST:
        written[name] = export_anomaly_maps(model, cfg, name, storage, method, score)
        folders = sorted({str(p.parent) for p in written[name]})
        print(f"{name}: {len(written[name])} '{score}' maps in {', '.join(folders)}")
    return written


def _evaluate_all(cfg: CfgNode, storage: str, method: str, label: str) -> dict[str, Any]:
    from gmmseg.evaluation.report import markdown_table, results_rows

    out = os.path.join(cfg.OUTPUT_DIR, "evaluate_folder", method)
    per_dataset = {}
    for name in cfg.DATASETS.TEST:
        per_dataset[name] = dict(evaluate_folder(cfg, name, storage, method, label, os.path.join(out, name)))
    print(markdown_table(results_rows(method, per_dataset)))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(per_dataset, f, indent=2)
    print(f"metrics written to {os.path.join(out, 'metrics.json')}")
    return per_dataset


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    try:
        run(args)
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"export_anomaly_maps.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
