"""Mask2Former's per-pixel anomaly scores (``modeling/mask_anomaly.py``): RbA and the claiming query's
likelihood against float64 loops written from their definitions, finiteness at extreme logits, the
registry's refusals naming ``TEST.ANOMALY_SCORES``, and an eval-only smoke through the anomaly evaluator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model
from PIL import Image
from test_mask_former import batch, tiny_cfg

from gmmseg import validate_gmmseg_config
from gmmseg.config_validation import ConfigValueError
from gmmseg.evaluation import AnomalyEvaluator
from gmmseg.evaluation.report import results_rows
from gmmseg.modeling import QueryGMMPredictor
from gmmseg.modeling.anomaly_scores import (
    LOGITS,
    MASK_CLASSIFICATION_MAPS,
    MASK_CLASSIFICATION_SOFTMAX_MAPS,
    compute_scores,
    default_scores,
    resolve_scores,
)
from gmmseg.modeling.mask_anomaly import (
    OWNERSHIP_FLOOR,
    assigned_query_anomaly,
    mask_weighted_sums,
    ownership_anomaly_from_sums,
    ownership_columns,
    rejected_by_all,
)
from gmmseg.modeling.mask_former import mask_classification_anomaly, mask_classification_scores

SOFTMAX_SCORES = ("msp", "entropy", "max_logit", "energy", "rba")
GMM_SCORES = ("gmm", "gmm_assigned", "rba", "msp", "entropy")


def _fixture(seed: int = 0, b: int = 2, q: int = 5, c: int = 4, h: int = 6, w: int = 7):
    """Query class logits (B, Q, C + 1), mask logits (B, Q, H, W), query scores (B, Q)."""
    g = torch.Generator().manual_seed(seed)
    mask_cls = 2 * torch.randn(b, q, c + 1, generator=g)
    mask_pred = 3 * torch.randn(b, q, h, w, generator=g)
    query_score = 20 * torch.randn(b, q, generator=g)
    return mask_cls, mask_pred, query_score


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + np.exp(-x))


def _query_probs(mask_cls: torch.Tensor) -> np.ndarray:
    z = mask_cls.double().numpy()
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_rba_against_a_float64_loop():
    """RbA (Nayal et al. 2023): -sum_c tanh(sum_q p(c|q) sigmoid(m_q(x))), no object excluded."""
    mask_cls, mask_pred, _ = _fixture()
    ours = rejected_by_all(mask_classification_scores(mask_cls, mask_pred))
    p = _query_probs(mask_cls)
    b_, q_, c1 = p.shape
    _, _, h, w = mask_pred.shape
    ref = np.zeros((b_, h, w))
    for b in range(b_):
        for y in range(h):
            for x in range(w):
                for c in range(c1 - 1):
                    s = sum(p[b, q, c] * _sigmoid(float(mask_pred[b, q, y, x])) for q in range(q_))
                    ref[b, y, x] -= np.tanh(s)
    assert ours.dtype == torch.float32 and ours.shape == (b_, h, w)
    np.testing.assert_allclose(ours.double().numpy(), ref, atol=1e-5)
    assert (ours <= 0).all() and (ours >= -(c1 - 1)).all()


def test_assigned_query_likelihood_against_a_float64_loop():
    """-max_c log p(e_q*|c) of q*(x) = argmax_q (1 - p(no object|q)) sigmoid(m_q(x))."""
    mask_cls, mask_pred, query_score = _fixture(1)
    ours = assigned_query_anomaly(mask_cls, mask_pred, query_score)
    p = _query_probs(mask_cls)
    b_, q_, h, w = mask_pred.shape
    ref, clear = np.zeros((b_, h, w)), np.zeros((b_, h, w), dtype=bool)
    for b in range(b_):
        for y in range(h):
            for x in range(w):
                weights = [(1 - p[b, q, -1]) * _sigmoid(float(mask_pred[b, q, y, x])) for q in range(q_)]
                owner = int(np.argmax(weights))
                ref[b, y, x] = -float(query_score[b, owner])
                top2 = sorted(weights)[-2:]
                clear[b, y, x] = top2[1] - top2[0] > 1e-6 * top2[1]  # no near-tie float32 may flip
    assert ours.dtype == torch.float32 and ours.shape == (b_, h, w)
    assert clear.mean() > 0.95
    np.testing.assert_array_equal(ours.double().numpy()[clear], ref[clear])
    # every pixel takes exactly one query's score, so it lies within the soft score's range
    soft = mask_classification_anomaly(mask_cls, mask_pred, query_score)
    lo, hi = (-query_score).amin(1)[:, None, None], (-query_score).amax(1)[:, None, None]
    assert ((ours >= lo) & (ours <= hi) & (soft >= lo - 1e-4) & (soft <= hi + 1e-4)).all()


def test_extreme_logits_give_finite_scores():
    g = torch.Generator().manual_seed(2)
    mask_cls = 1e4 * torch.randn(2, 5, 4, generator=g).sign()
    mask_pred = 1e4 * torch.randn(2, 5, 3, 4, generator=g).sign()
    query_score = 1e3 * torch.randn(2, 5, generator=g)
    scores = mask_classification_scores(mask_cls, mask_pred)
    logits = torch.log(scores.clamp_min(torch.finfo(scores.dtype).tiny))
    maps = {
        "rba": rejected_by_all(scores),
        "gmm": mask_classification_anomaly(mask_cls, mask_pred, query_score),
        "gmm_assigned": assigned_query_anomaly(mask_cls, mask_pred, query_score),
    }
    for b in range(2):
        maps.update(compute_scores(("msp", "entropy", "max_logit", "energy"), {LOGITS: logits[b]}))
        assert all(torch.isfinite(v).all() for v in maps.values()), {k: v for k, v in maps.items()}


def test_assignment_is_decided_where_probabilities_underflow():
    """Every query surely "no object" and no mask claiming the pixel: in probability space all weights
    are 0 (a tie); in log space the query with the largest mask logit still claims it."""
    mask_cls = torch.zeros(1, 4, 3)
    mask_cls[..., -1] = 1e4  # p(no object | q) rounds to 1 for every query
    mask_pred = torch.full((1, 4, 2, 3), -1e4) + torch.tensor([0.0, 3.0, 7.0, 1.0])[None, :, None, None]
    query_score = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert (F.softmax(mask_cls, -1)[..., -1] == 1).all() and (mask_pred.sigmoid() == 0).all()
    out = assigned_query_anomaly(mask_cls, mask_pred, query_score)
    assert torch.equal(out, torch.full((1, 2, 3), -3.0))


def test_registry_declares_the_mask_classification_scores():
    assert default_scores(MASK_CLASSIFICATION_SOFTMAX_MAPS) == SOFTMAX_SCORES
    assert default_scores(MASK_CLASSIFICATION_MAPS) == ("gmm",)  # today's default is kept
    assert resolve_scores(GMM_SCORES, MASK_CLASSIFICATION_MAPS) == GMM_SCORES
    for name in ("gmm", "gmm_assigned"):
        with pytest.raises(ValueError, match=f"^TEST.ANOMALY_SCORES: the '{name}' anomaly score needs"):
            resolve_scores(("rba", name), MASK_CLASSIFICATION_SOFTMAX_MAPS)
    with pytest.raises(ValueError, match="^TEST.ANOMALY_SCORES: the 'rba' anomaly score needs a mask-class"):
        resolve_scores(("msp", "rba"), {LOGITS})  # a per-pixel softmax head


def _names(scores) -> str:
    return "[" + ", ".join(f"'{s}'" for s in scores) + "]"


def test_softmax_mask2former_refuses_gmm_scores_by_the_key():
    cfg = tiny_cfg("softmax", "TEST.ANOMALY_SCORES", "['rba', 'gmm_assigned']")
    with pytest.raises(ConfigValueError, match="'gmm_assigned'") as info:
        validate_gmmseg_config(cfg)
    assert info.value.key == "TEST.ANOMALY_SCORES"
    with pytest.raises(ValueError, match="^TEST.ANOMALY_SCORES: the 'gmm_assigned' anomaly score needs GMM"):
        build_model(cfg)
    validate_gmmseg_config(tiny_cfg("gmmseg", "TEST.ANOMALY_SCORES", _names(GMM_SCORES)))


def _model(kind: str, scores=()):
    torch.manual_seed(0)
    opts = ("TEST.ANOMALY_SCORES", _names(scores)) if scores else ()
    return build_model(tiny_cfg(kind, *opts)).eval()


@pytest.mark.parametrize(
    "kind, scores",
    [
        ("softmax", ()),
        ("gmmseg", ()),
        ("softmax", ("msp",)),
        ("gmmseg", ("msp",)),
        ("gmmseg", ("gmm_assigned", "energy")),
    ],
)
def test_optional_maps_are_computed_only_when_read(kind, scores):
    model = _model(kind, scores)
    with torch.no_grad():
        (out,) = model.inference_outputs(batch(n=1))
    names = model.anomaly_score_names
    reads = {"gmm": "anomaly", "gmm_assigned": "anomaly_assigned", "rba": "rba"}
    expected = {"logits"} | {reads[name] for name in names if name in reads}
    assert set(out) == expected and names == (scores or (SOFTMAX_SCORES if kind == "softmax" else ("gmm",)))


def test_gmm_mask2former_without_its_anomaly_map_gives_the_same_posteriors():
    """Only logit scores asked for: no ownership columns are summed with the semantic scores, no
    ``anomaly`` in the result, and the posteriors are those of the default model (up to rounding)."""
    default, lean = _model("gmmseg"), _model("gmmseg", ("msp",))
    with torch.no_grad():
        (full,), (few,) = default(batch(n=1)), lean(batch(n=1))
        outputs = lean.sem_seg_head(lean.backbone(torch.zeros(1, 3, 64, 64)))
    assert lean.query_scores(outputs) is None and lean.aggregated_columns(outputs, None) is None
    assert default.aggregated_columns(outputs, default.query_scores(outputs)).shape[-1] == 2
    assert "anomaly" in full and "anomaly" not in few and list(few["anomaly_scores"]) == ["msp"]
    torch.testing.assert_close(few["sem_seg"], full["sem_seg"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind, scores", [("softmax", SOFTMAX_SCORES), ("gmmseg", GMM_SCORES)])
def test_eval_only_smoke_through_the_anomaly_evaluator(kind, scores, tmp_path):
    """One decoder pass gives every score; the maps are the functions of its outputs; the evaluator
    reports each score in its results, JSON and table."""
    model = _model(kind, scores)
    decoded = []
    model.sem_seg_head.register_forward_hook(lambda module, args, out: decoded.append(out))
    inputs = batch(n=2, size=64)
    with torch.no_grad():
        results = model(inputs)
    (outputs,) = decoded  # a single forward pass of the head
    mask_pred = F.interpolate(outputs["pred_masks"], size=(64, 64), mode="bilinear", align_corners=False)
    expected = {"rba": rejected_by_all(mask_classification_scores(outputs["pred_logits"], mask_pred))}
    if kind == "gmmseg":
        query_score = model.gmm_predictor.object_log_prob(outputs["gmm"])
        expected["gmm_assigned"] = assigned_query_anomaly(outputs["pred_logits"], mask_pred, query_score)
        expected["gmm"] = mask_classification_anomaly(outputs["pred_logits"], mask_pred, query_score)
    for i, result in enumerate(results):
        got = result["anomaly_scores"]
        assert tuple(got) == scores
        assert all(
            v.shape == (64, 64) and v.dtype == torch.float32 and torch.isfinite(v).all() for v in got.values()
        )
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value[i])
        if kind == "gmmseg":  # each pixel carries one query's likelihood
            assert set(got["gmm_assigned"].unique().tolist()) <= set((-query_score[i]).tolist())

    # ground truth: the top rows void, a square of anomaly pixels
    for i, x in enumerate(inputs):
        ood = np.zeros((64, 64), dtype=np.uint8)
        ood[20:40, 20:40], ood[:3] = 1, 255
        x["ood_file_name"] = str(tmp_path / f"ood_{i}.png")
        Image.fromarray(ood).save(x["ood_file_name"])
    evaluator = AnomalyEvaluator(
        "smoke", distributed=False, output_dir=str(tmp_path / "eval"), mode="exact", num_heatmaps=0
    )
    evaluator.reset()
    evaluator.process(inputs, results)
    metrics = evaluator.evaluate()["anomaly"]
    assert [k for k in metrics if k.endswith("/AUROC")] == [f"{s}/AUROC" for s in scores]
    assert all(0.0 <= metrics[f"{s}/{m}"] <= 100.0 for s in scores for m in ("AUROC", "AP", "FPR95"))
    rows = results_rows("tiny", {"smoke": {"anomaly": metrics}})
    assert [row[4] for row in rows] == list(scores)
    report = (tmp_path / "eval" / "anomaly_evaluation.json").read_text()
    assert all(f'"{s}/AP"' in report for s in scores)


def test_one_pass_sums_equal_the_separate_maps():
    """``mask_weighted_sums`` gives the semantic scores and the ownership sums of one einsum; the soft-
    ownership anomaly made from them equals the float64 definition (weights normalised per pixel)."""
    g = torch.Generator().manual_seed(3)
    mask_cls, mask_pred = torch.randn(2, 6, 5, generator=g), 4 * torch.randn(2, 6, 9, 11, generator=g)
    query_score = 40 + 10 * torch.randn(2, 6, generator=g)
    scores, sums = mask_weighted_sums(mask_cls, mask_pred, ownership_columns(mask_cls, query_score))
    torch.testing.assert_close(scores, mask_classification_scores(mask_cls, mask_pred))
    assert mask_weighted_sums(mask_cls, mask_pred)[1] is None
    probs = torch.softmax(mask_cls.double(), -1)
    weights = (1 - probs[..., -1])[..., None, None] * mask_pred.double().sigmoid() + OWNERSHIP_FLOOR
    expected = -(weights / weights.sum(1, keepdim=True) * query_score.double()[..., None, None]).sum(1)
    fused = ownership_anomaly_from_sums(sums, query_score)
    torch.testing.assert_close(fused.double(), expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(fused, mask_classification_anomaly(mask_cls, mask_pred, query_score))


@pytest.mark.parametrize(
    "scores, window",
    [(("gmm", "gmm_assigned"), None), (("gmm", "gmm_assigned"), "(64, 64)"), (("msp", "rba"), None)],
)
def test_query_scores_are_computed_once_per_decoder_pass(scores, window, monkeypatch):
    """The GMM query scores (``object_log_prob``) are made once per decoder pass, whole image or row of
    sliding windows, from that pass's outputs, and not at all when no map reads them; the maps equal
    those of the lower-level functions fed a score of their own."""
    opts = ["TEST.ANOMALY_SCORES", _names(scores)]
    if window:
        opts += ["TEST.SLIDING_WINDOW.ENABLED", "True", "TEST.SLIDING_WINDOW.SIZE", window]
        opts += ["TEST.SLIDING_WINDOW.STRIDE", "(32, 32)"]
    torch.manual_seed(0)
    model = build_model(tiny_cfg("gmmseg", *opts)).eval()
    scored, decoded = [], []
    score = QueryGMMPredictor.object_log_prob

    def spy(predictor, outputs):
        scored.append(outputs)
        return score(predictor, outputs)

    monkeypatch.setattr(QueryGMMPredictor, "object_log_prob", spy)
    model.sem_seg_head.register_forward_hook(lambda module, args, out: decoded.append(out))
    with torch.no_grad():
        (result,) = model(batch(n=1, size=96 if window else 64))
    assert len(decoded) == (2 if window else 1)  # two rows of two windows, or the whole image
    if "gmm" not in scores:
        assert scored == []
        return
    assert len(scored) == len(decoded) and all(s is d["gmm"] for s, d in zip(scored, decoded))
    if window is None:
        (outputs,) = decoded
        mask_cls, query_score = outputs["pred_logits"], score(model.gmm_predictor, outputs["gmm"])
        mask_pred = F.interpolate(outputs["pred_masks"], size=(64, 64), mode="bilinear", align_corners=False)
        got = result["anomaly_scores"]
        torch.testing.assert_close(
            got["gmm"], mask_classification_anomaly(mask_cls, mask_pred, query_score)[0]
        )
        assert torch.equal(got["gmm_assigned"], assigned_query_anomaly(mask_cls, mask_pred, query_score)[0])
