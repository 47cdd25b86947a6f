"""GMM heads: forward/backward on CPU, gradients, inference outputs, and no NaN on degenerate batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from gmmseg import add_gmmseg_config
from gmmseg.modeling import GMMDeepLabV3PlusHead, GMMPredictor, GMMSemSegFPNHead

REPO = Path(__file__).resolve().parent.parent
NUM_CLASSES = 12


def _cfg(head: str = "GMMDeepLabV3PlusHead"):
    cfg = get_cfg()
    add_gmmseg_config(cfg)
    name = "deeplabv3plus_R18_gmmseg.yaml" if head == "GMMDeepLabV3PlusHead" else "fpn_R18_gmmseg.yaml"
    cfg.merge_from_file(str(REPO / "configs" / "digitscapes" / name))
    return cfg


def _batch(n: int = 2, size: int = 64, labels: torch.Tensor | None = None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        label = labels[i] if labels is not None else torch.randint(0, NUM_CLASSES, (size, size), generator=g)
        image = torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8)
        out.append({"image": image, "sem_seg": label, "height": size, "width": size})
    return out


@pytest.fixture(scope="module", params=["GMMDeepLabV3PlusHead", "GMMSemSegFPNHead"])
def model(request):
    torch.manual_seed(0)
    return build_model(_cfg(request.param))


def test_heads_are_registered_and_built(model):
    assert isinstance(model.sem_seg_head, (GMMDeepLabV3PlusHead, GMMSemSegFPNHead))
    predictor = model.sem_seg_head.gmm_predictor
    assert isinstance(predictor, GMMPredictor)
    assert predictor.gmm.means.shape == (NUM_CLASSES, 5, 64)
    names = {n for n, _ in model.named_parameters()}
    assert not any(n.endswith("gmm.means") or n.endswith("gmm.stds") for n in names)  # buffers, not params
    assert {"sem_seg_head.gmm_predictor.gmm.means", "sem_seg_head.gmm_predictor.gmm.stds"} <= set(
        model.state_dict()
    )


def _received(predictor) -> list:
    """Subscribe a list to the predictor's EM channel (``em_observer``); it receives each EM batch."""
    received = []
    predictor.em_observer = received.append
    return received


def test_backward_reaches_projection_not_mixtures(model):
    model.train()
    model.zero_grad()
    means_before = model.sem_seg_head.gmm_predictor.gmm.means.clone()
    received = _received(model.sem_seg_head.gmm_predictor)
    losses = model(_batch())
    assert set(losses) == {"loss_sem_seg", "loss_gmm_component"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    predictor = model.sem_seg_head.gmm_predictor
    assert predictor.gmm.means.grad is None and predictor.gmm.stds.grad is None
    assert not predictor.gmm.means.requires_grad
    assert predictor.projection.weight.grad is not None and predictor.projection.weight.grad.abs().sum() > 0
    backbone_grads = [p.grad for p in model.backbone.parameters() if p.grad is not None]
    assert backbone_grads and any(g.abs().sum() > 0 for g in backbone_grads)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.step()
    assert torch.equal(predictor.gmm.means, means_before)  # only EM moves the mixtures
    assert len(received) == 1  # one EM batch per training step
    batch = received[0]
    assert batch.embeddings.shape[1] == 64 and batch.labels.shape == batch.correct.shape
    assert batch.assignment.shape == batch.labels.shape and not batch.embeddings.requires_grad
    assert torch.allclose(batch.embeddings.norm(dim=1), torch.ones(len(batch.labels)), atol=1e-5)
    predictor.em_observer = None


def test_one_e_step_gives_the_component_loss_targets_and_the_em_batch():
    """The assignments handed to the online EM are the component loss's targets: the loss recomputed
    from the EM batch alone (every labelled pixel is in it) equals the model's; and they are the E-step
    of those pixels (Sinkhorn per class over the batch's pixels)."""
    torch.manual_seed(0)
    m = build_model(_cfg())
    m.train()
    predictor = m.sem_seg_head.gmm_predictor
    received = _received(predictor)
    labels = torch.randint(0, NUM_CLASSES, (2, 64, 64), generator=torch.Generator().manual_seed(1))
    labels[:, :8] = 255  # some ignored pixels
    losses = m(_batch(labels=labels))
    (batch,) = received
    assert len(batch.labels) == 2 * 16 * 16 - 2 * 2 * 16  # the stride-4 pixels not ignored
    assert (batch.assignment >= 0).all() and (batch.assignment < predictor.num_components).all()
    with torch.no_grad():
        component = predictor.gmm.component_log_prob(batch.embeddings)
        target = batch.labels * predictor.num_components + batch.assignment
        expected = F.cross_entropy(component.flatten(1), target) * predictor.component_loss_weight
        assert torch.equal(predictor.e_step.assign(component, batch.labels), batch.assignment)
    torch.testing.assert_close(losses["loss_gmm_component"].detach(), expected)


def test_component_loss_weight_scales_the_component_loss():
    cfg = _cfg()
    cfg.MODEL.GMM.COMPONENT_LOSS_WEIGHT = 0.0
    torch.manual_seed(0)
    m = build_model(cfg)
    m.train()
    losses = m(_batch())
    assert losses["loss_gmm_component"].item() == 0.0 and losses["loss_sem_seg"].item() > 0


@pytest.mark.parametrize("activation", ["relu", "none"])
def test_projection_activation_from_the_config(activation):
    """With the reference's ReLU the projected features are >= 0, so the LayerNorm maps all zeroed
    channels of a pixel to one value; without it they keep their signs and spread."""
    cfg = _cfg()
    cfg.MODEL.GMM.PROJECTION_ACTIVATION = activation
    torch.manual_seed(0)
    predictor = build_model(cfg).eval().sem_seg_head.gmm_predictor
    features = torch.randn(2, predictor.projection.in_channels, 8, 8)
    with torch.no_grad():
        projected = predictor.projection(features)
        embeddings = predictor.embed(features)
    assert bool((projected < 0).any()) == (activation == "none")
    zeroed = projected.permute(0, 2, 3, 1) == 0  # (N, H, W, D)
    if activation == "relu":
        assert zeroed.sum(-1).min() >= 2  # several zeroed channels per pixel...
        normed = predictor.feature_norm(projected.permute(0, 2, 3, 1))  # (weight 1, bias 0 at init)
        for row, zeros in zip(normed.reshape(-1, 64)[:32], zeroed.reshape(-1, 64)[:32]):
            assert torch.allclose(row[zeros], row[zeros][0].expand(int(zeros.sum())))  # ...all one value
    else:
        assert not zeroed.any()
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(2, 8, 8))


def test_inference_returns_posteriors_and_anomaly_at_input_resolution(model):
    model.eval()
    inputs = _batch(n=2, size=64)
    inputs[1]["height"], inputs[1]["width"] = 80, 100  # original size differs from the network input
    with torch.no_grad():
        outputs = model(inputs)
    for out, (h, w) in zip(outputs, [(64, 64), (80, 100)]):
        assert out["sem_seg"].shape == (NUM_CLASSES, h, w) and out["anomaly"].shape == (h, w)
        assert torch.allclose(out["sem_seg"].sum(0), torch.ones(h, w), atol=1e-5)
        assert torch.isfinite(out["anomaly"]).all()
    # the anomaly map is -max_c log p(x|c) from the GMM, computed independently here at feature level
    head = model.sem_seg_head
    with torch.no_grad():
        images = torch.stack([(x["image"].float() - model.pixel_mean) / model.pixel_std for x in inputs[:1]])
        feats = head.layers(model.backbone(images))
        emb = head.gmm_predictor.embed(feats)
        gmm = head.gmm_predictor.gmm
        dist = torch.distributions.Independent(torch.distributions.Normal(gmm.means, gmm.stds), 1)
        comp = dist.log_prob(emb[..., None, None, :])  # (1, h, w, C, K)
        expected = -comp.amax(dim=-1).amax(dim=-1)[0]
        got = head.gmm_predictor.anomaly_map(head.gmm_predictor(feats))[0]
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize(
    "labels",
    [
        torch.full((2, 64, 64), 3),  # one class only
        torch.full((2, 64, 64), 255),  # everything ignored
    ],
    ids=["one-class", "all-ignore"],
)
def test_degenerate_batches_give_finite_losses_and_gradients(labels):
    torch.manual_seed(0)
    m = build_model(_cfg())
    m.train()
    received = _received(m.sem_seg_head.gmm_predictor)
    losses = m(_batch(labels=labels))
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    (batch,) = received
    assert set(batch.labels.unique().tolist()) <= {3}


def test_discriminative_variant_learns_the_mixtures_by_backprop_without_the_em_hook():
    """MODEL.GMM.FIT backprop (the paper's "discriminative GMMSeg"): means and stds are parameters that
    the loss moves; no EM batch is handed over and GMMSegTrainer adds no GMMEMHook."""
    cfg = _cfg()
    cfg.MODEL.GMM.FIT = "backprop"
    torch.manual_seed(0)
    m = build_model(cfg)
    m.train()
    gmm = m.sem_seg_head.gmm_predictor.gmm
    received = _received(m.sem_seg_head.gmm_predictor)
    names = {n for n, _ in m.named_parameters()}
    assert {"sem_seg_head.gmm_predictor.gmm.means", "sem_seg_head.gmm_predictor.gmm.stds"} <= names
    before = gmm.means.detach().clone(), gmm.stds.detach().clone()
    sum(m(_batch()).values()).backward()
    assert gmm.means.grad.abs().sum() > 0 and gmm.stds.grad.abs().sum() > 0
    torch.optim.SGD(m.parameters(), lr=0.5).step()
    assert not torch.equal(gmm.means, before[0]) and not torch.equal(gmm.stds, before[1])
    assert received == []
    # where they are used, means have unit length and stds respect the floor
    with torch.no_grad():
        gmm.stds.fill_(-3.0)
        means, stds = gmm.parameters_in_use()
    assert torch.allclose(means.norm(dim=-1), torch.ones_like(means[..., 0]), atol=1e-5)
    assert (stds == gmm.min_std).all()
    m.eval()
    with torch.no_grad():
        out = m(_batch(n=1))[0]
    assert torch.isfinite(out["anomaly"]).all()
    assert not m.sem_seg_head.gmm_predictor.fitted_by_em  # GMMSegTrainer adds no GMMEMHook for it
