"""Fast tests of the DigitScapes generator (small splits at 64 px; a few seconds in all)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gmmseg_datasets import digitscapes as ds

SMALL = {"train": 12, "val": 6, "anomaly_val": 6}
SIZE = 64
C = len(ds.DIGITSCAPES_CLASSES)
REPO = Path(__file__).resolve().parents[1]


def _gen(root: Path, **kwargs) -> Path:
    kwargs = {"seed": 0, "image_size": SIZE, "counts": SMALL, "workers": 2, **kwargs}
    return Path(ds.generate_digitscapes(str(root), **kwargs))


def _files(dataset: Path) -> dict[str, bytes]:
    return {str(p.relative_to(dataset)): p.read_bytes() for p in sorted(dataset.rglob("*")) if p.is_file()}


def _png(path: Path) -> tuple[str, np.ndarray]:
    with Image.open(path) as img:
        return img.mode, np.asarray(img)


def _manifest(dataset: Path, split: str) -> dict:
    return json.loads((dataset / split / "manifest.json").read_text())


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return _gen(tmp_path_factory.mktemp("small"))


@pytest.fixture(scope="module")
def train40(tmp_path_factory) -> Path:
    """A modest train split, for class coverage and style statistics."""
    counts = {"train": 40, "val": 0, "anomaly_val": 0}
    return _gen(tmp_path_factory.mktemp("train40"), counts=counts)


def test_layout_and_meta(small):
    meta = json.loads((small / "meta.json").read_text())
    assert meta["classes"] == list(ds.DIGITSCAPES_CLASSES)
    assert meta["classes"][: len(ds.STUFF_CLASSES)] == list(ds.STUFF_CLASSES)
    assert meta["ignore_label"] == 255
    assert len(meta["colors"]) == C and len({tuple(c) for c in meta["colors"]}) == C
    assert meta["generator"] == {
        "name": "digitscapes",
        "version": 1,
        "seed": 0,
        "image_size": SIZE,
        "counts": SMALL,
    }
    assert set(meta["ood_families"]) == {"1", "2"}
    for split, n in SMALL.items():
        maps = ["images", "labels"] + (["ood", "ood_family"] if split == "anomaly_val" else [])
        for sub in maps:
            assert sorted(p.name for p in (small / split / sub).iterdir()) == [
                f"{i:06d}.png" for i in range(n)
            ]
        assert sorted(_manifest(small, split)["images"]) == [f"{i:06d}" for i in range(n)]
    assert not (small / "train" / "ood").exists()


def test_same_seed_same_bytes_for_any_worker_count(small, tmp_path):
    reference = _files(small)
    assert _files(_gen(tmp_path / "w2", workers=2)) == reference
    assert _files(_gen(tmp_path / "w1", workers=1)) == reference


def test_different_seed_differs(small, tmp_path):
    other = _files(_gen(tmp_path / "s1", seed=1))
    reference = _files(small)
    images = [k for k in reference if "/images/" in k]
    assert sum(other[k] != reference[k] for k in images) == len(images)


def test_values_sizes_and_modes(small):
    for split in ds.SPLITS:
        for img_path in sorted((small / split / "images").iterdir()):
            mode, img = _png(img_path)
            assert mode == "RGB" and img.shape == (SIZE, SIZE, 3) and img.dtype == np.uint8
            maps = ["labels"] + (["ood", "ood_family"] if split == "anomaly_val" else [])
            for sub in maps:
                mode, arr = _png(small / split / sub / img_path.name)
                assert mode == "L" and arr.shape == (SIZE, SIZE)
            label = _png(small / split / "labels" / img_path.name)[1]
            values = set(np.unique(label).tolist())
            assert values <= set(range(C)) | {255}
            assert (label == 255).any(), "anti-aliased object edges must be void"


def test_anomaly_maps_agree_with_labels(small):
    families_seen = set()
    for img_id, record in _manifest(small, "anomaly_val")["images"].items():
        label = _png(small / "anomaly_val" / "labels" / f"{img_id}.png")[1]
        ood = _png(small / "anomaly_val" / "ood" / f"{img_id}.png")[1]
        family = _png(small / "anomaly_val" / "ood_family" / f"{img_id}.png")[1]
        assert set(np.unique(ood).tolist()) <= {0, 1, 255}
        assert set(np.unique(family).tolist()) <= {0, 1, 2, 255}
        assert (label[ood == 1] == 255).all(), "anomaly pixels must be ignored in the labels"
        assert ((ood == 0) == (label < C)).all() and ((ood == 255) == (family == 255)).all()
        assert ((ood == 1) == np.isin(family, (1, 2))).all()
        unknown = {o["family"] for o in record["objects"] if o["family"]}
        assert 1 <= sum(o["family"] > 0 for o in record["objects"]) <= 3
        for fam in (1, 2):
            assert ((family == fam).any()) == (fam in unknown), (img_id, fam)
        families_seen |= unknown
        for obj in record["objects"]:
            if obj["kind"] == "digit":
                assert (obj["digit"] in ds.ANOMALY_DIGITS) == (obj["family"] == 1)
    assert families_seen == {1, 2}


def test_digit_scan_pools_disjoint_and_used_as_declared(small):
    pools = ds.digit_scan_pools(0)
    assert ds.digit_scan_pools(1) != pools  # the split depends on the seed
    split_scans = {split: {i for idx in pools[split].values() for i in idx} for split in ds.SPLITS}
    assert not split_scans["train"] & split_scans["val"]
    assert not split_scans["train"] & split_scans["anomaly_val"]
    assert not split_scans["val"] & split_scans["anomaly_val"]
    assert len(set().union(*split_scans.values())) == 1797
    for d in ds.ANOMALY_DIGITS:
        assert not pools["train"][d] and not pools["val"][d] and pools["anomaly_val"][d]
    used: dict[str, set[int]] = {}
    for split in ds.SPLITS:
        used[split] = set()
        for record in _manifest(small, split)["images"].values():
            for obj in record["objects"]:
                if obj["kind"] != "digit":
                    continue
                assert obj["scan"] in pools[split][obj["digit"]]
                if split != "anomaly_val":
                    assert obj["digit"] in ds.KNOWN_DIGITS and obj["family"] == 0
                used[split].add(obj["scan"])
    assert not used["train"] & (used["val"] | used["anomaly_val"])


def test_texture_sources_of_train_and_eval_are_disjoint():
    def rects(part):
        return [(photo, r) for parts in ds.TEXTURE_REGIONS.values() for photo, r in parts[part]]

    for photo_a, (a0, a1, a2, a3) in rects("train"):
        for photo_b, (b0, b1, b2, b3) in rects("eval"):
            overlap = photo_a == photo_b and a0 < b1 and b0 < a1 and a2 < b3 and b2 < a3
            assert not overlap, (photo_a, (a0, a1, a2, a3), (b0, b1, b2, b3))


def test_every_class_present_in_modest_train_set(train40):
    seen = set()
    for path in (train40 / "train" / "labels").iterdir():
        seen |= set(np.unique(_png(path)[1]).tolist())
    assert set(range(C)) <= seen
    assert not (train40 / "val").exists(), "an empty split gets no folder (it would register as a dataset)"
    freq = json.loads((train40 / "meta.json").read_text())["pixel_counts"]["train"]
    assert all(f > 0 for f in freq[:C])


def _clusters(colours: np.ndarray, radius: float = 60.0, min_size: int = 2) -> int:
    """Greedy leader clustering in RGB; number of clusters with at least ``min_size`` members."""
    centres: list[np.ndarray] = []
    sizes: list[int] = []
    for c in colours:
        dist = [np.linalg.norm(c - m) for m in centres]
        if dist and min(dist) < radius:
            sizes[int(np.argmin(dist))] += 1
        else:
            centres.append(c)
            sizes.append(1)
    return sum(s >= min_size for s in sizes)


def test_classes_are_multimodal(train40):
    records = _manifest(train40, "train")["images"]
    inks: dict[int, list[np.ndarray]] = {d: [] for d in ds.KNOWN_DIGITS}
    sky: list[np.ndarray] = []
    for img_id, record in records.items():
        img = _png(train40 / "train" / "images" / f"{img_id}.png")[1].astype(np.float64)
        label = _png(train40 / "train" / "labels" / f"{img_id}.png")[1]
        digits = [o["digit"] for o in record["objects"]]
        for d in ds.KNOWN_DIGITS:
            if digits.count(d) == 1 and (label == len(ds.STUFF_CLASSES) + d).sum() >= 10:
                inks[d].append(img[label == len(ds.STUFF_CLASSES) + d].mean(0))
        if (label == 0).sum() >= 50:
            sky.append(img[label == 0].mean(0))
    # ink colour does not identify the digit: several distinct ink clusters per digit class
    pooled = np.array([c for d in ds.KNOWN_DIGITS for c in inks[d]])
    assert _clusters(pooled) >= 4
    assert max(_clusters(np.array(v)) for v in inks.values() if v) >= 3
    for d in ds.KNOWN_DIGITS:
        palettes = {o["ink"] for r in records.values() for o in r["objects"] if o.get("digit") == d}
        strokes = {o["stroke"] for r in records.values() for o in r["objects"] if o.get("digit") == d}
        assert len(palettes) >= 3 and len(strokes) >= 2, d
    # stuff classes are multi-modal through the scene colour schemes
    assert _clusters(np.array(sky)) >= 3
    assert {r["style"] for r in records.values()} == set(ds.SCENE_STYLES)


@pytest.mark.parametrize("size", [64, 128])
def test_render_scene_sizes(size):
    for split in ds.SPLITS:
        sample = ds.render_scene(3, split, 1, image_size=size)
        assert sample["image"].shape == (size, size, 3)
        for key in ("label", "ood", "ood_family"):
            assert sample[key].shape == (size, size) and sample[key].dtype == np.uint8
        stuff = np.isin(sample["label"], range(len(ds.STUFF_CLASSES)))
        assert stuff.mean() > 0.4  # a scene, not a collage of objects


def test_skip_if_same_error_if_different_overwrite(tmp_path):
    dataset = _gen(tmp_path, counts={"train": 2, "val": 1, "anomaly_val": 1})
    sentinel = dataset / "sentinel"
    sentinel.write_text("kept")
    assert _gen(tmp_path, counts={"train": 2, "val": 1, "anomaly_val": 1}) == dataset
    assert sentinel.exists(), "same settings: the existing dataset must be kept"
    with pytest.raises(FileExistsError, match="overwrite"):
        _gen(tmp_path, counts={"train": 3, "val": 1, "anomaly_val": 1})
    with pytest.raises(FileExistsError, match="overwrite"):
        _gen(tmp_path, seed=5, counts={"train": 2, "val": 1, "anomaly_val": 1})
    assert sentinel.exists()
    _gen(tmp_path, seed=5, counts={"train": 2, "val": 1, "anomaly_val": 1}, overwrite=True)
    assert not sentinel.exists()
    assert json.loads((dataset / "meta.json").read_text())["generator"]["seed"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digitscapes"]


def _fail_on_call(monkeypatch, n: int) -> None:
    real, calls = ds.render_scene, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(ds, "render_scene", flaky)


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    _fail_on_call(monkeypatch, 5)
    with pytest.raises(RuntimeError, match="simulated"):
        _gen(tmp_path, workers=1)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_overwrite_keeps_old_dataset(tmp_path, monkeypatch):
    counts = {"train": 2, "val": 1, "anomaly_val": 1}
    dataset = _gen(tmp_path, counts=counts)
    before = _files(dataset)
    _fail_on_call(monkeypatch, 3)
    with pytest.raises(RuntimeError, match="simulated"):
        _gen(tmp_path, seed=7, counts=counts, workers=1, overwrite=True)
    assert _files(dataset) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digitscapes"]


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="split"):
        _gen(tmp_path, counts={"test": 3})
    with pytest.raises(ValueError, match="image_size"):
        _gen(tmp_path, image_size=8)
    with pytest.raises(ValueError, match="split"):
        ds.render_scene(0, "test", 0)


def test_cli(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "prepare_digitscapes", REPO / "datasets/prepare_digitscapes.py"
    )
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    argv = ["--root", str(tmp_path), "--image-size", "64", "--train", "2", "--val", "1", "--anomaly-val", "1"]
    assert cli.main([*argv, "--workers", "1"]) == 0
    assert "written to" in capsys.readouterr().out
    assert cli.main(argv) == 0
    assert "up to date" in capsys.readouterr().out
    assert cli.main([*argv, "--seed", "3"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main([*argv, "--seed", "3", "--overwrite"]) == 0


def test_generator_imports_neither_torch_nor_detectron2():
    """The generator runs where only numpy, Pillow, OpenCV and scikit-learn are installed."""
    code = (
        "import sys, gmmseg_datasets.digitscapes; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'detectron2', 'gmmseg'}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"
