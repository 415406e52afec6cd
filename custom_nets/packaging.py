"""Release packaging of a bundle and its download: the model zoo's zip layout plus hashed large files.

A release of bundle ``<name>`` at version ``<v>`` (``metadata.json``) is, under one base URL chosen by the team that
hosts it (``--base_url`` or the ``CUSTOM_NETS_RELEASE_URL`` environment variable):

* ``<name>_v<v>.zip``: the bundle folder ``<name>/`` (configs, docs, LICENSE, ``large_files.yml``) without weights,
  the layout ``python -m monai.bundle download --url`` and MONAI Label extract;
* one file per weight, ``<name>_v<v>_<file name>``, listed in the zipped ``large_files.yml`` with its ``url``, its
  SHA-256 ``hash_val`` and ``hash_type``, so that MONAI's own ``download_large_files`` fetches and checks it;
* ``<name>_v<v>.json``: a manifest with the zip's SHA-256 and each weight's provenance (the ``.json`` written beside
  an exported file by ``custom_nets.cli export``: preset, corpus, iteration, commit).

:func:`download_bundle` is the other end: it downloads the zip (checked against the manifest's hash when given),
extracts it, fetches the large files through MONAI (each is downloaded to a temporary folder and moved into place only
after its hash matches: an interrupted or tampered download leaves nothing where the weights belong, and a file already
present with the right hash is not downloaded again) and, with ``verify=True``, loads ``models/model.pt`` into the
network of ``inference.json`` and fails with the weight report when a key is missing or unexpected.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

import yaml

from custom_nets.atomic_files import atomic_path, atomic_write_json
from custom_nets.weights import WeightLoadReport, load_weights

__all__ = ["RELEASE_URL_VARIABLE", "download_bundle", "package_bundle", "sha256_of", "verify_bundle_weights"]

RELEASE_URL_VARIABLE = "CUSTOM_NETS_RELEASE_URL"
EXCLUDED_NAMES = frozenset({"models", "outputs", "runs", "embeddings", "__pycache__", "large_files.yml"})


def sha256_of(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _release_prefix(bundle_dir: Path) -> tuple[str, str]:
    metadata_file = bundle_dir / "configs" / "metadata.json"
    if not metadata_file.is_file():
        raise FileNotFoundError(f"{metadata_file} not found: {bundle_dir} is not a MONAI bundle folder.")
    metadata = json.loads(metadata_file.read_text())
    version = metadata.get("version", "")
    if version not in metadata.get("changelog", {}):
        raise ValueError(f"{metadata_file}: version {version!r} has no changelog entry; add one before a release.")
    return bundle_dir.resolve().name, version  # the folder name, as in the model zoo (metadata names are titles)


def package_bundle(
    bundle: str | os.PathLike,
    weights: Mapping[str, str | os.PathLike],
    out_dir: str | os.PathLike,
    base_url: str | None = None,
    inference_overrides: Mapping[str, object] | None = None,
) -> Path:
    """Write the release files of ``bundle`` into ``out_dir``; returns the manifest's path.

    Args:
        bundle: the bundle folder (for example ``bundles/finetune_heart``).
        weights: bundle-relative destination -> local file, e.g. ``{"models/model.pt": "runs/heart/model.pt"}``.
        out_dir: where the zip, the weight files and the manifest go (upload its content to ``base_url``).
        base_url: where the release will be served from; default: ``$CUSTOM_NETS_RELEASE_URL``.
        inference_overrides: top-level keys of ``configs/inference.json`` set in the released copy so that it builds
            the network the weights were trained for (for example ``{"encoder_depth": 18, "embed_dim": 128}`` for
            the demo preset); MONAI Label reads that file alone. Recorded in the manifest.
    """
    bundle_dir, out_dir = Path(bundle), Path(out_dir)
    base_url = base_url or os.environ.get(RELEASE_URL_VARIABLE, "")
    if not base_url:
        raise ValueError(f"give base_url or set {RELEASE_URL_VARIABLE}: the URL the release files will be served from.")
    if not weights:
        raise ValueError("no weights given: a release without weights has nothing to download.")
    name, version = _release_prefix(bundle_dir)
    prefix = f"{name}_v{version}"
    out_dir.mkdir(parents=True, exist_ok=True)
    large_files, provenance = [], {}
    for destination, source in weights.items():
        source = Path(source)
        if not source.is_file():
            raise FileNotFoundError(f"weight file {source} (for {destination}) not found.")
        asset = f"{prefix}_{Path(destination).name}"
        with atomic_path(out_dir / asset) as temporary:
            shutil.copyfile(source, temporary)
        entry = {"path": destination, "url": f"{base_url.rstrip('/')}/{asset}"}
        large_files.append({**entry, "hash_val": sha256_of(out_dir / asset), "hash_type": "sha256"})
        sidecar = source.with_suffix(".json")
        provenance[destination] = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    header = (
        f"# Weights of release {version}: fetched and SHA-256-checked by\n"
        "#   python -m monai.bundle download_large_files --bundle_path <this bundle>\n"
    )
    large_files_text = header + yaml.safe_dump({"large_files": large_files}, sort_keys=False)
    inference_text = _overridden_inference(bundle_dir / "configs" / "inference.json", inference_overrides or {})

    zip_path = out_dir / f"{prefix}.zip"
    with atomic_path(zip_path) as temporary, zipfile.ZipFile(temporary, "w", zipfile.ZIP_DEFLATED) as archive:
        for file in sorted(p for p in bundle_dir.rglob("*") if p.is_file()):
            relative = file.relative_to(bundle_dir)
            if relative.as_posix() == "configs/inference.json":
                archive.writestr(f"{name}/configs/inference.json", inference_text)
            elif not EXCLUDED_NAMES.intersection(relative.parts) and relative.suffix != ".pyc":
                archive.write(file, f"{name}/{relative.as_posix()}")
        archive.writestr(f"{name}/large_files.yml", large_files_text)
    manifest = {
        "name": name,
        "version": version,
        "bundle": {"url": f"{base_url.rstrip('/')}/{zip_path.name}", "sha256": sha256_of(zip_path)},
        "large_files": large_files,
        "inference_overrides": dict(inference_overrides or {}),
        "provenance": provenance,
    }
    manifest_path = out_dir / f"{prefix}.json"
    atomic_write_json(manifest_path, manifest)
    return manifest_path


def _overridden_inference(path: Path, overrides: Mapping[str, object]) -> str:
    text = path.read_text()
    if not overrides:
        return text
    config = json.loads(text)
    unknown = sorted(set(overrides) - set(config))
    if unknown:
        raise KeyError(f"{path} has no top-level keys {unknown}; only existing keys can be overridden.")
    return json.dumps({**config, **overrides}, indent=4) + "\n"


def download_bundle(
    url: str,
    bundle_dir: str | os.PathLike,
    sha256: str | None = None,
    verify: bool = True,
    overrides: Mapping[str, object] | None = None,
) -> Path:
    """Download a packaged bundle zip from ``url`` into ``bundle_dir`` and fetch its weights; returns its folder.

    Args:
        url: the release zip (``<name>_v<version>.zip``).
        bundle_dir: the folder to extract into (the bundle lands in ``bundle_dir/<name>``).
        sha256: the zip's hash from the release manifest; checked when given.
        verify: load ``models/model.pt`` into ``inference.json``'s network and fail on any missing or unexpected key.
        overrides: config overrides for that network (for bundles packed with a non-default size).
    """
    from monai.apps.utils import download_url, extractall
    from monai.bundle import download_large_files

    bundle_dir = Path(bundle_dir)
    bundle_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=bundle_dir) as scratch:
        archive = Path(scratch) / Path(url).name
        download_url(url, archive, hash_val=sha256, hash_type="sha256", progress=False)
        with zipfile.ZipFile(archive) as opened:
            names = {Path(member).parts[0] for member in opened.namelist()}
        if len(names) != 1:
            raise ValueError(f"{url}: a bundle zip holds one top-level folder, found {sorted(names)}.")
        name = names.pop()
        # named after its folder, MONAI skips the extraction when bundle_dir/<name> already holds files
        extractall(archive.rename(archive.with_name(f"{name}.zip")), bundle_dir, has_base=True)
    root = bundle_dir / name
    download_large_files(bundle_path=str(root))
    if verify:
        verify_bundle_weights(root, overrides)
    return root


def verify_bundle_weights(
    bundle: str | os.PathLike, overrides: Mapping[str, object] | None = None
) -> list[WeightLoadReport]:
    """Load ``models/model.pt`` into the network that ``configs/inference.json`` builds; any missing or unexpected key
    (or a shape mismatch) is an error that carries the weight report.

    A pretraining network (:class:`~custom_nets.nets.JointSSLNet`, the ``pretrain_joint`` bundle) is checked the way
    its inference loads it: the file is the exported backbone, ``f_intra`` and ``f_inter`` must both be complete, and
    the projection heads and prototypes (training-only) are not expected."""
    from monai.bundle import ConfigParser

    from custom_nets.nets import JointSSLNet
    from custom_nets.weights import load_backbone_weights

    root = Path(bundle)
    weights = root / "models" / "model.pt"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found: fetch it with python -m monai.bundle download_large_files.")
    parser = ConfigParser()
    parser.read_config(str(root / "configs" / "inference.json"))
    parser.update({"bundle_root": str(root), **(overrides or {})})
    network = parser.get_parsed_content("network_def")
    hint = "The file was trained for another network (depth, widths, classes) or another bundle."
    if isinstance(network, JointSSLNet):
        try:
            return load_backbone_weights(network, weights)
        except RuntimeError as error:
            raise RuntimeError(
                f"{weights} does not fit the network of {root / 'configs' / 'inference.json'}: {error}. {hint}"
            ) from error
    report = load_weights(network, weights)
    if report.missing or report.unexpected:
        raise RuntimeError(
            f"{weights} does not fit the network of {root / 'configs' / 'inference.json'}: {report.summary()}. {hint}"
        )
    return [report]
