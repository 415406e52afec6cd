"""Speed and memory of attention along the slice axis: ours vs dense attention vs the public 1D deformable attention.

Compares, per number of slices ``N`` (batch ``B``, width ``d``), one forward + backward pass of:

* ``ours``: :class:`custom_nets.nets.DeformableSliceAttention` (8 heads, 4 points), input ``(B, N, d)``;
* ``dense``: multi-head attention of the same width (q/k/v projections, 8 heads,
  ``torch.nn.functional.scaled_dot_product_attention``, output projection), input ``(B, N, d)``;
* ``public``: ``deformable_attention.DeformableAttention1D`` (package ``deformable-attention`` >= 0.0.20, the ``bench``
  extra) with ``dim=d``, the same 8 heads and ``dim_head=d/8`` (equal inner width), other arguments at their defaults,
  slices as its sequence axis. Its input is channels-first ``(B, d, N)``, so it is built in that layout and no
  transpose is timed.

This is the benchmark of arXiv 2212.01893's inter-slice attention (``f_inter``) asked for in issue 2, section 5.

Method:

* Time: wall-clock of forward + backward (gradients of the input and of all parameters, ``grad=None`` between
  passes as after ``zero_grad(set_to_none=True)``), median of the timed repeats after warm-up passes. At each N the
  three methods run in one fresh subprocess with their passes interleaved (round robin, rotating order), so on a
  shared machine they share whatever load there is. On CUDA every pass is bracketed by ``torch.cuda.synchronize``.
  Repeats shrink at large N to keep a method within ``--case-budget-s`` (at least ``--min-repeats``).
* Memory is measured on the first forward + backward of each (method, N) in its own fresh subprocess (the figure
  includes the parameter gradients that pass allocates):

  - CPU "tensor" peak: a ``TorchDispatchMode`` tracker adds the bytes of every tensor storage an op creates during the
    pass and subtracts them when the storage is freed; the peak of that sum is reported. It is deterministic and
    counts what ``torch.cuda.max_memory_allocated`` counts on GPU, except scratch buffers an op frees internally.
  - CPU "RSS" peak: increase of the process's peak resident set size over the resident size just before the pass. The
    kernel's peak mark is reset right before the pass by writing ``5`` to ``/proc/self/clear_refs`` (where that is
    not allowed, the increase of ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` over its prior value is used, a lower
    bound). It includes allocator and page overhead and varies by about +-10 % from run to run.
  - CUDA: ``torch.cuda.max_memory_allocated`` during the pass minus ``torch.cuda.memory_allocated`` before it.

  Ratios and the linear-memory target use the tensor (CPU) or allocated (CUDA) figure.
* CPU memory cap: each CPU subprocess limits its address space to what it has mapped after building plus
  ``--cpu-memory-cap-gib`` (``RLIMIT_AS``), so a method whose working set explodes fails with "OOM" instead of
  exhausting a shared machine. The public module's positional-bias MLP holds ``B * heads * N * N/4 * d/4`` floats per
  hidden layer (2.7 GB at N=1024, 10.7 GB at N=2048 for B=2, d=640), so it hits the default cap at large N.

Example (the figures in docs/benchmarks.md)::

    .venv/bin/python benchmarks/slice_attention.py
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from measure import OperatorCounter, TensorMemoryTracker, sampling_counted_as_on_cuda, timed
from torch import nn

from custom_nets.nets import DeformableSliceAttention

METHODS = ("ours", "dense", "public")
DEFAULT_SIZES = (64, 128, 256, 512, 1024, 2048)
NUM_HEADS = 8
NUM_POINTS = 4
LINEAR_EXPONENT_LIMIT = 1.2  # growth exponent above which a curve is not called linear (quadratic is 2)


class DenseSliceAttention(nn.Module):
    """Dense multi-head self-attention over slices, the quadratic baseline: ``(B, N, d) -> (B, N, d)``.

    Query/key/value projections, ``num_heads`` heads through ``F.scaled_dot_product_attention`` (whatever kernel torch
    picks for the device), output projection: the same width and head count as ``DeformableSliceAttention``.
    """

    def __init__(self, embed_dim: int, num_heads: int = NUM_HEADS) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads}).")
        self.num_heads = num_heads
        self.qkv_proj = nn.Linear(embed_dim, 3 * embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, num_slices, embed_dim = tokens.shape
        qkv = self.qkv_proj(tokens).view(batch, num_slices, 3, self.num_heads, embed_dim // self.num_heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        attended = F.scaled_dot_product_attention(query, key, value)
        return self.output_proj(attended.transpose(1, 2).reshape(batch, num_slices, embed_dim))


def launches_per_pass(dim: int, num_slices: int = 64, batch: int = 2) -> dict[str, int]:
    """Kernel-launching operators of one forward + backward of ours and of dense, counted on the CPU as CUDA launches
    them (ours: the fused Triton sampling). Where both are bound by the host's launches (a GPU at the slice counts of
    real volumes), their times follow these counts. Parameter gradients start at None, as in the timed passes."""
    counts = {}
    for method, module in (
        ("ours", DeformableSliceAttention(dim, NUM_HEADS, NUM_POINTS)),
        ("dense", DenseSliceAttention(dim)),
    ):
        tokens = torch.randn(batch, num_slices, dim, requires_grad=True)
        counter = OperatorCounter()
        with counter, sampling_counted_as_on_cuda(counter):
            module(tokens).backward(torch.ones(batch, num_slices, dim))
        counts[method] = counter.kernels
    return counts


def launches_line(dim: int) -> str:
    counts = launches_per_pass(dim)
    return (
        f"Kernel-launching operators per forward + backward, as CUDA runs them (counted on the CPU): ours "
        f"{counts['ours']}, dense {counts['dense']} (ours / dense {counts['ours'] / counts['dense']:.2f})."
    )


@dataclass
class Case:
    """One benchmark subject: the module and an input in the layout it expects."""

    module: nn.Module
    tokens: torch.Tensor


def build_case(method: str, num_slices: int, batch: int, dim: int, device: torch.device) -> Case:
    """Module and input for ``method`` at ``num_slices`` slices; ImportError when the public package is absent."""
    if method == "ours":
        from custom_nets.nets import DeformableSliceAttention

        module: nn.Module = DeformableSliceAttention(dim, num_heads=NUM_HEADS, num_points=NUM_POINTS)
        shape = (batch, num_slices, dim)
    elif method == "dense":
        module = DenseSliceAttention(dim, num_heads=NUM_HEADS)
        shape = (batch, num_slices, dim)
    elif method == "public":
        from deformable_attention import DeformableAttention1D

        module = DeformableAttention1D(dim=dim, heads=NUM_HEADS, dim_head=dim // NUM_HEADS)
        shape = (batch, dim, num_slices)  # channels-first: slices are its sequence axis
    else:
        raise ValueError(f"Unknown method {method!r}; choose from {METHODS}.")
    tokens = torch.randn(shape, device=device, requires_grad=True)
    return Case(module.to(device), tokens)


def forward_backward(case: Case, grad_output: torch.Tensor) -> None:
    """One training-style pass: fresh gradients for the input and every parameter."""
    case.tokens.grad = None
    for parameter in case.module.parameters():
        parameter.grad = None
    case.module(case.tokens).backward(grad_output)


def proc_status_kib(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (e.g. ``VmRSS``, ``VmSize``)."""
    with open("/proc/self/status") as status:
        match = re.search(rf"^{field}:\s+(\d+) kB", status.read(), flags=re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field} field.")
    return int(match.group(1))


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (``VmHWM``, ``ru_maxrss``); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def cpu_peak_bytes(run_pass: Callable[[], None]) -> dict[str, int]:
    """Peak tensor bytes (dispatch tracker) and peak resident-set increase of ``run_pass``."""
    gc.collect()
    if reset_peak_rss():
        baseline_kib = proc_status_kib("VmRSS")
    else:
        baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with TensorMemoryTracker() as tracker:
        run_pass()
    rss_bytes = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_kib) * 1024
    return {"peak_bytes": tracker.peak_bytes, "rss_bytes": rss_bytes}


def cuda_peak_bytes(run_pass: Callable[[], None], device: torch.device) -> dict[str, int]:
    """``torch.cuda.max_memory_allocated`` increase of ``run_pass`` over the allocation before it."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    run_pass()
    torch.cuda.synchronize(device)
    return {"peak_bytes": torch.cuda.max_memory_allocated(device) - baseline}


def cap_address_space(extra_gib: float) -> None:
    """Let this process map at most ``extra_gib`` GiB beyond what it has mapped now (CPU out-of-memory guard)."""
    limit = proc_status_kib("VmSize") * 1024 + int(extra_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def is_out_of_memory(error: BaseException) -> bool:
    """Torch reports failed allocations as RuntimeError subclasses mentioning memory."""
    return isinstance(error, MemoryError) or (isinstance(error, RuntimeError) and "memory" in str(error).lower())


def failure(error: BaseException) -> dict:
    if isinstance(error, ImportError):
        return {"status": "missing", "detail": f"{error}; install the bench extra: pip install -e '.[bench]'"}
    if is_out_of_memory(error):
        return {"status": "oom", "detail": str(error).splitlines()[0][:200]}
    raise error


def measure_memory(args: argparse.Namespace) -> dict:
    """Worker: peak memory of the first forward + backward of one (method, N), in a fresh process."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    try:
        case = build_case(args.method, args.num_slices, args.batch, args.dim, device)
        grad_output = torch.randn_like(case.tokens)  # every method maps its input layout to the same layout
        if device.type == "cpu":
            cap_address_space(args.cpu_memory_cap_gib)
            return {"status": "ok", **cpu_peak_bytes(partial(forward_backward, case, grad_output))}
        return {"status": "ok", **cuda_peak_bytes(partial(forward_backward, case, grad_output), device)}
    except (ImportError, RuntimeError, MemoryError) as error:
        return failure(error)


def measure_time(args: argparse.Namespace) -> dict[str, dict]:
    """Worker: median forward + backward time of every method at one N, passes interleaved method by method.

    Interleaving makes the methods share whatever load the machine has, so their ratios stay fair on a busy machine.
    """
    device = torch.device(args.device)
    torch.manual_seed(0)
    if device.type == "cpu":
        cap_address_space(args.cpu_memory_cap_gib)
    records: dict[str, dict] = {}
    passes: dict[str, Callable[[], None]] = {}
    wanted: dict[str, int] = {}
    for method in METHODS:
        try:
            case = build_case(method, args.num_slices, args.batch, args.dim, device)
            passes[method] = partial(forward_backward, case, torch.randn_like(case.tokens))
            per_pass = min(timed(passes[method], device) for _ in range(max(1, args.warmup)))
        except (ImportError, RuntimeError, MemoryError) as error:
            records[method] = failure(error)
            passes.pop(method, None)
            continue
        wanted[method] = max(args.min_repeats, min(args.repeats, int(args.case_budget_s / max(per_pass, 1e-9))))
    times: dict[str, list[float]] = {method: [] for method in passes}
    methods = list(passes)
    for round_index in range(max(wanted.values(), default=0)):
        shift = round_index % len(methods)
        for method in methods[shift:] + methods[:shift]:  # rotate the order so no method always runs first
            if len(times[method]) < wanted[method]:
                times[method].append(timed(passes[method], device))
    for method, samples in times.items():
        records[method] = {"status": "ok", "time_s": statistics.median(samples), "repeats": len(samples)}
    return records


def run_worker(worker_args: Sequence[str], args: argparse.Namespace) -> dict:
    """Run a worker in a fresh interpreter and parse the JSON line it prints."""
    command = [sys.executable, os.path.abspath(__file__), *worker_args]
    for option in ("device", "batch", "dim", "repeats", "min_repeats", "warmup", "case_budget_s", "cpu_memory_cap_gib"):
        command += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    command += ["--threads", str(args.threads)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.case_timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "detail": f"over {args.case_timeout_s} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        status = "oom" if done.returncode in (-9, 137) else "error"  # -9: killed, usually by the kernel's OOM killer
        return {"status": status, "detail": f"exit {done.returncode}: {tail[:200]}"}
    return json.loads(lines[-1])


def measure_size(num_slices: int, args: argparse.Namespace) -> dict[str, dict]:
    """Time (one interleaved worker) and memory (one fresh worker per method) of every method at ``num_slices``."""
    timing = run_worker(["--worker", "time", "--num-slices", str(num_slices)], args)
    records = {}
    for method in METHODS:
        memory = run_worker(["--worker", "memory", "--method", method, "--num-slices", str(num_slices)], args)
        timed = timing.get(method, timing)  # a failed worker's single record stands for every method
        if timed["status"] == "ok" and memory["status"] == "ok":
            records[method] = {**timed, **memory}
        else:
            records[method] = memory if memory["status"] != "ok" else timed
    return records


def growth_exponent(sizes: Sequence[int], values: Sequence[float]) -> float:
    """Least-squares slope of ``log value`` against ``log N`` (1 = linear, 2 = quadratic)."""
    xs = [math.log(size) for size in sizes]
    ys = [math.log(value) for value in values]
    x_mean, y_mean = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - x_mean) * (y - y_mean) for x, y in zip(xs, ys, strict=True)) / sum((x - x_mean) ** 2 for x in xs)


def cell(record: dict, key: str, scale: float, digits: int) -> str:
    if record["status"] != "ok":
        return record["status"].upper()
    return f"{record[key] * scale:.{digits}f}"


def ratio(numerator: dict, denominator: dict, key: str) -> float | None:
    if numerator["status"] != "ok" or denominator["status"] != "ok" or denominator[key] <= 0:
        return None
    return numerator[key] / denominator[key]


def ratio_cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(text) for text in column) for column in zip(header, *rows, strict=True)]
    lines = [
        "| " + " | ".join(text.rjust(width) for text, width in zip(line, widths, strict=True)) + " |"
        for line in [header, *rows]
    ]
    lines.insert(1, "|" + "|".join("-" * (width + 1) + ":" for width in widths) + "|")
    return "\n".join(lines)


def verdict(passed: bool | None) -> str:
    return {True: "PASS", False: "FAIL", None: "NOT MEASURED"}[passed]


def report(results: dict[tuple[str, int], dict], sizes: Sequence[int], args: argparse.Namespace) -> str:
    """Time and memory tables, growth per doubling and the issue's targets, as markdown-friendly text."""
    on_cuda = args.device.startswith("cuda")
    out = [
        f"Device {args.device} ({describe_device(args)}), torch {torch.__version__}, float32, batch {args.batch}, "
        f"d {args.dim}, {NUM_HEADS} heads, ours with {NUM_POINTS} points.",
        "",
        f"Time: median ms per forward+backward after {args.warmup} warm-up pass(es), timed repeats in brackets.",
        "",
    ]
    rows = []
    for size in sizes:
        ours, dense, public = (results[method, size] for method in METHODS)
        row = [str(size)]
        for record in (ours, dense, public):
            text = cell(record, "time_s", 1e3, 1)
            row.append(f"{text} ({record['repeats']})" if record["status"] == "ok" else text)
        row += [ratio_cell(ratio(ours, other, "time_s")) for other in (dense, public)]
        rows.append(row)
    out += [markdown_table(["N", "ours", "dense", "public", "ours/dense", "ours/public"], rows), ""]

    if on_cuda:
        out += ["Memory: MiB, torch.cuda.max_memory_allocated increase during one forward+backward.", ""]
    else:
        out += [
            "Memory: MiB during one forward+backward, each in a fresh process: tensor = peak of live tensor storages "
            "(dispatch-mode tracker), RSS = peak resident-set increase.",
            "",
        ]
    rows = []
    for size in sizes:
        ours, dense, public = (results[method, size] for method in METHODS)
        row = [str(size)] + [cell(record, "peak_bytes", 2**-20, 1) for record in (ours, dense, public)]
        row += [ratio_cell(ratio(ours, other, "peak_bytes")) for other in (dense, public)]
        if not on_cuda:
            row += [cell(record, "rss_bytes", 2**-20, 1) for record in (ours, dense, public)]
        rows.append(row)
    header = ["N", "ours", "dense", "public", "ours/dense", "ours/public"]
    if not on_cuda:
        header = [
            *header[:1],
            *(f"{name} tensor" for name in METHODS),
            *header[4:],
            *(f"{name} RSS" for name in METHODS),
        ]
    out += [markdown_table(header, rows), ""]

    growth_rows = []
    for small, large in zip(sizes, sizes[1:], strict=False):
        row = [f"{small}->{large}"]
        for key in ("time_s", "peak_bytes"):
            row += [ratio_cell(ratio(results[method, large], results[method, small], key)) for method in METHODS]
        growth_rows.append(row)
    growth_header = ["N", "time ours", "time dense", "time public", "memory ours", "memory dense", "memory public"]
    out += ["Growth from one N to the next (2.00 = linear for a doubling, 4.00 = quadratic):", ""]
    out += [markdown_table(growth_header, growth_rows), ""]

    out += [launches_line(args.dim), ""]
    out += targets(results, sizes)
    unavailable = [
        f"{method} N={size}: {record['status']} ({record.get('detail', '')})"
        for (method, size), record in sorted(results.items(), key=lambda item: (item[0][1], item[0][0]))
        if record["status"] != "ok"
    ]
    if unavailable:
        out += ["", "Not measured:"] + [f"  {line}" for line in unavailable]
    return "\n".join(out)


def targets(results: dict[tuple[str, int], dict], sizes: Sequence[int]) -> list[str]:
    """PASS/FAIL lines for the targets of issue 2, section 5."""

    def time_ratio(other: str, size: int) -> float | None:
        return ratio(results["ours", size], results[other, size], "time_s") if size in sizes else None

    def at_most(other: str, size: int, limit: float) -> tuple[bool | None, str]:
        value = time_ratio(other, size)
        return (None, "not run") if value is None else (value < limit if limit == 1 else value <= limit, f"{value:.2f}")

    lines = ["Targets (issue 2, section 5):"]
    passed, text = at_most("dense", 256, 1.0)
    lines.append(f"  {verdict(passed)}  faster than dense at N=256 (time ours/dense {text} < 1)")
    for size in (1024, 2048):
        passed, text = at_most("dense", size, 0.5)
        lines.append(f"  {verdict(passed)}  at most half of dense's time at N={size} (ours/dense {text} <= 0.50)")
    public_ratios = {size: time_ratio("public", size) for size in sizes}
    measured = {size: value for size, value in public_ratios.items() if value is not None}
    # where the public module runs out of memory and ours runs, ours wins that size outright
    out_of_memory = [
        size for size in sizes if results["public", size]["status"] == "oom" and results["ours", size]["status"] == "ok"
    ]
    missing = [size for size in sizes if size not in measured and size not in out_of_memory]
    passed = all(value < 1 for value in measured.values()) if measured or out_of_memory else None
    detail = ", ".join(f"N={size}: {value:.3f}" for size, value in measured.items())
    if out_of_memory:
        detail += f"; public out of memory at N={', '.join(map(str, out_of_memory))}"
    if missing:
        detail += f"; not measured at N={', '.join(map(str, missing))}"
        passed = False if passed is False else None
    lines.append(f"  {verdict(passed)}  faster than the public 1D module at every N (ours/public {detail})")
    for key, name in (("peak_bytes", "memory"), ("time_s", "time")):
        lines.append("  " + linearity_line(results, sizes, key, name))
    return lines


def linearity_line(results: dict[tuple[str, int], dict], sizes: Sequence[int], key: str, name: str) -> str:
    """Ours grows linearly when its log-log growth exponent over N >= 256 is at most LINEAR_EXPONENT_LIMIT."""
    fitted = [size for size in sizes if size >= 256 and results["ours", size]["status"] == "ok"]
    values = [results["ours", size][key] for size in fitted]
    if len(fitted) < 2 or min(values) <= 0:
        return f"NOT MEASURED  {name} of ours linear in N (needs two sizes >= 256 with a positive figure)"
    exponent = growth_exponent(fitted, values)
    return (
        f"{verdict(exponent <= LINEAR_EXPONENT_LIMIT)}  {name} of ours linear in N (growth exponent over "
        f"N={fitted[0]}..{fitted[-1]}: {exponent:.2f} <= {LINEAR_EXPONENT_LIMIT}; 1 = linear, 2 = quadratic)"
    )


def describe_device(args: argparse.Namespace) -> str:
    if args.device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(args.device))
    return f"{args.threads} torch threads on {len(os.sched_getaffinity(0))} available cores"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device", default="auto", help="cpu or auto (default); cuda runs slice_attention_gpu.py (in-process timing)"
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES), help="numbers of slices N")
    parser.add_argument("--repeats", type=int, default=10, help="timed passes per case at most (default: 10)")
    parser.add_argument("--min-repeats", type=int, default=3, help="timed passes per case at least (default: 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed passes after the memory pass (default: 1)")
    parser.add_argument("--case-budget-s", type=float, default=4.0, help="seconds of timed passes per case")
    parser.add_argument("--case-timeout-s", type=float, default=600.0, help="a case's subprocess is stopped after")
    parser.add_argument("--cpu-memory-cap-gib", type=float, default=8.0, help="CPU memory a case may add (RLIMIT_AS)")
    parser.add_argument("--batch", type=int, default=2, help="volumes per batch (default: 2)")
    parser.add_argument("--dim", type=int, default=640, help="token width d, divisible by 8 (default: 640)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch CPU threads")
    parser.add_argument("--worker", choices=("time", "memory"), help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--num-slices", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None and args.device == "auto":
        args.device = "cpu"
    if args.dim % NUM_HEADS:
        parser.error(f"--dim must be divisible by {NUM_HEADS}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but torch.cuda.is_available() is False")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker == "time":
        print(json.dumps(measure_time(args)))
        return
    if args.worker == "memory":
        print(json.dumps(measure_memory(args)))
        return
    sizes = sorted(set(args.sizes))
    if args.device.startswith("cuda"):  # in-process, per dtype, with the fused sampling: see slice_attention_gpu.py
        import slice_attention_gpu

        sys.exit(
            slice_attention_gpu.main(["--sizes", *map(str, sizes), "--batch", str(args.batch), "--dim", str(args.dim)])
        )
    devices = ["cpu"]  # auto: the CPU; CUDA figures come from slice_attention_gpu.py (run_all.py runs both)
    for device in devices:
        args.device = device
        load_before = os.getloadavg()[0]
        results = {}
        for size in sizes:
            for method, record in measure_size(size, args).items():
                results[method, size] = record
                print(f"  {device} N={size:5d} {method:6s}: {record}", file=sys.stderr, flush=True)
        load = f"1-minute load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after the run"
        print(report(results, sizes, args), load, "", sep="\n", flush=True)


if __name__ == "__main__":
    main()
