"""The authors' class-balanced sampler: the class-to-image index (against numpy, cached, rebuilt on
change, errors naming the file), the drawn frequencies (chi-square against the analytic expectation,
which Detectron2's TrainingSampler fails), determinism, resume, several processes, and the trainer's
loader."""

from __future__ import annotations

import json
import os
from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_two_gloo_workers, save_gloo_worker_result
from detectron2.config import get_cfg
from detectron2.data.samplers import TrainingSampler
from PIL import Image
from scipy.stats import chisquare

from gmmseg import add_gmmseg_config
from gmmseg.config_validation import ConfigValueError, validate_gmmseg_config
from gmmseg.data import class_balanced_sampler as cbs
from gmmseg.data.class_balanced_sampler import (
    ClassBalancedTrainingSampler,
    ClassImageIndex,
    LabelIndexError,
    build_class_image_index,
    class_image_index_for_datasets,
)
from gmmseg.data.folder_dataset import register_folder_dataset
from gmmseg.engine import GMMSegTrainer
from gmmseg.engine.trainer import ResumableTrainingSampler

REPO = Path(__file__).resolve().parent.parent
NUM_CLASSES = 5  # class 4 occurs in no image: it must never be drawn
NUM_IMAGES = 60


def draw(sampler: ClassBalancedTrainingSampler, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(classes, images) at global stream positions ``start .. start + count - 1`` (all processes),
    read from the sampler's chunks, to check what it yields against what it drew."""
    size = sampler._chunk_size
    first, last = start // size, (start + count - 1) // size
    parts = [sampler._chunk(k) for k in range(first, last + 1)]
    offset = start - first * size
    classes = torch.cat([p[0] for p in parts])[offset : offset + count]
    images = torch.cat([p[1] for p in parts])[offset : offset + count]
    return classes, images


def classes_of(i: int) -> list[int]:
    """Strongly skewed: class 0 in every image, 1 in half, 2 in a fifth, 3 in two images."""
    return sorted(
        {0}
        | ({1} if i % 2 == 0 else set())
        | ({2} if i % 5 == 0 else set())
        | ({3} if i in (7, 33) else set())
    )


def write_skewed_dataset(root: Path, name: str, size: tuple[int, int] = (16, 16)) -> Path:
    """``root/name`` in the folder format (as tests/conftest.py) with the classes of ``classes_of``."""
    rng = np.random.default_rng(0)
    dataset_dir = root / name
    meta = {
        "classes": [f"class{i}" for i in range(NUM_CLASSES)],
        "colors": [[10 * i, 20 * i, 30 * i] for i in range(NUM_CLASSES)],
        "ignore_label": 255,
    }
    for sub in ("images", "labels"):
        (dataset_dir / "train" / sub).mkdir(parents=True)
    (dataset_dir / "meta.json").write_text(json.dumps(meta))
    for i in range(NUM_IMAGES):
        label = np.zeros(size, np.uint8)
        label[0] = 255
        for row, c in enumerate(classes_of(i)[1:], start=1):
            label[row, :4] = c
        Image.fromarray(label).save(dataset_dir / "train" / "labels" / f"{i:04d}.png")
        image = rng.integers(0, 256, (*size, 3)).astype(np.uint8)
        Image.fromarray(image).save(dataset_dir / "train" / "images" / f"{i:04d}.png")
    return dataset_dir


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch) -> Path:
    """Keep the fallback cache inside the test's folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user_cache"))
    return tmp_path / "user_cache"


@pytest.fixture
def dataset(tmp_path, unique_name) -> Path:
    return write_skewed_dataset(tmp_path, unique_name)


def label_files(dataset_dir: Path) -> list[str]:
    return sorted(str(p) for p in (dataset_dir / "train" / "labels").glob("*.png"))


def expected_image_probabilities(image_classes: list[list[int]]) -> np.ndarray:
    """P(image i) = sum over the classes c of image i of 1/|classes present| * 1/|images holding c|."""
    holders = Counter(c for classes in image_classes for c in classes)
    return np.array([sum(1 / len(holders) / holders[c] for c in classes) for classes in image_classes])


SKEWED = [classes_of(i) for i in range(NUM_IMAGES)]


# ------------------------------------------------------------------------------------------- the index
def test_index_equals_numpy_unique_per_image(dataset):
    files = label_files(dataset)
    index = build_class_image_index(files, NUM_CLASSES, 255)
    direct = [[int(v) for v in np.unique(np.asarray(Image.open(f))) if v < NUM_CLASSES] for f in files]
    assert [c.tolist() for c in index.image_classes] == direct == SKEWED
    per_class = index.images_per_class()
    assert per_class[3].tolist() == [7, 33] and len(per_class[0]) == NUM_IMAGES and len(per_class[4]) == 0


def test_index_cached_reused_and_rebuilt_when_a_label_changes(dataset, monkeypatch):
    files = label_files(dataset)
    first = build_class_image_index(files, NUM_CLASSES, 255)
    cache = dataset / "train" / "labels.gmmseg_class_index.json"
    assert cache.is_file()

    def no_reading(path):
        raise AssertionError(f"{path} read although the cache is valid")

    monkeypatch.setattr(cbs, "read_label", no_reading)
    again = build_class_image_index(files, NUM_CLASSES, 255)
    assert [c.tolist() for c in again.image_classes] == [c.tolist() for c in first.image_classes]

    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(dataset.parent / "user_cache"))
    label = np.asarray(Image.open(files[1])).copy()
    label[5, 5] = 4  # image 1 now holds class 4 too
    Image.fromarray(label).save(files[1])
    stat = os.stat(files[1])
    os.utime(files[1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    read = []
    monkeypatch.setattr(cbs, "read_label", lambda path: read.append(path) or cbs.np.asarray(Image.open(path)))
    rebuilt = build_class_image_index(files, NUM_CLASSES, 255)
    assert len(read) == NUM_IMAGES
    assert rebuilt.image_classes[1].tolist() == [0, 4]
    # other class counts or ignore labels are other caches, never a stale hit
    read.clear()
    build_class_image_index(files, NUM_CLASSES + 1, 255)
    assert len(read) == NUM_IMAGES


def test_index_falls_back_to_user_cache_then_memory(dataset, monkeypatch, user_cache, caplog):
    files = label_files(dataset)
    real_mkstemp = cbs.tempfile.mkstemp

    def beside_not_writable(dir=None, **kwargs):
        if Path(dir) == dataset / "train":
            raise PermissionError(13, "Permission denied", dir)
        return real_mkstemp(dir=dir, **kwargs)

    monkeypatch.setattr(cbs.tempfile, "mkstemp", beside_not_writable)
    build_class_image_index(files, NUM_CLASSES, 255)
    assert not (dataset / "train" / "labels.gmmseg_class_index.json").exists()
    assert len(list(user_cache.rglob("*.gmmseg_class_index.json"))) == 1
    monkeypatch.setattr(cbs, "read_label", lambda path: pytest.fail(f"{path} read"))
    assert [c.tolist() for c in build_class_image_index(files, NUM_CLASSES, 255).image_classes] == SKEWED

    monkeypatch.undo()
    monkeypatch.setattr(
        cbs.tempfile, "mkstemp", lambda **kw: (_ for _ in ()).throw(PermissionError(13, "no"))
    )
    monkeypatch.setenv("XDG_CACHE_HOME", str(dataset.parent / "other_cache"))
    with caplog.at_level("WARNING"):
        index = build_class_image_index(files, NUM_CLASSES + 1, 255)  # another key: no cache hit
    assert [c.tolist() for c in index.image_classes] == SKEWED
    assert "kept in memory only" in caplog.text


def test_bad_label_value_or_file_is_an_error_naming_it(dataset):
    files = label_files(dataset)
    label = np.asarray(Image.open(files[3])).copy()
    label[4, 4] = 7
    Image.fromarray(label).save(files[3])
    with pytest.raises(LabelIndexError, match=rf"{files[3]}.*\[7\]"):
        build_class_image_index(files, NUM_CLASSES, 255)
    Path(files[3]).write_bytes(b"not a png")
    with pytest.raises(LabelIndexError, match=rf"{files[3]}: unreadable"):
        build_class_image_index(files, NUM_CLASSES, 255)
    os.unlink(files[3])
    with pytest.raises(LabelIndexError, match=files[3]):
        build_class_image_index(files, NUM_CLASSES, 255)


# -------------------------------------------------------------------------------------- the sampler
def test_frequencies_match_the_class_balanced_expectation_and_plain_shuffling_fails():
    draws = 20000
    expected = expected_image_probabilities(SKEWED) * draws
    sampler = ClassBalancedTrainingSampler(ClassImageIndex(SKEWED, NUM_CLASSES), seed=0, rank=0, world_size=1)
    observed = np.bincount(list(islice(sampler, draws)), minlength=NUM_IMAGES)
    assert chisquare(observed, expected).pvalue > 1e-3
    # the two images holding class 3 get an eighth of the draws each, instead of 1/60
    assert observed[[7, 33]].min() > draws / 9

    classes, images = draw(sampler, 0, draws)
    assert all(int(c) in SKEWED[int(i)] for c, i in zip(classes[:2000], images[:2000]))
    class_counts = np.bincount(classes.numpy(), minlength=NUM_CLASSES)
    assert class_counts[4] == 0 and chisquare(class_counts[:4]).pvalue > 1e-3

    plain = TrainingSampler(NUM_IMAGES, seed=0)
    plain_observed = np.bincount(list(islice(plain, draws)), minlength=NUM_IMAGES)
    assert chisquare(plain_observed, expected).pvalue < 1e-3


def test_same_seed_same_stream_other_seed_other_stream():
    def stream(seed):
        sampler = ClassBalancedTrainingSampler(SKEWED, seed=seed, rank=0, world_size=1, chunk_size=100)
        return list(islice(sampler, 500))

    assert stream(3) == stream(3)
    assert stream(3) != stream(4)


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("skip", [0, 37, 5000])
def test_resumed_stream_equals_uninterrupted(world_size, skip):
    def stream(rank: int, skip: int, count: int) -> list[int]:
        sampler = ClassBalancedTrainingSampler(
            SKEWED, seed=11, skip=skip, rank=rank, world_size=world_size, chunk_size=64
        )
        return list(islice(sampler, count))

    for rank in range(world_size):
        assert stream(rank, skip, 200) == stream(rank, 0, skip + 200)[skip:]


def test_ranks_take_disjoint_positions_of_one_stream(monkeypatch):
    single = list(islice(ClassBalancedTrainingSampler(SKEWED, seed=5, rank=0, world_size=1), 1000))
    _, drawn = draw(ClassBalancedTrainingSampler(SKEWED, seed=5, rank=0, world_size=1), 0, 1000)
    assert drawn.tolist() == single
    per_rank = []
    for rank in range(2):  # the rank and world size come from detectron2.utils.comm, as in training
        monkeypatch.setattr(cbs.comm, "get_rank", lambda r=rank: r)
        monkeypatch.setattr(cbs.comm, "get_world_size", lambda: 2)
        per_rank.append(list(islice(ClassBalancedTrainingSampler(SKEWED, seed=5), 500)))
    assert per_rank[0] == single[0::2] and per_rank[1] == single[1::2]


def test_no_class_anywhere_is_an_error():
    with pytest.raises(ValueError, match="at least one image"):
        ClassBalancedTrainingSampler([[], []], seed=0, rank=0, world_size=1)


def _gloo_worker(rank: int, init_file: str, dataset_dir: str, out: str) -> None:
    import datetime

    import torch.distributed as dist
    from detectron2.utils import comm

    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=60),
    )
    comm._LOCAL_PROCESS_GROUP = dist.new_group([0, 1])

    def work() -> dict:
        names = register_folder_dataset(dataset_dir)
        _, index = class_image_index_for_datasets(names, NUM_CLASSES)
        sampler = ClassBalancedTrainingSampler(index)  # seed: shared among the processes
        return {"seed": sampler.seed, "stream": list(islice(sampler, 300)), "index": index.image_classes}

    save_gloo_worker_result(out, rank, work)


@pytest.mark.slow
def test_two_gloo_processes_share_one_stream(dataset, tmp_path):
    rank0, rank1 = run_two_gloo_workers(
        _gloo_worker, (str(tmp_path / "dist_init"), str(dataset), str(tmp_path)), tmp_path
    )
    assert rank0["seed"] == rank1["seed"]
    for result in (rank0, rank1):
        assert [c.tolist() for c in result["index"]] == SKEWED
    single = ClassBalancedTrainingSampler(SKEWED, seed=rank0["seed"], rank=0, world_size=1)
    stream = list(islice(single, 600))
    assert rank0["stream"] == stream[0::2] and rank1["stream"] == stream[1::2]
    assert (dataset / "train" / "labels.gmmseg_class_index.json").is_file()


# ------------------------------------------------------------------------------------------ trainer
def test_trainer_loader_yields_class_balanced_batches_and_resumes(dataset):
    (name,) = register_folder_dataset(dataset)
    cfg = get_cfg()
    add_gmmseg_config(cfg)
    cfg.merge_from_file(str(REPO / "configs" / "digitscapes" / "deeplabv3plus_R18_softmax.yaml"))
    cfg.merge_from_list(
        ["DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", "()", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "5"]
        + ["SOLVER.IMS_PER_BATCH", "4", "DATALOADER.NUM_WORKERS", "0", "INPUT.MIN_SIZE_TRAIN", "(16,)"]
        + ["SEED", "7", "DATALOADER.SAMPLER_TRAIN", "ClassBalancedSampler"]
    )
    validate_gmmseg_config(cfg)

    loader = iter(GMMSegTrainer.build_train_loader(cfg))
    batches = [[d["image_id"] for d in next(loader)] for _ in range(4)]
    _, expected = draw(ClassBalancedTrainingSampler(SKEWED, seed=7, rank=0, world_size=1), 0, 16)
    assert sum(batches, []) == [f"{i:04d}" for i in expected.tolist()]
    batch = next(loader)
    assert all(isinstance(d["image"], torch.Tensor) and d["sem_seg"].shape == (16, 16) for d in batch)

    resumed = iter(GMMSegTrainer.build_train_loader(cfg, start_iter=2))
    assert [[d["image_id"] for d in next(resumed)] for _ in range(2)] == batches[2:]

    cfg.DATALOADER.SAMPLER_TRAIN = "TrainingSampler"  # the default path is unchanged: shuffled epochs
    shuffled = [d["image_id"] for d in next(iter(GMMSegTrainer.build_train_loader(cfg)))]
    assert shuffled == [f"{i:04d}" for i in islice(ResumableTrainingSampler(NUM_IMAGES, seed=7), 4)]

    cfg.DATALOADER.SAMPLER_TRAIN = "ClassBalanced"
    with pytest.raises(ConfigValueError, match="DATALOADER.SAMPLER_TRAIN.*'ClassBalancedSampler'"):
        validate_gmmseg_config(cfg)
