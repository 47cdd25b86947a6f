"""Project config keys, their validation (a bad value fails at start with the key named) and the set-up
every entry point uses (file + overrides, datasets registered, validated, frozen)."""

from __future__ import annotations

import pytest
from conftest import write_folder_dataset
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog

from gmmseg import add_gmmseg_config, register_datasets, setup_cfg, validate_gmmseg_config
from gmmseg.config_validation import KEY_RULES, MASK_FORMER_KEY_RULES, ConfigValueError, lookup
from gmmseg.data.folder_dataset import DatasetFormatError, register_folder_dataset


@pytest.fixture
def cfg(tmp_path, unique_name):
    register_folder_dataset(
        write_folder_dataset(tmp_path, unique_name, {"train": 1, "val": 1}, num_classes=3)
    )
    cfg = get_cfg()
    add_gmmseg_config(cfg)
    cfg.DATASETS.TRAIN = (f"{unique_name}_train",)
    cfg.DATASETS.TEST = (f"{unique_name}_val",)
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 3
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def test_defaults_and_deeplab_keys_are_added():
    cfg = get_cfg()
    add_gmmseg_config(cfg)
    assert cfg.TEST.CALIBRATION_BINS == 15
    assert cfg.SOLVER.POLY_LR_POWER == 0.9  # from Detectron2's DeepLab project
    add_gmmseg_config(cfg)  # idempotent


def test_valid_config_passes(cfg):
    validate_gmmseg_config(cfg)


@pytest.mark.parametrize(
    "key, value",
    [
        ("TEST.CALIBRATION_BINS", 0),
        ("MODEL.SEM_SEG_HEAD.NUM_CLASSES", 0),
        ("MODEL.SEM_SEG_HEAD.NUM_CLASSES", 4),  # the dataset has 3 classes
        ("MODEL.SEM_SEG_HEAD.IGNORE_VALUE", 1),  # a class index
        ("MODEL.SEM_SEG_HEAD.IGNORE_VALUE", 254),  # not the dataset's ignore label
        ("INPUT.RANDOM_FLIP", "diagonal"),
        ("SOLVER.IMS_PER_BATCH", 0),
        ("SOLVER.MAX_ITER", 0),
        ("SOLVER.BASE_LR", 0.0),
        ("MODEL.DEVICE", "tpu"),
    ],
)
def test_invalid_value_names_the_key(cfg, key, value):
    cfg.merge_from_list([key, value])
    with pytest.raises(ConfigValueError) as info:
        validate_gmmseg_config(cfg)
    assert str(info.value).startswith(f"{key} = {value!r} is invalid")
    assert info.value.key == key


def test_crop_size_is_checked(cfg):
    cfg.INPUT.CROP.ENABLED = True
    cfg.INPUT.CROP.SIZE = [0, 32]
    with pytest.raises(ConfigValueError, match=r"^INPUT\.CROP\.SIZE"):
        validate_gmmseg_config(cfg)


def test_unknown_dataset_fails_with_the_path_at_registration_and_validation_registers_nothing(
    cfg, tmp_path, monkeypatch
):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    cfg.DATASETS.TEST = ("nowhere_val",)
    with pytest.raises(DatasetFormatError, match=str(tmp_path)):
        register_datasets(cfg)
    write_folder_dataset(tmp_path, "nowhere", {"val": 1}, num_classes=3)
    with pytest.raises(ConfigValueError, match="'nowhere_val' is not") as info:
        validate_gmmseg_config(cfg)  # the folder exists now, but validating does not register it
    assert info.value.key == "DATASETS.TEST" and "nowhere_val" not in DatasetCatalog.list()
    register_datasets(cfg)
    validate_gmmseg_config(cfg)


def test_every_rule_names_a_key_the_config_has():
    """A renamed or removed key must not leave a rule that checks nothing (lookup would raise)."""
    cfg = get_cfg()
    add_gmmseg_config(cfg)
    rules = dict(KEY_RULES)
    if hasattr(cfg.MODEL, "MASK_FORMER"):  # Mask2Former installed
        rules.update(MASK_FORMER_KEY_RULES)
    for key, rule in rules.items():
        assert rule.accepts(lookup(cfg, key)), f"the default of {key} breaks its own rule"


def test_setup_cfg_merges_registers_validates_and_freezes(tmp_path, monkeypatch, unique_name):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))  # read at set-up, not at import
    write_folder_dataset(tmp_path, unique_name, {"train": 1, "val": 1}, num_classes=3)
    config = tmp_path / "run.yaml"
    config.write_text(
        "MODEL:\n  DEVICE: cpu\n  SEM_SEG_HEAD:\n    NUM_CLASSES: 3\n"
        f"DATASETS:\n  TRAIN: ('{unique_name}_train',)\n  TEST: ('{unique_name}_val',)\n"
    )
    cfg = setup_cfg(config, ["SOLVER.MAX_ITER", "7"])
    assert cfg.is_frozen() and cfg.SOLVER.MAX_ITER == 7 and cfg.MODEL.GMM.EMBED_DIM == 64
    assert f"{unique_name}_val" in DatasetCatalog.list()
    assert MetadataCatalog.get(f"{unique_name}_val").stuff_classes == ["class0", "class1", "class2"]
    with pytest.raises(ConfigValueError, match=r"^MODEL\.GMM\.EMBED_DIM = 0 is invalid"):
        setup_cfg(config, ["MODEL.GMM.EMBED_DIM", "0"])
    with pytest.raises(ConfigValueError, match="MODEL.SEM_SEG_HEAD.NUM_CLASSES = 4 is invalid: expected 3"):
        setup_cfg(config, ["MODEL.SEM_SEG_HEAD.NUM_CLASSES", "4"])  # the dataset's metadata decides
    with pytest.raises(DatasetFormatError, match=str(tmp_path)):
        setup_cfg(config, ["DATASETS.TEST", "('elsewhere_val',)"])


def test_gmm_defaults_are_the_reference_values():
    cfg = get_cfg()
    add_gmmseg_config(cfg)
    g = cfg.MODEL.GMM
    assert (g.EMBED_DIM, g.NUM_COMPONENTS, g.MEMORY_CAPACITY, g.MEMORY_PER_STEP, g.UPDATE_INTERVAL) == (
        64,
        5,
        32000,
        20,
        5,
    )
    assert (g.MEAN_MOMENTUM, g.COV_MOMENTUM, g.VAR_FLOOR, g.SINKHORN_EPSILON, g.SINKHORN_ITERS) == (
        0.999,
        0.0,
        0.01,
        0.05,
        3,
    )
    assert (g.E_STEP, g.CLASS_SCORE, g.LOGIT_NORM, g.COMPONENT_LOSS_WEIGHT) == (
        "sinkhorn",
        "wta",
        "layernorm",
        0.01,
    )
    assert (g.MEMORY_DTYPE, g.MEMORY_SAMPLING, g.ENQUEUE_CORRECT_ONLY) == ("float32", "uniform", True)
    assert g.MEMORY_INIT == "random"  # the authors' memory
    assert g.LOGIT_NORM_INIT_SCALE == 1.0
    assert g.PROJECTION_ACTIVATION == "relu"


@pytest.mark.parametrize(
    "key, value",
    [
        ("EMBED_DIM", 0),
        ("NUM_COMPONENTS", 0),
        ("MEMORY_CAPACITY", -1),
        ("MEMORY_PER_STEP", 0),
        ("UPDATE_INTERVAL", 0),
        ("SINKHORN_ITERS", 0),
        ("MEMORY_SAMPLING", "stratified"),
        ("MEMORY_DTYPE", "int8"),
        ("MEMORY_INIT", "zeros"),
        ("E_STEP", "kmeans"),
        ("CLASS_SCORE", "sum"),
        ("LOGIT_NORM", "batchnorm"),
        ("PROJECTION_ACTIVATION", "gelu"),
        ("MEAN_MOMENTUM", 1.5),
        ("COV_MOMENTUM", -0.1),
        ("VAR_FLOOR", 0.0),
        ("SINKHORN_EPSILON", 0.0),
        ("COMPONENT_LOSS_WEIGHT", -1.0),
        ("ENQUEUE_CORRECT_ONLY", "yes"),
        ("LOGIT_NORM_INIT_SCALE", 0.0),
        ("DIAGNOSTICS_PERIOD", 10),  # not a multiple of metrics.json's write period (20)
        ("DIAGNOSTICS_PERIOD", -20),
    ],
)
def test_invalid_gmm_value_names_the_key(cfg, key, value):
    cfg.MODEL.GMM[key] = value
    with pytest.raises(ConfigValueError) as info:
        validate_gmmseg_config(cfg)
    assert info.value.key == f"MODEL.GMM.{key}"
    assert str(info.value).startswith(f"MODEL.GMM.{key} = {value!r} is invalid")


def test_memory_init_values_and_no_memory_is_one_key_away(cfg):
    cfg.MODEL.GMM.MEMORY_INIT = "empty"
    validate_gmmseg_config(cfg)
    cfg.MODEL.GMM.MEMORY_INIT = "zeros"
    with pytest.raises(ConfigValueError, match="'empty' or 'random'") as info:
        validate_gmmseg_config(cfg)
    assert info.value.key == "MODEL.GMM.MEMORY_INIT"
    # the paper's no-memory ablation from the default "random": MEMORY_INIT describes a memory, and with
    # none it is ignored (tests/test_gmm_hook.py: the hook then starts no random vectors)
    cfg.MODEL.GMM.MEMORY_INIT, cfg.MODEL.GMM.MEMORY_CAPACITY = "random", 0
    validate_gmmseg_config(cfg)
