"""One command line for the project: ``python -m custom_nets.cli <command> --help``.

A mistake in the input (a missing file, a corrupt image, a wrong setting) prints the list of problems and exits with
status 1, without a traceback (see :mod:`custom_nets.command_line`).

Commands:
    demo             demo corpora -> pretrain_joint -> few-label segmentation, pretrained vs random init -> report
    export           write f_intra (+ f_inter) weights from a pretraining checkpoint for the fine-tune bundles
    make_datalist    scan folders of PNG/JPG, DICOM, NIfTI and MetaImage files into a pretraining datalist
    validate_data    open every file of a datalist and report all problems at once (--report writes JSON)
    prepare_brats    BraTS folders -> segmentation datalist (finetune_brainseg)
    prepare_mmwhs    MM-WHS folders -> segmentation datalist with labels mapped to 1..7 (finetune_heart)
    prepare_luna16   LUNA16 scans + candidate CSVs -> cached candidate cubes + fold datalist (finetune_nodule)
    prepare_vindr_cxr  VinDr-CXR DICOMs + CSV -> resized PNGs + detection datalist with fused boxes (finetune_cxr)
    package_bundle   a bundle + its weights -> release zip, hashed weight files (large_files.yml) and a manifest
    download_bundle  a release zip URL -> extracted bundle with its weights fetched, hash-checked and load-tested
    serve_monailabel bundles with weights -> MONAI Label's monaibundle app -> a running MONAI Label server
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from custom_nets.command_line import fire_command
from custom_nets.data.make_datalist import make_datalist
from custom_nets.data.validate_data import validate_data
from custom_nets.datasets import brats, luna16, mmwhs, vindr_cxr
from custom_nets.monailabel_serving import serve_monailabel
from custom_nets.packaging import download_bundle, package_bundle
from custom_nets.pretraining_demo import run_demo
from custom_nets.weights import export_pretrained

__all__ = ["main"]


def export(checkpoint: str, out: str, preset: str = "", datalist: str = "", whole: bool = False) -> str:
    """Export ``slice_encoder.*`` + ``slice_transformer.*`` (or the whole network) of ``checkpoint`` to ``out``
    (e.g. ``bundles/finetune_heart/models/pretrained.pt``), with ``<out>.json`` provenance."""
    provenance = {key: value for key, value in (("preset", preset), ("datalist", datalist)) if value}
    return str(export_pretrained(checkpoint, out, provenance=provenance, whole=whole))


def package(
    bundle: str,
    weights: dict[str, str],
    out_dir: str = "dist",
    base_url: str | None = None,
    inference_overrides: dict | None = None,
) -> str:
    """Pack ``bundle`` for release: ``--weights "{'models/model.pt': 'path/to/model.pt'}"``; the files go to
    ``out_dir`` (upload them to ``base_url``, default ``$CUSTOM_NETS_RELEASE_URL``); ``--inference_overrides
    "{'encoder_depth': 18}"`` sets keys of the released inference.json to the weights' network; returns the
    manifest's path."""
    return str(package_bundle(bundle, weights, out_dir, base_url, inference_overrides))


def download(url: str, bundle_dir: str = "bundles", sha256: str | None = None, verify: bool = True) -> str:
    """Download a released bundle zip, fetch and hash-check its weights, load-test them; returns the bundle folder."""
    return str(download_bundle(url, bundle_dir, sha256, verify))


def serve(
    bundles: str | list[str],
    studies: str,
    app_dir: str = "monailabel_app",
    python: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    weights: dict[str, str] | None = None,
    overrides: dict | None = None,
    conf: dict[str, str] | None = None,
    reinstall: bool = False,
) -> None:
    """Serve bundles in MONAI Label (its own environment: ``make monailabel-venv``) until Ctrl-C:
    ``--bundles bundles/finetune_heart,bundles/finetune_brainseg --studies /data/to_label``; ``--weights
    "{'finetune_heart': 'runs/heart/model.pt'}"`` when a bundle's ``models/model.pt`` is elsewhere; ``--overrides
    "{'encoder_depth': 18}"`` for weights of another network size; ``--reinstall`` replaces bundles already served
    from ``app_dir`` (and the weights MONAI Label trained there); see :mod:`custom_nets.monailabel_serving`."""
    status = serve_monailabel(bundles, studies, app_dir, python, host, port, weights, overrides, conf, reinstall)
    if status:
        raise SystemExit(status)


def demo(
    workdir: str | os.PathLike = "demo_output",
    epochs: int | None = None,
    seed: int = 0,
    split: str = "testing",
    finetune_workers: int | None = None,
    protocols: Sequence[str] | None = None,
) -> None:
    """Joint pretraining on the embedded demo corpus, then the downstream yardstick: few-label segmentation from the
    pretrained slice encoder against random initialisation (``split="validation"`` scores the validation corpus, for
    tuning). Uses the GPU when there is one. ``finetune_workers``: fine-tuning trials run side by side (default 2
    where 2 or more cores are available). ``protocols``: the fine-tuning protocols (default: the demo's; e.g.
    ``--protocols "[frozen,frozen_then_end_to_end,end_to_end]"`` for all three, see
    ``custom_nets.pretraining_demo.PROTOCOLS``)."""
    if isinstance(protocols, str):  # --protocols frozen or --protocols frozen,end_to_end
        protocols = protocols.split(",")
    options = {} if protocols is None else {"protocols": tuple(protocols)}
    run_demo(workdir, epochs=epochs, seed=seed, split=split, finetune_workers=finetune_workers, **options)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(name)s - %(levelname)s - %(message)s")
    fire_command(
        {
            "demo": demo,
            "export": export,
            "make_datalist": make_datalist,
            "validate_data": validate_data,
            "prepare_brats": brats.prepare,
            "prepare_mmwhs": mmwhs.prepare,
            "prepare_luna16": luna16.prepare,
            "prepare_vindr_cxr": vindr_cxr.prepare,
            "package_bundle": package,
            "download_bundle": download,
            "serve_monailabel": serve,
        }
    )


if __name__ == "__main__":
    main()
