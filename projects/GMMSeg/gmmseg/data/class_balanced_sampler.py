"""The authors' class-balanced training sampler (their mmseg ``sampler_mode='gmmseg'``).

Each sample first draws a class uniformly among the classes that occur in at least one training image,
then an image uniformly among the images that hold that class. Rare classes are thereby seen as often as
frequent ones, which feeds every class's Gaussian mixture (and its memory) with features early on.

The class-to-image index is read once from the label files and cached on disk beside the labels
(``<label folder>.gmmseg_class_index.json``, e.g. ``<root>/<name>/<split>/labels.gmmseg_class_index.json``),
keyed by a fingerprint of the file list, sizes and modification times, so it is rebuilt when a label
changes. Where that folder is not writable the cache goes to ``$XDG_CACHE_HOME/gmmseg`` (default
``~/.cache/gmmseg``), and failing that it is kept in memory only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from detectron2.utils import comm
from torch.utils.data import Sampler

__all__ = [
    "ClassBalancedTrainingSampler",
    "ClassImageIndex",
    "LabelIndexError",
    "build_class_image_index",
    "class_image_index_for_datasets",
]

logger = logging.getLogger(__name__)

CACHE_FORMAT = "gmmseg-class-index-v1"
CACHE_SUFFIX = ".gmmseg_class_index.json"
PROGRESS_MIN_FILES = 500  # a progress bar only where building takes noticeable time


class LabelIndexError(ValueError):
    """A label file cannot be indexed (missing, unreadable, or holding a value that is no class)."""


class ClassImageIndex:
    """Which classes each training image holds; the sampler draws from its inverse (class -> images)."""

    def __init__(self, image_classes: Sequence[Sequence[int]], num_classes: int) -> None:
        self.num_classes = int(num_classes)
        self.image_classes = [np.asarray(c, dtype=np.int64).reshape(-1) for c in image_classes]

    def __len__(self) -> int:
        return len(self.image_classes)

    def images_per_class(self) -> list[np.ndarray]:
        """For every class id, the (sorted) indices of the images holding it."""
        if not self.image_classes:
            return [np.zeros(0, dtype=np.int64) for _ in range(self.num_classes)]
        lengths = np.array([len(c) for c in self.image_classes])
        images = np.repeat(np.arange(len(self.image_classes)), lengths)
        classes = np.concatenate(self.image_classes)
        order = np.lexsort((images, classes))
        images, classes = images[order], classes[order]
        bounds = np.searchsorted(classes, np.arange(self.num_classes + 1))
        return [images[bounds[c] : bounds[c + 1]] for c in range(self.num_classes)]

    @staticmethod
    def concatenate(indices: Sequence[ClassImageIndex]) -> ClassImageIndex:
        """One index over datasets concatenated in order (as ``get_detection_dataset_dicts`` does)."""
        num_classes = max((i.num_classes for i in indices), default=0)
        return ClassImageIndex([c for i in indices for c in i.image_classes], num_classes)


def read_label(path: str) -> np.ndarray:
    """The label array exactly as the training mapper reads it (Detectron2's ``read_image``)."""
    from detectron2.data.detection_utils import read_image

    return read_image(path)


def label_classes(path: str, num_classes: int, ignore_label: int) -> np.ndarray:
    """The sorted class ids occurring in one label file; any other value but ``ignore_label`` is an error."""
    try:
        label = read_label(path)
    except OSError as err:
        raise LabelIndexError(f"{path}: unreadable label file ({err})") from err
    if label.ndim != 2:
        raise LabelIndexError(
            f"{path}: label must be a single-channel image of class indices ({label.shape})"
        )
    if label.dtype == np.uint8:
        values = np.flatnonzero(np.bincount(label.ravel(), minlength=256))
    else:
        values = np.unique(label)
    bad = values[((values < 0) | (values >= num_classes)) & (values != ignore_label)]
    if bad.size:
        raise LabelIndexError(
            f"{path}: label values {bad.tolist()[:10]} are outside the {num_classes} classes "
            f"(0..{num_classes - 1}) and are not the ignore label {ignore_label}"
        )
    return values[(values >= 0) & (values < num_classes)].astype(np.int64)


def _fingerprint(files: Sequence[str], base: str, num_classes: int, ignore_label: int) -> str:
    digest = hashlib.sha256(f"{CACHE_FORMAT}\0{num_classes}\0{ignore_label}\n".encode())
    for path in files:
        try:
            st = os.stat(path)
        except OSError as err:
            raise LabelIndexError(f"{path}: unreadable label file ({err})") from err
        digest.update(f"{os.path.relpath(path, base)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def cache_paths(files: Sequence[str]) -> tuple[str, list[Path]]:
    """The labels' common folder and the candidate cache files: beside that folder, then the user cache."""
    base = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])
    user_root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gmmseg" / "class_index"
    user = user_root / (hashlib.sha1(base.encode()).hexdigest()[:16] + CACHE_SUFFIX)
    folder = Path(base)
    beside = [folder.parent / (folder.name + CACHE_SUFFIX)] if folder.name else []
    return base, beside + [user]


def _load_cache(path: Path, fingerprint: str) -> list[list[int]] | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        logger.warning("ignoring unreadable class-index cache %s (%s)", path, err)
        return None
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
        return None
    if data.get("fingerprint") != fingerprint:
        logger.info("class-index cache %s is stale (label files changed): rebuilding", path)
        return None
    return data.get("image_classes")


def _write_cache(paths: Sequence[Path], payload: dict[str, Any]) -> Path | None:
    """Write atomically to the first writable candidate; None (index kept in memory) if none is."""
    text = json.dumps(payload, separators=(",", ":"))
    for path in paths:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(text)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            return path
        except OSError as err:
            logger.info("cannot write the class-index cache to %s (%s)", path, err)
    logger.warning("no writable place for the class-index cache: the index is kept in memory only")
    return None


def build_class_image_index(
    label_files: Sequence[str],
    num_classes: int,
    ignore_label: int = 255,
    use_cache: bool = True,
    num_threads: int | None = None,
) -> ClassImageIndex:
    """Index which classes each label file holds, reading the files only when no valid cache exists.

    Raises LabelIndexError naming the file if one is missing, unreadable or holds a value that is
    neither a class in ``[0, num_classes)`` nor ``ignore_label``.
    """
    files = [str(f) for f in label_files]
    if not files:
        raise LabelIndexError("no label files to index")
    base, candidates = cache_paths(files)
    fingerprint = _fingerprint(files, base, num_classes, ignore_label) if use_cache else ""
    if use_cache:
        for path in candidates:
            cached = _load_cache(path, fingerprint)
            if cached is not None and len(cached) == len(files):
                logger.info("class-to-image index of %d label files read from %s", len(files), path)
                return ClassImageIndex(cached, num_classes)

    from tqdm import tqdm

    logger.info("building the class-to-image index of %d label files in %s", len(files), base)
    threads = num_threads or min(8, os.cpu_count() or 1)
    pool = ThreadPoolExecutor(max_workers=threads)  # PNG decoding releases the GIL
    try:
        results = pool.map(lambda f: label_classes(f, num_classes, ignore_label), files)
        bar = tqdm(results, total=len(files), desc="class index", disable=len(files) < PROGRESS_MIN_FILES)
        image_classes = [c.tolist() for c in bar]
    finally:  # on a bad file, do not wait for the rest of the dataset to be read
        pool.shutdown(wait=True, cancel_futures=True)
    if use_cache:
        payload = {
            "format": CACHE_FORMAT,
            "fingerprint": fingerprint,
            "num_classes": num_classes,
            "ignore_label": ignore_label,
            "files": [os.path.relpath(f, base) for f in files],
            "image_classes": image_classes,
        }
        written = _write_cache(candidates, payload)
        if written is not None:
            logger.info("class-to-image index cached at %s", written)
    return ClassImageIndex(image_classes, num_classes)


def class_image_index_for_datasets(
    dataset_names: Sequence[str], num_classes: int
) -> tuple[list[dict[str, Any]], ClassImageIndex]:
    """The concatenated dataset dicts of ``dataset_names`` and their class-to-image index.

    Each dataset is indexed with its own ignore label (metadata ``ignore_label``, default 255). With
    several processes the first one per machine builds (and caches) the index while the others wait,
    then read the cache, so the label files are read once.
    """
    from detectron2.data import MetadataCatalog, get_detection_dataset_dicts

    dicts, indices = [], []
    for name in dataset_names:
        records = get_detection_dataset_dicts([name], filter_empty=False)
        missing = [r.get("file_name", "?") for r in records if "sem_seg_file_name" not in r]
        if missing:
            raise LabelIndexError(f"dataset '{name}': {missing[0]} has no 'sem_seg_file_name' to index")
        ignore = MetadataCatalog.get(name).get("ignore_label", 255)
        files = [r["sem_seg_file_name"] for r in records]
        first = comm.get_local_rank() == 0
        if not first:
            comm.synchronize()
        indices.append(build_class_image_index(files, num_classes, ignore))
        if first:
            comm.synchronize()
        dicts += records
    return dicts, ClassImageIndex.concatenate(indices)


def _chunk_seed(seed: int, chunk: int) -> int:
    """A well-mixed generator seed per (seed, chunk): any chunk can be drawn without the ones before."""
    state = np.random.SeedSequence([seed % 2**64, chunk]).generate_state(1, dtype=np.uint64)[0]
    return int(state) & (2**63 - 1)


class ClassBalancedTrainingSampler(Sampler):
    """Infinite class-balanced stream of image indices, like Detectron2's ``TrainingSampler``.

    Global position ``p`` of the stream depends only on ``seed`` and ``p`` (draws are made in chunks of
    ``chunk_size``, each from its own seeded generator). Process ``rank`` yields positions ``rank,
    rank + world_size, ...``, so the processes share one stream without duplicating a position, and
    ``skip`` starts ``skip`` samples (per process) in, so a resumed run reads the batches an uninterrupted
    run would have read.
    """

    def __init__(
        self,
        index: ClassImageIndex | Sequence[Sequence[int]],
        seed: int | None = None,
        skip: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        chunk_size: int = 8192,
    ) -> None:
        if not isinstance(index, ClassImageIndex):
            index = ClassImageIndex(index, 1 + max((max(c, default=-1) for c in index), default=-1))
        per_class = index.images_per_class()
        present = [c for c, images in enumerate(per_class) if len(images)]
        if not present:
            raise ValueError("class-balanced sampling needs at least one image holding a class")
        self.num_images = len(index)
        self.classes = torch.tensor(present, dtype=torch.int64)
        self._counts = torch.tensor([len(per_class[c]) for c in present], dtype=torch.int64)
        self._offsets = torch.cumsum(self._counts, 0) - self._counts
        self._images = torch.from_numpy(np.concatenate([per_class[c] for c in present]).astype(np.int64))
        no_class = sum(1 for c in index.image_classes if len(c) == 0)
        if no_class:
            logger.warning("%d of %d images hold no class (only ignore): never sampled", no_class, len(index))
        self._seed = int(comm.shared_random_seed() if seed is None else seed)
        self._skip = int(skip)
        self._rank = comm.get_rank() if rank is None else int(rank)
        self._world_size = comm.get_world_size() if world_size is None else int(world_size)
        if not 0 <= self._rank < self._world_size:
            raise ValueError(f"rank {self._rank} is not in [0, world_size={self._world_size})")
        self._chunk_size = int(chunk_size)

    @property
    def seed(self) -> int:
        """The stream's seed (shared by all processes)."""
        return self._seed

    def _chunk(self, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(drawn class ids, drawn image indices) of global positions ``chunk * chunk_size ...``."""
        g = torch.Generator().manual_seed(_chunk_seed(self._seed, chunk))
        drawn = torch.randint(len(self.classes), (self._chunk_size,), generator=g)
        counts = self._counts[drawn]
        u = torch.rand(self._chunk_size, generator=g, dtype=torch.float64)
        within = torch.minimum((u * counts).long(), counts - 1)
        return self.classes[drawn], self._images[self._offsets[drawn] + within]

    def __iter__(self) -> Iterator[int]:
        position = self._rank + self._skip * self._world_size
        while True:
            chunk, offset = divmod(position, self._chunk_size)
            taken = self._chunk(chunk)[1][offset :: self._world_size].tolist()
            yield from taken
            position += len(taken) * self._world_size
