"""Speed of our SwAV loss (Sinkhorn-Knopp included) against ``lightly.loss.SwaVLoss`` (the ``bench`` extra).

Both losses get the same inputs and the same configuration: two global views used both as assignment views and as
predictors (lightly's ``high_resolution_outputs``), optional ``--small-crops`` of the same batch (lightly's
``low_resolution_outputs``), one prototype head of ``--prototypes`` rows, Sinkhorn epsilon 0.05 with 3 iterations,
temperature 0.1, no queue. Scores are ``projection @ prototypes^T`` of unit-norm vectors (``--dim``), the setting
of arXiv 2212.01893's 2D clustering head (K = 3000).

Method: for every batch size, the time of one forward + backward pass (gradients of the scores), median of
``--repeats`` timed passes after ``--warmup`` passes, the two losses interleaved so that both see the same machine
state; on CUDA every pass is bracketed by ``torch.cuda.synchronize``. The two loss values must agree to 1e-5
(absolute and relative), else the script exits with status 1.

Example (the table in the losses report)::

    .venv/bin/python benchmarks/losses.py --batch-sizes 256 4096 --prototypes 3000
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F
from measure import timed

from custom_nets.losses import SwAVLoss

TOLERANCE = 1e-5
GLOBAL_VIEWS = 2


def _inputs(batch: int, args: argparse.Namespace, device: torch.device) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(batch)
    base = torch.randn(batch, args.dim, generator=generator)
    prototypes = F.normalize(torch.randn(args.prototypes, args.dim, generator=generator), dim=1)
    views = [
        F.normalize(base + 0.5 * torch.randn(batch, args.dim, generator=generator), dim=1)
        for _ in range(GLOBAL_VIEWS + args.small_crops)
    ]
    return [(v @ prototypes.t()).to(device) for v in views]


def benchmark(batch: int, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    from lightly.loss import SwaVLoss

    scores = _inputs(batch, args, device)
    ours = SwAVLoss(temperature=0.1, epsilon=0.05, sinkhorn_iterations=3, assignment_views=(0, 1))
    theirs = SwaVLoss(temperature=0.1, sinkhorn_iterations=3, sinkhorn_epsilon=0.05)

    def run_ours() -> torch.Tensor:
        leaves = [s.detach().requires_grad_() for s in scores]
        loss = ours(leaves, [leaves])  # projections are only used by the (disabled) queue
        loss.backward()
        return loss.detach()

    def run_theirs() -> torch.Tensor:
        leaves = [s.detach().requires_grad_() for s in scores]
        loss = theirs(leaves[:GLOBAL_VIEWS], leaves[GLOBAL_VIEWS:]).squeeze()
        loss.backward()
        return loss.detach()

    value_ours, value_theirs = float(run_ours()), float(run_theirs())
    for _ in range(args.warmup):
        run_ours(), run_theirs()
    times_ours, times_theirs = [], []
    for _ in range(args.repeats):
        times_ours.append(timed(run_ours, device))
        times_theirs.append(timed(run_theirs, device))
    return {
        "ours_ms": 1000 * statistics.median(times_ours),
        "lightly_ms": 1000 * statistics.median(times_theirs),
        "ours": value_ours,
        "lightly": value_theirs,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 4096])
    parser.add_argument("--prototypes", type=int, default=3000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--small-crops", type=int, default=0, help="extra small-crop views of the same items")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"SwAV loss, forward + backward, K={args.prototypes}, dim={args.dim}, views={GLOBAL_VIEWS}+"
        f"{args.small_crops} small, eps=0.05, 3 Sinkhorn iterations, tau=0.1; {name}, torch {torch.__version__}"
    )
    header = ("batch", "ours ms", "lightly ms", "ours/lightly", "loss (ours)", "|diff|")
    print(" | ".join(f"{title:>{width}}" for title, width in zip(header, (6, 9, 10, 12, 11, 8), strict=True)))
    print("-" * 74)
    agree = True
    for batch in args.batch_sizes:
        row = benchmark(batch, args, device)
        difference = abs(row["ours"] - row["lightly"])
        agree &= difference <= TOLERANCE * max(1.0, abs(row["lightly"]))
        print(
            f"{batch:>6} | {row['ours_ms']:>9.2f} | {row['lightly_ms']:>10.2f} | "
            f"{row['ours_ms'] / row['lightly_ms']:>12.2f} | {row['ours']:>11.6f} | {difference:>8.1e}"
        )
    if not agree:
        print(f"the two losses differ by more than {TOLERANCE}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
