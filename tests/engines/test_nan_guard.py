"""NaN / inf loss: nan_policy 'stop' ends the run before the bad step, 'skip' drops the step (also with an AMP
scaler); the last good checkpoint of a bundle stays intact."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigWorkflow
from monai.engines import SupervisedTrainer
from monai.losses import DiceCELoss

from custom_nets.datasets import mmwhs
from custom_nets.engines.handlers import NonFiniteLossGuard

HEART = Path(__file__).resolve().parents[2] / "bundles" / "finetune_heart"


def _trainer(policy: str, bad_iterations: set[int], epochs: int = 1, **guard_args) -> tuple[SupervisedTrainer, list]:
    """SGD with momentum on a linear model; the batches of ``bad_iterations`` hold a NaN. Records the weights after
    every iteration."""
    torch.manual_seed(0)
    network = torch.nn.Linear(3, 1)
    batches = []
    for iteration in range(1, 5):
        image = torch.randn(2, 3)
        if iteration in bad_iterations:
            image[0, 0] = float("nan")
        batches.append({"image": image, "label": torch.randn(2, 1)})
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=epochs,
        train_data_loader=batches,
        network=network,
        optimizer=torch.optim.SGD(network.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01),
        loss_function=torch.nn.MSELoss(),
    )
    guard = NonFiniteLossGuard(policy, **guard_args)
    guard.attach(trainer)
    trainer.guard = guard
    weights = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda _: weights.append(network.weight.detach().clone()))
    return trainer, weights


def test_stop_raises_before_the_bad_step():
    trainer, weights = _trainer("stop", {3})
    with pytest.raises(FloatingPointError, match=r"non-finite loss nan at iteration 3 \(epoch 1\); nan_policy 'stop'"):
        trainer.run()
    assert len(weights) == 2 and torch.isfinite(trainer.network.weight).all()
    assert torch.equal(trainer.network.weight.detach(), weights[-1])  # the bad step changed nothing


def test_skip_drops_the_step_and_training_goes_on():
    trainer, weights = _trainer("skip", {2})
    trainer.run()
    assert trainer.guard.skipped == [2]
    assert torch.equal(weights[1], weights[0])  # no update at all at iteration 2, momentum and weight decay included
    assert not torch.equal(weights[2], weights[1]) and torch.isfinite(weights[-1]).all()
    clean, clean_weights = _trainer("skip", set())
    clean.run()
    assert not torch.equal(clean_weights[1], clean_weights[0])


def test_skip_stops_after_too_many_in_a_row():
    trainer, _ = _trainer("skip", {2, 3}, max_consecutive_skips=2)
    with pytest.raises(FloatingPointError, match="2 non-finite losses in a row up to iteration 3"):
        trainer.run()
    with pytest.raises(ValueError, match="nan_policy must be one of"):
        NonFiniteLossGuard("ignore")


def test_skip_with_an_amp_scaler_lets_the_scaler_skip_the_step():
    """Under AMP the gradients are poisoned so that GradScaler.step skips the update and lowers the scale."""
    layer = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    engine = Engine(lambda e, b: None)
    engine.amp, engine.scaler, engine.optimizer = True, scaler, optimizer
    engine.state.iteration, engine.state.epoch = 5, 1
    before = layer.weight.detach().clone()
    loss = layer(torch.ones(1, 2)).sum() * float("inf")
    scaler.scale(loss).backward()
    engine.state.output = {"loss": loss}
    NonFiniteLossGuard("skip")(engine)
    scaler.step(optimizer)
    scaler.update()
    assert torch.equal(layer.weight.detach(), before) and scaler.get_scale() == 2.0


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="float16 autocast with a scaler needs CUDA")


@pytest.mark.slow
@pytest.mark.parametrize(
    "policy, amp_dtype",
    [
        ("stop", "auto"),
        ("skip", "auto"),
        pytest.param("stop", "float16", marks=CUDA),
        pytest.param("skip", "float16", marks=CUDA),
    ],
)
def test_heart_bundle_keeps_its_last_good_checkpoint(tmp_path, policy, amp_dtype, bundle_checks, heart_raw):
    """On CUDA, "auto" is bfloat16 autocast without a scaler where the GPU has it; "float16" runs MONAI's GradScaler."""
    bundle = tmp_path / "heart"
    shutil.copytree(HEART, bundle, ignore=shutil.ignore_patterns("models", "outputs"))
    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True)
    loss = bundle_checks.NaNAt(dice_ce, call=3)  # epoch 2, first step
    mmwhs.prepare(str(heart_raw), str(tmp_path / "data"), split="random", val_fraction=0.25, test_fraction=0.25)
    overrides = {
        "bundle_root": str(bundle),
        "dataset_dir": str(tmp_path / "data"),
        "encoder_depth": 18,
        "decoder_channels": [16, 16, 8, 8, 8],
        "image_size": [32, 32],
        "num_workers": 0,
        "sw_batch_size": 8,
        "epochs": 2,
        "batch_size": 1,
        "slices_per_volume": 2,
        "val_interval": 1,
        "nan_policy": policy,
        "amp_dtype": amp_dtype,
        "loss": loss,
    }
    workflow = ConfigWorkflow(config_file=str(bundle / "configs" / "train.json"), workflow_type="train", **overrides)
    workflow.initialize()
    checkpoints = bundle / "outputs" / "checkpoints"
    if policy == "stop":
        with pytest.raises(RuntimeError) as stopped:  # MONAI wraps errors raised inside the config's "run"
            workflow.run()
        assert isinstance(stopped.value.__cause__, FloatingPointError)
        assert "iteration 3 (epoch 2); nan_policy 'stop'" in str(stopped.value.__cause__)
        epoch_one = torch.load(checkpoints / "checkpoint_epoch=1.pt", weights_only=True)
        assert epoch_one["trainer"]["iteration"] == 2
    else:
        workflow.run()
    assert loss.calls >= 3
    for path in [*checkpoints.glob("*.pt"), bundle / "models" / "model.pt"]:
        state = torch.load(path, weights_only=True)
        model = state.get("model", state)
        assert all(torch.isfinite(value).all() for value in model.values() if value.is_floating_point()), path
