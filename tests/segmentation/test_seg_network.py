"""SliceEncoderUNet: FlexibleUNet registration, shapes, pretrained encoder loading (zero missing keys), freezing."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets.flexible_unet import FLEXUNET_BACKBONE

from custom_nets.nets.segmentation import SliceEncoderBackbone, SliceEncoderUNet
from custom_nets.nets.slice_encoder import SliceEncoder
from custom_nets.weights import WeightShapeError

TINY = {"depth": 18, "decoder_channels": (16, 16, 8, 8, 8)}


def _pretrained_state(depth: int = 18, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {f"slice_encoder.{k}": v for k, v in SliceEncoder(depth=depth, embed_dim=32).state_dict().items()}


def test_encoders_are_registered_in_flexible_unet():
    for depth, channels in ((18, (64, 64, 128, 256, 512)), (50, (64, 256, 512, 1024, 2048))):
        entry = FLEXUNET_BACKBONE.register_dict[f"slice_encoder_resnet{depth}"]
        assert entry["type"] is SliceEncoderBackbone and entry["feature_channel"] == channels
    backbone = SliceEncoderBackbone(in_channels=2, depth=18).eval()
    encoder = SliceEncoder(depth=18, in_channels=2).eval()
    encoder.load_state_dict(backbone.state_dict(), strict=False)
    x = torch.randn(1, 2, 64, 64)
    with torch.no_grad():
        features, reference = backbone(x), encoder(x).features
    assert [tuple(f.shape[1:]) for f in features] == [(64, 32, 32), (64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2)]
    assert all(torch.equal(a, b) for a, b in zip(features, reference, strict=True))  # the encoder's own stage maps


@pytest.mark.parametrize("size", [(64, 64), (40, 56), (33, 47)])
def test_logits_have_input_size(size):
    net = SliceEncoderUNet(in_channels=3, out_channels=4, **TINY).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 3, *size)).shape == (2, 4, *size)


def test_wrong_channel_count_is_explained():
    net = SliceEncoderUNet(in_channels=3, out_channels=2, **TINY)
    with pytest.raises(ValueError, match="modalities times num_slices"):
        net(torch.randn(1, 1, 32, 32))


def test_pretrained_encoder_loads_with_zero_missing_keys(tmp_path):
    state = _pretrained_state()
    state["slice_transformer.layer.weight"] = torch.zeros(2)  # other parts of a pretrain_joint export are ignored
    path = tmp_path / "model.pt"
    torch.save(state, path)
    net = SliceEncoderUNet(in_channels=1, out_channels=2, pretrained_ckpt=str(path), **TINY)
    report = net.weight_report
    assert report.missing == [] and report.adapted == []
    assert report.unexpected == ["embedding_proj.weight", "embedding_proj.bias"]  # slice-embedding head: unused
    assert len(report.matched) == len(net.encoder.state_dict())
    for key in ("trunk.conv1.weight", "trunk.layer4.1.bn2.running_var"):
        assert torch.equal(net.encoder.state_dict()[key], state[f"slice_encoder.{key}"])


def test_pretrained_first_convolution_is_adapted_to_more_channels():
    state = _pretrained_state()
    net = SliceEncoderUNet(in_channels=3, out_channels=2, pretrained_ckpt=state, **TINY)
    assert net.weight_report.missing == [] and net.weight_report.adapted == ["trunk.conv1.weight"]
    conv = net.encoder.trunk.conv1.weight
    assert conv.shape[1] == 3
    # a grayscale image repeated over the 3 channels gives the pretrained response
    assert torch.allclose(conv.sum(dim=1), state["slice_encoder.trunk.conv1.weight"][:, 0], atol=1e-6)


def test_pretrained_loading_fails_loudly():
    with pytest.raises(RuntimeError, match="no slice encoder weights"):
        SliceEncoderUNet(in_channels=1, out_channels=2, pretrained_ckpt={"decoder.x": torch.zeros(1)}, **TINY)
    partial = {k: v for k, v in _pretrained_state().items() if "layer4" not in k}
    with pytest.raises(RuntimeError, match=r"(?s)did not load completely from the given state dict.*missing 30.*depth"):
        SliceEncoderUNet(in_channels=1, out_channels=2, pretrained_ckpt=partial, **TINY)
    with pytest.raises(WeightShapeError):
        SliceEncoderUNet(in_channels=1, out_channels=2, pretrained_ckpt=_pretrained_state(depth=50), **TINY)
    with pytest.raises(FileNotFoundError, match="pretrained_ckpt"):
        SliceEncoderUNet(in_channels=1, out_channels=2, pretrained_ckpt="/no/such/model.pt", **TINY)


def test_frozen_encoder_keeps_weights_and_statistics_while_decoder_learns():
    torch.manual_seed(0)
    net = SliceEncoderUNet(in_channels=1, out_channels=2, freeze_encoder=True, **TINY).train()
    assert not net.encoder.training and net.decoder.training
    encoder_before = {k: v.clone() for k, v in net.encoder.state_dict().items()}
    decoder_before = {k: v.clone() for k, v in net.decoder.state_dict().items()}
    trainable = [p for p in net.parameters() if p.requires_grad]
    assert all(not p.requires_grad for p in net.encoder.parameters())
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    loss = net(torch.randn(2, 1, 32, 32)).square().mean()
    loss.backward()
    optimizer.step()
    assert all(torch.equal(v, encoder_before[k]) for k, v in net.encoder.state_dict().items())
    assert any(not torch.equal(v, decoder_before[k]) for k, v in net.decoder.state_dict().items())


def test_fine_tuned_encoder_trains_and_holds_no_embedding_head():
    net = SliceEncoderUNet(in_channels=1, out_channels=2, **TINY).train()
    net(torch.randn(2, 1, 32, 32)).mean().backward()
    assert net.encoder.trunk.conv1.weight.grad is not None
    assert not any(k.startswith("embedding_proj") for k in net.state_dict())
    with pytest.raises(ValueError, match="pretrained_ckpt"):
        SliceEncoderBackbone(pretrained=True)


def test_parameter_groups_give_the_encoder_its_own_rate_and_cover_every_trainable_parameter_once():
    net = SliceEncoderUNet(in_channels=1, out_channels=2, **TINY)
    encoder, rest = net.parameter_groups(encoder_lr=1e-4)
    assert encoder["lr"] == 1e-4 and "lr" not in rest
    assert {id(p) for p in encoder["params"]} == {id(p) for p in net.encoder.parameters()}
    grouped = [id(p) for group in (encoder, rest) for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in net.parameters()) and len(set(grouped)) == len(grouped)
    optimizer = torch.optim.AdamW(net.parameter_groups(encoder_lr=1e-4), lr=1e-3)
    assert [group["lr"] for group in optimizer.param_groups] == [1e-4, 1e-3]
    frozen = SliceEncoderUNet(in_channels=1, out_channels=2, freeze_encoder=True, **TINY)
    (only,) = frozen.parameter_groups(encoder_lr=1e-4)  # the empty encoder group is left out
    assert "lr" not in only and all(p.requires_grad for p in only["params"])
