"""A training run by ``python -m monai.bundle run`` and killed with SIGKILL mid-epoch leaves only loadable
checkpoints, resumes from the last saved iteration and ends with the weights of an uninterrupted run (CPU,
deterministic, num_workers 0): pretrain_joint (cpu_demo preset) and finetune_heart here, finetune_nodule and
finetune_cxr with their bundle tests. Also the atomic saver and the random-state checkpoint on their own."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import ignite.distributed as idist
import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigWorkflow
from monai.data import DataLoader, Dataset
from monai.transforms import Compose, RandGaussianNoised, RandSpatialCropd

from custom_nets.data import make_demo_corpus
from custom_nets.datasets import mmwhs
from custom_nets.engines import AtomicCheckpointSaver, AtomicDiskSaver, atomic_torch_save
from custom_nets.engines.handlers import RandomStateCheckpoint, random_transforms

REPO = Path(__file__).resolve().parents[2]
PRETRAIN = REPO / "bundles" / "pretrain_joint"
HEART = REPO / "bundles" / "finetune_heart"


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = atomic_torch_save({"w": torch.ones(2)}, tmp_path / "model.pt")
    assert os.stat(path).st_mode & 0o044 == 0o044  # readable by group and others, like any output

    def crash(obj, target):
        Path(target).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"w": torch.zeros(2)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no temporary file left behind


def test_superseded_checkpoint_is_deleted_only_after_its_successor_is_written(tmp_path, monkeypatch):
    """ignite calls ``remove(old)`` before ``save(new)``: a crash in between must still leave ``old``."""
    saver = AtomicDiskSaver(tmp_path)
    saver({"w": torch.ones(1)}, "checkpoint_epoch=1.pt")
    saver.remove("checkpoint_epoch=1.pt")  # ignite's order: remove the oldest, then save the next
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, handle: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        saver({"w": torch.zeros(1)}, "checkpoint_epoch=2.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch=1.pt"]
    monkeypatch.setattr(torch, "save", real_save)
    saver({"w": torch.zeros(1)}, "checkpoint_epoch=2.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch=2.pt"]
    fixed = AtomicDiskSaver(tmp_path, filename="model.pt")  # MONAI's fixed name: remove + save of the same file
    fixed({"w": torch.ones(1)}, "ignored.pt")
    fixed.remove("ignored.pt")
    fixed({"w": torch.full((1,), 3.0)}, "ignored.pt")
    assert torch.load(tmp_path / "model.pt", weights_only=True)["w"].item() == 3.0


def test_only_the_saving_rank_creates_the_checkpoint_folder(tmp_path, monkeypatch):
    """Under torchrun every rank builds the savers; a folder created by another rank between the check and the
    ``mkdir`` of ignite's ``DiskSaver`` on rank 0 ended finetune_heart's two-process run with ``FileExistsError``."""
    monkeypatch.setattr(idist, "get_rank", lambda: 1)
    saver = AtomicDiskSaver(tmp_path / "models")
    saver({"w": torch.ones(1)}, "model.pt")  # ignored on a rank that does not save
    assert not (tmp_path / "models").exists()
    monkeypatch.setattr(idist, "get_rank", lambda: 0)
    AtomicDiskSaver(tmp_path / "models")({"w": torch.ones(1)}, "model.pt")
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["model.pt"]


def test_monai_saver_swapped_for_atomic_handlers(tmp_path):
    model = torch.nn.Linear(2, 2)
    saver = AtomicCheckpointSaver(
        str(tmp_path), {"model": model}, save_final=True, final_filename="final.pt", save_interval=1, n_saved=1
    )
    engine = Engine(lambda e, b: None)
    saver.attach(engine)
    engine.run([0, 1], max_epochs=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final.pt", "model_epoch=3.pt"]  # MONAI's names, n_saved
    assert all(
        isinstance(c.save_handler, AtomicDiskSaver) for c in (saver._final_checkpoint, saver._interval_checkpoint)
    )


def test_random_state_checkpoint_replays_the_augmentations():
    """Draw, save, draw again; restore and the second draws repeat (torch global RNG and every transform's R)."""
    data = [{"image": np.arange(64, dtype=np.float32).reshape(1, 8, 8)} for _ in range(4)]
    transform = Compose(
        [RandSpatialCropd("image", roi_size=(4, 4), random_size=False), RandGaussianNoised("image", 1.0)]
    )
    loader = DataLoader(Dataset(data, transform), batch_size=2, shuffle=True, num_workers=0)
    assert len(random_transforms(loader)) == 5  # the Compose, its two random transforms and the array ones inside
    states = RandomStateCheckpoint(loader)
    next(iter(loader))
    saved = states.state_dict()
    after = [batch["image"] for batch in loader]
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    states.load_state_dict(torch.load(buffer, weights_only=True))  # as MONAI's CheckpointLoader reads it
    replay = [batch["image"] for batch in loader]
    assert all(torch.equal(a, b) for a, b in zip(after, replay, strict=True))


PRETRAIN_TINY = {  # the cpu_demo preset shrunk to seconds; 4 images + 4 volumes -> 2 iterations per epoch
    "encoder_depth": 18,
    "embed_dim": 32,
    "projection_dim": 16,
    "image_size": 16,
    "volume_size": 16,
    "small_crop_size": 8,
    "num_small_crops": 1,
    "num_slices": 4,
    "intra_slices_per_volume": 2,
    "images_per_batch": 2,
    "volumes_per_batch": 2,
    "num_workers": 0,
    "intra_prototypes": [8],
    "inter_prototypes": [4],
    "w_inter": 1.0,
    "epochs": 2,
}


def _kill_then_resume(
    tmp_path: Path, bundle_checks, config_file: list[str], overrides: dict, kill_at: int, resume: dict
) -> ConfigWorkflow:
    """Train in a subprocess killed with SIGKILL after iteration ``kill_at``, then resume in-process."""
    bundle_checks.train_until_sigkill(config_file, overrides, kill_at, tmp_path)
    return _train(config_file, {**overrides, **resume})


def _train(config_file: list[str], overrides: dict) -> ConfigWorkflow:
    workflow = ConfigWorkflow(config_file=config_file, workflow_type="train", **overrides)
    workflow.initialize()
    started_at = []
    workflow.trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: started_at.append(e.state.iteration))
    workflow.run()
    workflow.finalize()
    workflow.started_at = started_at  # iteration at each epoch start of this run
    return workflow


@pytest.mark.slow
def test_pretrain_joint_sigkill_mid_epoch_resumes_exactly(tmp_path, bundle_checks):
    corpus = make_demo_corpus(tmp_path / "corpus", num_per_class=1, in_plane=32, image_size=32)
    config = [str(PRETRAIN / "configs" / "train.json"), str(PRETRAIN / "configs" / "presets" / "cpu_demo.json")]
    common = {"bundle_root": str(PRETRAIN), "dataset_dir": str(corpus.parent), "datalist": str(corpus), **PRETRAIN_TINY}
    reference = _train(config, {**common, "output_dir": str(tmp_path / "reference")})
    assert reference.trainer.state.iteration == 4

    crashed = tmp_path / "crashed"
    resumed = _kill_then_resume(
        tmp_path, bundle_checks, config, {**common, "output_dir": str(crashed)}, kill_at=3, resume={"resume": True}
    )
    # killed in epoch 2: only the epoch-1 checkpoint existed, loadable, and the run went on from its iteration
    assert resumed.started_at == [2]
    checkpoints = bundle_checks.assert_checkpoints_loadable(crashed)
    final = torch.load(crashed / "model_final.pt", map_location="cpu", weights_only=True)
    assert final["trainer"]["iteration"] == 4 and len(checkpoints) >= 2
    expected = torch.load(tmp_path / "reference" / "model_final.pt", map_location="cpu", weights_only=True)
    bundle_checks.assert_same_weights(final["model"], expected["model"])


@pytest.mark.slow
def test_finetune_heart_sigkill_mid_epoch_resumes_exactly(tmp_path, heart_raw, bundle_checks):
    mmwhs.prepare(str(heart_raw), str(tmp_path / "data"), split="random", val_fraction=0.25, test_fraction=0.25)
    config = [str(HEART / "configs" / "train.json")]
    common = {
        "dataset_dir": str(tmp_path / "data"),
        "encoder_depth": 18,
        "decoder_channels": [16, 16, 8, 8, 8],
        "image_size": [32, 32],
        "num_workers": 0,
        "sw_batch_size": 8,
        "epochs": 3,
        "batch_size": 1,
        "slices_per_volume": 2,
        "val_interval": 1,
    }

    def bundle_copy(name: str) -> dict:
        root = tmp_path / name
        shutil.copytree(HEART, root, ignore=shutil.ignore_patterns("models", "outputs"))
        return {**common, "bundle_root": str(root)}

    reference = _train(config, bundle_copy("reference"))
    assert reference.trainer.state.iteration == 6  # 2 training volumes, batch 1

    crashed = bundle_copy("crashed")
    checkpoints = Path(crashed["bundle_root"]) / "outputs" / "checkpoints"
    resume = {"resume": str(checkpoints / "checkpoint_epoch=1.pt")}
    resumed = _kill_then_resume(tmp_path, bundle_checks, config, crashed, kill_at=3, resume=resume)
    assert resumed.started_at == [2, 4]
    bundle_checks.assert_checkpoints_loadable(checkpoints)
    bundle_checks.assert_checkpoints_loadable(Path(crashed["bundle_root"]) / "models")
    bundle_checks.assert_same_final_checkpoint(crashed["bundle_root"], tmp_path / "reference", 6)
