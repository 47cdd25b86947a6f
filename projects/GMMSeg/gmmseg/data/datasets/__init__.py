"""The GMMSeg paper's public datasets: their on-disk layouts, and the registration of all of them.

One ``register_<dataset>.py`` per dataset holds its class list, loader and Detectron2 registration
(in the spirit of Mask2Former's ``data/datasets/``); ``common.py`` holds what they share.

Closed-set semantic segmentation (``evaluator_type="sem_seg"``, ``ignore_label=255``)::

    cityscapes_fine_sem_seg_{train,val}   cityscapes/leftImg8bit/<split>/<city>/*_leftImg8bit.png
                                          cityscapes/gtFine/<split>/<city>/*_gtFine_labelTrainIds.png
    ade20k_sem_seg_{train,val}            ADEChallengeData2016/images/{training,validation}/*.jpg
                                          ADEChallengeData2016/annotations_detectron2/{training,validation}/*.png
    coco_2017_{train,val}_stuff_sem_seg   coco/{train2017,val2017}/*.jpg
                                          coco/stuffthingmaps_detectron2/{train2017,val2017}/*.png

Anomaly segmentation (``evaluator_type="anomaly"``; no semantic labels, only ``ood_file_name`` masks with
0 in-distribution, 1 anomaly, 255 void; ``stuff_classes`` are Cityscapes' 19 because the models evaluated
on them are trained on Cityscapes)::

    fs_lost_and_found_val   fs_lost_and_found/{original,labels}/<id>.png
    fs_static_val           fs_static/{original,labels}/<id>.png
    road_anomaly            road_anomaly/{original,labels}/<id>.{jpg,png}   (labels: 0/1, no void)

This is the layout of SynBoost's preprocessed release of the three sets (``data_processed.tar``;
giandbt/synboost reads ``<dataroot>/{original,labels}`` with dataroot ``fs_lost_and_found``, ``fs_static``
or ``road_anomaly``), so its folders can be moved under the datasets root as they are. PEBAL
(tianyu0207/PEBAL, ``code/dataset/data_loader.py``) and RPL (yyliu01/RPL,
``rpl.code/dataset/validation/{fishyscapes,road_anomaly}.py``) read the same ``original/`` + ``labels/``
folders and values (0 in-distribution, 1 anomaly, 255 void). ``gmmseg_datasets.road_anomaly`` writes this
layout from the original Road Anomaly release.

Paths are relative to ``$DETECTRON2_DATASETS`` (default ``./datasets``), read when a dataset is loaded,
not when it is registered. Registration is cheap and is a step of set-up (``gmmseg.engine.setup_cfg``
calls ``register_all_public_datasets``); the file listing
happens on ``DatasetCatalog.get``, and a missing folder or file raises ``DatasetFormatError`` naming the
path and what was expected there. Detectron2 v0.6 registers Cityscapes and ADE20K itself, but its loaders
fail with bare ``assert`` messages (or silently use the intersection of images and labels) and its
metadata lack ``stuff_colors`` (ADE20K) or use the Cityscapes-specific evaluator; the names are therefore
re-registered here.

SegmentMeIfYouCan (``register_smiyc.py``: ``AnomalyTrack-validation``, ``ObstacleTrack-validation``,
``LostAndFound-testNoKnown``, ``FishyLAFAnomaly-val``) keeps the benchmark's own layouts and roots
(``$DIR_LAF``, ``$DIR_FISHY_LAF``, ``$DIR_DATASETS``, then ``$DETECTRON2_DATASETS``).

The offline label conversions (``prepare_*``) are not part of this runtime package: they live in
``gmmseg_datasets``, behind the thin ``datasets/prepare_*.py`` scripts.
"""

from __future__ import annotations

import os

from gmmseg.data.datasets.register_ade20k import ADE20K_SPLITS, register_ade20k
from gmmseg.data.datasets.register_anomaly import ANOMALY_SPLITS, register_anomaly_datasets
from gmmseg.data.datasets.register_cityscapes import CITYSCAPES_SPLITS, register_cityscapes
from gmmseg.data.datasets.register_coco_stuff import COCO_STUFF_SPLITS, register_coco_stuff
from gmmseg.data.datasets.register_smiyc import SMIYC_SPLITS, register_smiyc

PUBLIC_DATASET_NAMES: tuple[str, ...] = (
    *CITYSCAPES_SPLITS,
    *ADE20K_SPLITS,
    *COCO_STUFF_SPLITS,
    *ANOMALY_SPLITS,
    *SMIYC_SPLITS,
)

__all__ = [
    "PUBLIC_DATASET_NAMES",
    "register_ade20k",
    "register_all_public_datasets",
    "register_anomaly_datasets",
    "register_cityscapes",
    "register_coco_stuff",
    "register_smiyc",
]


def register_all_public_datasets(root: str | os.PathLike | None = None) -> list[str]:
    """Register every public dataset of the paper; return the names.

    With ``root=None`` each loader reads ``$DETECTRON2_DATASETS`` when it runs, so the variable can be set
    after import. Nothing touches the disk here.
    """
    return [
        *register_cityscapes(root),
        *register_ade20k(root),
        *register_coco_stuff(root),
        *register_anomaly_datasets(root),
        *register_smiyc(root),
    ]
