"""Component-level anomaly metrics (SegmentMeIfYouCan's sIoU / PPV / mean F1): closed-form fixtures, a
loop-by-loop reference of the benchmark's definitions, and the evaluator end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage
from sklearn.metrics import precision_recall_curve

from gmmseg.evaluation import AnomalyEvaluator
from gmmseg.evaluation.anomaly_components import (
    SIOU_THRESHOLDS,
    ComponentSettings,
    aggregate_components,
    best_f1_point,
    image_components,
)

VOID = 255


def comps(pred, labels, min_pred=0, min_gt=0):
    labels = np.asarray(labels)
    return image_components(np.asarray(pred, bool), labels == 1, labels == VOID, min_pred, min_gt)


def box(shape, rows, cols):
    m = np.zeros(shape, bool)
    m[rows[0] : rows[1], cols[0] : cols[1]] = True
    return m


# --------------------------------------------------------------------------------------------------
# closed form
# --------------------------------------------------------------------------------------------------
def test_partial_overlap_is_plain_iou():
    labels = box((12, 20), (0, 10), (0, 10)).astype(np.uint8)  # 100 px object
    pred = box((12, 20), (0, 10), (5, 15))  # 100 px, half on the object
    c = comps(pred, labels)
    np.testing.assert_allclose(c.siou_gt, [50 / 150])
    np.testing.assert_allclose(c.siou_pred, [50 / 150])
    np.testing.assert_allclose(c.ppv, [0.5])


def test_one_prediction_covering_two_objects():
    """sIoU discounts the other object: |A ∩ P| / |(A ∪ P) minus B| = 25 / 50, not IoU 25 / 75."""
    labels = (box((5, 15), (0, 5), (0, 5)) | box((5, 15), (0, 5), (10, 15))).astype(np.uint8)
    pred = box((5, 15), (0, 5), (0, 15))  # 75 px: both objects and the 25 px between them
    c = comps(pred, labels)
    np.testing.assert_allclose(c.siou_gt, [0.5, 0.5])
    np.testing.assert_allclose(c.siou_pred, [50 / 75])  # the objects together against the prediction
    np.testing.assert_allclose(c.ppv, [50 / 75])


def test_touching_components_are_eight_connected():
    """Two squares meeting at a corner are one object (8-connectivity), so covering one gives sIoU 1/2;
    with 4-connectivity it would be two objects with sIoU 1 and 0."""
    shape = (10, 10)
    labels = (box(shape, (0, 5), (0, 5)) | box(shape, (5, 10), (5, 10))).astype(np.uint8)
    pred = box(shape, (0, 5), (0, 5))
    c = comps(pred, labels)
    np.testing.assert_allclose(c.siou_gt, [0.5])
    np.testing.assert_allclose(c.ppv, [1.0])
    # and predictions touching at a corner are one predicted component as well
    c2 = comps(labels, box(shape, (0, 5), (0, 5)).astype(np.uint8))
    np.testing.assert_allclose(c2.ppv, [0.5])
    # F1: sIoU 0.5 is a true positive for t <= 0.5 (6 of the 11 thresholds) and PPV 1 never a false one
    agg = aggregate_components([c])
    assert agg["mean_F1"] == pytest.approx(6 / 11)
    assert (agg["F1_25"], agg["F1_50"], agg["F1_75"]) == (1.0, 1.0, 0.0)
    assert agg["sIoU"] == 0.5 and agg["PPV"] == 1.0


def test_components_cut_by_void():
    """Void is removed from the prediction before labelling: a prediction across a void column is two
    components, the one on the object (PPV 1) and the one beside it (PPV 0, a false positive)."""
    labels = np.zeros((10, 20), np.uint8)
    labels[:, :10] = 1
    labels[:, 10] = VOID
    pred = np.ones((10, 20), bool)  # over the object, the void column and 90 background pixels
    c = comps(pred, labels)
    np.testing.assert_allclose(c.siou_gt, [1.0])
    np.testing.assert_allclose(np.sort(c.ppv), [0.0, 1.0])
    agg = aggregate_components([c])
    assert agg["mean_F1"] == pytest.approx(2 / 3)  # TP 1, FN 0, FP 1 at every threshold
    # an object cut by void is two objects: each half fully covered
    labels[:, 4] = VOID
    c = comps(labels == 1, labels)
    np.testing.assert_allclose(c.siou_gt, [1.0, 1.0])


def test_size_filters():
    shape = (30, 30)
    labels = np.zeros(shape, np.uint8)
    labels[box(shape, (0, 10), (0, 10))] = 1  # 100 px object
    labels[box(shape, (20, 22), (20, 24))] = 1  # 8 px object
    pred = box(shape, (0, 10), (0, 10)) | box(shape, (20, 23), (20, 24))  # 100 px + 12 px
    pred |= box(shape, (25, 30), (0, 6))  # 30 px false positive
    c = comps(pred, labels)
    assert c.siou_gt.size == 2 and c.ppv.size == 3
    # min_pred 40 drops the 12 and 30 px predictions: the small object is missed
    c = comps(pred, labels, min_pred=40)
    np.testing.assert_allclose(np.sort(c.siou_gt), [0.0, 1.0])
    np.testing.assert_allclose(c.ppv, [1.0])
    # min_gt 10 voids the 8 px object; the 12 px prediction (size counted before, so kept with
    # min_pred 10) keeps only its 4 background pixels: PPV 0
    c = comps(pred, labels, min_pred=10, min_gt=10)
    np.testing.assert_allclose(c.siou_gt, [1.0])
    np.testing.assert_allclose(np.sort(c.ppv), [0.0, 0.0, 1.0])
    # a prediction entirely on a voided object is no component at all
    c = comps(box(shape, (20, 22), (20, 24)), labels, min_gt=10)
    assert c.ppv.size == 0 and c.siou_gt.size == 1


def test_aggregate_pools_components_and_handles_empty():
    agg = aggregate_components([])
    assert np.isnan(agg["sIoU"]) and np.isnan(agg["PPV"]) and np.isnan(agg["mean_F1"])
    labels = box((10, 10), (0, 4), (0, 4)).astype(np.uint8)
    hit = comps(labels == 1, labels)
    miss = comps(np.zeros((10, 10), bool), labels)
    agg = aggregate_components([hit, miss])
    assert agg["sIoU"] == 0.5 and agg["PPV"] == 1.0 and agg["num_gt"] == 2 and agg["num_pred"] == 1
    assert agg["mean_F1"] == pytest.approx(2 / 3)  # TP 1, FN 1, FP 0 at every threshold
    assert aggregate_components([miss, hit]) == agg


def test_best_f1_point_matches_sklearn():
    rng = np.random.default_rng(0)
    y = (rng.random(5000) < 0.2).astype(int)
    s = np.round(rng.normal(size=5000) + y, 1)
    uniq = np.unique(s)[::-1]
    pos = np.array([(y[s == v] == 1).sum() for v in uniq])
    neg = np.array([(y[s == v] == 0).sum() for v in uniq])
    k, f1 = best_f1_point(pos, neg)
    p, r, t = precision_recall_curve(y, s)
    f = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-300), 0)
    assert f1 == pytest.approx(f.max(), abs=1e-12)
    assert uniq[k] == t[np.argmax(f[:-1])]


# --------------------------------------------------------------------------------------------------
# against a loop-by-loop reading of the benchmark's definitions
# --------------------------------------------------------------------------------------------------
def reference_components(pred, labels, min_pred, min_gt):
    """The benchmark's default_instancer + segment_metrics, one component at a time, with sets."""
    st = np.ones((3, 3), int)
    gt_lab, n_gt = ndimage.label(labels == 1, st)
    pr_lab, n_pr = ndimage.label(pred & (labels != VOID), st)
    for j in range(1, n_pr + 1):
        if (pr_lab == j).sum() < min_pred:
            pr_lab[pr_lab == j] = 0
    labels = labels.copy()
    for i in range(1, n_gt + 1):
        if (gt_lab == i).sum() < min_gt:
            labels[gt_lab == i] = VOID
    roi = labels != VOID
    g, p = gt_lab[roi], pr_lab[roi]
    siou_gt, siou_pred, ppv = [], [], []
    for i in np.unique(g[g > 0]):
        touching = np.unique(p[(g == i) & (p > 0)])
        in_p = np.isin(p, touching)
        inter = np.sum((g == i) & in_p)
        adjust = np.sum(~np.isin(g, [0, i]) & in_p)
        siou_gt.append(inter / (in_p.sum() + (g == i).sum() - inter - adjust))
    for j in np.unique(p[p > 0]):
        touching = np.unique(g[(p == j) & (g > 0)])
        in_g = np.isin(g, touching)
        inter = np.sum((p == j) & in_g)
        adjust = np.sum(~np.isin(p, [0, j]) & in_g)
        siou_pred.append(inter / (in_g.sum() + (p == j).sum() - inter - adjust))
        ppv.append(inter / (p == j).sum())
    return np.array(siou_gt), np.array(siou_pred), np.array(ppv)


def random_scene(rng, shape=(48, 64)):
    """Blobs of anomaly (some touching), a void band and stray void pixels, and a noisy prediction."""
    labels = np.zeros(shape, np.uint8)
    for _ in range(int(rng.integers(1, 7))):
        y, x = rng.integers(0, shape[0] - 4), rng.integers(0, shape[1] - 4)
        labels[y : y + rng.integers(1, 14), x : x + rng.integers(1, 14)] = 1
    labels[:, int(rng.integers(0, shape[1]))] = VOID
    labels[rng.random(shape) < 0.03] = VOID
    noise = ndimage.uniform_filter(rng.normal(size=shape), 3)
    pred = (noise + 0.4 * (labels == 1)) > rng.uniform(0.05, 0.3)
    return pred, labels


@pytest.mark.parametrize("seed", range(25))
def test_matches_loop_reference(seed):
    rng = np.random.default_rng(seed)
    pred, labels = random_scene(rng)
    min_pred, min_gt = int(rng.integers(0, 30)), int(rng.integers(0, 20))
    c = comps(pred, labels, min_pred, min_gt)
    ref = reference_components(pred, labels, min_pred, min_gt)
    np.testing.assert_allclose(c.siou_gt, ref[0], atol=1e-12)
    np.testing.assert_allclose(c.siou_pred, ref[1], atol=1e-12)
    np.testing.assert_allclose(c.ppv, ref[2], atol=1e-12)


# --------------------------------------------------------------------------------------------------
# in the evaluator
# --------------------------------------------------------------------------------------------------
def make_scenes(tmp_path, seed: int, num_images: int = 4):
    rng = np.random.default_rng(seed)
    dicts, maps = [], []
    for i in range(num_images):
        _, labels = random_scene(rng)
        score = ndimage.uniform_filter(rng.normal(size=labels.shape), 3) + 0.5 * (labels == 1)
        score = np.round(score, 2).astype(np.float32)  # ties
        score[labels == VOID] = 50.0  # void pixels must not count anywhere
        path = tmp_path / f"s{seed}_{i}.png"
        Image.fromarray(labels).save(path)
        dicts.append({"file_name": "", "ood_file_name": str(path), "image_id": f"s{seed}_{i}"})
        maps.append({"gmm": score, "msp": -score})
    return dicts, maps


def evaluate(dicts, maps, **kwargs):
    ev = AnomalyEvaluator("scenes", distributed=False, **kwargs)
    ev.reset()
    for d, m in zip(dicts, maps):
        ev.process([d], [{"anomaly_scores": {n: torch.from_numpy(v) for n, v in m.items()}}])
    return ev.evaluate()["anomaly"]


def reference_split(dicts, maps, name, settings, threshold=None):
    """Best-F1 threshold from sklearn's PR curve of the pooled pixels, then the loop reference."""
    labels = [np.asarray(Image.open(d["ood_file_name"])) for d in dicts]
    if threshold is None:
        valid = np.concatenate([lab.ravel() != VOID for lab in labels])
        y = np.concatenate([lab.ravel() for lab in labels])[valid]
        s = np.concatenate([m[name].ravel() for m in maps])[valid]
        p, r, t = precision_recall_curve(y, s)
        f = 2 * p * r / np.maximum(p + r, 1e-300)
        pred_maps = [m[name] >= t[np.argmax(f[:-1])] for m in maps]
    else:
        pred_maps = [m[name] > threshold for m in maps]
    parts = []
    for pred, lab in zip(pred_maps, labels):
        gt, pr, pv = reference_components(pred, lab, settings.min_pred_size, settings.min_gt_size)
        parts.append(type("P", (), {"siou_gt": gt, "siou_pred": pr, "ppv": pv}))
    return aggregate_components(parts)


def test_evaluator_reports_components(tmp_path):
    dicts, maps = make_scenes(tmp_path, 1)
    settings = ComponentSettings(min_pred_size=5, min_gt_size=3)
    res = evaluate(dicts, maps, mode="exact", components=settings, output_dir=str(tmp_path / "out"))
    for name in ("gmm", "msp"):
        ref = reference_split(dicts, maps, name, settings)
        assert res[f"{name}/sIoU"] == pytest.approx(100 * ref["sIoU"], abs=1e-9)
        assert res[f"{name}/PPV"] == pytest.approx(100 * ref["PPV"], abs=1e-9)
        assert res[f"{name}/mean_F1"] == pytest.approx(100 * ref["mean_F1"], abs=1e-9)
    assert 0 < res["gmm/sIoU"] < 100 and res["gmm/sIoU"] > res["msp/sIoU"]
    report = json.loads((tmp_path / "out" / "anomaly_evaluation.json").read_text())
    gmm = report["components"]["gmm"]
    assert {"threshold", "pixel_F1", "F1_50", "num_gt", "rule"} <= gmm.keys()
    assert report["components"]["settings"]["min_pred_size"] == 5 and report["aggregation"] == "pooled"
    # no components unless asked for; the pixel metrics are the same either way
    plain = evaluate(dicts, maps, mode="exact")
    assert "gmm/sIoU" not in plain and all(res[k] == v for k, v in plain.items())


def test_fixed_threshold_in_any_mode_and_best_f1_needs_exact(tmp_path):
    dicts, maps = make_scenes(tmp_path, 2)
    fixed = ComponentSettings(min_pred_size=4, min_gt_size=0, threshold=0.3)
    exact = evaluate(dicts, maps, mode="exact", components=fixed)
    hist = evaluate(dicts, maps, mode="histogram", components=fixed)
    ref = reference_split(dicts, maps, "gmm", fixed, threshold=0.3)
    for key in ("sIoU", "PPV", "mean_F1"):
        assert exact[f"gmm/{key}"] == hist[f"gmm/{key}"] == pytest.approx(100 * ref[key], abs=1e-9)
    skipped = evaluate(dicts, maps, mode="histogram", components=ComponentSettings(5, 3))
    assert "gmm/sIoU" not in skipped and "gmm/AUROC" in skipped


def test_settings_are_checked():
    with pytest.raises(ValueError, match=">= 0"):
        ComponentSettings(min_pred_size=-1)
    assert SIOU_THRESHOLDS.size == 11 and SIOU_THRESHOLDS[0] == 0.25 and SIOU_THRESHOLDS[-1] == 0.75
