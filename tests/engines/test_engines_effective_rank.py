"""The effective-rank (RankMe) monitor of pretraining on fake outputs and on a tiny JointSSLNet."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import torch
from ignite.engine import Engine

from custom_nets.engines.handlers import EffectiveRankMonitor
from custom_nets.engines.handlers.effective_rank import evenly_spaced_rows
from custom_nets.nets import JointSSLNet

DIM = 32  # the default threshold, 5 % of min(rows, d), is above the collapsed rank of 1 from d = 20 on


class RecordingWriter:
    def __init__(self) -> None:
        self.calls: list[tuple[str, float, int]] = []

    def add_scalar(self, tag: str, scalar_value: float, global_step: int) -> None:
        self.calls.append((tag, scalar_value, global_step))


def collapsed_output(iteration: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Every row a multiple of one direction, as JointSSLNet's ``pred`` would hold after collapse."""
    direction = torch.arange(1.0, DIM + 1)
    return {
        "slice_embedding": torch.rand(20, 1, generator=generator) * direction,
        "volume_feature": torch.rand(4, 1, generator=generator) * direction,
    }


def isotropic_output(iteration: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "slice_embedding": torch.randn(20, DIM, generator=generator),
        "volume_feature": torch.randn(4, DIM, generator=generator),
    }


def run_monitor(
    make_output: Callable[[int, torch.Generator], dict[str, torch.Tensor]], iterations: int, **options
) -> EffectiveRankMonitor:
    """Run a fake trainer whose ``engine.state.output`` is shaped like a ``SupervisedTrainer``'s."""
    generator = torch.Generator().manual_seed(0)

    def step(engine: Engine, batch: object) -> dict[str, object]:
        return {"pred": make_output(engine.state.iteration, generator), "loss": torch.tensor(1.0)}

    engine = Engine(step)
    monitor = EffectiveRankMonitor(**options)
    monitor.attach(engine)
    engine.run(range(iterations), max_epochs=1)
    return monitor


def test_collapsed_features_give_rank_one_and_warn(caplog) -> None:
    with caplog.at_level(logging.WARNING):
        monitor = run_monitor(collapsed_output, iterations=20, interval=10)
    assert [record["iteration"] for record in monitor.history] == [10, 20]
    assert monitor.last["intra"] == pytest.approx(1.0, abs=1e-3)
    assert monitor.last["inter"] == pytest.approx(1.0, abs=1e-3)
    warnings = [r.getMessage() for r in caplog.records if "dimensional collapse" in r.getMessage()]
    assert len(warnings) == 2  # one per check, naming both buffers
    assert "intra" in warnings[0] and "inter" in warnings[0]


def test_isotropic_features_give_rank_near_the_dimension_without_warning(caplog) -> None:
    with caplog.at_level(logging.WARNING):
        monitor = run_monitor(isotropic_output, iterations=30, interval=10)
    assert monitor.last["intra"] > 0.9 * DIM and monitor.last["inter"] > 0.8 * DIM
    assert not [r for r in caplog.records if "dimensional collapse" in r.getMessage()]


def test_absolute_min_rank_warns_on_healthy_features(caplog) -> None:
    with caplog.at_level(logging.WARNING):
        run_monitor(isotropic_output, iterations=10, interval=10, min_rank=DIM + 1.0)
    assert [r for r in caplog.records if "dimensional collapse" in r.getMessage()]


def test_writer_tags_history_and_rolling_buffers() -> None:
    writer = RecordingWriter()
    monitor = run_monitor(
        isotropic_output, iterations=25, interval=10, buffer_size=50, rows_per_iteration=5, summary_writer=writer
    )
    steps = [10, 20, 25]  # every interval, then at completion
    assert [(tag, step) for tag, _, step in writer.calls] == [
        (f"effective_rank/{name}", step) for step in steps for name in ("intra", "inter")
    ]
    keys = {"iteration", "intra", "intra_rows", "inter", "inter_rows"}
    assert [record["iteration"] for record in monitor.history] == steps
    assert all(set(record) == keys for record in monitor.history)
    # 5 of the 20 slice rows per iteration; all 4 volume rows; at most buffer_size rows kept
    assert [(r["intra_rows"], r["inter_rows"]) for r in monitor.history] == [(50, 40), (50, 50), (50, 50)]
    assert monitor.last is monitor.history[-1]
    assert writer.calls[-1][1] == monitor.last["inter"]


def test_images_only_batches_report_intra_only() -> None:
    def images_only(iteration: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {"slice_embedding": isotropic_output(iteration, generator)["slice_embedding"]}

    monitor = run_monitor(images_only, iterations=10, interval=10)
    assert set(monitor.last) == {"iteration", "intra", "intra_rows"}


def test_output_without_features_is_rejected() -> None:
    with pytest.raises(KeyError, match="slice_embedding"):
        run_monitor(lambda iteration, generator: {"intra_projection": []}, iterations=1, interval=1)


def test_evenly_spaced_rows() -> None:
    rows = torch.arange(10.0)[:, None]
    assert evenly_spaced_rows(rows, 4).flatten().tolist() == [0.0, 3.0, 6.0, 9.0]
    assert evenly_spaced_rows(rows, None) is rows and evenly_spaced_rows(rows, 20) is rows


def test_bad_options_are_rejected() -> None:
    for options in ({"interval": 0}, {"buffer_size": 1}, {"rows_per_iteration": 0}, {"min_rank_fraction": 2.0}):
        with pytest.raises(ValueError):
            EffectiveRankMonitor(**options)


def tiny_batch() -> dict[str, object]:
    generator = torch.Generator().manual_seed(0)
    return {
        "image_views": [torch.randn(3, 1, 32, 32, generator=generator) for _ in range(2)],
        "volume_views": [torch.randn(2, 1, 6, 32, 32, generator=generator) for _ in range(2)],
        "slice_valid": torch.tensor([[True] * 6, [True] * 4 + [False] * 2]),
        "slice_position": torch.arange(6.0).expand(2, 6),
    }


def test_joint_ssl_net_returns_the_monitored_features() -> None:
    torch.manual_seed(0)
    net = JointSSLNet(
        encoder_depth=18,
        embed_dim=32,
        transformer_layers=1,
        num_heads=4,
        num_points=2,
        ffn_dim=40,
        projection_hidden_dim=64,
        projection_dim=16,
        intra_prototypes=(20,),
        inter_prototypes=(6,),
        inter_projection_head=False,
    ).train()
    batch = tiny_batch()
    out = net(batch)
    assert out["slice_embedding"].shape == (3 + 10, 32) and not out["slice_embedding"].requires_grad
    torch.testing.assert_close(out["slice_embedding"][3:], out["mask_target"][0][batch["slice_valid"]])
    assert out["volume_feature"].shape == (2, 32) and not out["volume_feature"].requires_grad
    torch.testing.assert_close(out["volume_feature"], out["inter_projection"][0].detach())  # no projection head
    images_only = net({"image_views": batch["image_views"]})
    assert images_only["slice_embedding"].shape == (3, 32) and "volume_feature" not in images_only

    writer = RecordingWriter()
    engine = Engine(lambda engine, item: {"pred": out, "loss": torch.tensor(1.0)})
    monitor = EffectiveRankMonitor(summary_writer=writer, interval=1)
    monitor.attach(engine)
    engine.run([batch], max_epochs=1)
    assert [tag for tag, _, _ in writer.calls] == ["effective_rank/intra", "effective_rank/inter"]
    assert (monitor.last["intra_rows"], monitor.last["inter_rows"]) == (13, 2)
