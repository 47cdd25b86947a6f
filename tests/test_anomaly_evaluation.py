"""Tests for gmmseg.evaluation.anomaly against independent references (scikit-learn, brute force)."""

from __future__ import annotations

import datetime
import json
import logging
import os
import uuid

import numpy as np
import pytest
import torch
from conftest import run_two_gloo_workers, save_gloo_worker_result
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from gmmseg.evaluation import AnomalyEvaluator, ScoreHistogram, anomaly_metrics

VOID = 255
SCORES = ("gmm", "msp", "energy")
METRICS = ("AUROC", "AP", "FPR95")


# --------------------------------------------------------------------------------------------------
# independent references
# --------------------------------------------------------------------------------------------------
def ref_fpr95(labels: np.ndarray, scores: np.ndarray) -> float:
    """Smallest FPR over the ROC points (every distinct threshold) whose TPR is at least 0.95."""
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return float(fpr[tpr >= 0.95].min())


def ref_metrics(labels: np.ndarray, scores: np.ndarray) -> dict:
    return {
        "auroc": roc_auc_score(labels, scores),
        "ap": average_precision_score(labels, scores),
        "fpr95": ref_fpr95(labels, scores),
    }


def random_case(seed: int, n: int, decimals: int | None, pos_rate: float = 0.2, shift: float = 1.2):
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < pos_rate).astype(np.uint8)
    scores = rng.normal(size=n) + shift * labels
    if decimals is not None:
        scores = np.round(scores, decimals)  # tie-heavy: few distinct values
    return scores, labels


# --------------------------------------------------------------------------------------------------
# exact metrics
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "seed, decimals, pos_rate",
    [(0, None, 0.2), (1, None, 0.01), (2, 2, 0.3), (3, 1, 0.2), (4, 0, 0.5), (5, 0, 0.03)],
)
def test_exact_metrics_match_sklearn(seed, decimals, pos_rate):
    scores, labels = random_case(seed, 20000, decimals, pos_rate)
    if decimals is not None:
        assert np.unique(scores).size < 2000  # ties really are heavy
    res = anomaly_metrics(scores, labels)
    ref = ref_metrics(labels, scores)
    assert res.keys() == {"auroc", "ap", "fpr95"}
    for key in res:
        assert res[key] == pytest.approx(ref[key], abs=1e-9), key
        assert 0.0 <= res[key] <= 1.0


def test_exact_metrics_hand_example_and_inputs():
    # ranks: + - + -  -> AUROC 3/4; AP = (1/2)(1/1) + (1/2)(2/3); TPR reaches 1 at the 3rd pixel, FPR 1/2
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    labels = np.array([1, 0, 1, 0])
    res = anomaly_metrics(scores, labels)
    assert res == pytest.approx({"auroc": 0.75, "ap": (1 + 2 / 3) / 2, "fpr95": 0.5})
    # TPR exactly 0.95 counts as reached: 19 of 20 positives above all negatives gives FPR95 0
    s95 = np.r_[np.arange(40.0, 21.0, -1), 20.5, 1.0, np.zeros(9)]
    y95 = np.r_[np.ones(19), 0, 1, np.zeros(9)].astype(np.uint8)
    assert anomaly_metrics(s95, y95)["fpr95"] == 0.0 == ref_fpr95(y95, s95)
    # all tied: one threshold, AUROC 1/2, AP = base rate, FPR95 = 1
    assert anomaly_metrics(np.zeros(4), labels) == pytest.approx({"auroc": 0.5, "ap": 0.5, "fpr95": 1.0})
    # torch tensors of any shape and dtype give the same numbers as numpy
    s, y = random_case(7, 3000, 2)
    from_torch = anomaly_metrics(
        torch.from_numpy(s).float().reshape(50, 60), torch.from_numpy(y).reshape(50, 60)
    )
    assert from_torch == pytest.approx(anomaly_metrics(s.astype(np.float32), y), abs=1e-12)


def test_label_convention_and_void():
    scores, labels = random_case(8, 5000, None, shift=3.0)  # anomalies score clearly higher
    res = anomaly_metrics(scores, labels)
    assert res["auroc"] > 0.95 and res["fpr95"] < 0.5 and res["ap"] > 0.8
    swapped = anomaly_metrics(scores, 1 - labels)
    assert swapped["auroc"] == pytest.approx(1 - res["auroc"], abs=1e-12) and swapped["fpr95"] > 0.9
    negated = anomaly_metrics(-scores, labels)  # "higher = more anomalous", not the reverse
    assert negated["auroc"] < 0.05

    # void pixels, even with extreme scores of either label's kind, are simply dropped
    rng = np.random.default_rng(9)
    void_scores = rng.choice([-1e9, 1e9, np.inf], size=700)
    with_void = anomaly_metrics(np.r_[scores, void_scores], np.r_[labels, np.full(700, VOID, np.uint8)])
    assert with_void == pytest.approx(res, abs=1e-15)


def test_exact_metrics_errors():
    with pytest.raises(ValueError, match="both classes"):
        anomaly_metrics(np.arange(5.0), np.zeros(5))
    with pytest.raises(ValueError, match="both classes"):
        anomaly_metrics(np.arange(5.0), np.ones(5))
    with pytest.raises(ValueError, match="both classes"):
        anomaly_metrics(np.arange(3.0), np.array([1, VOID, VOID]))
    with pytest.raises(ValueError, match=r"\[2\]"):
        anomaly_metrics(np.arange(3.0), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="NaN"):
        anomaly_metrics(np.array([0.0, np.nan]), np.array([0, 1]))
    with pytest.raises(ValueError, match="size"):
        anomaly_metrics(np.arange(3.0), np.array([0, 1]))


# --------------------------------------------------------------------------------------------------
# histogram
# --------------------------------------------------------------------------------------------------
def assert_within_bounds(hist_res: dict, exact: dict, slack: float = 1e-12) -> None:
    for key in ("auroc", "ap", "fpr95"):
        assert abs(hist_res[key] - exact[key]) <= hist_res[f"bound_{key}"] + slack, key
        assert hist_res[f"{key}_lower"] - slack <= exact[key] <= hist_res[f"{key}_upper"] + slack, key


def test_histogram_large_input_within_bound():
    rng = np.random.default_rng(10)
    n = 3_000_000
    labels = (rng.random(n) < 0.1).astype(np.uint8)
    scores = np.round(rng.normal(size=n) + 1.5 * labels, 3).astype(np.float32)  # ~10^4 distinct values
    # outliers beyond the range the first pixels set: they must land in the open end bins
    late = rng.choice(np.arange(2_000_000, n), size=4000, replace=False)
    scores[late] = rng.choice(np.array([-1e4, -50.0, 60.0, 1e5, np.inf, -np.inf], np.float32), size=late.size)
    hist = ScoreHistogram()  # 2^16 bins, range from the first 2^20 pixels
    for start in range(0, n, 250_000):
        hist.add(scores[start : start + 250_000], labels[start : start + 250_000])
    summary = hist.summary()
    assert hist.is_ranged and summary["pixels"] == n
    assert summary["below_range"] > 0 and summary["above_range"] > 0
    assert summary["range"][0] > -50 and summary["range"][1] < 60  # not stretched by the outliers

    exact = anomaly_metrics(scores, labels)
    res = hist.metrics()
    assert_within_bounds(res, exact)
    # the bounds are informative, not vacuous
    assert res["bound_auroc"] < 1e-4 and res["bound_ap"] < 1e-3 and res["bound_fpr95"] < 1e-3
    assert res["auroc"] != exact["auroc"]  # it is an approximation (scores within a bin are tied)...

    # ...and exactly the metrics of the bin index: bins are [e_{j-1}, e_j) with open ends
    bin_index = np.searchsorted(hist.edges, scores.astype(np.float64), side="right")
    expected_counts = np.zeros_like(hist.counts)
    np.add.at(expected_counts, (bin_index, labels), 1)
    np.testing.assert_array_equal(hist.counts, expected_counts)
    quantized = anomaly_metrics(bin_index, labels)
    for key in quantized:
        assert res[key] == pytest.approx(quantized[key], abs=1e-12), key


@pytest.mark.parametrize("seed", range(40))
def test_histogram_brackets_hold_for_coarse_bins(seed):
    """Few bins and heavy ties: the exact metrics always lie in the reported brackets."""
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(10, 300))
    labels = (rng.random(n) < rng.uniform(0.1, 0.9)).astype(np.uint8)
    labels[:2] = [0, 1]
    scores = np.round(rng.normal(size=n) + rng.uniform(-1, 2) * labels, int(rng.integers(0, 3)))
    hist = ScoreHistogram(int(rng.integers(1, 9)), (-1.5, 2.0))
    hist.add(scores, labels)
    assert_within_bounds(hist.metrics(), anomaly_metrics(scores, labels), slack=1e-12)


def test_histogram_brackets_are_attained():
    """Positives tied on top in every bin attain the upper AUROC / AP ends, negatives on top the others."""
    rng = np.random.default_rng(11)
    num_bins, lo, hi = 20, 0.0, 1.0
    bins = rng.integers(0, num_bins, size=3000)
    labels = (rng.random(3000) < 0.4).astype(np.uint8)
    width = (hi - lo) / num_bins
    hist = ScoreHistogram(num_bins, (lo, hi))
    top = lo + (bins + np.where(labels == 1, 0.75, 0.25)) * width  # positives tied above negatives
    hist.add(top, labels)
    res = hist.metrics()
    exact = anomaly_metrics(top, labels)
    assert exact["auroc"] == pytest.approx(res["auroc_upper"], abs=1e-12)
    assert exact["ap"] == pytest.approx(res["ap_upper"], abs=1e-12)
    assert exact["fpr95"] == pytest.approx(res["fpr95_lower"], abs=1e-12)

    # negatives on top and positives strictly ordered below them: the lower ends (AP's up to the
    # integral bound's small slack)
    jitter = rng.permutation(3000) / 3000 * 0.4
    bottom = lo + (bins + np.where(labels == 1, 0.05 + jitter, 0.75)) * width
    exact = anomaly_metrics(bottom, labels)
    assert exact["auroc"] == pytest.approx(res["auroc_lower"], abs=1e-12)
    assert exact["fpr95"] == pytest.approx(res["fpr95_upper"], abs=1e-12)
    assert res["ap_lower"] <= exact["ap"] <= res["ap_lower"] + 1e-4


def test_histogram_merge():
    scores, labels = random_case(12, 200_000, 3)
    half = 100_000
    # fixed range: merging two halves equals the histogram of the whole, count for count
    whole = ScoreHistogram(4096, (-5.0, 6.0))
    whole.add(scores, labels)
    a, b = ScoreHistogram(4096, (-5.0, 6.0)), ScoreHistogram(4096, (-5.0, 6.0))
    a.add(scores[:half], labels[:half])
    b.add(scores[half:], labels[half:])
    merged = a.merge(b)
    np.testing.assert_array_equal(merged.edges, whole.edges)
    np.testing.assert_array_equal(merged.counts, whole.counts)
    assert merged.metrics() == whole.metrics()
    assert a.summary()["pixels"] == half  # merge returns a new histogram

    # ranges still open (warming up): the buffers are pooled, as if all pixels went to one histogram
    whole = ScoreHistogram(4096)
    whole.add(scores, labels)
    a, b = ScoreHistogram(4096), ScoreHistogram(4096)
    a.add(scores[:half], labels[:half])
    b.add(scores[half:], labels[half:])
    assert not a.is_ranged
    merged = a.merge(b)
    merged.fix_range()
    whole.fix_range()
    np.testing.assert_array_equal(merged.edges, whole.edges)
    np.testing.assert_array_equal(merged.counts, whole.counts)


def test_histogram_merge_of_different_ranges_stays_rigorous(caplog):
    scores, labels = random_case(13, 200_000, None)
    half = 100_000
    scores[half:] = scores[half:] * 3 + 4  # the second half alone picks a wider, shifted range
    a, b = ScoreHistogram(4096, warmup_pixels=1000), ScoreHistogram(4096, warmup_pixels=1000)
    a.add(scores[:half], labels[:half])
    b.add(scores[half:], labels[half:])
    assert not np.array_equal(a.edges, b.edges)
    with caplog.at_level(logging.WARNING, logger="gmmseg.evaluation.score_histogram"):
        merged = a.merge(b)
    assert any("different bin edges" in r.getMessage() for r in caplog.records)
    # no merged edge splits an occupied bin of either side, so the merged counts are exact on its bins
    for h in (a, b):
        occupied = h.counts.sum(axis=1) > 0
        inside = occupied[np.searchsorted(h.edges, merged.edges, side="right")] & ~np.isin(
            merged.edges, h.edges
        )
        assert not inside.any()
    expected = np.zeros_like(merged.counts)
    np.add.at(expected, (np.searchsorted(merged.edges, scores, side="right"), labels), 1)
    np.testing.assert_array_equal(merged.counts, expected)
    # where only b has data (above a's range) b's resolution is kept, not a's open end bin
    assert merged.summary()["above_range"] < 100 and merged.num_bins > 1000
    res = merged.metrics()
    assert_within_bounds(res, anomaly_metrics(scores, labels))
    assert res["bound_auroc"] < 2e-3 and res["bound_ap"] < 5e-3 and res["bound_fpr95"] < 1e-2


@pytest.mark.parametrize("score_range, num_bins", [((0.1, 0.7), 6), ((-0.3, 1.1), 7), ((1e3, 1e3 + 0.3), 3)])
def test_histogram_binning_at_edges(score_range, num_bins):
    """Scores on and next to every edge land where the edges say ([e_{j-1}, e_j)), despite rounding."""
    hist = ScoreHistogram(num_bins, score_range)
    edges = hist.edges
    scores = np.concatenate([edges, np.nextafter(edges, -np.inf), np.nextafter(edges, np.inf)])
    labels = np.arange(scores.size) % 2
    hist.add(scores, labels)
    expected = np.zeros_like(hist.counts)
    np.add.at(expected, (np.searchsorted(edges, scores, side="right"), labels), 1)
    np.testing.assert_array_equal(hist.counts, expected)
    assert hist.counts[0].sum() == 1 and hist.counts[-1].sum() == 2  # below e_0; at and above e_m


def test_histogram_edge_cases():
    constant = ScoreHistogram(64)
    constant.add(np.full(10, 3.0), np.array([0, 1] * 5))
    res = constant.metrics()
    assert res["auroc"] == 0.5 and res["fpr95"] == 1.0
    assert constant.edges[0] <= 3.0 < constant.edges[-1]
    with pytest.raises(ValueError, match="both classes"):
        ScoreHistogram(8).metrics()
    with pytest.raises(ValueError, match="score_range"):
        ScoreHistogram(8, (1.0, 1.0))
    with pytest.raises(ValueError, match=r"\[3\]"):
        ScoreHistogram(8).add(np.zeros(3), np.array([0, 1, 3]))
    with pytest.raises(ValueError, match="NaN"):
        ScoreHistogram(8).add(np.array([np.nan]), np.array([0]))


# --------------------------------------------------------------------------------------------------
# evaluator end to end
# --------------------------------------------------------------------------------------------------
def make_dataset(tmp_path, seed: int = 0, num_images: int = 5, families: bool = True) -> tuple[list, list]:
    """Images with near (family 1) and far (family 2) anomaly boxes, a family-less anomaly pixel, void.

    Returns (dataset dicts, per-image score maps). ``gmm`` separates far better than near, ``msp`` is
    tie-heavy, ``energy`` is anti-correlated. Void pixels get extreme scores, so counting them would show.
    """
    rng = np.random.default_rng(seed)
    folder = tmp_path / f"data{seed}"
    folder.mkdir()
    dicts, maps = [], []
    for i in range(num_images):
        h, w = int(rng.integers(14, 22)), int(rng.integers(16, 26))
        ood = np.zeros((h, w), np.uint8)
        family = np.zeros((h, w), np.uint8)
        for fam in (1, 2):
            y0, x0 = int(rng.integers(0, h - 5)), int(rng.integers(0, w - 5))
            ood[y0 : y0 + 4, x0 : x0 + 5], family[y0 : y0 + 4, x0 : x0 + 5] = 1, fam
        ood[0, 0], family[0, 0] = 1, 0  # anomaly without a family: overall metrics only
        void = rng.random((h, w)) < 0.08
        ood[void], family[void] = VOID, VOID
        shift = np.select([family == 2, family == 1, ood == 1], [3.0, 1.0, 1.5], 0.0)
        gmm = (rng.normal(size=(h, w)) + shift).astype(np.float32)
        scores = {
            "gmm": gmm,
            "msp": np.round(0.5 * gmm + 0.5 * rng.normal(size=(h, w)), 1).astype(np.float32),
            "energy": (-gmm + 0.1 * rng.normal(size=(h, w))).astype(np.float32),
        }
        for s in scores.values():
            s[void] = rng.choice([-1e6, 1e6], size=void.sum())
        paths = {k: str(folder / f"{k}_{i}.png") for k in ("image", "ood", "family")}
        Image.fromarray(rng.integers(0, 256, (h, w, 3)).astype(np.uint8)).save(paths["image"])
        Image.fromarray(ood).save(paths["ood"])
        Image.fromarray(family).save(paths["family"])
        record = {
            "file_name": paths["image"],
            "image_id": f"img{seed}_{i}",
            "height": h,
            "width": w,
            "ood_file_name": paths["ood"],
            "family_png": paths["family"],  # for the reference, also when the evaluator does not get it
        }
        if families:
            record["ood_family_file_name"] = paths["family"]
        dicts.append(record)
        maps.append(scores)
    return dicts, maps


@pytest.fixture
def dataset(tmp_path):
    name = f"gmmseg_test_anomaly_{uuid.uuid4().hex[:8]}"
    dicts, maps = make_dataset(tmp_path)
    DatasetCatalog.register(name, lambda: dicts)
    MetadataCatalog.get(name).set(evaluator_type="anomaly", has_ood=True)
    yield name, dicts, maps
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def run_evaluator(evaluator, dicts, maps, batch: int = 2, key: str = "anomaly_scores"):
    evaluator.reset()
    for s in range(0, len(dicts), batch):
        inputs = dicts[s : s + batch]
        if key == "anomaly_scores":
            outputs = [
                {"anomaly_scores": {n: torch.from_numpy(v) for n, v in m.items()}}
                for m in maps[s : s + batch]
            ]
        else:
            outputs = [{"anomaly": torch.from_numpy(m["gmm"])} for m in maps[s : s + batch]]
        evaluator.process(inputs, outputs)
    return evaluator.evaluate()


def reference_results(dicts, maps, families: bool = True) -> dict:
    """sklearn on the pooled pixels, read back from the PNGs; keys as the evaluator's, in percent."""
    ood = np.concatenate([np.asarray(Image.open(d["ood_file_name"])).ravel() for d in dicts])
    fam = np.concatenate([np.asarray(Image.open(d["family_png"])).ravel() for d in dicts])
    subsets = {"": ood != VOID}
    if families:
        subsets["near/"] = (ood == 0) | ((ood == 1) & (fam == 1))
        subsets["far/"] = (ood == 0) | ((ood == 1) & (fam == 2))
    out = {}
    for name in maps[0]:
        scores = np.concatenate([m[name].ravel() for m in maps])
        for prefix, keep in subsets.items():
            ref = ref_metrics(ood[keep], scores[keep])
            for metric in METRICS:
                out[f"{name}/{prefix}{metric}"] = 100 * ref[metric.lower()]
    return out


def test_evaluator_exact_end_to_end(tmp_path, dataset):
    name, dicts, maps = dataset
    out_dir = tmp_path / "eval"
    ev = AnomalyEvaluator(name, distributed=False, output_dir=str(out_dir), mode="exact", num_heatmaps=3)
    results = run_evaluator(ev, dicts, maps)
    assert list(results) == ["anomaly"]
    res = results["anomaly"]
    ref = reference_results(dicts, maps)
    assert res.keys() == ref.keys()
    for key, value in ref.items():
        assert res[key] == pytest.approx(value, abs=1e-9), key
    # sanity of the synthetic model, and of the label convention
    assert res["gmm/AUROC"] > 80 and res["energy/AUROC"] < 20
    assert res["gmm/far/AUROC"] > res["gmm/near/AUROC"]

    report = json.loads((out_dir / "anomaly_evaluation.json").read_text())
    assert report["mode"] == "exact"
    assert report["metrics"]["gmm/AP"] == pytest.approx(res["gmm/AP"])
    ood = np.concatenate([np.asarray(Image.open(d["ood_file_name"])).ravel() for d in dicts])
    assert report["pixels"]["in_distribution"] == (ood == 0).sum()
    assert report["pixels"]["anomaly"] == (ood == 1).sum()
    for score in SCORES:
        png = out_dir / f"roc_pr_{score}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    heatmaps = sorted(p.name for p in out_dir.glob("heatmap_*.png"))
    assert heatmaps == [f"heatmap_{d['image_id']}.png" for d in dicts[:3]]

    # reset() clears everything: a second round on two images equals those images alone
    again = run_evaluator(ev, dicts[:2], maps[:2])["anomaly"]
    assert again["gmm/AUROC"] == pytest.approx(reference_results(dicts[:2], maps[:2])["gmm/AUROC"], abs=1e-9)


@pytest.mark.parametrize("score_range", [None, (-8.0, 8.0)])
def test_evaluator_histogram_within_bounds(dataset, score_range):
    name, dicts, maps = dataset
    ev = AnomalyEvaluator(name, distributed=False, mode="histogram", num_bins=4096, score_range=score_range)
    res = run_evaluator(ev, dicts, maps)["anomaly"]
    ref = reference_results(dicts, maps)
    assert {k for k in res if "bound_" not in k} == ref.keys()
    for key, value in ref.items():
        score, metric = key.rsplit("/", 1)
        bound = res[f"{score}/bound_{metric}"]
        assert abs(res[key] - value) <= bound + 1e-9, key
    assert res["gmm/bound_AUROC"] < 0.5  # percent; the continuous score is well resolved


def test_evaluator_auto_switches_and_anomaly_key(tmp_path, dataset, caplog):
    name, dicts, maps = dataset
    ref = reference_results(dicts, maps)
    with caplog.at_level(logging.INFO, logger="gmmseg.evaluation.anomaly"):
        small = AnomalyEvaluator(name, distributed=False, mode="auto", max_exact_pixels=500)
        res = run_evaluator(small, dicts, maps)["anomaly"]
    assert any("switching from exact to histogram" in r.getMessage() for r in caplog.records)
    assert "gmm/bound_AUROC" in res
    for key, value in ref.items():
        score, metric = key.rsplit("/", 1)
        assert abs(res[key] - value) <= res[f"{score}/bound_{metric}"] + 1e-9, key

    big = run_evaluator(AnomalyEvaluator(name, distributed=False, mode="auto"), dicts, maps)["anomaly"]
    assert not any("bound" in k for k in big) and big["msp/near/AP"] == pytest.approx(ref["msp/near/AP"])

    with pytest.raises(RuntimeError, match="max_exact_pixels"):
        run_evaluator(
            AnomalyEvaluator(name, distributed=False, mode="exact", max_exact_pixels=500), dicts, maps
        )

    # output["anomaly"] alone is reported as score "anomaly"; no family maps -> no family keys
    plain = [{k: v for k, v in d.items() if k != "ood_family_file_name"} for d in dicts]
    res = run_evaluator(AnomalyEvaluator(name, distributed=False, mode="exact"), plain, maps, key="anomaly")
    assert set(res["anomaly"]) == {f"anomaly/{m}" for m in METRICS}
    assert res["anomaly"]["anomaly/AUROC"] == pytest.approx(ref["gmm/AUROC"], abs=1e-9)


def test_evaluator_input_errors(tmp_path, dataset):
    name, dicts, maps = dataset
    ev = AnomalyEvaluator(name, distributed=False)
    d, m = dicts[0], maps[0]
    h, w = m["gmm"].shape
    transposed = {"anomaly_scores": {"gmm": torch.zeros(w, h)}}
    with pytest.raises(ValueError, match=os.path.basename(d["ood_file_name"])) as err:
        ev.process([d], [transposed])
    assert f"({h}, {w})" in str(err.value) and f"({w}, {h})" in str(err.value)

    bad = np.zeros((4, 4), np.uint8)
    bad[0, 0], bad[1, 1] = 7, VOID
    Image.fromarray(bad).save(tmp_path / "bad_ood.png")
    with pytest.raises(ValueError, match="bad_ood.png") as err:
        ev.process([{"ood_file_name": str(tmp_path / "bad_ood.png")}], [{"anomaly": torch.zeros(4, 4)}])
    assert "[7]" in str(err.value)

    good = np.zeros((4, 4), np.uint8)
    good[0, 0] = 1
    Image.fromarray(good).save(tmp_path / "good_ood.png")
    fam = np.zeros((4, 4), np.uint8)
    fam[0, 0] = 5
    Image.fromarray(fam).save(tmp_path / "bad_family.png")
    with pytest.raises(ValueError, match="bad_family.png") as err:
        ev.process(
            [
                {
                    "ood_file_name": str(tmp_path / "good_ood.png"),
                    "ood_family_file_name": str(tmp_path / "bad_family.png"),
                }
            ],
            [{"anomaly": torch.zeros(4, 4)}],
        )
    assert "[5]" in str(err.value)
    fam[0, 0], fam[2, 2] = 1, 2  # pixel (2, 2) is in-distribution in the ood map
    Image.fromarray(fam).save(tmp_path / "clash_family.png")
    with pytest.raises(ValueError, match="clash_family.png"):
        ev.process(
            [
                {
                    "ood_file_name": str(tmp_path / "good_ood.png"),
                    "ood_family_file_name": str(tmp_path / "clash_family.png"),
                }
            ],
            [{"anomaly": torch.zeros(4, 4)}],
        )

    ev.reset()
    ev.process([d], [{"anomaly_scores": {"gmm": torch.from_numpy(m["gmm"])}}])
    with pytest.raises(ValueError, match="same scores"):
        ev.process([d], [{"anomaly_scores": {"msp": torch.from_numpy(m["msp"])}}])
    with pytest.raises(KeyError, match="ood_file_name"):
        ev.process([{"file_name": "x.png"}], [{"anomaly": torch.zeros(4, 4)}])
    with pytest.raises(ValueError, match="mode"):
        AnomalyEvaluator(name, mode="fast")
    ev.reset()
    assert ev.evaluate() == {}


# --------------------------------------------------------------------------------------------------
# distributed: 2 gloo processes, each with half of the images
# --------------------------------------------------------------------------------------------------
EVAL_CONFIGS = {
    "exact": {"mode": "exact"},
    "fixed_range": {"mode": "histogram", "score_range": (-10.0, 10.0), "num_bins": 2048},
    "auto_small": {"mode": "auto", "max_exact_pixels": 400},  # each rank switches with its own range
}


def rank_skewed(maps: list) -> list:
    """Odd images' scores scaled and shifted: rank 1 then fixes a different histogram range than rank 0."""
    return [{n: s * 4 + 20 if i % 2 else s for n, s in m.items()} for i, m in enumerate(maps)]


def _dist_worker(rank: int, world_size: int, init_file: str, dicts: list, maps: list, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )

    def work() -> dict:
        results = {}
        for key, kwargs in EVAL_CONFIGS.items():
            out_dir = os.path.join(out, "eval") if key == "exact" else None
            ev = AnomalyEvaluator("dist_fake", distributed=True, output_dir=out_dir, **kwargs)
            data = rank_skewed(maps) if key == "auto_small" else maps
            results[key] = run_evaluator(ev, dicts[rank::world_size], data[rank::world_size], batch=1)
        return results

    save_gloo_worker_result(out, rank, work)


@pytest.mark.slow
def test_distributed_gather_equals_single_process(tmp_path):
    dicts, maps = make_dataset(tmp_path, seed=3, num_images=6)
    single = {
        key: run_evaluator(AnomalyEvaluator("single", distributed=False, **kw), dicts, maps)["anomaly"]
        for key, kw in EVAL_CONFIGS.items()
        if key != "auto_small"
    }
    skewed_exact = reference_results(dicts, rank_skewed(maps))
    rank0, rank1 = run_two_gloo_workers(
        _dist_worker, (2, str(tmp_path / "dist_init"), dicts, maps, str(tmp_path)), tmp_path
    )
    assert all(v is None for v in rank1.values())  # only the main process reports

    for key in ("exact", "fixed_range"):
        dist_res = rank0[key]["anomaly"]
        assert dist_res.keys() == single[key].keys()
        for k, v in single[key].items():
            assert dist_res[k] == pytest.approx(v, rel=1e-12, abs=1e-12), (key, k)
    assert (tmp_path / "eval" / "anomaly_evaluation.json").exists()

    # per-rank ranges differ, merged onto common edges: still within the bounds of the exact result
    auto = rank0["auto_small"]["anomaly"]
    assert "gmm/bound_AUROC" in auto
    assert auto.keys() == single["fixed_range"].keys()
    for k, v in skewed_exact.items():
        score, metric = k.rsplit("/", 1)
        assert abs(auto[k] - v) <= auto[f"{score}/bound_{metric}"] + 1e-9, k
