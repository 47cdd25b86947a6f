"""Mask2Former with the GMM class predictor: training step, gradients, matched-query memory, inference
outputs, the per-pixel anomaly formula against a float64 loop, and a checkpoint round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from gmmseg import add_gmmseg_config, validate_gmmseg_config
from gmmseg.config_validation import ConfigValueError
from gmmseg.engine.hooks import GMMEMHook, find_gmm_predictors
from gmmseg.modeling.mask_former import (
    OWNERSHIP_FLOOR,
    GMMMaskFormer,
    GMMMultiScaleMaskedTransformerDecoder,
    mask_classification_anomaly,
    mask_classification_scores,
)

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "digitscapes"
NUM_CLASSES = 4
NUM_QUERIES = 6
# a tiny Mask2Former: the DigitScapes config, narrower and shallower
TINY = [
    "MODEL.SEM_SEG_HEAD.NUM_CLASSES", NUM_CLASSES,
    "MODEL.SEM_SEG_HEAD.CONVS_DIM", 32,
    "MODEL.SEM_SEG_HEAD.MASK_DIM", 32,
    "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", 1,
    "MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS", 2,
    "MODEL.MASK_FORMER.HIDDEN_DIM", 32,
    "MODEL.MASK_FORMER.NHEADS", 2,
    "MODEL.MASK_FORMER.DIM_FEEDFORWARD", 64,
    "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", NUM_QUERIES,
    "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", 64,
    "MODEL.GMM.EMBED_DIM", 8,
    "MODEL.GMM.NUM_COMPONENTS", 2,
    "MODEL.GMM.MEMORY_CAPACITY", 50,
    "DATASETS.TRAIN", (),
    "DATASETS.TEST", (),
]  # fmt: skip


def tiny_cfg(kind: str = "gmmseg", *opts):
    cfg = get_cfg()
    add_gmmseg_config(cfg)
    cfg.merge_from_file(str(CONFIGS / f"mask2former_R18_{kind}.yaml"))
    cfg.merge_from_list([str(v) if not isinstance(v, tuple) else v for v in TINY] + list(opts))
    return cfg


def tiny_model(kind: str = "gmmseg", seed: int = 0):
    torch.manual_seed(seed)
    return build_model(tiny_cfg(kind))


def batch(seed: int = 0, size: int = 64, n: int = 2) -> list[dict]:
    """Images with blocky labels: image i holds classes {0, 1, 2} or {1, 3}, plus ignored pixels."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        label = torch.full((size, size), 1, dtype=torch.long)
        if i % 2 == 0:
            label[: size // 2, : size // 2] = 0
            label[size // 2 :, size // 2 :] = 2
        else:
            label[:, : size // 3] = 3
        label[:3] = 255
        image = torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8)
        out.append({"image": image, "sem_seg": label, "height": size, "width": size})
    return out


def present_classes(label: torch.Tensor) -> set[int]:
    return {int(c) for c in label.unique() if c != 255}


def test_forward_backward_on_cpu_without_gradient_into_the_mixtures():
    model = tiny_model()
    model.train()
    losses = model(batch())
    expected = {"loss_ce", "loss_mask", "loss_dice", "loss_gmm_component"}
    expected |= {f"{k}_{i}" for k in ("loss_ce", "loss_mask", "loss_dice") for i in range(3)}
    assert set(losses) == expected
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()

    predictor = model.sem_seg_head.predictor.class_predictor
    gmm = predictor.gmm
    # the mixtures are buffers: not parameters, no gradient, no optimizer state
    parameters = set(model.parameters())
    assert gmm.means not in parameters and gmm.stds not in parameters
    assert not gmm.means.requires_grad and gmm.means.grad is None and gmm.stds.grad is None
    assert all(
        not name.startswith("sem_seg_head.predictor.class_predictor.gmm")
        for name, _ in model.named_parameters()
    )
    # ... while the query embedding, the decoder, the pixel decoder and the backbone learn
    for param in (
        predictor.projection.weight,
        model.sem_seg_head.predictor.query_feat.weight,
        model.sem_seg_head.pixel_decoder.mask_features.weight,
        model.backbone.stem.conv1.weight,
    ):
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0
    assert not hasattr(model.sem_seg_head.predictor, "class_embed")


def test_class_logits_are_the_gmm_posteriors_used_by_matcher_criterion_and_inference():
    model = tiny_model()
    model.eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        outputs = model.sem_seg_head(model.backbone(images))
        gmm_out = outputs["gmm"]
        # the last layer's logits are the layer-normalised GMM class scores log p(e_q | c)
        predictor = model.sem_seg_head.predictor.class_predictor
        assert torch.equal(outputs["pred_logits"], gmm_out["logits"])
        assert torch.allclose(gmm_out["logits"], predictor.logit_norm(gmm_out["class_log_prob"]))
        ref = torch.distributions.Normal(predictor.gmm.means.double(), predictor.gmm.stds.double())
        e = gmm_out["embeddings"].double()[..., None, None, :]  # (B, Q, 1, 1, D)
        component = ref.log_prob(e).sum(-1)  # (B, Q, C+1, K)
        assert torch.allclose(gmm_out["component_log_prob"].double(), component, atol=1e-4)
        assert torch.allclose(gmm_out["class_log_prob"].double(), component.amax(-1), atol=1e-4)
        # moving the mixtures changes every classification output, but no mask
        predictor.gmm.means.copy_(
            torch.nn.functional.normalize(torch.randn_like(predictor.gmm.means), dim=-1)
        )
        moved = model.sem_seg_head(model.backbone(images))
    assert not torch.allclose(moved["pred_logits"], outputs["pred_logits"])
    assert all(
        not torch.allclose(a["pred_logits"], b["pred_logits"])
        for a, b in zip(moved["aux_outputs"], outputs["aux_outputs"])
    )
    assert torch.allclose(moved["pred_masks"], outputs["pred_masks"])


def test_matched_queries_fill_the_memory():
    model = tiny_model()
    model.train()
    predictor = find_gmm_predictors(model)[0]
    seen, received = [], []
    predictor.register_forward_hook(lambda module, args, out: seen.append(out))
    predictor.em_observer = received.append
    inputs = batch()
    model(inputs)
    (em,) = received  # one EM batch per step: the last decoder layer's queries
    last = seen[-1]  # the last decoder layer's GMM outputs
    no_object = NUM_CLASSES
    assert em.embeddings.shape == (2 * NUM_QUERIES, 8)
    assert torch.equal(em.embeddings, last["embeddings"].detach().reshape(-1, 8))
    labels = em.labels.reshape(2, NUM_QUERIES)
    for image_labels, x in zip(labels, inputs):
        matched = image_labels[image_labels != no_object].tolist()
        # the Hungarian matching gives each class present exactly one query; the rest are "no object"
        assert sorted(matched) == sorted(present_classes(x["sem_seg"]))
    prediction = last["logits"].argmax(-1).reshape(-1)
    assert torch.equal(em.correct, prediction == em.labels)
    component = last["component_log_prob"].detach().reshape(-1, NUM_CLASSES + 1, 2)
    assert torch.equal(em.assignment, predictor.e_step.assign(component, em.labels))

    # the online EM enqueues them by label (here all, not only the correctly classified ones)
    hook = GMMEMHook(predictor, capacity=50, max_per_step=20, enqueue_correct_only=False)
    written, classes = hook.online.observe(em.embeddings, em.labels, em.correct, em.assignment)
    assert written == 2 * NUM_QUERIES and classes == NUM_CLASSES + 1
    memory = hook.online.memory
    counts = memory.count.sum(dim=1)  # per class
    expected = torch.bincount(em.labels, minlength=NUM_CLASSES + 1)
    assert torch.equal(counts.cpu(), expected)
    # a class with a single matched query holds exactly that query's embedding
    single = [c for c in range(NUM_CLASSES) if expected[c] == 1][0]
    k = int(memory.count[single].argmax())
    stored = memory.features[single, k, 0].float()
    assert torch.allclose(stored, em.embeddings[em.labels == single][0])


def test_correct_only_enqueue_and_em_step_update_the_query_mixtures():
    model = tiny_model()
    model.train()
    predictor = find_gmm_predictors(model)[0]
    # the Mask2Former configs enqueue every matched query
    assert GMMEMHook.from_config(tiny_cfg(), predictor).online.enqueue_correct_only is False
    # the pixel heads' filter still works here
    hook = GMMEMHook(predictor, capacity=50, max_per_step=20, interval=1, enqueue_correct_only=True)
    received = []
    predictor.em_observer = received.append
    model(batch())
    (em,) = received
    written, _ = hook.online.observe(em.embeddings, em.labels, em.correct, em.assignment)
    assert written == int(em.correct.sum())
    before = predictor.gmm.means.clone()
    hook.online.maximise()
    changed = (predictor.gmm.means != before).any(-1).any(-1)
    assert torch.equal(changed, hook.online.memory.count.sum(1) > 0)


@pytest.mark.parametrize("kind", ["gmmseg", "softmax"])
def test_inference_outputs_at_input_resolution(kind):
    model = tiny_model(kind)
    model.eval()
    inputs = [dict(x, height=100, width=80) for x in batch()]
    inputs[1]["image"] = inputs[1]["image"][:, :48, :56]  # another size in the same batch
    with torch.no_grad():
        results = model(inputs)
    for result in results:
        sem_seg = result["sem_seg"]
        assert sem_seg.shape == (NUM_CLASSES, 100, 80)
        assert torch.allclose(sem_seg.sum(0), torch.ones(100, 80), atol=1e-5) and (sem_seg >= 0).all()
        scores = result["anomaly_scores"]
        if kind == "gmmseg":
            assert result["anomaly"].shape == (100, 80) and torch.isfinite(result["anomaly"]).all()
            assert list(scores) == ["gmm"] and torch.equal(scores["gmm"], result["anomaly"])
        else:
            assert "anomaly" not in result
            assert list(scores) == ["msp", "entropy", "max_logit", "energy", "rba"]
        assert all(v.shape == (100, 80) and torch.isfinite(v).all() for v in scores.values())


def test_semantic_inference_matches_mask2former():
    """``sem_seg`` is Mask2Former's ``sum_q p(c|q) sigmoid(m_q)`` renormalised over classes: same argmax."""
    from mask2former.maskformer_model import MaskFormer

    g = torch.Generator().manual_seed(0)
    mask_cls, mask_pred = torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 7, 9, generator=g)
    ours = mask_classification_scores(mask_cls, mask_pred)
    for b in range(2):
        reference = MaskFormer.semantic_inference(None, mask_cls[b], mask_pred[b])
        assert torch.allclose(ours[b], reference, atol=1e-6)


def test_anomaly_formula_against_a_float64_loop():
    g = torch.Generator().manual_seed(1)
    mask_cls, mask_pred = torch.randn(2, 5, 4, generator=g), 3 * torch.randn(2, 5, 6, 7, generator=g)
    query_score = 20 * torch.randn(2, 5, generator=g)
    ours = mask_classification_anomaly(mask_cls, mask_pred, query_score)
    m = mask_cls.double().numpy()
    p_object = 1 - np.exp(m[..., -1]) / np.exp(m).sum(-1)
    ref = np.zeros((2, 6, 7))
    for b in range(2):
        for y in range(6):
            for x in range(7):
                w = [
                    p_object[b, q] / (1 + np.exp(-float(mask_pred[b, q, y, x]))) + OWNERSHIP_FLOOR
                    for q in range(5)
                ]
                ref[b, y, x] = -sum(wq * float(query_score[b, q]) for wq, q in zip(w, range(5))) / sum(w)
    assert np.allclose(ours.double().numpy(), ref, atol=1e-4)

    # a query rejected as "no object" does not count, however unlikely its embedding
    mask_cls2, score2 = mask_cls.clone(), query_score.clone()
    mask_cls2[:, 0, -1] = 1e4  # p(no object | q0) = 1
    score2[:, 0] -= 500.0  # an embedding no class explains
    a = mask_classification_anomaly(mask_cls2, mask_pred, score2)
    b = mask_classification_anomaly(mask_cls2, mask_pred, query_score)
    assert torch.allclose(a, b, atol=1e-2)
    # no query claims any pixel: still finite (uniform ownership)
    silent = mask_classification_anomaly(mask_cls, torch.full_like(mask_pred, -1e4), query_score)
    assert torch.isfinite(silent).all()
    assert torch.allclose(silent, -query_score.mean(1)[:, None, None].expand_as(silent), atol=1e-3)


def test_checkpoint_round_trip(tmp_path):
    model = tiny_model()
    model.train()
    predictor = find_gmm_predictors(model)[0]
    hook = GMMEMHook(predictor, capacity=50, max_per_step=20, interval=1)
    for seed in range(2):
        model(batch(seed))  # its losses hand the EM batch to the hook, which enqueues it
        hook.online.maximise()
    assert int(hook.online.memory.count.sum()) > 0
    DetectionCheckpointer(model, str(tmp_path), hook=hook).save("ckpt", hook=hook.state_dict())

    other = tiny_model(seed=1)
    other_predictor = find_gmm_predictors(other)[0]
    other_hook = GMMEMHook(other_predictor, capacity=50, max_per_step=20, interval=1)
    assert not torch.equal(other_predictor.gmm.means, predictor.gmm.means)
    checkpoint = DetectionCheckpointer(other, str(tmp_path)).load(str(tmp_path / "ckpt.pth"))
    other_hook.load_state_dict(checkpoint["hook"])

    state, loaded = model.state_dict(), other.state_dict()
    assert state.keys() == loaded.keys()
    assert all(torch.equal(state[k], loaded[k]) for k in state)
    assert torch.equal(other_hook.online.memory.features, hook.online.memory.features)
    assert torch.equal(other_hook.online.memory.count, hook.online.memory.count)
    model.eval(), other.eval()
    with torch.no_grad():
        a, b = model(batch(5)), other(batch(5))
    assert torch.equal(a[0]["sem_seg"], b[0]["sem_seg"]) and torch.equal(a[0]["anomaly"], b[0]["anomaly"])


def test_registered_names_and_validation():
    model = tiny_model()
    assert isinstance(model, GMMMaskFormer)
    assert isinstance(model.sem_seg_head.predictor, GMMMultiScaleMaskedTransformerDecoder)
    cfg = tiny_cfg(
        "gmmseg", "MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME", "MultiScaleMaskedTransformerDecoder"
    )
    with pytest.raises(ConfigValueError, match="MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME"):
        validate_gmmseg_config(cfg)
    cfg = tiny_cfg("softmax", "MODEL.MASK_FORMER.TEST.PANOPTIC_ON", "True")
    with pytest.raises(ConfigValueError, match="MODEL.MASK_FORMER.TEST.PANOPTIC_ON"):
        validate_gmmseg_config(cfg)
    cfg = tiny_cfg("softmax", "SOLVER.OPTIMIZER", "LAMB")
    with pytest.raises(ConfigValueError, match="SOLVER.OPTIMIZER"):
        validate_gmmseg_config(cfg)
