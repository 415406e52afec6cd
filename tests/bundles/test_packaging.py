"""Release packaging and download against a real HTTP server on 127.0.0.1 (a subprocess): hashes, tampering,
interrupted downloads, repeated downloads and weights that do not fit the network."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from monai.apps.utils import HashCheckError
from monai.bundle import ConfigParser

from custom_nets.packaging import download_bundle, package_bundle, sha256_of, verify_bundle_weights

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "finetune_heart"
TINY = {"encoder_depth": 18, "decoder_channels": [16, 16, 8, 8, 8]}

SERVER = textwrap.dedent(
    """
    import functools, http.server, sys
    from pathlib import Path

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def copyfile(self, source, destination):
            # files named in 'truncate.txt' stop after half of the announced bytes: a connection lost mid-download
            truncated = (Path(self.directory) / "truncate.txt").read_text().split() if (
                Path(self.directory) / "truncate.txt").is_file() else []
            if Path(self.path).name in truncated:
                data = source.read()
                destination.write(data[: len(data) // 2])
                destination.flush()
                self.close_connection = True
                return
            super().copyfile(source, destination)

    handler = functools.partial(Handler, directory=sys.argv[2])
    http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), handler).serve_forever()
    """
)


@pytest.fixture
def server(tmp_path: Path, bundle_checks):
    """(base URL, served folder) of an HTTP server in a subprocess."""
    served = tmp_path / "served"
    served.mkdir()
    port = bundle_checks.free_port()
    process = subprocess.Popen([sys.executable, "-c", SERVER, str(port), str(served)])
    base_url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(base_url, timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    yield base_url, served
    process.terminate()
    process.wait(timeout=10)


def _heart_weights(path: Path, seed: int = 0, **overrides) -> Path:
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.json"))
    parser.update({"bundle_root": str(BUNDLE), **TINY, **overrides})
    torch.manual_seed(seed)
    network = parser.get_parsed_content("network_def")
    torch.save(network.state_dict(), path)
    path.with_suffix(".json").write_text(json.dumps({"preset": "test", "iteration": 2}))
    return path


def _release(tmp_path: Path, base_url: str, served: Path, weights: Path | None = None) -> dict:
    weights = weights or _heart_weights(tmp_path / "model.pt")
    manifest = package_bundle(BUNDLE, {"models/model.pt": weights}, served, base_url=base_url)
    return json.loads(manifest.read_text())


def test_package_layout_hashes_and_provenance(tmp_path: Path) -> None:
    weights = _heart_weights(tmp_path / "model.pt")
    manifest_path = package_bundle(BUNDLE, {"models/model.pt": weights}, tmp_path / "dist", "https://example.org/r")
    manifest = json.loads(manifest_path.read_text())
    version = json.loads((BUNDLE / "configs" / "metadata.json").read_text())["version"]
    assert manifest_path.name == f"finetune_heart_v{version}.json"
    (entry,) = manifest["large_files"]
    asset = tmp_path / "dist" / f"finetune_heart_v{version}_model.pt"
    assert entry == {
        "path": "models/model.pt",
        "url": f"https://example.org/r/{asset.name}",
        "hash_val": sha256_of(weights),
        "hash_type": "sha256",
    }
    assert manifest["provenance"]["models/model.pt"] == {"preset": "test", "iteration": 2}
    archive = tmp_path / "dist" / f"finetune_heart_v{version}.zip"
    assert manifest["bundle"]["sha256"] == sha256_of(archive)
    with zipfile.ZipFile(archive) as opened:
        names = opened.namelist()
        listed = yaml.safe_load(opened.read("finetune_heart/large_files.yml"))
    assert all(name.startswith("finetune_heart/") for name in names)
    assert {"finetune_heart/configs/inference.json", "finetune_heart/LICENSE", "finetune_heart/docs/README.md"} <= set(
        names
    )
    assert not any("/models/" in name for name in names)  # weights travel as large files, not in the zip
    assert listed["large_files"] == manifest["large_files"]


def test_package_needs_a_base_url_and_existing_weights(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("CUSTOM_NETS_RELEASE_URL", raising=False)
    weights = _heart_weights(tmp_path / "model.pt")
    with pytest.raises(ValueError, match="CUSTOM_NETS_RELEASE_URL"):
        package_bundle(BUNDLE, {"models/model.pt": weights}, tmp_path / "dist")
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        package_bundle(BUNDLE, {"models/model.pt": tmp_path / "absent.pt"}, tmp_path / "dist", "http://x")
    monkeypatch.setenv("CUSTOM_NETS_RELEASE_URL", "https://weights.example.org/v1")
    manifest = json.loads(package_bundle(BUNDLE, {"models/model.pt": weights}, tmp_path / "dist").read_text())
    assert manifest["large_files"][0]["url"].startswith("https://weights.example.org/v1/finetune_heart_v")


def test_download_verifies_loads_and_repeats_as_a_no_op(tmp_path: Path, server) -> None:
    base_url, served = server
    manifest = _release(tmp_path, base_url, served)
    root = download_bundle(
        manifest["bundle"]["url"], tmp_path / "bundles", manifest["bundle"]["sha256"], overrides=TINY
    )
    weights = root / "models" / "model.pt"
    assert root.name == "finetune_heart" and sha256_of(weights) == manifest["large_files"][0]["hash_val"]
    assert verify_bundle_weights(root, TINY)[0].matched
    stamp = (weights.stat().st_mtime_ns, (root / "configs" / "train.json").stat().st_mtime_ns)
    (served / Path(manifest["large_files"][0]["url"]).name).unlink()  # nothing to fetch: a second run must not try
    download_bundle(manifest["bundle"]["url"], tmp_path / "bundles", manifest["bundle"]["sha256"], overrides=TINY)
    assert (weights.stat().st_mtime_ns, (root / "configs" / "train.json").stat().st_mtime_ns) == stamp


def test_tampered_weights_are_rejected_and_never_installed(tmp_path: Path, server) -> None:
    base_url, served = server
    manifest = _release(tmp_path, base_url, served)
    asset = served / Path(manifest["large_files"][0]["url"]).name
    content = bytearray(asset.read_bytes())
    content[len(content) // 2] ^= 0xFF  # one flipped byte
    asset.write_bytes(bytes(content))
    with pytest.raises(HashCheckError, match="model.pt"):
        download_bundle(manifest["bundle"]["url"], tmp_path / "bundles", manifest["bundle"]["sha256"], overrides=TINY)
    assert not (tmp_path / "bundles" / "finetune_heart" / "models" / "model.pt").exists()


def test_tampered_bundle_zip_is_rejected(tmp_path: Path, server) -> None:
    base_url, served = server
    manifest = _release(tmp_path, base_url, served)
    with pytest.raises(HashCheckError, match="finetune_heart"):
        download_bundle(manifest["bundle"]["url"], tmp_path / "bundles", "0" * 64)
    assert not (tmp_path / "bundles" / "finetune_heart").exists()


def test_interrupted_download_leaves_no_partial_weights(tmp_path: Path, server) -> None:
    base_url, served = server
    manifest = _release(tmp_path, base_url, served)
    (served / "truncate.txt").write_text(Path(manifest["large_files"][0]["url"]).name)
    with pytest.raises(Exception) as raised:  # urllib's ContentTooShortError / IncompleteRead, or the hash check
        download_bundle(manifest["bundle"]["url"], tmp_path / "bundles", manifest["bundle"]["sha256"], overrides=TINY)
    assert not isinstance(raised.value, AssertionError)
    models = tmp_path / "bundles" / "finetune_heart" / "models"
    assert not models.exists() or list(models.iterdir()) == []
    (served / "truncate.txt").unlink()  # the connection is back: the same command completes the download
    root = download_bundle(
        manifest["bundle"]["url"], tmp_path / "bundles", manifest["bundle"]["sha256"], overrides=TINY
    )
    assert sha256_of(root / "models" / "model.pt") == manifest["large_files"][0]["hash_val"]


def test_weights_of_another_network_fail_with_the_weight_report(tmp_path: Path, server) -> None:
    base_url, served = server
    other = _heart_weights(tmp_path / "other.pt", decoder_channels=[32, 16, 8, 8, 8])  # another decoder
    manifest = _release(tmp_path, base_url, served, weights=other)
    with pytest.raises(Exception, match="does not fit|do not fit"):
        download_bundle(manifest["bundle"]["url"], tmp_path / "bundles", manifest["bundle"]["sha256"], overrides=TINY)


def test_pretraining_export_ships_as_the_pretrain_joint_release(tmp_path: Path, server) -> None:
    """The backbone export (f_intra + f_inter, what ``custom_nets.cli export`` writes) is pretrain_joint's weight."""
    base_url, served = server
    bundle = BUNDLE.parent / "pretrain_joint"
    sizes = {"encoder_depth": 18, "embed_dim": 32}
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.update({"bundle_root": str(bundle), **sizes})
    state = parser.get_parsed_content("network_def").state_dict()
    export = {k: v for k, v in state.items() if k.startswith(("slice_encoder.", "slice_transformer."))}
    torch.save(export, tmp_path / "model.pt")
    manifest = json.loads(
        package_bundle(bundle, {"models/model.pt": tmp_path / "model.pt"}, served, base_url).read_text()
    )
    root = download_bundle(
        manifest["bundle"]["url"], tmp_path / "bundles", manifest["bundle"]["sha256"], overrides=sizes
    )
    assert [len(report.missing) for report in verify_bundle_weights(root, sizes)] == [0, 0]
    torch.save({k: v for k, v in export.items() if k.startswith("slice_encoder.")}, root / "models" / "model.pt")
    with pytest.raises(RuntimeError, match="does not fit"):  # f_inter missing from the file
        verify_bundle_weights(root, sizes)


@pytest.mark.parametrize("bundle", ["finetune_heart", "finetune_brainseg", "finetune_cxr", "finetune_nodule"])
def test_fine_tune_bundles_build_a_fused_adamw_unless_turned_off(bundle: str) -> None:
    """``fused_optimizer`` (true by default) gives AdamW torch's fused kernel; false gives the per-parameter loop
    (``fused=None``, torch's default). heart / brainseg also compare the updates (tests/segmentation)."""
    for fused, expected in ((None, True), (True, True), (False, None)):
        parser = ConfigParser()
        parser.read_config(str(Path(__file__).resolve().parents[2] / "bundles" / bundle / "configs" / "train.json"))
        parser.update({"encoder_depth": 18} if fused is None else {"encoder_depth": 18, "fused_optimizer": fused})
        optimizer = parser.get_parsed_content("optimizer")
        assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"] is expected
