"""Slice attention on CUDA: the fused Triton sampling against the PyTorch reference and dense attention, per dtype.

Issue 11, goal 1. For every autocast dtype (float32 = autocast off, bfloat16, float16) and slice count ``N``:

* **check**: ``DeformableSliceAttention`` with ``sampling_backend="triton"`` against the same module (same weights,
  same input, padding slices in one volume) with ``"torch"``: relative error ``||a - b|| / ||b||`` of the output and
  of the gradients of the input and of every parameter. The run exits non-zero if one exceeds its bound (1e-4 in
  float32, 2e-2 under bfloat16 / float16 autocast).
* **time**: one forward + backward (gradients of the input and of all parameters, ``grad=None`` between passes) of
  ``ours`` (fused Triton sampling, the CUDA default), ``ours-torch`` (the PyTorch reference sampling) and ``dense``
  (q/k/v projections + ``F.scaled_dot_product_attention`` + output projection, the same 8 heads and width), input
  ``(B, N, d)``. Each round runs ``P`` passes back to back between two CUDA events (nothing synchronises inside, as in
  training, so host-side launch costs overlap GPU work exactly as they would there); ``P`` is chosen so a round takes
  about ``--round-s``. Median over ``--rounds`` rounds, methods interleaved round by round.
* **graph**: the same forward + backward captured once as CUDA graphs (``torch.cuda.make_graphed_callables``, float32
  only: capture needs autocast off) and replayed back to back: the device time without the host's launch costs. At
  small N both attentions are bound by those host costs (about 1-2 ms per pass whatever N is), which in a training
  step overlap with the slice encoder's GPU work; the graph column says what the GPU itself spends.
* **compiled** (``--compile-mode MODE``): ``ours-compiled`` and ``dense-compiled``, the same two modules through
  ``torch.compile(mode=MODE)`` (what ``compile_slice_transformer`` does to ``f_inter`` in pretraining; the fused
  sampling is a ``torch.library`` operator, so the graph does not break there), timed like the others after their
  compilation. ``reduce-overhead`` replays them as CUDA graphs: the host's launch costs go, as in the graph column,
  but through the path a training run takes. Targets are also checked for ``ours-compiled`` against eager ``dense``.
* **memory**: ``torch.cuda.max_memory_allocated`` increase during one forward + backward.

Targets (issue 11): ours no slower than dense at every N >= 64, and at most half of dense's time at N >= 1024, in
every dtype.

Example (the CUDA figures in docs/benchmarks.md)::

    python benchmarks/slice_attention_gpu.py
    python benchmarks/slice_attention_gpu.py --compile-mode reduce-overhead --sizes 64 256 1024 4096 --check-sizes 64
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch
from slice_attention import NUM_HEADS, NUM_POINTS, DenseSliceAttention, launches_line
from torch import nn

from custom_nets.nets import DeformableSliceAttention
from custom_nets.nets.joint_ssl import COMPILE_MODES

DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHECK_BOUNDS = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 2e-2}
METHODS = ("ours", "ours-torch", "dense")
COMPILED_METHODS = ("ours-compiled", "dense-compiled")


def build(method: str, dim: int, device: torch.device, seed: int = 0, compile_mode: str | None = None) -> nn.Module:
    """The module of ``method``; a ``-compiled`` method is its eager module through ``torch.compile(compile_mode)``."""
    if method.endswith("-compiled"):
        return torch.compile(build(method.removesuffix("-compiled"), dim, device, seed), mode=compile_mode)
    torch.manual_seed(seed)
    if method == "dense":
        return DenseSliceAttention(dim).to(device)
    backend = "torch" if method == "ours-torch" else "triton"
    module = DeformableSliceAttention(dim, NUM_HEADS, NUM_POINTS, sampling_backend=backend).to(device)
    with torch.no_grad():  # offsets and weights that depend on the query, as after training
        module.sampling_proj.weight.normal_(std=0.05)
    return module


def forward_backward(module: nn.Module, tokens: torch.Tensor, grad_output: torch.Tensor, amp_dtype) -> None:
    tokens.grad = None
    for parameter in module.parameters():
        parameter.grad = None
    torch.compiler.cudagraph_mark_step_begin()  # a new pass: CUDA graphs of "reduce-overhead" may reuse their memory
    with torch.autocast(tokens.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        output = module(tokens)
    output.float().backward(grad_output)


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.float() - reference.float()).norm() / reference.float().norm().clamp_min(1e-30))


def check(dim: int, num_slices: int, batch: int, device: torch.device, dtype_name: str) -> dict[str, float]:
    """Relative errors of the Triton path against the PyTorch reference: output, input gradient, worst parameter."""
    amp_dtype = DTYPES[dtype_name]
    generator = torch.Generator(device=device).manual_seed(1)
    tokens = torch.randn(batch, num_slices, dim, device=device, generator=generator)
    valid = torch.ones(batch, num_slices, dtype=torch.bool, device=device)
    valid[-1, num_slices // 2 :] = False
    grad_output = torch.randn(batch, num_slices, dim, device=device, generator=generator)
    results = []
    for backend in ("triton", "torch"):
        module = build("ours", dim, device)
        module.sampling_backend = backend
        inputs = tokens.clone().requires_grad_()
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            output = module(inputs, slice_valid=valid)
        output.float().backward(grad_output)
        results.append((output.detach(), inputs.grad, {n: p.grad for n, p in module.named_parameters()}))
    (out, grad_in, grads), (ref_out, ref_grad_in, ref_grads) = results
    return {
        "output": relative_error(out, ref_out),
        "input grad": relative_error(grad_in, ref_grad_in),
        "worst parameter grad": max(relative_error(grads[name], ref_grads[name]) for name in ref_grads),
    }


def time_methods(
    dim: int,
    num_slices: int,
    batch: int,
    device: torch.device,
    amp_dtype,
    rounds: int,
    round_s: float,
    compile_mode: str | None = None,
) -> dict[str, dict]:
    """Median ms per forward + backward of every method (rounds interleaved) and the peak memory of one pass; with
    ``compile_mode`` the compiled methods too (compiled afresh for this size and dtype, outside the timing)."""
    passes: dict[str, Callable[[], None]] = {}
    records: dict[str, dict] = {}
    torch._dynamo.reset()  # every size and dtype compiles once, never against the recompilation limit
    for method in METHODS + (COMPILED_METHODS if compile_mode else ()):
        try:
            module = build(method, dim, device, compile_mode=compile_mode)
            tokens = torch.randn(batch, num_slices, dim, device=device, requires_grad=True)
            grad_output = torch.randn(batch, num_slices, dim, device=device)
            run = (lambda m, t, g: lambda: forward_backward(m, t, g, amp_dtype))(module, tokens, grad_output)
            if method in COMPILED_METHODS:
                for _ in range(3):  # compile, then record CUDA graphs (reduce-overhead), before memory and timing
                    run()
            records[method] = {"peak_mib": peak_mib(run, device), "times": []}
            for _ in range(3):
                run()
            records[method]["per_round"] = max(1, min(50, int(round_s / max(round_time(run, 1, device), 1e-6))))
            passes[method] = run
        except torch.OutOfMemoryError:
            records[method] = {"status": "OOM"}
            torch.cuda.empty_cache()
    for round_index in range(rounds):
        order = list(passes)[round_index % len(passes) :] + list(passes)[: round_index % len(passes)]
        for method in order:
            count = records[method]["per_round"]
            records[method]["times"].append(round_time(passes[method], count, device) / count)
    for method in passes:
        records[method]["ms"] = 1e3 * statistics.median(records[method]["times"])
    return records


def peak_mib(run: Callable[[], None], device: torch.device) -> float:
    """``torch.cuda.max_memory_allocated`` increase during one pass (NaN off CUDA)."""
    if device.type != "cuda":
        run()
        return float("nan")
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def graphed_ms(method: str, dim: int, num_slices: int, batch: int, device: torch.device, rounds: int) -> float | None:
    """Median ms per replayed forward + backward of the CUDA-graphed module (float32), None where capture fails."""
    module = build(method, dim, device)
    tokens = torch.randn(batch, num_slices, dim, device=device, requires_grad=True)
    grad_output = torch.randn(batch, num_slices, dim, device=device)
    try:
        graphed = torch.cuda.make_graphed_callables(module, (tokens,))
    except Exception as error:  # noqa: BLE001 - report and go on: the wall-clock figures stand without it
        print(f"  graph capture failed for {method} N={num_slices}: {type(error).__name__}: {error}", file=sys.stderr)
        return None

    def run() -> None:
        graphed(tokens).backward(grad_output)

    for _ in range(3):
        run()
    count = max(1, min(200, int(0.05 / max(round_time(run, 1, device), 1e-6))))
    return 1e3 * statistics.median(round_time(run, count, device) / count for _ in range(rounds))


def round_time(run: Callable[[], None], count: int, device: torch.device) -> float:
    """Seconds of ``count`` back-to-back passes between two CUDA events (host clock off CUDA, for dry runs)."""
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(count):
            run()
        return time.perf_counter() - start
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    for _ in range(count):
        run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 4096, 16384])
    parser.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=list(DTYPES))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dim", type=int, default=640)
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per case (median)")
    parser.add_argument("--round-s", type=float, default=0.05, help="seconds of passes per round, about")
    parser.add_argument("--check-sizes", type=int, nargs="+", default=[7, 64, 1024], help="slice counts of the check")
    parser.add_argument("--device", default="cuda", help="cuda (cpu only for a dry run with TRITON_INTERPRET=1)")
    parser.add_argument("--compile-mode", choices=COMPILE_MODES, help="also time both modules through torch.compile")
    args = parser.parse_args(argv)
    methods = METHODS + (COMPILED_METHODS if args.compile_mode else ())
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("needs CUDA")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    print(
        f"{name}, torch {torch.__version__}, batch {args.batch}, d {args.dim}, "
        f"{NUM_HEADS} heads, ours with {NUM_POINTS} points; median of {args.rounds} rounds of back-to-back passes.",
        flush=True,
    )
    failures = []
    rows = []
    for dtype_name in args.dtypes:
        for num_slices in args.check_sizes:
            errors = check(args.dim, num_slices, args.batch, device, dtype_name)
            rows.append([dtype_name, str(num_slices)] + [f"{value:.2e}" for value in errors.values()])
            failures += [f"{dtype_name} N={num_slices} {k}" for k, v in errors.items() if v > CHECK_BOUNDS[dtype_name]]
    print("\nCheck: Triton sampling vs PyTorch reference, relative error (padding in one volume)\n", flush=True)
    print(markdown_table(["dtype", "N", "output", "input grad", "worst parameter grad"], rows), flush=True)

    verdicts = []
    for dtype_name in args.dtypes:
        rows = []
        for num_slices in args.sizes:
            records = time_methods(
                args.dim,
                num_slices,
                args.batch,
                device,
                DTYPES[dtype_name],
                args.rounds,
                args.round_s,
                args.compile_mode,
            )
            ms = {m: records[m].get("ms") for m in methods}
            ratio = ms["ours"] / ms["dense"] if ms["ours"] and ms["dense"] else None
            graphs = {}
            if dtype_name == "float32" and device.type == "cuda":
                graphs = {
                    m: graphed_ms(m, args.dim, num_slices, args.batch, device, args.rounds) for m in ("ours", "dense")
                }
            limit = 0.5 if num_slices >= 1024 else 1.0
            if ratio is not None:
                verdicts.append((ratio <= limit, f"{dtype_name} N={num_slices}: ours/dense {ratio:.2f} <= {limit}"))
            if ms.get("ours-compiled") and ms["dense"]:
                compiled_ratio = ms["ours-compiled"] / ms["dense"]
                text = (
                    f"{dtype_name} N={num_slices}, ours compiled ({args.compile_mode}): ours/dense {compiled_ratio:.2f}"
                )
                verdicts.append((compiled_ratio <= limit, f"{text} <= {limit}"))
            if graphs.get("ours") and graphs.get("dense"):
                graph_ratio = graphs["ours"] / graphs["dense"]
                text = f"{dtype_name} N={num_slices}, device time (CUDA graph): ours/dense {graph_ratio:.2f} <= {limit}"
                verdicts.append((graph_ratio <= limit, text))
            rows.append(
                [str(num_slices)]
                + [f"{ms[m]:.3f}" if ms[m] else records[m].get("status", "-") for m in methods]
                + [f"{ratio:.2f}" if ratio else "-"]
                + [f"{graphs[m]:.3f}" if graphs.get(m) else "-" for m in ("ours", "dense")]
                + [
                    f"{records[m]['peak_mib']:.1f}" if records[m].get("peak_mib") == records[m].get("peak_mib") else "-"
                    for m in methods
                ]
            )
            print(f"  {dtype_name} N={num_slices}: {rows[-1]}", file=sys.stderr, flush=True)
        header = ["N", *(f"{m} ms" for m in methods), "ours/dense", "ours graph ms", "dense graph ms"]
        header += [f"{m} MiB" for m in methods]
        print(f"\nTime and memory per forward + backward, {dtype_name}\n", flush=True)
        print(markdown_table(header, rows), flush=True)
    print(f"\n{launches_line(args.dim)}", flush=True)
    print("\nTargets (issue 11, goal 1):", flush=True)
    for passed, text in verdicts:
        print(f"  {'PASS' if passed else 'FAIL'}  {text}", flush=True)
    if failures:
        print("\nCHECK FAILED: " + "; ".join(failures), flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
