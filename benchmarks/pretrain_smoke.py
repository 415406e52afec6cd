"""One-epoch smoke run of ``pretrain_joint`` on the current device: train (amp as configured), export, embed.

Part of ``benchmarks/gpu_check.sh`` (issue 11, goal 5): on a GPU machine it shows that the bundle trains under
CUDA autocast (bfloat16 where the GPU has it), writes its checkpoint, exports the pretrained weights and runs the
embedding inference, and prints the wall time of each stage. The corpus is the embedded demo corpus (small); where
ITK is not installed (``itk-io`` is an 80 MB wheel), its DICOM items are left out and the count is printed.

Example::

    python benchmarks/pretrain_smoke.py --output /tmp/pretrain_smoke
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from monai.bundle import create_workflow

from custom_nets.data import make_demo_corpus
from custom_nets.weights import export_pretrained

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "pretrain_joint"
CONFIGS = BUNDLE / "configs"


def corpus_datalist(root: Path) -> tuple[Path, int]:
    """The demo corpus' datalist, without DICOM items when ITK is absent; returns it and the number left out."""
    datalist = make_demo_corpus(root / "corpus", num_per_class=3, in_plane=64, image_size=64)
    if importlib.util.find_spec("itk") is not None:
        return datalist, 0
    content = json.loads(datalist.read_text())
    kept = [item for item in content["training"] if "num_files" not in item]
    left_out = len(content["training"]) - len(kept)
    filtered = datalist.with_name("datalist_without_dicom.json")
    filtered.write_text(json.dumps({**content, "training": kept}, indent=1))
    return filtered, left_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path("pretrain_smoke"))
    parser.add_argument("--amp", type=int, default=1, help="1: amp on (bf16 where supported), 0: float32")
    parser.add_argument("--fast-path", action="store_true", help="channels_last and fused_optimizer on as well")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    stages: dict[str, float] = {}
    start = time.perf_counter()
    datalist, left_out = corpus_datalist(args.output)
    stages["corpus"] = time.perf_counter() - start

    start = time.perf_counter()
    run_dir = args.output / "run"
    workflow = create_workflow(
        config_file=[str(CONFIGS / "train.json"), str(CONFIGS / "presets" / "cpu_demo.json")],
        workflow_type="train",
        bundle_root=str(BUNDLE),
        dataset_dir=str(datalist.parent),
        datalist=str(datalist),
        output_dir=str(run_dir),
        epochs=1,
        amp=bool(args.amp),
        num_workers=4,
        channels_last=args.fast_path,
        fused_optimizer=args.fast_path,
    )
    workflow.run()
    workflow.finalize()
    stages["train (1 epoch)"] = time.perf_counter() - start
    handlers = workflow.parser.get_parsed_content("train#handlers")
    history = next(h for h in handlers if type(h).__name__ == "LossTermsHandler").history
    finite = all(math.isfinite(value) for terms in history for value in terms.values())

    start = time.perf_counter()
    exported = export_pretrained(run_dir / "model_final.pt", args.output / "model.pt", {"preset": "cpu_demo, 1 epoch"})
    stages["export"] = time.perf_counter() - start
    start = time.perf_counter()
    inference = create_workflow(
        config_file=str(CONFIGS / "inference.json"),
        workflow_type="inference",
        bundle_root=str(BUNDLE),
        dataset_dir=str(datalist.parent),
        datalist=str(datalist),
        output_dir=str(args.output / "embeddings"),
        ckpt_path=str(exported),
        encoder_depth=18,
        embed_dim=128,
        image_size=64,
        volume_size=64,
        num_workers=4,
        amp=bool(args.amp),
    )
    inference.run()
    embeddings = np.load(args.output / "embeddings" / "embeddings.npy")
    stages["embed"] = time.perf_counter() - start

    trainer = workflow.trainer
    dtype = trainer.amp_kwargs.get("dtype") if trainer.amp else None
    print(
        f"pretrain_joint smoke on {device} (amp {dtype or 'off'}): {trainer.state.iteration} iterations, "
        f"losses finite: {finite}, last terms { ({k: round(v, 4) for k, v in history[-1].items()}) }; "
        f"fast-path switches {'on' if args.fast_path else 'off'}; {len(embeddings)} embeddings "
        f"{embeddings.shape[1]}-d, finite: {bool(np.isfinite(embeddings).all())}; "
        f"DICOM items left out (no ITK): {left_out}"
    )
    print("stage seconds: " + ", ".join(f"{name} {seconds:.1f}" for name, seconds in stages.items()))
    if not finite or not np.isfinite(embeddings).all():
        raise SystemExit("pretrain_joint smoke FAILED: non-finite loss or embeddings")
    print("pretrain_joint smoke PASSED")


if __name__ == "__main__":
    main()
