"""Tools that measure GMM Mask2Former (issue 14): the mixtures' per-class diagnostics against a direct float64
computation, their logging by GMMEMHook at the configured period on a tiny Mask2Former, the plot script on
a synthetic metrics.json, and the query / pixel ECE split against numpy."""

from __future__ import annotations

import importlib.util
import json
import math
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import write_folder_dataset
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage, JSONWriter
from PIL import Image
from test_mask_former import NUM_CLASSES, NUM_QUERIES, batch, tiny_cfg

from gmmseg import validate_gmmseg_config
from gmmseg.config_validation import ConfigValueError
from gmmseg.data.folder_dataset import register_folder_dataset
from gmmseg.engine import GMMSegTrainer
from gmmseg.engine.hooks import GMMEMHook, find_gmm_predictors
from gmmseg.evaluation.sem_seg import SemSegEvaluator
from gmmseg.gmm import GaussianMixtureClassifier, MixtureDiagnostics, OnlineGMM
from gmmseg.modeling.query_labels import labels_from_matching

REPO = Path(__file__).resolve().parent.parent
C, K, D = 3, 2, 4
STATS = ("std", "memory_share", "mean_angle", "offered_per_step", "written_per_step")


def _steps(n_steps: int = 3, n: int = 30):
    g = torch.Generator().manual_seed(0)
    for _ in range(n_steps):
        emb = F.normalize(torch.randn(n, D, generator=g, dtype=torch.float64), dim=1).float()
        labels = torch.randint(-1, C, (n,), generator=g)  # -1: unlabelled, skipped
        labels[labels == 2] = 0  # class 2 never offered: its rows stay zero
        yield emb, labels, torch.rand(n, generator=g) > 0.3


def test_diagnostics_against_a_direct_float64_computation():
    torch.manual_seed(0)
    clf = GaussianMixtureClassifier(C, K, D)
    online = OnlineGMM(clf, capacity=12, max_per_step=4, interval=2, mean_momentum=0.5)
    diagnostics = MixtureDiagnostics(online)
    means0 = clf.means.double().clone()
    offered, written = np.zeros(C), np.zeros(C)
    for step, (emb, labels, correct) in enumerate(_steps(), start=1):
        assignment = online.e_step.assign(clf.component_log_prob(emb), labels)
        for c in range(C):  # the enqueue rule, by hand: filter, then at most 4 per (class, component)
            for k in range(K):
                n_ck = int(((labels == c) & (assignment == k) & correct).sum())
                offered[c] += n_ck
                written[c] += min(n_ck, 4)
        online.observe(emb, labels, correct, assignment)
        if online.due(step):
            online.maximise()
    stats = diagnostics.collect(steps=3)
    assert set(stats) == set(STATS) and all(
        v.shape == (C,) and v.dtype == torch.float64 for v in stats.values()
    )

    stds, means, count = clf.stds.double(), clf.means.double(), online.memory.count.double()
    for c in range(C):
        assert stats["std"][c].item() == pytest.approx(stds[c].sum().item() / (K * D), rel=1e-12)
        assert stats["memory_share"][c].item() == pytest.approx(count[c].sum().item() / count.sum().item())
        cosines = [float(means[c, k] @ means0[c, k]) / means[c, k].norm().item() for k in range(K)]
        angles = [math.degrees(math.acos(max(-1.0, min(1.0, cos)))) for cos in cosines]
        assert stats["mean_angle"][c].item() == pytest.approx(sum(angles) / K, abs=1e-4)
    assert np.allclose(stats["offered_per_step"].numpy(), offered / 3)
    assert np.allclose(stats["written_per_step"].numpy(), written / 3)
    assert stats["mean_angle"][0] > 0 and stats["mean_angle"][2] == 0 and stats["offered_per_step"][2] == 0
    # a second collect measures from the first: nothing happened in between
    again = diagnostics.collect(steps=1)
    assert again["mean_angle"].abs().max() < 1e-6 and again["written_per_step"].sum() == 0
    # the tallies are monitoring only: not in the checkpointed state
    assert not any("offered" in k or "pushed" in k for k in online.state_dict())


def test_hook_logs_the_diagnostics_at_its_period_on_a_tiny_mask2former(tmp_path):
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    model.train()
    predictor = find_gmm_predictors(model)[0]
    hook = GMMEMHook(
        predictor, capacity=50, max_per_step=3, interval=1, enqueue_correct_only=False, diagnostics_period=2
    )
    assert hook.class_names == [str(c) for c in range(NUM_CLASSES)] + ["no_object"]
    hook.trainer = types.SimpleNamespace(iter=0)
    with EventStorage(0) as storage, torch.no_grad():
        hook.trainer.storage = storage
        hook.before_train()
        for it in range(3):
            storage.iter = hook.trainer.iter = it
            model(batch(seed=it))
            hook.after_step()
        logged = {k: v for k, v in storage.histories().items() if k.startswith("gmm_diag/")}
        writer = JSONWriter(str(tmp_path / "metrics.json"))
        writer.write()  # what the trainer's PeriodicWriter does
        writer.close()
    names = hook.class_names
    expected = {f"gmm_diag/{s}/{c}" for s in STATS + ("logit_scale", "logit_bias") for c in names}
    assert set(logged) == expected | {"gmm_diag/logit_scale_mean"}
    assert all([it for _, it in h.values()] == [1] for h in logged.values())  # iteration 2 only, not 1 or 3
    value = {k: h.latest() for k, h in logged.items()}
    # two steps of 2 images x 6 queries: each step offers all 12 queries, no object gets those unmatched
    offered = sum(value[f"gmm_diag/offered_per_step/{c}"] for c in names)
    assert offered == 2 * NUM_QUERIES
    assert 0 < value["gmm_diag/written_per_step/no_object"] <= 3 * 2  # at most 3 per queue, K = 2 queues
    assert sum(value[f"gmm_diag/memory_share/{c}"] for c in names) == pytest.approx(1.0)
    weight = predictor.logit_norm.weight.detach().double()
    assert value["gmm_diag/logit_scale_mean"] == pytest.approx(weight.mean().item())
    assert value["gmm_diag/logit_scale/no_object"] == pytest.approx(weight[-1].item())
    records = {
        r["iteration"]: r for r in map(json.loads, (tmp_path / "metrics.json").read_text().splitlines())
    }
    assert set(logged) <= set(records[1]) and not any(k.startswith("gmm_diag/") for k in records[2])


def test_diagnostics_period_config_key():
    cfg = tiny_cfg("gmmseg", "MODEL.GMM.DIAGNOSTICS_PERIOD", "40")
    validate_gmmseg_config(cfg)
    predictor = find_gmm_predictors(build_model(cfg))[0]
    assert GMMEMHook.from_config(cfg, predictor).diagnostics_period == 40
    assert tiny_cfg().MODEL.GMM.DIAGNOSTICS_PERIOD == 0  # off by default
    with pytest.raises(ConfigValueError, match="DIAGNOSTICS_PERIOD"):
        validate_gmmseg_config(tiny_cfg("gmmseg", "MODEL.GMM.DIAGNOSTICS_PERIOD", "10"))


def _synthetic_metrics(path, rise: bool) -> None:
    lines = []
    for it in range(19, 400, 20):
        record = {"iteration": it, "loss_ce": 1.0 - it / 800 + (0.3 * (it > 200) if rise else 0.0)}
        record["gmm/memory_fill"] = min(1.0, it / 200)
        for c in ("0", "1", "no_object"):
            for s in STATS + ("logit_scale", "logit_bias"):
                record[f"gmm_diag/{s}/{c}"] = 0.1 + 0.01 * len(c) + it / 4000
        record["gmm_diag/logit_scale_mean"] = 1.1
        lines.append(json.dumps(record))
    lines.append(json.dumps({"iteration": 399, "sem_seg/mIoU": 40.0}))
    path.mkdir()
    (path / "metrics.json").write_text("\n".join(lines) + '\n{"iteration": 41')  # unfinished last line


def test_plot_script_writes_a_png_for_two_runs(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "plot_gmm_diagnostics", REPO / "tools" / "plot_gmm_diagnostics.py"
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)

    _synthetic_metrics(tmp_path / "before", rise=True)
    _synthetic_metrics(tmp_path / "after", rise=False)
    metrics = tool.load_metrics(str(tmp_path / "before" / "metrics.json"))
    assert metrics["loss_ce"][0][:2] == [19, 39] and metrics["sem_seg/mIoU"] == ([399], [40.0])
    assert list(tool.class_series(metrics, "std")) == ["0", "1", "no_object"]
    out = tmp_path / "diag.png"
    tool.main(
        [
            str(tmp_path / "before"),
            str(tmp_path / "after"),
            "--labels",
            "before",
            "after",
            "--output",
            str(out),
        ]
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _ece(conf: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """Direct ECE: per bin [b/B, (b+1)/B) (the last one closed), |accuracy - mean confidence| weighted."""
    total = 0.0
    for b in range(bins):
        upper = conf <= 1.0 if b == bins - 1 else conf < (b + 1) / bins
        inside = (conf >= b / bins) & upper
        if inside.any():
            total += inside.sum() / conf.size * abs(correct[inside].mean() - conf[inside].mean())
    return 100.0 * total


@pytest.mark.parametrize("kind", ["gmmseg", "softmax"])
def test_query_and_pixel_ece_against_numpy(tmp_path, kind):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(kind))
    model.eval()
    inputs = batch(seed=3)
    rng_before = torch.get_rng_state()
    with torch.no_grad():
        outputs = model(inputs)
        again = model(inputs)
        images = torch.stack([(x["image"] - model.pixel_mean) / model.pixel_std for x in inputs])
        decoded = model.sem_seg_head(model.backbone(images))
    assert torch.equal(torch.get_rng_state(), rng_before)  # the matching's random points are drawn aside
    posteriors = torch.stack([o["query_calibration"]["posteriors"] for o in outputs])
    labels = torch.stack([o["query_calibration"]["labels"] for o in outputs])
    assert torch.equal(labels, torch.stack([o["query_calibration"]["labels"] for o in again]))
    assert torch.allclose(posteriors, decoded["pred_logits"].softmax(-1), atol=1e-6)
    # the labels are the training matcher's (one query per class present, the rest no object)
    targets = model.prepare_targets(inputs, types.SimpleNamespace(tensor=torch.zeros(1, 1, 64, 64)))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        indices = model.criterion.matcher({k: decoded[k] for k in ("pred_logits", "pred_masks")}, targets)
    assert torch.equal(labels, labels_from_matching(indices, targets, labels.shape, NUM_CLASSES))
    assert (labels < NUM_CLASSES).sum() == sum(len(t["labels"]) for t in targets)

    name = f"_diag_ece_{kind}"
    MetadataCatalog.get(name).set(stuff_classes=[f"c{i}" for i in range(NUM_CLASSES)], ignore_label=255)
    evaluator = SemSegEvaluator(name, distributed=False)
    records = []
    for i, x in enumerate(inputs):
        path = tmp_path / f"{i}.png"
        Image.fromarray(x["sem_seg"].numpy().astype(np.uint8)).save(path)
        records.append({"sem_seg_file_name": str(path)})
    evaluator.process(records, outputs)
    results = evaluator.evaluate()["sem_seg"]

    gt = np.stack([x["sem_seg"].numpy() for x in inputs]).reshape(-1)
    probs = np.stack([o["sem_seg"].numpy() for o in outputs]).astype(np.float64)
    conf, pred = probs.max(1).reshape(-1), probs.argmax(1).reshape(-1)
    keep = gt != 255
    assert results["ECE"] == pytest.approx(_ece(conf[keep], pred[keep] == gt[keep]), abs=1e-4)
    q_post, q_lab = posteriors.double().numpy().reshape(-1, NUM_CLASSES + 1), labels.numpy().reshape(-1)
    q_conf, q_correct = q_post.max(1), q_post.argmax(1) == q_lab
    matched = q_lab < NUM_CLASSES
    assert results["ECE-query"] == pytest.approx(_ece(q_conf[matched], q_correct[matched]), abs=1e-4)
    assert results["ECE-query-all"] == pytest.approx(_ece(q_conf, q_correct), abs=1e-4)


def test_eval_only_reports_pixel_and_query_ece(tmp_path, unique_name):
    """The evaluation flow (``GMMSegTrainer.test``, as ``--eval-only``): a Mask2Former model's test loader
    carries the labels, so the evaluator reports both ECEs."""
    (name,) = register_folder_dataset(
        write_folder_dataset(tmp_path, unique_name, {"val": 2}, num_classes=NUM_CLASSES), unique_name
    )
    cfg = tiny_cfg(
        "gmmseg", "DATASETS.TEST", (name,), "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(tmp_path)
    )
    torch.manual_seed(0)
    results = GMMSegTrainer.test(cfg, build_model(cfg))["sem_seg"]  # one split: not keyed by name
    assert all(0 <= results[k] <= 100 for k in ("ECE", "ECE-query", "ECE-query-all"))
