"""Loads GMMSeg-D2's Detectron2 glue once: config keys, datasets, mapper, evaluators and models.

Importing it registers the project's meta-architectures and heads in Detectron2's registries and every
dataset folder found under ``$DETECTRON2_DATASETS`` (default ``./datasets``) in ``DatasetCatalog``.
"""

from gmmseg import modeling  # noqa: F401  (registers meta-architectures and heads)
from gmmseg.config import add_gmmseg_config, validate_gmmseg_config
from gmmseg.data.dataset_mapper import SemanticDatasetMapper
from gmmseg.data.datasets import register_all_public_datasets
from gmmseg.data.folder_dataset import register_all_folder_datasets, register_folder_dataset
from gmmseg.evaluation.sem_seg import SemSegEvaluator

register_all_folder_datasets()
register_all_public_datasets()

__all__ = [
    "SemSegEvaluator",
    "SemanticDatasetMapper",
    "add_gmmseg_config",
    "register_all_folder_datasets",
    "register_folder_dataset",
    "validate_gmmseg_config",
]
