"""Weight I/O: prefixes, checkpoint wrappers, channel adaptation, reports and errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from custom_nets.nets import JointSSLNet, SliceEncoder, SliceTransformer
from custom_nets.nets.segmentation import SliceEncoderUNet
from custom_nets.weights import (
    WeightShapeError,
    check_whole_network_file,
    load_slice_encoder_weights,
    load_slice_transformer_weights,
    read_state_dict,
    save_weights,
)

NET_OPTIONS = dict(
    encoder_depth=18,
    embed_dim=32,
    transformer_layers=1,
    num_heads=4,
    ffn_dim=40,
    projection_hidden_dim=32,
    projection_dim=16,
    intra_prototypes=(8,),
    inter_prototypes=(4,),
)


@pytest.fixture
def exported(tmp_path: Path) -> Path:
    net = JointSSLNet(**NET_OPTIONS)
    return save_weights(
        net, tmp_path / "model.pt", prefixes=("slice_encoder.", "slice_transformer."), provenance={"preset": "test"}
    )


def test_encoder_loads_with_no_missing_keys(exported: Path) -> None:
    encoder = SliceEncoder(depth=18, embed_dim=32)
    report = load_slice_encoder_weights(encoder, exported)
    assert report.missing == [] and report.unexpected == [] and len(report.matched) == len(encoder.state_dict())
    expected = read_state_dict(exported)["slice_encoder.trunk.conv1.weight"]
    torch.testing.assert_close(encoder.trunk.conv1.weight, expected)
    assert exported.with_suffix(".json").is_file()


def test_transformer_loads_from_checkpoint_dict_with_ddp_prefix(tmp_path: Path) -> None:
    net = JointSSLNet(**NET_OPTIONS)
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    transformer = SliceTransformer(embed_dim=32, num_layers=1, num_heads=4, ffn_dim=40)
    report = load_slice_transformer_weights(transformer, path)
    assert report.missing == []
    torch.testing.assert_close(transformer.mask_token, net.slice_transformer.mask_token)


def test_export_from_before_the_single_sampling_projection_loads(tmp_path: Path) -> None:
    """Exports written before f_inter's offset and attention-weight projections became one still load, exactly."""
    net = JointSSLNet(**NET_OPTIONS)
    legacy = {}
    for key, value in net.state_dict().items():
        if ".sampling_proj." in key:
            offsets, logits = value.chunk(2)
            legacy[key.replace("sampling_proj", "sampling_offsets")] = offsets
            legacy[key.replace("sampling_proj", "attention_weights")] = logits
        else:
            legacy[key] = value
    torch.save(legacy, tmp_path / "legacy.pt")
    transformer = SliceTransformer(embed_dim=32, num_layers=1, num_heads=4, ffn_dim=40)
    report = load_slice_transformer_weights(transformer, tmp_path / "legacy.pt")
    assert report.missing == [] and report.unexpected == []
    attention = transformer.layers[0].attention
    torch.testing.assert_close(
        attention.sampling_proj.weight, net.slice_transformer.layers[0].attention.sampling_proj.weight
    )


def test_input_channel_adaptation_preserves_grayscale_response(exported: Path) -> None:
    gray = SliceEncoder(depth=18, embed_dim=32).eval()
    load_slice_encoder_weights(gray, exported)
    four = SliceEncoder(depth=18, in_channels=4, embed_dim=32).eval()
    report = load_slice_encoder_weights(four, exported)
    assert report.adapted == ["trunk.conv1.weight"] and report.missing == []
    image = torch.randn(1, 1, 32, 32)
    torch.testing.assert_close(four(image.repeat(1, 4, 1, 1)).embedding, gray(image).embedding, rtol=1e-4, atol=1e-5)


def test_shape_mismatch_is_a_clear_error(exported: Path) -> None:
    with pytest.raises(WeightShapeError, match="embedding_proj.weight"):
        load_slice_encoder_weights(SliceEncoder(depth=18, embed_dim=64), exported)


def test_wrong_file_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="pretrained_ckpt"):
        load_slice_encoder_weights(SliceEncoder(depth=18), tmp_path / "absent.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="corrupt.pt"):
        load_slice_encoder_weights(SliceEncoder(depth=18), corrupt)
    with pytest.raises(RuntimeError, match="no slice encoder weights"):
        load_slice_encoder_weights(SliceEncoder(depth=18), {"other.weight": torch.zeros(1)})


def test_save_is_atomic_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = save_weights({"a": torch.ones(2)}, tmp_path / "w.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pt"]
    torch.testing.assert_close(read_state_dict(path)["a"], torch.ones(2))


def test_whole_network_file_check_names_the_file_and_the_fix(tmp_path: Path, exported: Path) -> None:
    """``init_ckpt`` of the fine-tune bundles: the whole U-Net of a previous run. A pretraining export, a network of
    other classes or a missing file is refused before training, with the file and the key to change."""
    network = SliceEncoderUNet(in_channels=1, out_channels=3, depth=18, decoder_channels=(16, 16, 8, 8, 8))
    torch.save(network.state_dict(), tmp_path / "unet.pt")
    check_whole_network_file(tmp_path / "unet.pt", network)  # its own weights fit
    with pytest.raises(ValueError, match=f"{exported}.*pretraining export.*pretrained_ckpt"):
        check_whole_network_file(exported, network)
    other_classes = SliceEncoderUNet(in_channels=1, out_channels=5, depth=18, decoder_channels=(16, 16, 8, 8, 8))
    with pytest.raises(ValueError, match=r"unet\.pt does not fit .* 2 of another shape .*class_names"):
        check_whole_network_file(tmp_path / "unet.pt", other_classes)
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        check_whole_network_file(tmp_path / "absent.pt", network)
