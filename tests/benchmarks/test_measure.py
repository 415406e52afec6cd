"""benchmarks/measure.py: interleaved timing rounds."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import measure  # noqa: E402


def test_interleaved_rounds_warm_up_and_rotate_the_order() -> None:
    calls: list[str] = []
    steps = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    seconds = measure.interleaved_seconds_per_call(steps, torch.device("cpu"), rounds=4, repeats=2, warmup=1)
    assert calls[:3] == ["a", "b", "c"]  # one warm-up call each
    rounds = ["".join(calls[3 + 6 * index : 9 + 6 * index : 2]) for index in range(4)]
    assert rounds == ["abc", "bca", "cab", "abc"]  # no step always runs first
    assert len(calls) == 3 + 4 * 3 * 2
    assert list(seconds) == ["a", "b", "c"] and all(value >= 0 for value in seconds.values())


def test_interleaved_rounds_report_the_median_round(monkeypatch) -> None:
    times = {"fast": iter([1.0, 9.0, 2.0]), "slow": iter([5.0, 4.0, 100.0])}
    monkeypatch.setattr(measure, "seconds_per_call", lambda step, device, warmup, repeats: next(times[step()]))
    steps = {name: (lambda name=name: name) for name in times}
    seconds = measure.interleaved_seconds_per_call(steps, torch.device("cpu"), rounds=3, repeats=5, warmup=0)
    assert seconds == {"fast": 2.0, "slow": 5.0}
