"""build_sgd: the fused kernel gives the unfused updates, also for parameters whose first gradient comes late."""

from __future__ import annotations

import pytest
import torch

from custom_nets.engines import build_sgd


def _train(fused: bool, steps: int = 4) -> tuple[torch.nn.Linear, torch.nn.Linear]:
    torch.manual_seed(0)
    trunk, prototypes = torch.nn.Linear(6, 4), torch.nn.Linear(4, 3, bias=False)
    optimizer = build_sgd([*trunk.parameters(), *prototypes.parameters()], 0.1, 0.9, 1e-3, fused=fused)
    inputs = torch.randn(steps, 5, 6)
    for step in range(steps):
        optimizer.zero_grad()
        prototypes(trunk(inputs[step])).square().mean().backward()
        if step < 2:  # frozen for the first iterations, as PrototypeHandler does
            prototypes.weight.grad = None
        optimizer.step()
    return trunk, prototypes


def test_fused_matches_unfused_with_late_first_gradients() -> None:
    for plain, fused in zip(_train(fused=False), _train(fused=True), strict=True):
        for expected, actual in zip(plain.parameters(), fused.parameters(), strict=True):
            torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7)


def test_fused_skips_a_step_with_overflowed_gradients() -> None:
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = build_sgd([weight], 0.1, 0.9, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale(weight.sum()).backward()
    weight.grad.fill_(float("inf"))
    scaler.unscale_(optimizer)  # as GradientControl does before clipping and LARC
    scaler.step(optimizer)
    scaler.update()
    assert torch.equal(weight.detach(), torch.ones(3))
    assert torch.equal(optimizer.state[weight]["momentum_buffer"], torch.zeros(3))
    assert scaler.get_scale() == pytest.approx(2.0)
