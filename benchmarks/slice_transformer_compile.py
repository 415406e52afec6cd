"""``f_inter`` (the deformable slice transformer) eager against ``torch.compile``: what ``compile_slice_transformer``
buys, per compile mode (issue 11, goals 1 and 3).

One forward + backward of :class:`custom_nets.nets.SliceTransformer` in train mode (dropout on, as in pretraining)
over ``B`` sequences of ``N`` slice embeddings (one sequence with padding slices), gradients of the input and of
every parameter. The compiled module is compiled in place, as ``JointSSLNet(compile_slice_transformer=MODE)`` does;
its first pass (compilation of forward and backward) is timed on its own. Then ``--rounds`` rounds of ``--repeats``
back-to-back passes (CUDA: synchronised only around a round, so host launch costs overlap GPU work as in training),
the modes' rounds interleaved; the median round gives the time per pass. On CUDA, ``reduce-overhead`` replays the
compiled graphs as CUDA graphs.

The paper's shape is the default: 8 sequences (2 views x 4 volumes) of 64 slices, d = 640, 4 layers.

Example::

    python benchmarks/slice_transformer_compile.py                       # CPU: eager and "default"
    python benchmarks/slice_transformer_compile.py --device cuda --amp bfloat16 --modes default reduce-overhead
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence

import torch
from measure import interleaved_seconds_per_call

from custom_nets.nets import SliceTransformer
from custom_nets.nets.joint_ssl import COMPILE_MODES

EAGER = "eager"


def build(args: argparse.Namespace, mode: str, device: torch.device) -> SliceTransformer:
    torch.manual_seed(0)
    transformer = SliceTransformer(args.embed_dim, args.layers).to(device).train()
    if mode != EAGER:
        transformer.compile(mode=mode)
    return transformer


def training_pass(args: argparse.Namespace, transformer: SliceTransformer, device: torch.device) -> Callable[[], None]:
    """One forward + backward over fixed inputs, as pretraining calls ``f_inter`` (padding in the last sequence)."""
    generator = torch.Generator(device=device).manual_seed(1)
    shape = (args.batch, args.num_slices)
    embeddings = torch.randn(*shape, args.embed_dim, device=device, generator=generator, requires_grad=True)
    valid = torch.ones(*shape, dtype=torch.bool, device=device)
    valid[-1, args.num_slices * 3 // 4 :] = False
    position = torch.arange(args.num_slices, device=device, dtype=torch.float32).expand(*shape) * 2.5
    amp_dtype = None if args.amp == "off" else getattr(torch, args.amp)

    def run() -> None:
        embeddings.grad = None
        transformer.zero_grad(set_to_none=True)
        torch.compiler.cudagraph_mark_step_begin()  # a new pass: "reduce-overhead" may reuse its graphs' memory
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            out = transformer(embeddings, valid, position)
        (out.tokens.float().square().mean() + out.volume_embedding.float().sum()).backward()

    return run


def measure(args: argparse.Namespace, modes: Sequence[str], device: torch.device) -> dict[str, dict[str, float]]:
    """Per mode: seconds of the first pass (compilation) and the median ms per pass over ``args.rounds`` rounds, the
    modes' rounds interleaved with rotating order so that a drift of the host's speed hits every mode alike."""
    torch._dynamo.reset()
    modes = list(modes)
    runs, results = {}, {}
    for mode in modes:
        runs[mode] = training_pass(args, build(args, mode, device), device)
        start = time.perf_counter()
        runs[mode]()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        results[mode] = {"first_s": time.perf_counter() - start}
        for _ in range(2):  # warm-up (CUDA graphs of reduce-overhead are recorded here)
            runs[mode]()
    seconds = interleaved_seconds_per_call(runs, device, rounds=args.rounds, repeats=args.repeats, warmup=0)
    for mode in modes:
        results[mode]["ms"] = 1e3 * seconds[mode]
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when present)")
    parser.add_argument("--modes", nargs="+", choices=COMPILE_MODES, help="compile modes (default: default)")
    parser.add_argument("--amp", choices=("off", "bfloat16", "float16"), default="off", help="autocast dtype")
    parser.add_argument("--batch", type=int, default=8, help="sequences: 2 views x volumes per batch (default: 8)")
    parser.add_argument("--num-slices", type=int, default=64, help="slices per sequence (default: 64)")
    parser.add_argument("--embed-dim", type=int, default=640, help="token width d (default: 640)")
    parser.add_argument("--layers", type=int, default=4, help="transformer layers (default: 4)")
    parser.add_argument("--repeats", type=int, default=10, help="back-to-back passes per round (default: 10)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds, median reported (default: 5)")
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but torch.cuda.is_available() is False")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"{name}, torch {torch.__version__}, {args.amp if args.amp != 'off' else 'float32'}: f_inter forward + "
        f"backward, {args.batch} sequences x {args.num_slices} slices, d {args.embed_dim}, {args.layers} layers; "
        f"median of {args.rounds} rounds of {args.repeats} passes.\n",
        flush=True,
    )
    results = measure(args, [EAGER, *(args.modes or ["default"])], device)
    print("| f_inter | first pass s (compiles, less from the compile cache) | ms per forward + backward | / eager |")
    print("|---|--:|--:|--:|")
    for mode, result in results.items():
        ratio = result["ms"] / results[EAGER]["ms"]
        print(f"| {mode} | {result['first_s']:.1f} | {result['ms']:.2f} | {ratio:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
