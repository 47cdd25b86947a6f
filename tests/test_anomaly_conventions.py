"""Anomaly metric conventions: pooled (SegmentMeIfYouCan) and per-image (pytorch-ood) aggregation, each
cross-checked against an independent implementation, and a two-process evaluation equal to one process.

pytorch-ood 0.4.0 (``pytorch_ood.metrics``) is the per-image reference. Its conventions, read from its
source, and how ours map onto them:

- labels: OOD (anomaly, the positive class) is any label < 0, known is >= 0, and ``void_label`` is
  ignored; so our 1 -> -1, 0 -> 0, 255 -> ``void_label=255``. Larger scores mean more anomalous in both.
- ``OODPerImageSegmentationMetrics`` (its replacement of the older ``OODMetrics(mode="segmentation")``):
  each image's metrics, then the mean; images without known or without anomaly pixels are skipped. Ours
  (``aggregation="per_image"``) skips the same images.
- AUROC: trapezoid over the ROC with tied scores as one point (ties count 1/2) = ours.
- FPR95TPR: FPR at the first threshold whose TPR >= 0.95 (``searchsorted``) = ours.
- AUPR-OUT: trapezoid rule over scikit-learn's precision-recall points; ours (AP) is the step sum of
  ``average_precision_score``. So pytorch-ood's AUPR-OUT is checked against the per-image mean of
  ``sklearn.metrics.auc(recall, precision)`` and our AP against the per-image mean of
  ``average_precision_score``, on the same images.
"""

from __future__ import annotations

import datetime
import warnings

import numpy as np
import pytest
import torch
from conftest import run_two_gloo_workers, save_gloo_worker_result
from PIL import Image
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score, roc_curve
from test_component_metrics import make_scenes

from gmmseg.evaluation import AnomalyEvaluator
from gmmseg.evaluation.anomaly_components import ComponentSettings

pytorch_ood_metrics = pytest.importorskip("pytorch_ood.metrics")
VOID = 255


def make_images(tmp_path, seed: int, decimals: int | None, num_images: int = 6):
    """Label PNGs (0 / 1 / 255) of varying sizes, one without anomaly pixels, and two scores per image."""
    rng = np.random.default_rng(seed)
    dicts, maps = [], []
    for i in range(num_images):
        h, w = int(rng.integers(12, 30)), int(rng.integers(12, 30))
        labels = (rng.random((h, w)) < rng.uniform(0.05, 0.4)).astype(np.uint8)
        if i == 2:
            labels[:] = 0  # no anomaly: no per-image curve, skipped by both tools
        labels[rng.random((h, w)) < 0.1] = VOID
        base = rng.normal(size=(h, w)) + rng.uniform(0.3, 2.0) * (labels == 1)
        if decimals is not None:
            base = np.round(base, decimals)  # tie-heavy
        score = base.astype(np.float32)
        score[labels == VOID] = rng.choice([-1e6, 1e6], size=int((labels == VOID).sum()))
        path = tmp_path / f"img{seed}_{i}.png"
        Image.fromarray(labels).save(path)
        dicts.append({"file_name": "", "ood_file_name": str(path), "image_id": str(i)})
        maps.append({"gmm": score, "energy": -score + np.float32(0.5) * (labels == 0)})
    return dicts, maps


def run(dicts, maps, **kwargs):
    ev = AnomalyEvaluator("conv", distributed=False, **kwargs)
    ev.reset()
    for d, m in zip(dicts, maps):
        ev.process([d], [{"anomaly_scores": {n: torch.from_numpy(v) for n, v in m.items()}}])
    return ev.evaluate()["anomaly"]


def labels_of(dicts):
    return [np.asarray(Image.open(d["ood_file_name"])) for d in dicts]


@pytest.mark.parametrize("seed, decimals", [(0, None), (1, 1), (2, 0)])
def test_per_image_equals_pytorch_ood(tmp_path, seed, decimals):
    dicts, maps = make_images(tmp_path, seed, decimals)
    ours = run(dicts, maps, mode="exact", aggregation="per_image")
    labels = labels_of(dicts)
    for name in ("gmm", "energy"):
        ref = pytorch_ood_metrics.OODPerImageSegmentationMetrics(void_label=VOID)
        aps, trapz = [], []
        for lab, m in zip(labels, maps):
            mapped = torch.from_numpy(np.where(lab == 1, -1, lab.astype(np.int64)))
            ref.update(torch.from_numpy(m[name])[None], mapped[None])
            keep = lab != VOID
            y, s = lab[keep], m[name][keep]
            if 0 < y.sum() < y.size:
                aps.append(average_precision_score(y, s))
                p, r, _ = precision_recall_curve(y, s)
                trapz.append(auc(r, p))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Skipped 1 of 6 images without OOD pixels"
            r = ref.compute()
        assert len(aps) == len(labels) - 1
        assert ours[f"{name}/AUROC"] == pytest.approx(100 * r["AUROC"], abs=1e-9)
        assert ours[f"{name}/FPR95"] == pytest.approx(100 * r["FPR95TPR"], abs=1e-9)
        assert ours[f"{name}/AP"] == pytest.approx(100 * np.mean(aps), abs=1e-9)
        assert r["AUPR-OUT"] == pytest.approx(np.mean(trapz), abs=1e-9)  # the mapping of the docstring
        assert "gmm/bound_AUROC" not in ours


@pytest.mark.parametrize("seed, decimals", [(3, None), (4, 1)])
def test_pooled_equals_sklearn_and_pytorch_ood(tmp_path, seed, decimals):
    dicts, maps = make_images(tmp_path, seed, decimals)
    ours = run(dicts, maps, mode="exact")
    per_image = run(dicts, maps, mode="exact", aggregation="per_image")
    labels = labels_of(dicts)
    keep = np.concatenate([lab.ravel() != VOID for lab in labels])
    y = np.concatenate([lab.ravel() for lab in labels])[keep]
    for name in ("gmm", "energy"):
        s = np.concatenate([m[name].ravel() for m in maps])[keep]
        fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
        assert ours[f"{name}/AUROC"] == pytest.approx(100 * roc_auc_score(y, s), abs=1e-9)
        assert ours[f"{name}/AP"] == pytest.approx(100 * average_precision_score(y, s), abs=1e-9)
        assert ours[f"{name}/FPR95"] == pytest.approx(100 * fpr[np.argmax(tpr >= 0.95)], abs=1e-9)
        ref = pytorch_ood_metrics.OODSegmentationMetrics(void_label=VOID)
        for lab, m in zip(labels, maps):
            ref.update(
                torch.from_numpy(m[name]), torch.from_numpy(np.where(lab == 1, -1, lab.astype(np.int64)))
            )
        r = ref.compute()
        assert ours[f"{name}/AUROC"] == pytest.approx(100 * r["AUROC"], abs=1e-9)
        assert ours[f"{name}/FPR95"] == pytest.approx(100 * r["FPR95TPR"], abs=1e-9)
        assert ours[f"{name}/AP"] != pytest.approx(per_image[f"{name}/AP"], abs=1e-6)  # they differ


def test_aggregation_is_checked():
    with pytest.raises(ValueError, match="aggregation"):
        AnomalyEvaluator("x", aggregation="mean")


# --------------------------------------------------------------------------------------------------
# two processes = one process, for every new metric
# --------------------------------------------------------------------------------------------------
CONFIGS = {
    "per_image": {"mode": "exact", "aggregation": "per_image"},
    "components": {"mode": "exact", "components": ComponentSettings(5, 3)},
    "fixed_hist": {"mode": "histogram", "components": ComponentSettings(4, 0, threshold=0.3)},
    "per_image_hist": {"mode": "histogram", "aggregation": "per_image", "score_range": (-5.0, 5.0)},
}


def _worker(rank: int, init_file: str, dicts: list, maps: list, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=60),
    )

    def work() -> dict:
        results = {}
        for key, kwargs in CONFIGS.items():
            ev = AnomalyEvaluator("dist", distributed=True, **kwargs)
            ev.reset()
            for d, m in zip(dicts[rank::2], maps[rank::2]):  # each rank half of the images
                ev.process([d], [{"anomaly_scores": {n: torch.from_numpy(v) for n, v in m.items()}}])
            results[key] = ev.evaluate()
        return results

    save_gloo_worker_result(out, rank, work)


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    dicts, maps = make_scenes(tmp_path, 5, num_images=5)  # odd: the ranks see different numbers
    rank0, rank1 = run_two_gloo_workers(
        _worker, (str(tmp_path / "init"), dicts, maps, str(tmp_path)), tmp_path
    )
    assert all(v is None for v in rank1.values())
    for key, kwargs in CONFIGS.items():
        single = run(dicts, maps, **kwargs)
        dist_res = rank0[key]["anomaly"]
        assert dist_res.keys() == single.keys(), key
        new = [k for k in single if k.endswith(("sIoU", "PPV", "mean_F1"))]
        assert new or key.startswith("per_image"), key
        for k, v in single.items():
            if k.endswith(("sIoU", "PPV", "mean_F1")) or key.startswith("per_image"):
                assert dist_res[k] == v or (np.isnan(v) and np.isnan(dist_res[k])), (key, k)
            else:
                assert dist_res[k] == pytest.approx(v, rel=1e-12, abs=1e-12), (key, k)


# --------------------------------------------------------------------------------------------------
# config keys: bad values fail at start naming the key; -1 size filters take the dataset's
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "key, value",
    [
        ("TEST.ANOMALY_AGGREGATION", "mean"),
        ("TEST.ANOMALY_COMPONENTS.MIN_PRED_SIZE", -2),
        ("TEST.ANOMALY_COMPONENTS.MIN_GT_SIZE", 1.5),
        ("TEST.ANOMALY_COMPONENTS.THRESHOLD", "high"),
        ("TEST.ANOMALY_COMPONENTS.ENABLED", 1),
    ],
)
def test_bad_config_values_name_the_key(key, value):
    from detectron2.config import get_cfg

    from gmmseg import add_gmmseg_config
    from gmmseg.config_validation import KEY_RULES, ConfigValueError, check_rules

    cfg = get_cfg()
    add_gmmseg_config(cfg)
    check_rules(cfg, KEY_RULES)  # the defaults pass
    *parents, last = key.split(".")
    node = cfg
    for part in parents:
        node = node[part]
    node[last] = value  # as a YAML file of the wrong type would leave it (merge_from_list converts)
    with pytest.raises(ConfigValueError) as info:
        check_rules(cfg, KEY_RULES)
    assert info.value.key == key and str(info.value).startswith(f"{key} = {value!r}")


def test_component_settings_from_config_and_metadata():
    from gmmseg.evaluation.anomaly_components import component_settings

    obstacle = {"component_min_pred_size": 50, "component_min_gt_size": 10}
    assert component_settings(True, -1, -1, None, obstacle) == ComponentSettings(50, 10)
    assert component_settings(True, -1, -1, None, {}) == ComponentSettings(500, 100)
    assert component_settings(True, 3, -1, 0.5, obstacle) == ComponentSettings(3, 10, 0.5)
    assert component_settings(False, -1, -1, None, obstacle) is None
