"""Deformable slice sampling: the reference against a dense hand formula, the fused Triton kernels against the
reference (values and gradients, run by Triton's CPU interpreter), and the choice of implementation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from custom_nets.nets import DeformableSliceAttention
from custom_nets.nets.slice_sampling import (
    deformable_slice_sampling,
    resolve_sampling_backend,
    slice_sampling_reference,
    triton_available,
)


def _inputs(batch=2, slices=7, heads=3, head_dim=5, points=3, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(batch, slices, heads, head_dim, generator=generator).to(dtype)
    offsets = 3.0 * torch.randn(batch, slices, heads, points, generator=generator)  # many reads fall outside
    logits = torch.randn(batch, slices, heads, points, generator=generator)
    valid = torch.ones(batch, slices, dtype=torch.bool)
    valid[-1, slices - 2 :] = False
    return values, offsets, logits, valid


def _dense_formula(values, offsets, logits, valid):
    """out[b,n,m] = sum_k w_k sum_j max(0, 1 - |n + o_k - j|) * valid[b,j] * v[b,j,m], in float64."""
    values, offsets, logits = values.double(), offsets.double(), logits.double()
    slices = values.shape[1]
    locations = torch.arange(slices, dtype=torch.float64).view(1, -1, 1, 1) + offsets  # (B, N, M, K)
    hat = (1 - (locations[..., None] - torch.arange(slices, dtype=torch.float64)).abs()).clamp(min=0)  # (..., K, J)
    kernel = (logits.softmax(-1)[..., None] * hat).sum(dim=3) * valid[:, None, None, :]  # (B, N, M, J)
    return torch.einsum("bnmj,bjmd->bnmd", kernel, values)


def test_reference_matches_the_dense_formula() -> None:
    values, offsets, logits, valid = _inputs()
    for slice_valid in (None, valid):
        expected = _dense_formula(values, offsets, logits, valid if slice_valid is not None else torch.ones_like(valid))
        result = slice_sampling_reference(values, offsets, logits, slice_valid)
        torch.testing.assert_close(result.double(), expected, rtol=1e-5, atol=1e-5)


def test_reference_gradients_match_the_dense_formula() -> None:
    values, offsets, logits, valid = _inputs(seed=1)
    grads = []
    for function in (slice_sampling_reference, _dense_formula):
        inputs = [t.clone().requires_grad_() for t in (values, offsets, logits)]
        output = function(*inputs, valid)
        (output * torch.linspace(-1, 1, output.numel()).view_as(output)).sum().backward()
        grads.append([t.grad.double() for t in inputs])
    for reference, dense in zip(*grads, strict=True):
        torch.testing.assert_close(reference, dense, rtol=1e-4, atol=1e-5)


def test_reduced_precision_values_keep_their_dtype() -> None:
    values, offsets, logits, valid = _inputs(dtype=torch.bfloat16)
    values.requires_grad_()
    output = deformable_slice_sampling(values, torch.stack([offsets, logits], dim=2), valid)
    output.float().sum().backward()
    assert output.dtype == torch.bfloat16 and values.grad.dtype == torch.bfloat16


def test_backend_choice() -> None:
    cpu_values = torch.zeros(1, 2, 1, 1)
    assert resolve_sampling_backend("auto", cpu_values) == "torch"
    assert resolve_sampling_backend("triton", cpu_values) == "triton"
    with pytest.raises(ValueError, match="backend"):
        resolve_sampling_backend("cuda", cpu_values)
    with pytest.raises(ValueError, match="sampling_backend"):
        DeformableSliceAttention(16, 2, 2, sampling_backend="fast")
    with pytest.raises(ValueError, match="offsets, then logits"):
        deformable_slice_sampling(torch.zeros(1, 4, 3, 5), torch.zeros(1, 4, 3, 2, 2))  # (B, N, M, 2, K): wrong order


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_uses_the_reference_in_deterministic_mode() -> None:
    values = torch.zeros(1, 2, 1, 1, device="cuda")
    assert resolve_sampling_backend("auto", values) == ("triton" if triton_available() else "torch")
    torch.use_deterministic_algorithms(True)
    try:
        assert resolve_sampling_backend("auto", values) == "torch"
    finally:
        torch.use_deterministic_algorithms(False)


TRITON_CHECK = textwrap.dedent(
    """
    import json, torch
    from custom_nets.nets.slice_sampling import slice_sampling_reference
    from custom_nets.nets.slice_sampling_triton import triton_slice_sampling

    def fused(values, offsets, logits, valid):  # offsets and logits read in place from one (B, N, 2, M, K) tensor
        return triton_slice_sampling(values, torch.stack([offsets, logits], dim=2), valid)

    errors = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for points, head_dim in ((3, 5), (4, 8)):
            for masked in (False, True):
                generator = torch.Generator().manual_seed(points + head_dim)
                values = torch.randn(2, 7, 3, head_dim, generator=generator).to(dtype)
                offsets = 3.0 * torch.randn(2, 7, 3, points, generator=generator)
                logits = torch.randn(2, 7, 3, points, generator=generator)
                valid = torch.ones(2, 7, dtype=torch.bool)
                valid[1, 5:] = False
                grad_output = torch.randn(2, 7, 3, head_dim, generator=generator)
                results = []
                for function in (slice_sampling_reference, fused):
                    inputs = [t.clone().requires_grad_() for t in (values, offsets, logits)]
                    output = function(*inputs, valid if masked else None)
                    (output.float() * grad_output).sum().backward()
                    results.append([output.float()] + [t.grad.float() for t in inputs] + [str(output.dtype)])
                name = f"{dtype}-K{points}-D{head_dim}-{'masked' if masked else 'full'}"
                errors[name] = [float((a - b).abs().max()) for a, b in zip(results[0][:4], results[1][:4])]
                errors[name].append(results[1][4] == str(dtype))
    print(json.dumps(errors))
    """
)


@pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
def test_triton_kernels_match_the_reference_in_the_interpreter(tmp_path) -> None:
    """Forward values and the gradients of values, offsets and logits, for float32 / bfloat16 / float16 values,
    ``K`` a power of two or not, with and without padding slices; run by ``TRITON_INTERPRET=1`` on the CPU."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    result = subprocess.run(
        [sys.executable, "-c", TRITON_CHECK], capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    errors = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(errors) == 12
    for name, (output, grad_values, grad_offsets, grad_logits, same_dtype) in errors.items():
        output_tolerance = 1e-5 if "float32" in name else 2e-2  # one rounding of the output to 16 bits
        assert output < output_tolerance, name
        assert grad_values < output_tolerance and grad_offsets < 1e-4 and grad_logits < 1e-4, name
        assert same_dtype, name


TRITON_OPERATOR_CHECK = textwrap.dedent(
    """
    import json, torch
    from custom_nets.nets import DeformableSliceAttention
    from custom_nets.nets.slice_sampling_triton import slice_sampling_op

    generator = torch.Generator().manual_seed(0)
    values = torch.randn(2, 7, 3, 8, generator=generator, requires_grad=True)
    parameters = torch.randn(2, 7, 2, 3, 4, generator=generator, requires_grad=True)
    valid = torch.ones(2, 7, dtype=torch.int8)
    valid[1, 5:] = 0
    for slice_valid in (None, valid):  # schema, fake tensor rule, autograd registration, against eager calls
        torch.library.opcheck(slice_sampling_op, (values, parameters, slice_valid))

    torch.manual_seed(0)
    attention = DeformableSliceAttention(24, 3, 4, sampling_backend="triton")
    compiled = torch.compile(attention, fullgraph=True)  # fullgraph: a graph break would raise
    query = torch.randn(2, 7, 24, generator=generator)
    grad_output = torch.randn(2, 7, 24, generator=generator)
    results = []
    for module in (attention, compiled):
        attention.zero_grad()
        inputs = query.clone().requires_grad_()
        output = module(inputs, slice_valid=valid.bool())
        (output * grad_output).sum().backward()
        results.append([output, inputs.grad] + [p.grad.clone() for p in attention.parameters()])
    print(json.dumps([float((a - b).abs().max()) for a, b in zip(*results)]))
    """
)


@pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
def test_triton_sampling_is_an_operator_that_torch_compile_traces(tmp_path) -> None:
    """The fused sampling is a ``torch.library`` operator (``opcheck``: schema, fake tensor rule, autograd), and an
    attention layer on the Triton path compiles in one graph with the eager values and gradients (interpreter)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    result = subprocess.run(
        [sys.executable, "-c", TRITON_OPERATOR_CHECK],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    errors = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(errors) == 2 + 6  # output, input gradient, three projections' weight and bias
    assert max(errors) < 1e-5, errors
