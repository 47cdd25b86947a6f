"""Tests for gmmseg.evaluation.sem_seg against independent references (sklearn, explicit loops)."""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import uuid

import numpy as np
import pytest
import torch
from conftest import run_two_gloo_workers, save_gloo_worker_result
from detectron2.data import MetadataCatalog
from PIL import Image
from sklearn.metrics import accuracy_score, jaccard_score, recall_score
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from gmmseg.evaluation import (
    SemSegEvaluator,
    confusion_matrix,
    expected_calibration_error,
    segmentation_metrics,
)

IGNORE = 255
CLASSES = ["road", "car", "sky", "tree", "unused"]  # "unused" never appears in gt nor prediction


# --------------------------------------------------------------------------------------------------
# independent references
# --------------------------------------------------------------------------------------------------
def ref_metrics(gt: np.ndarray, pred: np.ndarray, num_classes: int, ignore: int) -> dict:
    """IoU / ACC via sklearn on the non-ignored pixels; NaN for classes a metric is undefined for."""
    keep = gt != ignore
    g, p = gt[keep], pred[keep]
    labels = list(range(num_classes))
    iou = jaccard_score(g, p, labels=labels, average=None, zero_division=0.0)
    rec = recall_score(g, p, labels=labels, average=None, zero_division=0.0)
    in_gt = np.isin(labels, g)
    in_any = in_gt | np.isin(labels, p)
    iou = np.where(in_any, iou, np.nan)
    acc = np.where(in_gt, rec, np.nan)
    freq = np.array([(g == c).sum() for c in labels]) / g.size
    return {
        "iou": 100 * iou,
        "acc": 100 * acc,
        "mIoU": 100 * iou[in_any].mean(),
        "mACC": 100 * acc[in_gt].mean(),
        "pACC": 100 * accuracy_score(g, p),
        "fwIoU": 100 * float(np.sum(freq[in_gt] * iou[in_gt])),
    }


def ref_ece(conf: np.ndarray, correct: np.ndarray, num_bins: int) -> float:
    """Textbook ECE with an explicit loop over bins: [k/B, (k+1)/B), the last bin closed at 1."""
    conf = np.asarray(conf, dtype=np.float64).ravel()
    correct = np.asarray(correct, dtype=bool).ravel()
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    ece = 0.0
    for k in range(num_bins):
        lo, hi = edges[k], edges[k + 1]
        member = (conf >= lo) & ((conf < hi) if k < num_bins - 1 else (conf <= hi))
        if member.any():
            ece += member.sum() / conf.size * abs(correct[member].mean() - conf[member].mean())
    return ece


def calibration_bins(
    confidence: np.ndarray, correct: np.ndarray, num_bins: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The evaluator's reliability-bin sums (pixel count, summed confidence, correct pixels), in NumPy:
    bin of a confidence ``c`` is ``min(floor(c * B), B - 1)``, so ``c == 1`` lands in the last bin."""
    conf = np.asarray(confidence, dtype=np.float64).reshape(-1)
    corr = np.asarray(correct).reshape(-1).astype(bool)
    idx = np.clip(np.floor(conf * num_bins), 0, num_bins - 1).astype(np.int64)
    counts = np.bincount(idx, minlength=num_bins).astype(np.int64)
    conf_sums = np.bincount(idx, weights=conf, minlength=num_bins).astype(np.float64)
    correct_sums = np.bincount(idx[corr], minlength=num_bins).astype(np.int64)
    return counts, conf_sums, correct_sums


def test_confusion_matrix_matches_sklearn():
    rng = np.random.default_rng(0)
    c = 6
    gt = rng.integers(0, c, size=(37, 41))
    gt[rng.random(gt.shape) < 0.2] = IGNORE
    pred = rng.integers(0, c, size=gt.shape)
    cm = confusion_matrix(gt.astype(np.uint8), pred, c, IGNORE)
    keep = gt != IGNORE
    expected = sk_confusion_matrix(gt[keep], pred[keep], labels=list(range(c)))
    assert cm.dtype == np.int64 and cm.shape == (c, c)
    np.testing.assert_array_equal(cm, expected)
    assert cm.sum() == keep.sum()  # ignored pixels are not counted


def test_confusion_matrix_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match=r"\[7\]"):
        confusion_matrix(np.array([0, 7, IGNORE]), np.array([0, 1, 9]), 3, IGNORE)


def test_segmentation_metrics_match_sklearn():
    rng = np.random.default_rng(1)
    c = len(CLASSES)
    gt = rng.choice([0, 1, 2], size=5000, p=[0.6, 0.3, 0.1])  # class 3 never in gt
    pred = np.where(rng.random(gt.size) < 0.7, gt, rng.choice([0, 1, 2, 3], size=gt.size))
    gt[rng.random(gt.size) < 0.1] = IGNORE
    res = segmentation_metrics(confusion_matrix(gt, pred, c, IGNORE), CLASSES)
    ref = ref_metrics(gt, pred, c, IGNORE)

    assert list(res)[:2] == ["mIoU", "fwIoU"]
    for i, name in enumerate(CLASSES):
        np.testing.assert_allclose(res[f"IoU-{name}"], ref["iou"][i], rtol=1e-12)
        np.testing.assert_allclose(res[f"ACC-{name}"], ref["acc"][i], rtol=1e-12)
    for key in ("mIoU", "fwIoU", "mACC", "pACC"):
        assert res[key] == pytest.approx(ref[key], rel=1e-12), key
    # predicted-only class: IoU 0 (counts in mIoU), accuracy undefined; absent class: both NaN
    assert res["IoU-tree"] == 0.0 and math.isnan(res["ACC-tree"])
    assert math.isnan(res["IoU-unused"]) and math.isnan(res["ACC-unused"])
    assert res["mIoU"] == pytest.approx(np.mean([res[f"IoU-{n}"] for n in CLASSES[:4]]))


def test_segmentation_metrics_perfect_and_empty():
    cm = np.diag([5, 0, 3]).astype(np.int64)
    res = segmentation_metrics(cm, ["a", "b", "c"])
    assert res["mIoU"] == res["mACC"] == res["pACC"] == res["fwIoU"] == 100.0
    assert math.isnan(res["IoU-b"])
    empty = segmentation_metrics(np.zeros((2, 2), np.int64), ["a", "b"])
    assert all(math.isnan(v) for v in empty.values())
    with pytest.raises(ValueError):
        segmentation_metrics(cm, ["a", "b"])


def test_calibration_bins_edges_and_ece_extremes():
    b = 8  # edges k/8 are exact in binary, so the expected bins are unambiguous
    conf = np.array([0.0, 0.125, 0.124, 0.5, 0.999, 1.0, 1.0])
    correct = np.array([0, 1, 1, 0, 1, 1, 0], dtype=bool)
    counts, conf_sums, correct_sums = calibration_bins(conf, correct, b)
    np.testing.assert_array_equal(counts, [2, 1, 0, 0, 1, 0, 0, 3])
    np.testing.assert_array_equal(correct_sums, [1, 1, 0, 0, 0, 0, 0, 2])
    np.testing.assert_allclose(conf_sums, [0.124, 0.125, 0, 0, 0.5, 0, 0, 2.999])
    assert counts.dtype == np.int64 and correct_sums.dtype == np.int64 and conf_sums.dtype == np.float64
    assert expected_calibration_error(counts, conf_sums, correct_sums) == pytest.approx(
        ref_ece(conf, correct, b)
    )

    ones = np.ones(10)
    assert expected_calibration_error(*calibration_bins(ones, np.ones(10, bool), 15)) == 0.0
    assert expected_calibration_error(*calibration_bins(ones, np.zeros(10, bool), 15)) == 1.0
    assert expected_calibration_error(*calibration_bins(np.zeros(4), np.ones(4, bool), 15)) == 1.0
    assert math.isnan(expected_calibration_error(*calibration_bins(np.zeros(0), np.zeros(0, bool), 15)))


@pytest.mark.parametrize("num_bins", [1, 10, 15])
def test_ece_matches_loop_reference(num_bins):
    rng = np.random.default_rng(num_bins)
    conf = np.concatenate([rng.beta(5, 2, size=4000), [0.0, 0.0, 1.0, 1.0, 1.0]])
    correct = rng.random(conf.size) < conf**1.5  # over-confident model
    counts, conf_sums, correct_sums = calibration_bins(conf, correct, num_bins)
    ece = expected_calibration_error(counts, conf_sums, correct_sums)
    assert counts.sum() == conf.size and counts[0] >= 2 and counts[-1] >= 3
    assert 0.0 <= ece <= 1.0
    assert ece == pytest.approx(ref_ece(conf, correct, num_bins), abs=1e-12)
    # digitize-based cross-check of the bin counts (interior confidences are never on an edge)
    idx = np.clip(np.digitize(conf, np.linspace(0, 1, num_bins + 1)) - 1, 0, num_bins - 1)
    np.testing.assert_array_equal(counts, np.bincount(idx, minlength=num_bins))


# --------------------------------------------------------------------------------------------------
# evaluator end to end
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def dataset_name():
    name = f"gmmseg_test_semseg_{uuid.uuid4().hex[:8]}"
    MetadataCatalog.get(name).set(stuff_classes=list(CLASSES), ignore_label=IGNORE)
    yield name
    MetadataCatalog.remove(name)


def make_images(tmp_path, seed: int = 0, sizes=((12, 16), (9, 7), (20, 11), (5, 5))):
    """gt PNGs (classes 0..3 plus ignore; class 4 absent) and matching random logits."""
    rng = np.random.default_rng(seed)
    images = []
    for i, (h, w) in enumerate(sizes):
        gt = rng.integers(0, 3, size=(h, w)).astype(np.uint8)
        gt[rng.random((h, w)) < 0.15] = IGNORE
        path = str(tmp_path / f"gt_{seed}_{i}.png")
        Image.fromarray(gt).save(path)
        logits = rng.normal(size=(len(CLASSES), h, w)).astype(np.float32) * 2
        logits[4] -= 30  # "unused" is never predicted
        onehot = np.eye(len(CLASSES), dtype=np.float32)[np.where(gt == IGNORE, 0, gt)].transpose(2, 0, 1)
        logits += 2.5 * onehot  # mostly right, not always
        images.append({"file_name": f"img_{i}.jpg", "sem_seg_file_name": path, "gt": gt, "logits": logits})
    return images


def softmax_np(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=0, keepdims=True))
    return e / e.sum(axis=0, keepdims=True)


def run_evaluator(evaluator, images, use_logits: bool = False, batch: int = 2):
    evaluator.reset()
    for s in range(0, len(images), batch):
        chunk = images[s : s + batch]
        inputs = [
            {"file_name": im["file_name"], "sem_seg_file_name": im["sem_seg_file_name"]} for im in chunk
        ]
        outputs = [
            {"sem_seg": torch.from_numpy(im["logits"] if use_logits else softmax_np(im["logits"]))}
            for im in chunk
        ]
        evaluator.process(inputs, outputs)
    return evaluator.evaluate()


def test_evaluator_end_to_end(tmp_path, dataset_name):
    images = make_images(tmp_path)
    out_dir = tmp_path / "eval"
    ev = SemSegEvaluator(dataset_name, distributed=False, output_dir=str(out_dir), num_calibration_bins=10)
    results = run_evaluator(ev, images)
    assert list(results) == ["sem_seg"]
    res = results["sem_seg"]

    probs = [softmax_np(im["logits"]) for im in images]
    gt = np.concatenate([im["gt"].ravel() for im in images]).astype(np.int64)
    pred = np.concatenate([p.argmax(0).ravel() for p in probs])
    conf = np.concatenate([p.max(0).ravel() for p in probs])
    ref = ref_metrics(gt, pred, len(CLASSES), IGNORE)
    for key in ("mIoU", "fwIoU", "mACC", "pACC"):
        assert res[key] == pytest.approx(ref[key], rel=1e-9), key
    for i, name in enumerate(CLASSES):
        np.testing.assert_allclose(res[f"IoU-{name}"], ref["iou"][i], rtol=1e-9)
        np.testing.assert_allclose(res[f"ACC-{name}"], ref["acc"][i], rtol=1e-9)
    assert math.isnan(res["IoU-unused"])
    keep = gt != IGNORE
    assert 0 < res["ECE"] <= 100
    assert res["ECE"] == pytest.approx(100 * ref_ece(conf[keep], pred[keep] == gt[keep], 10), rel=1e-6)
    assert 50 < res["pACC"] < 100  # sanity: the synthetic model is good but not perfect

    report = json.loads((out_dir / "sem_seg_evaluation.json").read_text())
    np.testing.assert_array_equal(
        report["confusion_matrix"],
        sk_confusion_matrix(gt[keep], pred[keep], labels=list(range(len(CLASSES)))),
    )
    assert report["metrics"]["mIoU"] == pytest.approx(res["mIoU"])
    assert report["metrics"]["IoU-unused"] is None  # NaN written as null: standard JSON
    bins = report["reliability_bins"]
    assert len(bins) == 10 and sum(r["count"] for r in bins) == keep.sum()
    png = out_dir / "reliability_diagram.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert min(Image.open(png).size) > 100

    # reset() clears state: a second round on one image equals that image alone
    one = run_evaluator(ev, images[:1])["sem_seg"]
    ref1 = ref_metrics(images[0]["gt"].ravel(), probs[0].argmax(0).ravel(), len(CLASSES), IGNORE)
    assert one["pACC"] == pytest.approx(ref1["pACC"])


def test_logits_are_softmaxed_with_one_warning(tmp_path, dataset_name, caplog):
    images = make_images(tmp_path, seed=3)
    with caplog.at_level(logging.WARNING, logger="gmmseg.evaluation.sem_seg"):
        from_probs = run_evaluator(SemSegEvaluator(dataset_name, distributed=False), images)["sem_seg"]
        assert not [r for r in caplog.records if "softmax" in r.getMessage()]
        from_logits = run_evaluator(SemSegEvaluator(dataset_name, distributed=False), images, use_logits=True)
    warnings = [r for r in caplog.records if "softmax" in r.getMessage()]
    assert len(warnings) == 1  # one-time, although 4 images were logits
    from_logits = from_logits["sem_seg"]
    assert from_logits.keys() == from_probs.keys()
    for k, v in from_probs.items():
        assert from_logits[k] == pytest.approx(v, rel=1e-5, nan_ok=True), k
    assert from_logits["ECE"] > 0


def test_shape_mismatch_raises_with_file_name(tmp_path, dataset_name):
    images = make_images(tmp_path, seed=4, sizes=((6, 8),))
    ev = SemSegEvaluator(dataset_name, distributed=False)
    bad = torch.softmax(torch.randn(len(CLASSES), 8, 6), dim=0)  # transposed H, W
    with pytest.raises(ValueError, match="gt_4_0.png") as err:
        ev.process([{"sem_seg_file_name": images[0]["sem_seg_file_name"]}], [{"sem_seg": bad}])
    assert "(6, 8)" in str(err.value) and "(8, 6)" in str(err.value)


def test_out_of_range_label_raises_with_file_name(tmp_path, dataset_name):
    gt = np.zeros((4, 4), np.uint8)
    gt[0, 0], gt[1, 1], gt[2, 2] = 7, IGNORE, 4  # 7 is invalid, 255 ignored, 4 valid
    path = tmp_path / "bad_labels.png"
    Image.fromarray(gt).save(path)
    ev = SemSegEvaluator(dataset_name, distributed=False)
    probs = torch.full((len(CLASSES), 4, 4), 1.0 / len(CLASSES))
    with pytest.raises(ValueError, match="bad_labels.png") as err:
        ev.process([{"sem_seg_file_name": str(path)}], [{"sem_seg": probs}])
    assert "[7]" in str(err.value)


def test_constructor_options(tmp_path, dataset_name):
    with pytest.raises(ValueError, match="num_classes"):
        SemSegEvaluator(dataset_name, num_classes=3)
    # ignore_label argument overrides metadata: label 2 becomes "ignored", so only 2 pixels count
    gt = np.array([[0, 1, 2, 2]], np.uint8)
    path = tmp_path / "gt.png"
    Image.fromarray(gt).save(path)
    probs = torch.zeros(len(CLASSES), 1, 4)
    probs[0] = 1.0  # predicts class 0 everywhere
    ev = SemSegEvaluator(dataset_name, distributed=False, ignore_label=2)
    ev.process([{"sem_seg_file_name": str(path)}], [{"sem_seg": probs}])
    res = ev.evaluate()["sem_seg"]
    assert res["pACC"] == 50.0 and res["ECE"] == 50.0
    ev.reset()
    assert ev.evaluate() == {}  # nothing processed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_evaluator_on_cuda_matches_cpu(tmp_path, dataset_name):
    images = make_images(tmp_path, seed=5)
    cpu = run_evaluator(SemSegEvaluator(dataset_name, distributed=False), images)["sem_seg"]
    ev = SemSegEvaluator(dataset_name, distributed=False)
    for im in images:
        out = torch.from_numpy(softmax_np(im["logits"])).cuda()
        ev.process([{"sem_seg_file_name": im["sem_seg_file_name"]}], [{"sem_seg": out}])
    gpu = ev.evaluate()["sem_seg"]
    for k, v in cpu.items():
        assert gpu[k] == pytest.approx(v, rel=1e-9, nan_ok=True), k


# --------------------------------------------------------------------------------------------------
# distributed: 2 gloo processes, each with half of the images
# --------------------------------------------------------------------------------------------------
def _dist_worker(rank: int, world_size: int, init_file: str, name: str, images: list, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )

    def work() -> dict:
        MetadataCatalog.get(name).set(stuff_classes=list(CLASSES), ignore_label=IGNORE)
        ev = SemSegEvaluator(name, distributed=True, output_dir=os.path.join(out, "eval"))
        return run_evaluator(ev, images[rank::world_size], batch=1)

    save_gloo_worker_result(out, rank, work)


@pytest.mark.slow
def test_distributed_gather_equals_single_process(tmp_path, dataset_name):
    images = make_images(tmp_path, seed=6, sizes=((10, 12), (7, 9), (15, 6), (8, 8), (3, 11)))
    single = run_evaluator(SemSegEvaluator(dataset_name, distributed=False), images)
    rank0, rank1 = run_two_gloo_workers(
        _dist_worker, (2, str(tmp_path / "dist_init"), dataset_name, images, str(tmp_path)), tmp_path
    )
    assert rank1 is None  # only the main process reports
    assert rank0.keys() == single.keys()
    for k, v in single["sem_seg"].items():
        assert rank0["sem_seg"][k] == pytest.approx(v, rel=1e-12, nan_ok=True), k
    assert (tmp_path / "eval" / "sem_seg_evaluation.json").exists()
