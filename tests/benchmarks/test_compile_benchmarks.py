"""The benchmarks of ``torch.compile`` on the CPU: slice_attention_gpu.py as a dry run (Triton's interpreter) with
``--compile-mode`` times both attention modules compiled too and checks the goal-1 targets for the compiled one;
slice_transformer_compile.py times f_inter eager and compiled."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from custom_nets.nets.slice_sampling import triton_available

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.slow
@pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
def test_dry_run_times_the_compiled_modules() -> None:
    command = [sys.executable, "slice_attention_gpu.py", "--device", "cpu", "--sizes", "8", "--dtypes", "float32"]
    command += ["--check-sizes", "7", "--dim", "16", "--rounds", "1", "--round-s", "0.001", "--compile-mode", "default"]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(BENCHMARKS.parent)}
    result = subprocess.run(command, cwd=BENCHMARKS, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    header = next(line for line in result.stdout.splitlines() if line.startswith("| N |"))
    assert "ours-compiled ms" in header and "dense-compiled ms" in header
    row = next(line for line in result.stdout.splitlines() if line.startswith("| 8 |"))
    assert len(row.split("|")) == len(header.split("|"))
    assert "float32 N=8, ours compiled (default): ours/dense" in result.stdout


@pytest.mark.slow
def test_slice_transformer_compile_times_eager_and_compiled() -> None:
    command = [sys.executable, "slice_transformer_compile.py", "--device", "cpu", "--batch", "2", "--num-slices", "6"]
    command += ["--embed-dim", "16", "--layers", "1", "--repeats", "1", "--rounds", "1"]
    env = {**os.environ, "PYTHONPATH": str(BENCHMARKS.parent)}
    result = subprocess.run(command, cwd=BENCHMARKS, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in result.stdout.splitlines() if line.startswith("| ")}
    assert {"eager", "default"} <= set(rows)
    assert rows["eager"].rstrip(" |").endswith("1.000")
