"""Loads GMMSeg-D2's Detectron2 glue once: config keys and their validation, mapper, evaluators, models.

Importing it registers the project's meta-architectures and heads in Detectron2's registries. Datasets are
registered by an explicit step of set-up (``gmmseg.engine.setup_cfg``: ``setup_cfg`` calls
``register_datasets``), not on import.
"""

from gmmseg import modeling  # noqa: F401  (registers meta-architectures and heads)
from gmmseg.config import add_gmmseg_config
from gmmseg.config_validation import validate_gmmseg_config
from gmmseg.data.dataset_mapper import SemanticDatasetMapper
from gmmseg.data.folder_dataset import register_all_folder_datasets, register_folder_dataset
from gmmseg.evaluation.sem_seg import SemSegEvaluator

__all__ = [
    "SemSegEvaluator",
    "SemanticDatasetMapper",
    "add_gmmseg_config",
    "register_all_folder_datasets",
    "register_folder_dataset",
    "validate_gmmseg_config",
]
