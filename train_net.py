#!/usr/bin/env python
"""GMMSeg-D2 training and evaluation script, in the style of Detectron2's projects.

python train_net.py --config-file configs/digitscapes/deeplabv3plus_R18_softmax.yaml
python train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/.../model_final.pth
python train_net.py --config-file ... --resume          # continue from the last checkpoint
python train_net.py --config-file ... --num-gpus 8      # one process per GPU (NCCL)
python train_net.py --config-file ... --num-gpus 2 MODEL.DEVICE cpu   # two CPU processes (gloo)
python train_net.py --config-file ... SOLVER.MAX_ITER 100 MODEL.DEVICE cpu   # overrides
"""

from __future__ import annotations

from gmmseg.reproducibility import pin_mkl_branch

# first, before anything loads torch: MKL reads MKL_CBWR at its first call (gmmseg/reproducibility.py)
pin_mkl_branch()
# ruff: noqa: E402  (the imports below must follow pin_mkl_branch())

import json
import logging
import os
from collections import OrderedDict

import detectron2.utils.comm as comm
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.engine import default_argument_parser, default_setup
from detectron2.evaluation import verify_results
from detectron2.utils.logger import setup_logger

from gmmseg import load_cfg, setup_cfg
from gmmseg.engine import GMMSegTrainer, launch
from gmmseg.evaluation.report import markdown_table, results_rows


class Trainer(GMMSegTrainer):
    """The project's trainer (data mapper, evaluators, poly LR, CPU-capable DDP); extend it here."""


def setup(args) -> CfgNode:
    """The config (datasets registered, validated before anything runs or is written), then Detectron2's
    usual set-up."""
    cfg = setup_cfg(args.config_file, args.opts)
    default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="gmmseg")
    return cfg


def write_summary(cfg: CfgNode, results: OrderedDict | None) -> None:
    """Print one table (mIoU, ECE, and AUROC / AP / FPR95 per anomaly score) for all test sets and save
    all metrics to ``OUTPUT_DIR/inference/metrics.json`` (``OUTPUT_DIR/metrics.json`` is Detectron2's
    training log)."""
    if not comm.is_main_process() or not results:
        return
    # DefaultTrainer.test unwraps the per-dataset dict when there is a single test set
    per_dataset = {cfg.DATASETS.TEST[0]: results} if len(cfg.DATASETS.TEST) == 1 else results
    table = markdown_table(results_rows(os.path.basename(os.path.normpath(cfg.OUTPUT_DIR)), per_dataset))
    logging.getLogger("gmmseg").info("Results:\n%s", table)
    os.makedirs(os.path.join(cfg.OUTPUT_DIR, "inference"), exist_ok=True)
    with open(os.path.join(cfg.OUTPUT_DIR, "inference", "metrics.json"), "w") as f:
        json.dump(per_dataset, f, indent=2)


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        results = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, results)
        write_summary(cfg, results)
        return results

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    trainer.train()
    results = getattr(trainer, "_last_eval_results", None)  # set by the final evaluation
    write_summary(cfg, results)
    return results


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
        device=load_cfg(args.config_file, args.opts).MODEL.DEVICE,  # NCCL on GPUs, gloo on CPU
    )
