"""The paper's public datasets: tiny fixtures in each dataset's exact on-disk format, converted with the
prepare functions, loaded through Detectron2's DatasetCatalog, and every missing/malformed path named."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from gmmseg.data.datasets import (
    PUBLIC_DATASET_NAMES,
    register_all_public_datasets,
    register_anomaly_datasets,
)
from gmmseg.data.datasets.register_coco_stuff import coco_stuff_categories
from gmmseg.data.folder_dataset import DatasetFormatError, ensure_registered
from gmmseg_datasets.ade20k import prepare_ade20k
from gmmseg_datasets.cityscapes import cityscapes_ids_to_train_ids, prepare_cityscapes
from gmmseg_datasets.coco_stuff import coco_stuff_lut, prepare_coco_stuff_164k
from gmmseg_datasets.road_anomaly import prepare_road_anomaly

REPO = Path(__file__).resolve().parents[1]
H, W = 16, 24


@pytest.fixture(autouse=True)
def data_root(tmp_path, monkeypatch) -> Path:
    """Point $DETECTRON2_DATASETS at an empty folder; the registered loaders read it at call time."""
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    register_all_public_datasets()  # as set-up does; again for each test, after any fixed-root one
    return tmp_path


def _rgb(path: Path, size: tuple[int, int] = (H, W), seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


def _gray(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(path)  # 2-D uint8: mode L


def _load(path: Path) -> np.ndarray:
    return np.array(Image.open(path))


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "datasets" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- Cityscapes -------------------------------------------------------------------------------------------

CITY_FRAMES = {"train": ["aachen_000000_000019", "aachen_000001_000019"], "val": ["frankfurt_000000_000294"]}


def _city_polygons(seed: int) -> dict:
    """A gtFine_polygons.json: full-image 'unlabeled', road, sky, a car with a license plate, a cargroup,
    a deleted person, and an 'out of roi' strip, drawn in this order like the real files."""
    shift = seed % 3
    return {
        "imgHeight": H,
        "imgWidth": W,
        "objects": [
            {"label": "unlabeled", "polygon": [[0, 0], [W, 0], [W, H], [0, H]]},
            {"label": "sky", "polygon": [[0, 0], [W, 0], [W, 6], [0, 6]]},
            {"label": "road", "polygon": [[0, 10], [W, 10], [W, H], [0, H]]},
            {"label": "car", "polygon": [[2 + shift, 7], [10, 7], [10, 13], [2 + shift, 13]]},
            {"label": "license plate", "polygon": [[4, 11], [7, 11], [7, 12], [4, 12]]},
            {"label": "cargroup", "polygon": [[14, 7], [20, 7], [20, 11], [14, 11]]},
            {"label": "person", "polygon": [[0, 0], [5, 0], [5, 5], [0, 5]], "deleted": 1},
            {"label": "out of roi", "polygon": [[W - 2, 0], [W, 0], [W, H], [W - 2, H]]},
        ],
    }


def _write_cityscapes(root: Path, with_json: bool = True) -> None:
    for split, frames in CITY_FRAMES.items():
        for i, frame in enumerate(frames):
            city = frame.split("_")[0]
            _rgb(root / "cityscapes/leftImg8bit" / split / city / f"{frame}_leftImg8bit.png", seed=i)
            if with_json:
                path = root / "cityscapes/gtFine" / split / city / f"{frame}_gtFine_polygons.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(_city_polygons(i)))


def test_cityscapes_label_ids_to_train_ids_agree_with_cityscapesscripts(data_root):
    from cityscapesscripts.helpers.labels import id2label, labels

    ids = [lab.id for lab in labels]
    assert sorted(ids) == [-1, *range(34)]
    expected = {i: (id2label[i].trainId if 0 <= id2label[i].trainId < 255 else 255) for i in ids}
    got = cityscapes_ids_to_train_ids(np.array([ids], dtype=np.int16))[0]
    assert dict(zip(ids, got.tolist())) == expected
    assert sorted(v for v in expected.values() if v != 255) == list(range(19))

    # the same through a labelIds PNG fixture and the prepare function (ids 0..33 on one image)
    frame = "bonn_000000_000019"
    _rgb(data_root / "cityscapes/leftImg8bit/train/bonn" / f"{frame}_leftImg8bit.png", size=(2, 17))
    label_ids = np.arange(34, dtype=np.uint8).reshape(2, 17)
    _gray(label_ids, data_root / "cityscapes/gtFine/train/bonn" / f"{frame}_gtFine_labelIds.png")
    assert prepare_cityscapes(splits=["train"], source="labelIds") == 1
    out = _load(data_root / "cityscapes/gtFine/train/bonn" / f"{frame}_gtFine_labelTrainIds.png")
    assert out.tolist() == np.vectorize(expected.get)(label_ids).tolist()

    with pytest.raises(DatasetFormatError, match="34, 255.*not Cityscapes labelIds"):
        cityscapes_ids_to_train_ids(np.array([[34, 255, 7]], dtype=np.uint8))


def test_cityscapes_prepare_matches_json2label_img_and_registers(data_root, tmp_path_factory):
    from cityscapesscripts.preparation.json2labelImg import json2labelImg

    _write_cityscapes(data_root)
    assert prepare_cityscapes() == 3
    reference_dir = tmp_path_factory.mktemp("reference")
    for split, frames in CITY_FRAMES.items():
        for frame in frames:
            gt_city = data_root / "cityscapes/gtFine" / split / frame.split("_")[0]
            ours = _load(gt_city / f"{frame}_gtFine_labelTrainIds.png")
            json2labelImg(
                str(gt_city / f"{frame}_gtFine_polygons.json"), str(reference_dir / "t.png"), "trainIds"
            )
            json2labelImg(str(gt_city / f"{frame}_gtFine_polygons.json"), str(reference_dir / "i.png"), "ids")
            np.testing.assert_array_equal(ours, _load(reference_dir / "t.png"))  # official trainIds
            # labelIds -> trainIds gives the same file as rasterising the polygons
            np.testing.assert_array_equal(ours, cityscapes_ids_to_train_ids(_load(reference_dir / "i.png")))
            assert set(np.unique(ours)) <= {0, 10, 13, 255}  # road, sky, car (cargroup -> car), ignore

    dicts = DatasetCatalog.get("cityscapes_fine_sem_seg_train")
    assert [d["image_id"] for d in dicts] == CITY_FRAMES["train"]
    first = dicts[0]
    assert first["file_name"].endswith(
        "cityscapes/leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png"
    )
    assert first["sem_seg_file_name"].endswith(
        "gtFine/train/aachen/aachen_000000_000019_gtFine_labelTrainIds.png"
    )
    assert (first["height"], first["width"]) == (H, W) and "ood_file_name" not in first
    assert len(DatasetCatalog.get("cityscapes_fine_sem_seg_val")) == 1

    from cityscapesscripts.helpers.labels import trainId2label

    meta = MetadataCatalog.get("cityscapes_fine_sem_seg_val")
    assert meta.stuff_classes == [trainId2label[i].name for i in range(19)]
    assert meta.stuff_colors == [tuple(trainId2label[i].color) for i in range(19)]
    assert meta.ignore_label == 255 and meta.evaluator_type == "sem_seg"
    assert meta.stuff_dataset_id_to_contiguous_id[26] == 13  # car


def test_cityscapes_errors_name_the_path(data_root):
    with pytest.raises(DatasetFormatError, match=str(data_root / "cityscapes/leftImg8bit/train")):
        DatasetCatalog.get("cityscapes_fine_sem_seg_train")
    with pytest.raises(
        DatasetFormatError, match=str(data_root / "cityscapes/gtFine/train") + ".*missing folder"
    ):
        prepare_cityscapes()

    _write_cityscapes(data_root)
    label = data_root / "cityscapes/gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelTrainIds.png"
    with pytest.raises(DatasetFormatError, match=f"{label}: missing label.*prepare_cityscapes.py"):
        DatasetCatalog.get("cityscapes_fine_sem_seg_val")
    with pytest.raises(DatasetFormatError, match="_gtFine_labelIds.png: missing"):
        prepare_cityscapes(source="labelIds")

    bad = data_root / "cityscapes/gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_polygons.json"
    bad.write_text(
        json.dumps({"imgHeight": H, "imgWidth": W, "objects": [{"label": "dragon", "polygon": []}]})
    )
    with pytest.raises(DatasetFormatError, match=f"{bad}: unknown Cityscapes label 'dragon'"):
        prepare_cityscapes(splits=["val"])
    bad.write_text("{not json")
    with pytest.raises(DatasetFormatError, match=f"{bad}: not a Cityscapes polygon annotation"):
        prepare_cityscapes(splits=["val"])


# --- ADE20K -----------------------------------------------------------------------------------------------

ADE_FRAMES = {"training": ["ADE_train_00000001", "ADE_train_00000002"], "validation": ["ADE_val_00000001"]}


def _write_ade(root: Path) -> np.ndarray:
    raw = np.arange(H * W).reshape(H, W) % 151  # every raw value 0..150
    for split, frames in ADE_FRAMES.items():
        for i, frame in enumerate(frames):
            _rgb(root / "ADEChallengeData2016/images" / split / f"{frame}.jpg", seed=i)
            _gray(raw, root / "ADEChallengeData2016/annotations" / split / f"{frame}.png")
    return raw


def test_ade20k_prepare_and_register(data_root):
    from detectron2.data.datasets.builtin_meta import ADE20K_SEM_SEG_CATEGORIES

    raw = _write_ade(data_root)
    assert prepare_ade20k() == 3
    out = _load(data_root / "ADEChallengeData2016/annotations_detectron2/validation/ADE_val_00000001.png")
    np.testing.assert_array_equal(out, np.where(raw == 0, 255, raw - 1))
    assert out.max() == 255 and out[out != 255].max() == 149

    dicts = DatasetCatalog.get("ade20k_sem_seg_train")
    assert [d["image_id"] for d in dicts] == ADE_FRAMES["training"]
    assert dicts[0]["sem_seg_file_name"].endswith("annotations_detectron2/training/ADE_train_00000001.png")
    assert dicts[0]["file_name"].endswith("images/training/ADE_train_00000001.jpg")
    assert (dicts[0]["height"], dicts[0]["width"]) == (H, W)
    meta = MetadataCatalog.get("ade20k_sem_seg_val")
    assert meta.stuff_classes == list(ADE20K_SEM_SEG_CATEGORIES) and len(meta.stuff_classes) == 150
    assert (
        len(set(meta.stuff_colors)) == 150 and meta.ignore_label == 255 and meta.evaluator_type == "sem_seg"
    )


def test_ade20k_errors_name_the_path(data_root):
    with pytest.raises(DatasetFormatError, match=str(data_root / "ADEChallengeData2016/images/validation")):
        DatasetCatalog.get("ade20k_sem_seg_val")
    with pytest.raises(
        DatasetFormatError, match=str(data_root / "ADEChallengeData2016/annotations/training")
    ):
        prepare_ade20k()
    _write_ade(data_root)
    labels = data_root / "ADEChallengeData2016/annotations_detectron2/validation"
    with pytest.raises(DatasetFormatError, match=f"{labels}: missing folder.*prepare_ade20k_sem_seg.py"):
        DatasetCatalog.get("ade20k_sem_seg_val")
    prepare_ade20k()
    (labels / "ADE_val_00000001.png").unlink()
    with pytest.raises(DatasetFormatError, match=f"{labels / 'ADE_val_00000001.png'}: missing label"):
        DatasetCatalog.get("ade20k_sem_seg_val")
    bad = data_root / "ADEChallengeData2016/annotations/training/ADE_train_00000001.png"
    _gray(np.full((H, W), 151), bad)
    with pytest.raises(DatasetFormatError, match=f"{bad}: values 151 exceed 150"):
        prepare_ade20k()


# --- COCO-Stuff-164k --------------------------------------------------------------------------------------

# stuffthingmaps value (= COCO-Stuff id - 1) -> contiguous id; 11, 25, ... are the unused thing ids
COCO_CASES = {0: 0, 10: 10, 11: 255, 12: 11, 25: 255, 89: 79, 90: 255, 91: 80, 148: 137, 181: 170, 255: 255}


def _write_coco(root: Path) -> np.ndarray:
    raw = np.resize(np.array(list(COCO_CASES), dtype=np.uint8), (H, W))
    for split, ids in (("train2017", ["000000000009", "000000000025"]), ("val2017", ["000000000139"])):
        for i, image_id in enumerate(ids):
            _rgb(root / "coco" / split / f"{image_id}.jpg", seed=i)
            _gray(raw, root / "coco/stuffthingmaps" / split / f"{image_id}.png")
    return raw


def test_coco_stuff_class_list_is_the_standard_171():
    cats = coco_stuff_categories()
    ids = [c["id"] for c in cats]
    assert len(cats) == 171 and ids == sorted(ids) and len(set(c["name"] for c in cats)) == 171
    assert sorted(set(range(1, 183)) - set(ids)) == [12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91]
    by_name = {c["name"]: c["id"] for c in cats}
    assert (by_name["person"], by_name["toothbrush"], by_name["banner"]) == (1, 90, 92)
    assert (by_name["road"], by_name["sky-other"], by_name["tree"], by_name["wood"]) == (149, 157, 169, 182)
    lut = coco_stuff_lut()
    assert {v: int(lut[v]) for v in COCO_CASES} == COCO_CASES
    assert (lut[182:255] == -1).all()


def test_coco_stuff_prepare_and_register(data_root):
    raw = _write_coco(data_root)
    assert prepare_coco_stuff_164k() == 3
    out = _load(data_root / "coco/stuffthingmaps_detectron2/val2017/000000000139.png")
    np.testing.assert_array_equal(out, np.vectorize(COCO_CASES.get)(raw))

    dicts = DatasetCatalog.get("coco_2017_train_stuff_sem_seg")
    assert [d["image_id"] for d in dicts] == ["000000000009", "000000000025"]
    assert dicts[1]["file_name"].endswith("coco/train2017/000000000025.jpg")
    assert dicts[1]["sem_seg_file_name"].endswith("coco/stuffthingmaps_detectron2/train2017/000000000025.png")
    meta = MetadataCatalog.get("coco_2017_val_stuff_sem_seg")
    assert len(meta.stuff_classes) == 171 and meta.stuff_classes[0] == "person"
    assert meta.stuff_classes[80] == "banner" and meta.stuff_classes[-1] == "wood"
    assert len(meta.stuff_colors) == 171 and meta.ignore_label == 255 and meta.evaluator_type == "sem_seg"
    assert meta.stuff_dataset_id_to_contiguous_id[92] == 80


def test_coco_stuff_errors_name_the_path(data_root):
    with pytest.raises(DatasetFormatError, match=str(data_root / "coco/stuffthingmaps/train2017")):
        prepare_coco_stuff_164k()
    with pytest.raises(DatasetFormatError, match=str(data_root / "coco/val2017")):
        DatasetCatalog.get("coco_2017_val_stuff_sem_seg")
    _write_coco(data_root)
    bad = data_root / "coco/stuffthingmaps/val2017/000000000139.png"
    _gray(np.full((H, W), 200), bad)
    with pytest.raises(DatasetFormatError, match=f"{bad}: values 200 are no COCO-Stuff ids"):
        prepare_coco_stuff_164k()
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(bad)
    with pytest.raises(DatasetFormatError, match=f"{bad}: expected a single-channel label PNG"):
        prepare_coco_stuff_164k()


# --- Fishyscapes ------------------------------------------------------------------------------------------


def _write_fishyscapes(root: Path, subset: str, count: int) -> None:
    for i in range(count):
        _rgb(root / subset / "original" / f"{i}.png", seed=i)
        ood = np.zeros((H, W), np.uint8)
        ood[4:8, 5:9] = 1
        ood[:2] = 255
        _gray(ood, root / subset / "labels" / f"{i}.png")


@pytest.mark.parametrize(
    "name,subset", [("fs_lost_and_found_val", "fs_lost_and_found"), ("fs_static_val", "fs_static")]
)
def test_fishyscapes_register(data_root, name, subset):
    from cityscapesscripts.helpers.labels import trainId2label

    _write_fishyscapes(data_root, subset, 3)
    dicts = DatasetCatalog.get(name)
    assert [d["image_id"] for d in dicts] == ["0", "1", "2"]
    assert set(dicts[0]) == {"file_name", "ood_file_name", "image_id", "height", "width"}
    assert dicts[2]["ood_file_name"] == str(data_root / subset / "labels" / "2.png")
    assert set(np.unique(_load(Path(dicts[0]["ood_file_name"])))) == {0, 1, 255}
    meta = MetadataCatalog.get(name)
    assert meta.evaluator_type == "anomaly" and meta.ignore_label == 255 and meta.has_ood
    assert meta.stuff_classes == [trainId2label[i].name for i in range(19)]


def test_fishyscapes_errors_name_the_path(data_root):
    with pytest.raises(DatasetFormatError, match=str(data_root / "fs_static/original") + ": missing folder"):
        DatasetCatalog.get("fs_static_val")
    _rgb(data_root / "fs_lost_and_found/original/0.png")
    with pytest.raises(DatasetFormatError, match=str(data_root / "fs_lost_and_found/labels")):
        DatasetCatalog.get("fs_lost_and_found_val")
    _gray(np.zeros((H + 1, W)), data_root / "fs_lost_and_found/labels/0.png")
    with pytest.raises(DatasetFormatError, match="labels/0.png: size 24x17 differs from its image"):
        DatasetCatalog.get("fs_lost_and_found_val")
    _rgb(data_root / "fs_lost_and_found/original/1.png")
    with pytest.raises(DatasetFormatError, match="labels/1.png: missing anomaly mask"):
        DatasetCatalog.get("fs_lost_and_found_val")


# --- Road Anomaly -----------------------------------------------------------------------------------------

RA_FRAMES = ["animals01_Guiness_sheep", "cones03_roadworks", "tractor02_field"]


def _write_road_anomaly(root: Path) -> None:
    release = root / "RoadAnomaly_jpg"
    (release / "frames").mkdir(parents=True)
    (release / "frame_list.json").write_text(json.dumps([f"{f}.jpg" for f in RA_FRAMES]))
    for i, frame in enumerate(RA_FRAMES):
        _rgb(release / "frames" / f"{frame}.jpg", seed=i)
        semantic = np.zeros((H, W), np.uint8)
        semantic[5 : 10 + i, 3:12] = 2
        _gray(semantic, release / "frames" / f"{frame}.labels" / "labels_semantic.png")


def test_road_anomaly_prepare_and_register(data_root):
    _write_road_anomaly(data_root)
    assert prepare_road_anomaly() == 3
    for i, frame in enumerate(RA_FRAMES):
        ood = _load(data_root / "road_anomaly/labels" / f"{frame}.png")
        assert set(np.unique(ood)) == {0, 1} and int(ood.sum()) == (5 + i) * 9  # no void
        assert (data_root / "road_anomaly/original" / f"{frame}.jpg").read_bytes() == (
            data_root / "RoadAnomaly_jpg/frames" / f"{frame}.jpg"
        ).read_bytes()
    dicts = DatasetCatalog.get("road_anomaly")
    assert [d["image_id"] for d in dicts] == RA_FRAMES and "sem_seg_file_name" not in dicts[0]
    assert dicts[0]["ood_file_name"].endswith("road_anomaly/labels/animals01_Guiness_sheep.png")
    meta = MetadataCatalog.get("road_anomaly")
    assert meta.evaluator_type == "anomaly" and len(meta.stuff_classes) == 19 and meta.ignore_label == 255


def test_road_anomaly_errors_name_the_path(data_root):
    with pytest.raises(
        DatasetFormatError, match=str(data_root / "RoadAnomaly_jpg/frames") + ": missing folder"
    ):
        prepare_road_anomaly()
    with pytest.raises(DatasetFormatError, match=str(data_root / "road_anomaly/original")):
        DatasetCatalog.get("road_anomaly")
    _write_road_anomaly(data_root)
    label = data_root / "RoadAnomaly_jpg/frames" / f"{RA_FRAMES[1]}.labels" / "labels_semantic.png"
    _gray(np.full((H, W), 7), label)
    with pytest.raises(DatasetFormatError, match=f"{label}: values 7 are not Road Anomaly labels"):
        prepare_road_anomaly()
    label.unlink()
    with pytest.raises(DatasetFormatError, match=f"{label}: missing"):
        prepare_road_anomaly()


# --- Shared behaviour -------------------------------------------------------------------------------------


def test_all_names_registered_lazily_and_ensure_registered_returns(data_root):
    for name in PUBLIC_DATASET_NAMES:
        ensure_registered(name)  # registered (data_root): returns without touching the (empty) root
        with pytest.raises(DatasetFormatError, match=str(data_root)):
            DatasetCatalog.get(name)  # fails on use, naming a path under $DETECTRON2_DATASETS


def test_explicit_root_and_prepare_scripts(tmp_path_factory, data_root, capsys):
    other = tmp_path_factory.mktemp("other_root")
    _write_fishyscapes(other, "fs_static", 2)
    try:
        register_anomaly_datasets(root=other)
        assert len(DatasetCatalog.get("fs_static_val")) == 2
    finally:
        register_all_public_datasets()
    with pytest.raises(DatasetFormatError):
        DatasetCatalog.get("fs_static_val")  # back to $DETECTRON2_DATASETS (empty)

    # the scripts are thin: they exit 1 with the path on bad input and succeed on a fixture
    for script in ("prepare_cityscapes", "prepare_ade20k_sem_seg", "prepare_coco_stuff_164k_sem_seg"):
        assert _script(script).main(["--root", str(other), "--workers", "1"]) == 1
        assert str(other) in capsys.readouterr().err
    assert _script("prepare_road_anomaly").main(["--root", str(other)]) == 1
    _write_road_anomaly(other)
    assert _script("prepare_road_anomaly").main(["--root", str(other)]) == 0
    assert len(list((other / "road_anomaly/labels").glob("*.png"))) == 3


def test_import_loads_no_offline_preparation_and_registers_no_dataset():
    """gmmseg registers the datasets, at set-up and not on import; the conversions (gmmseg_datasets) are
    only for the prepare scripts."""
    code = (
        "import sys, gmmseg.d2; from detectron2.data import DatasetCatalog; "
        "print(sorted(m for m in sys.modules if m.startswith('gmmseg_datasets')), "
        "'fs_static_val' in DatasetCatalog.list())"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip().splitlines()[-1] == "[] False"
