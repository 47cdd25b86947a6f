"""SegmentMeIfYouCan's submission files: one HDF5 anomaly map per frame, where the benchmark reads them.

The format is the benchmark's own (github.com/SegmentMeIfYouCan/road-anomaly-benchmark, commit 1c7804e):
``road_anomaly_benchmark/evaluation.py`` (``Evaluation.channels`` and ``save_output``) writes and reads::

    ChannelLoaderHDF5(str(DIR_OUTPUTS / "anomaly_p/{method_name}/{dset_name}/{fid}.hdf5"), compression = 9)
    value = anomaly_p.astype(np.float16)

and ``road_anomaly_benchmark/datasets/dataset_io.py`` (``ChannelLoaderHDF5``, ``var_name='value'``) stores
it as ``create_dataset('value', data=value, compression=9)`` (gzip, level 9), read back with ``np.squeeze``
to the frame's (H, W). ``dset_name`` is not the dataset's name but its frames' ``dset_name``
(``DatasetBase.get_frame``: ``cfg.name_for_persistence``, else the name of the dataset the frame comes
from), so several splits share a folder: ``AnomalyTrack-validation`` frames are read from
``AnomalyTrack-all`` (``tracks_extra.py``, ``RoadAnomalyByClass`` takes them from that dataset),
``ObstacleTrack-validation`` from ``ObstacleTrack-all`` and ``LostAndFound-testNoKnown`` from
``LostAndFound-test`` (``tracks.py``, ``name_for_persistence``), ``FishyLAFAnomaly-val`` from
``LostAndFound-train`` or ``LostAndFound-test``, the LostAndFound split holding the frame
(``tracks_extra.py``, ``FishyscapesLAFSubset.get_frame``). ``fid`` is the benchmark's frame id, which our
SMIYC dataset dicts carry as ``image_id`` (``gmmseg.data.datasets.register_smiyc``); other datasets use
their registered name as folder and the image file's stem as frame id.

Scores are written as the model gives them (higher = more anomalous): the benchmark's metrics threshold
at the data's own quantiles (``PixBinaryClass``: 768 percentile bins), so no [0, 1] range is needed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "HDF5_COMPRESSION",
    "HDF5_DTYPE",
    "HDF5_KEY",
    "SMIYC_FOLDERS",
    "anomaly_map_path",
    "dataset_folder",
    "frame_id",
    "frame_paths",
    "read_anomaly_map",
    "write_anomaly_map",
]

HDF5_KEY = "value"
HDF5_DTYPE = np.float16
HDF5_COMPRESSION = 9  # h5py: an integer 0-9 is gzip at that level
# our registered name -> the benchmark's folder (dset_name) of its frames; None: per frame (FishyLAF)
SMIYC_FOLDERS: dict[str, str | None] = {
    "AnomalyTrack-validation": "AnomalyTrack-all",
    "ObstacleTrack-validation": "ObstacleTrack-all",
    "LostAndFound-testNoKnown": "LostAndFound-test",
    "FishyLAFAnomaly-val": None,
}


def frame_id(dataset_name: str, record: Mapping[str, Any]) -> str:
    """The benchmark's frame id of a dataset dict: ``image_id`` for SMIYC sets, else the image's stem."""
    if dataset_name in SMIYC_FOLDERS:
        return str(record["image_id"])
    return Path(record["file_name"]).stem


def dataset_folder(dataset_name: str, record: Mapping[str, Any]) -> str:
    """The folder the benchmark reads a frame's map from (its ``dset_name``); our name for other sets."""
    if dataset_name not in SMIYC_FOLDERS:
        return dataset_name
    folder = SMIYC_FOLDERS[dataset_name]
    if folder is not None:
        return folder
    # FishyLAF: <laf>/leftImg8bit/<split>/<NN_scene>/<fid>_leftImg8bit.<ext>
    split = Path(record["file_name"]).parents[1].name
    if split not in ("train", "test"):
        raise ValueError(
            f"{record['file_name']}: a FishyLAF image must lie in LostAndFound's train or test split"
        )
    return f"LostAndFound-{split}"


def anomaly_map_path(
    storage: str | os.PathLike, method: str, dataset_name: str, record: Mapping[str, Any]
) -> Path:
    """``<storage>/anomaly_p/<method>/<dset_name>/<fid>.hdf5`` (``storage``: the benchmark's DIR_OUTPUTS)."""
    if not method or "/" in method or method in (".", ".."):
        raise ValueError(f"method name {method!r}: give a non-empty name without '/'")
    fid = frame_id(dataset_name, record)
    return Path(storage) / "anomaly_p" / method / dataset_folder(dataset_name, record) / f"{fid}.hdf5"


def frame_paths(
    storage: str | os.PathLike, method: str, dataset_name: str, records: Iterable[Mapping[str, Any]]
) -> list[Path]:
    """Each record's file; two frames of one dataset sharing a file (same image stem) is an error."""
    paths = [anomaly_map_path(storage, method, dataset_name, r) for r in records]
    seen: dict[Path, int] = {}
    for i, path in enumerate(paths):
        if path in seen:
            raise ValueError(
                f"{dataset_name}: frames {seen[path]} and {i} both map to {path} (frame ids must be unique)"
            )
        seen[path] = i
    return paths


def write_anomaly_map(path: str | os.PathLike, scores: np.ndarray) -> None:
    """Write an (H, W) map as the benchmark does (float16 dataset 'value', gzip 9), if float16 holds it."""
    import h5py

    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"{path}: an anomaly map is (H, W), got shape {scores.shape}")
    with np.errstate(over="ignore"):  # reported below, naming the file
        value = scores.astype(HDF5_DTYPE)
    bad = ~np.isfinite(value)
    if bad.any():
        raise ValueError(
            f"{path}: {int(bad.sum())} scores are not finite in float16 (range {np.nanmin(scores):.4g} .. "
            f"{np.nanmax(scores):.4g}; float16 holds |x| <= 65504)"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset(HDF5_KEY, data=value, compression=HDF5_COMPRESSION)


def read_anomaly_map(path: str | os.PathLike, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read one map as the benchmark does (dataset 'value', squeezed), as float32; errors name the file."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing anomaly map")
    try:
        with h5py.File(path, "r") as f:
            if HDF5_KEY not in f:
                raise ValueError(f"{path}: no dataset {HDF5_KEY!r} (keys: {sorted(f.keys())})")
            value = np.squeeze(np.asarray(f[HDF5_KEY][()]))
    except OSError as err:
        raise ValueError(f"{path}: not a readable HDF5 file ({err})") from err
    if shape is not None and value.shape != tuple(shape):
        raise ValueError(f"{path}: anomaly map of shape {value.shape}, the frame is {tuple(shape)} (H, W)")
    if not np.issubdtype(value.dtype, np.floating) and not np.issubdtype(value.dtype, np.integer):
        raise ValueError(f"{path}: anomaly map of dtype {value.dtype}, expected numbers")
    return value.astype(np.float32)
