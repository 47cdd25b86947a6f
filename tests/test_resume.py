"""An interrupted GMMSeg run resumed with --resume ends bit-identical to an uninterrupted one (CPU, fixed
seed): model weights, GMM means/stds, memory, optimizer state; for DeepLabV3+ and for Mask2Former (whose
Hungarian matcher samples points from the global RNG), and from a checkpoint whose online-EM state is in
the layout of release 0.1.0."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.engine import HookBase
from detectron2.utils.env import seed_all_rng

from gmmseg import add_gmmseg_config
from gmmseg.data.folder_dataset import register_folder_dataset
from gmmseg.engine import GMMSegTrainer
from gmmseg.engine.hooks import GMMEMHook
from gmmseg_datasets.digitscapes import generate_digitscapes

REPO = Path(__file__).resolve().parent.parent


class _Crash(HookBase):
    """Simulates a crash after a given iteration (after the checkpointer has run for it)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def after_step(self) -> None:
        if self.trainer.iter == self.at:
            raise KeyboardInterrupt("simulated crash")


def _cfg(out: Path, config: str = "deeplabv3plus_R18_gmmseg.yaml"):
    cfg = get_cfg()
    add_gmmseg_config(cfg)
    cfg.merge_from_file(str(REPO / "configs" / "digitscapes" / config))
    cfg.merge_from_list(
        [
            "SOLVER.IMS_PER_BATCH",
            "2",
            "SOLVER.MAX_ITER",
            "8",
            "SOLVER.CHECKPOINT_PERIOD",
            "4",
            "SOLVER.WARMUP_ITERS",
            "1",
            "DATALOADER.NUM_WORKERS",
            "0",
            "INPUT.MIN_SIZE_TRAIN",
            "(64,)",
            "MODEL.GMM.UPDATE_INTERVAL",
            "2",
            "MODEL.GMM.MEMORY_CAPACITY",
            "50",
            "DATASETS.TEST",
            "()",
            "OUTPUT_DIR",
            str(out),
            "SEED",
            "3",
        ]
    )
    return cfg


def _train(cfg, resume: bool, crash_at: int | None = None) -> GMMSegTrainer:
    seed_all_rng(cfg.SEED)
    trainer = GMMSegTrainer(cfg)
    if crash_at is not None:
        trainer.register_hooks([_Crash(crash_at)])
    trainer.resume_or_load(resume=resume)
    if crash_at is None:
        trainer.train()
    else:
        with pytest.raises(KeyboardInterrupt):
            trainer.train()
    return trainer


def _state(trainer: GMMSegTrainer) -> dict[str, torch.Tensor]:
    state = {f"model.{k}": v for k, v in trainer.model.state_dict().items()}
    hook = next(h for h in trainer._hooks if isinstance(h, GMMEMHook))
    state.update({f"em.{k}": v for k, v in hook.online.state_dict().items()})
    opt = trainer.optimizer.state_dict()["state"]
    state.update({f"opt.{i}.{k}": v for i, s in opt.items() for k, v in s.items() if torch.is_tensor(v)})
    return state


def _to_release_0_1_0_layout(checkpoint: Path) -> None:
    """Rewrite the checkpoint's GMMEMHook state as release 0.1.0 saved it (its key names, by hand)."""
    data = torch.load(checkpoint, weights_only=True)
    state = data["trainer"]["hooks"]["GMMEMHook"]
    names = ("features", "ptr", "count", "sums", "sq_sums")
    data["trainer"]["hooks"]["GMMEMHook"] = {
        "memory": {name: state[f"memory.{name}"] for name in names},
        "seen": state["seen"],
        "generator": state.get("sampling_generator"),
    }
    assert set(state) - {"sampling_generator"} == {f"memory.{name}" for name in names} | {"seen"}
    torch.save(data, checkpoint)


@pytest.mark.slow
@pytest.mark.parametrize(
    "config, layout",
    [
        ("deeplabv3plus_R18_gmmseg.yaml", "current"),
        ("deeplabv3plus_R18_gmmseg.yaml", "0.1.0"),
        ("mask2former_R18_gmmseg.yaml", "current"),
    ],
)
def test_interrupt_and_resume_equals_uninterrupted(tmp_path, config, layout):
    root = tmp_path / "datasets"
    register_folder_dataset(
        generate_digitscapes(str(root), image_size=64, counts={"train": 10, "val": 0, "anomaly_val": 0})
    )
    straight = _state(_train(_cfg(tmp_path / "straight", config), resume=False))

    crashed_cfg = _cfg(tmp_path / "crashed", config)
    _train(crashed_cfg, resume=False, crash_at=5)  # checkpoint written after iteration 3, crash in 5
    assert (tmp_path / "crashed" / "last_checkpoint").read_text().strip() == "model_0000003.pth"
    if layout == "0.1.0":
        _to_release_0_1_0_layout(tmp_path / "crashed" / "model_0000003.pth")
    resumed = _train(crashed_cfg, resume=True)
    assert resumed.start_iter == 4
    after = _state(resumed)

    assert set(after) == set(straight)
    different = [k for k in straight if not torch.equal(straight[k], after[k])]
    assert not different, different
    assert int(after["em.memory.count"].sum()) > 0
