"""Run every benchmark script and write their figures into docs/benchmarks.md, one section per device.

Issue 11, goal 4. The CPU section runs the slice attention, joint step (encoder share, loader headroom, memory, plain
ResNet throughput), SwAV-loss, segmentation-throughput and DDP-scaling scripts, and with ``--demo`` the embedded demo
end to end (its wall time). Where CUDA is present (``--device auto`` or ``cuda``), the GPU section runs the CUDA slice
attention benchmark (fused Triton sampling vs PyTorch reference vs dense, per dtype) and the joint step at demo and
paper sizes under bfloat16 autocast, the latter also with every fast-path switch of train.json and a profile. Every
ratio is measured inside one script run.

Each section is written between its own markers (``<!-- run_all.py <device>: begin -->`` ... ``end``) in the output
file, replacing what a former run wrote there and leaving the hand-written text and the other device's section alone
(a CPU-only machine keeps the last GPU figures). The section states the date, machine, device name, torch and monai
versions and the load average, then per script: the command, its exit status, its wall time and its output (markdown
tables; for the demo, its report without the log lines before it). A script that fails, or runs past
``--script-timeout``, is recorded as failed and the run goes on. The section is rewritten after every script, so a
run stopped midway keeps the figures of the scripts it finished.

Example::

    .venv/bin/python benchmarks/run_all.py                      # CPU (+ GPU where present) -> docs/benchmarks.md
    python benchmarks/run_all.py --device cuda --output /tmp/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import monai
import torch

from custom_nets.atomic_files import atomic_write_text
from custom_nets.pretraining_demo import REPORT_TITLE

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PAPER = ["--image-size", "224", "--volumes-per-batch", "4", "--num-slices", "64", "--images-per-batch", "32"]
PAPER += ["--embed-dim", "640"]


@dataclass
class Script:
    """A script to run: its section title, its arguments after ``python``, and optionally the first line of the part
    of its output to record (``output_from``: what comes before it, such as a bundle run's log lines, is left out)."""

    title: str
    arguments: list[str]
    output_from: str | None = None


def recorded_output(output: str, output_from: str | None) -> str:
    """``output`` from the first line that starts with ``output_from`` on (all of it if none does)."""
    lines = output.splitlines()
    if output_from is not None:
        start = next((i for i, line in enumerate(lines) if line.startswith(output_from)), 0)
        lines = lines[start:]
    return "\n".join(lines)


def cpu_scripts(demo: bool) -> list[Script]:
    scripts = [
        Script("Slice attention (CPU)", ["benchmarks/slice_attention.py", "--device", "cpu"]),
        Script("Joint pretraining step (CPU)", ["benchmarks/pretrain_step.py", "--device", "cpu"]),
        Script("SwAV loss against lightly (CPU)", ["benchmarks/losses.py", "--device", "cpu", "--repeats", "15"]),
        Script("Segmentation throughput (CPU, and CUDA where present)", ["benchmarks/segmentation.py"]),
        Script("DDP scaling, 1 -> 2 processes (CPU, gloo)", ["benchmarks/ddp_scaling.py", "--device", "cpu"]),
    ]
    if demo:
        workdir = tempfile.mkdtemp(prefix="run_all_demo_")
        demo_command = ["-m", "custom_nets.cli", "demo", "--workdir", workdir]
        scripts.append(Script("Demo wall time", demo_command, output_from=REPORT_TITLE))
    return scripts


def cuda_scripts() -> list[Script]:
    """The CUDA figures, the most informative first (gpu_check.sh stops the list after its figures timeout)."""
    step = ["benchmarks/pretrain_step.py", "--device", "cuda", "--sections", "a"]
    fast = ["--channels-last", "--fused-optimizer", "--pin-memory"]
    return [
        Script("Slice attention (CUDA)", ["benchmarks/slice_attention_gpu.py"]),
        Script(
            "Joint step, paper size, bfloat16 autocast, every fast-path switch, with a profile (CUDA)",
            [*step, "--amp", "bfloat16", *PAPER, *fast, "--profile"],
        ),
        Script(
            "f_inter eager and compiled, paper size, bfloat16 autocast (CUDA)",
            [
                "benchmarks/slice_transformer_compile.py",
                *("--device", "cuda", "--amp", "bfloat16", "--modes", "default", "reduce-overhead"),
            ],
        ),
        Script(
            "Joint step, paper size, bfloat16 autocast, every fast-path switch, views grouped by kind and size (CUDA)",
            [*step, "--amp", "bfloat16", *PAPER, *fast, "--group-views"],
        ),
        Script(
            "Slice attention, compiled with CUDA graphs (CUDA)",
            [
                "benchmarks/slice_attention_gpu.py",
                *("--compile-mode", "reduce-overhead", "--sizes", "64", "1024", "--dtypes", "float32", "bfloat16"),
                *("--check-sizes", "64", "--rounds", "5"),
            ],
        ),
        Script(
            "Joint step, paper size, bfloat16 autocast, every fast-path switch, f_inter compiled (CUDA)",
            [*step, "--amp", "bfloat16", *PAPER, *fast, "--compile-slice-transformer", "default"],
        ),
        Script("Joint step, demo size, bfloat16 autocast (CUDA)", [*step, "--amp", "bfloat16"]),
        Script(
            "Joint step, demo size, bfloat16 autocast, views grouped by kind and size (CUDA)",
            [*step, "--amp", "bfloat16", "--group-views"],
        ),
        Script(
            "Joint step, paper size: kernel launches and host synchronisations (CUDA)",
            [*step[:-1], "d", "--amp", "bfloat16", *PAPER, *fast],
        ),
        Script("Joint step, paper size, bfloat16 autocast (CUDA)", [*step, "--amp", "bfloat16", *PAPER]),
        Script(
            "Joint step, paper size, bfloat16 autocast, every fast-path switch and LARC as train.json (CUDA)",
            [*step, "--amp", "bfloat16", *PAPER, *fast, "--larc"],
        ),
    ]


def run_script(script: Script, timeout_s: float | None = None) -> str:
    """Run one script from the repository root; its markdown: command, status, wall time, output.

    A script still running after ``timeout_s`` seconds is stopped and recorded as timed out, with what it printed."""
    command = [sys.executable, *script.arguments]
    shown = " ".join(["python", *script.arguments])
    print(f"running: {shown}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"}
    try:
        done = subprocess.run(
            command, cwd=REPO, capture_output=True, text=True, env=environment, check=False, timeout=timeout_s
        )
        stdout, stderr, status = done.stdout, done.stderr, f"exit status {done.returncode}"
        failed = done.returncode != 0
    except subprocess.TimeoutExpired as expired:
        stdout, stderr = (
            text.decode() if isinstance(text, bytes) else text or "" for text in (expired.stdout, expired.stderr)
        )
        status, failed = f"stopped after the {timeout_s:.0f} s timeout", True
    seconds = time.perf_counter() - start
    output = recorded_output(stdout.strip(), script.output_from) or "(no output)"
    output = "\n".join("##" + line if line.startswith("#") else line for line in output.splitlines())  # below ###
    text = [f"### {script.title}", "", f"`{shown}`: {status}, {seconds:.0f} s", "", output, ""]
    if failed:
        error = "\n".join(stderr.strip().splitlines()[-15:])
        text[-1:] = ["", "Failed; the end of its error output:", "", "```", error, "```", ""]
    return "\n".join(text)


def machine_line(device: str) -> str:
    load = os.getloadavg()[0]
    if device == "cuda":
        name = torch.cuda.get_device_name(0)
    else:
        name = f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores available"
    return (
        f"Measured {datetime.date.today().isoformat()} by `benchmarks/run_all.py` on {name} "
        f"(host {platform.node()}), torch {torch.__version__}, monai {monai.__version__}, Python "
        f"{platform.python_version()}; 1-minute load average {load:.2f} at the start."
    )


def replace_section(document: str, device: str, body: str) -> str:
    begin, end = f"<!-- run_all.py {device}: begin -->", f"<!-- run_all.py {device}: end -->"
    section = f"{begin}\n{body}\n{end}"
    if begin in document and end in document:
        head, rest = document.split(begin, 1)
        return head + section + rest.split(end, 1)[1]
    title = "## All figures of one run: CPU" if device == "cpu" else "## All figures of one run: GPU"
    return document.rstrip("\n") + f"\n\n{title}\n\n{section}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--demo", action="store_true", help="also run the demo end to end (minutes on a CPU)")
    parser.add_argument("--script-timeout", type=float, help="seconds after which a script is stopped (default: none)")
    args = parser.parse_args()
    devices = ["cpu", "cuda"] if args.device == "auto" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        if args.device == "cuda":
            parser.error("--device cuda asked for, but torch.cuda.is_available() is False")
        devices.remove("cuda")
    for device in devices:
        scripts = cpu_scripts(args.demo) if device == "cpu" else cuda_scripts()
        parts = [machine_line(device), ""]
        for done, script in enumerate(scripts, start=1):  # written after every script: a killed run keeps its figures
            parts.append(run_script(script, args.script_timeout))
            progress = [] if done == len(scripts) else [f"(Incomplete: {done} of {len(scripts)} scripts so far.)", ""]
            document = args.output.read_text() if args.output.is_file() else "# Benchmarks\n"
            atomic_write_text(args.output, replace_section(document, device, "\n".join(parts + progress)))
        print(f"wrote the {device} section of {args.output}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
