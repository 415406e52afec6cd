"""SliceEncoder: shapes for images and volumes, chunking, channels-last layout, input checks."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from custom_nets.nets import SliceEncoder
from custom_nets.nets.slice_encoder import spatial_mean


@pytest.fixture(scope="module")
def encoder() -> SliceEncoder:
    torch.manual_seed(0)
    return SliceEncoder(depth=18, in_channels=1, embed_dim=48).eval()


def test_image_shapes(encoder: SliceEncoder) -> None:
    out = encoder(torch.randn(2, 1, 64, 64))
    assert out.embedding.shape == (2, 48)
    assert out.pooled.shape == (2, encoder.pooled_dim) == (2, 512)
    assert [f.shape[1] for f in out.features] == list(encoder.stage_channels)
    assert [f.shape[-1] for f in out.features] == [32, 16, 8, 4, 2]


@pytest.mark.parametrize("num_slices", [1, 2, 7])
def test_volume_shapes(encoder: SliceEncoder, num_slices: int) -> None:
    out = encoder(torch.randn(2, 1, num_slices, 32, 32), return_features=False)
    assert out.embedding.shape == (2, num_slices, 48)
    assert out.pooled.shape == (2, num_slices, 512)
    assert out.features == ()


def test_volume_equals_its_slices(encoder: SliceEncoder) -> None:
    volume = torch.randn(1, 1, 3, 32, 32)
    out = encoder(volume, return_features=False)
    single = encoder(volume[:, :, 1], return_features=False)
    torch.testing.assert_close(out.embedding[:, 1], single.embedding, rtol=1e-4, atol=1e-5)


def test_slice_chunk_gives_same_result(encoder: SliceEncoder) -> None:
    volume = torch.randn(2, 1, 5, 32, 32)
    chunked = SliceEncoder(depth=18, embed_dim=48, slice_chunk=3).eval()
    chunked.load_state_dict(encoder.state_dict())
    torch.testing.assert_close(chunked(volume).embedding, encoder(volume).embedding, rtol=1e-4, atol=1e-5)


def test_gradient_checkpointing_matches_gradients() -> None:
    torch.manual_seed(1)
    plain = SliceEncoder(depth=18, embed_dim=16, slice_chunk=2).train()
    checkpointed = SliceEncoder(depth=18, embed_dim=16, slice_chunk=2, gradient_checkpointing=True).train()
    checkpointed.load_state_dict(plain.state_dict())
    images = torch.randn(4, 1, 32, 32)
    for net in (plain, checkpointed):
        net(images).embedding.sum().backward()
    torch.testing.assert_close(plain.embedding_proj.weight.grad, checkpointed.embedding_proj.weight.grad)


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_without_embedding_gives_the_same_pooled_output_and_features(gradient_checkpointing: bool) -> None:
    """return_embedding=False leaves out the multi-scale embedding (None) and nothing else, also in chunks and with
    gradient checkpointing; the embedding projection then gets no gradient."""
    torch.manual_seed(2)
    net = SliceEncoder(depth=18, embed_dim=16, slice_chunk=3, gradient_checkpointing=gradient_checkpointing).train()
    images = torch.randn(5, 1, 32, 32)
    full = net.encode_images(images)
    partial = net.encode_images(images, return_embedding=False)
    assert full.embedding.shape == (5, 16) and partial.embedding is None
    torch.testing.assert_close(partial.pooled, full.pooled, rtol=0, atol=0)
    for left, right in zip(partial.features, full.features, strict=True):
        torch.testing.assert_close(left, right, rtol=0, atol=0)
    partial.pooled.sum().backward()
    assert net.embedding_proj.weight.grad is None and net.trunk.conv1.weight.grad is not None


def test_multi_channel_input() -> None:
    encoder = SliceEncoder(depth=34, in_channels=4, embed_dim=32).eval()
    assert encoder(torch.randn(1, 4, 32, 32)).embedding.shape == (1, 32)
    with pytest.raises(ValueError, match="input channels"):
        encoder(torch.randn(1, 1, 32, 32))


def test_bad_dimensions_and_depth() -> None:
    with pytest.raises(ValueError, match="depth"):
        SliceEncoder(depth=101)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        SliceEncoder(depth=18)(torch.randn(32, 32))


def test_resnet50_widths() -> None:
    encoder = SliceEncoder(depth=50)
    assert encoder.stage_channels == (64, 256, 512, 1024, 2048)
    assert encoder.embedding_proj.in_features == 3840 and encoder.embedding_proj.out_features == 640


def test_channels_last_matches_default_layout() -> None:
    torch.manual_seed(2)
    plain = SliceEncoder(depth=18, embed_dim=16).train()
    fast = SliceEncoder(depth=18, embed_dim=16, channels_last=True).train()
    fast.load_state_dict(plain.state_dict())
    assert fast.trunk.layer4[1].conv2.weight.is_contiguous(memory_format=torch.channels_last)
    volume = torch.randn(2, 1, 3, 32, 32)
    outputs = [net(volume) for net in (plain, fast)]
    assert outputs[1].features[2].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(outputs[1].embedding, outputs[0].embedding, rtol=1e-4, atol=1e-5)
    for out in outputs:
        out.embedding.square().sum().backward()
    torch.testing.assert_close(fast.trunk.conv1.weight.grad, plain.trunk.conv1.weight.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_spatial_mean_equals_mean_in_value_and_gradient(channels_last: bool) -> None:
    torch.manual_seed(3)
    maps = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    if channels_last:
        maps = maps.contiguous(memory_format=torch.channels_last)
    maps.requires_grad_(True)
    torch.testing.assert_close(spatial_mean(maps), maps.mean(dim=(2, 3)), rtol=0, atol=1e-15)
    assert torch.autograd.gradcheck(spatial_mean, (maps,))
    weights = torch.randn(2, 3, dtype=torch.float64)
    (gradient,) = torch.autograd.grad((spatial_mean(maps) * weights).sum(), maps)
    torch.testing.assert_close(gradient, (weights / 20)[:, :, None, None].expand(2, 3, 4, 5), rtol=0, atol=0)


class ActivationLayouts(TorchDispatchMode):
    """Records the memory layout of every activation-sized tensor (first dimension ``batch``, H and W > 1) that an
    operator writes; weight gradients, whose first dimension is a channel count, are left out."""

    def __init__(self, batch: int) -> None:
        super().__init__()
        self.batch, self.layouts = batch, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if (
                isinstance(tensor, torch.Tensor)
                and not func.is_view
                and tensor.ndim == 4
                and tensor.shape[0] == self.batch
            ):
                if tensor.shape[2] > 1 and tensor.shape[3] > 1:
                    self.layouts.append((func.__name__, tensor.is_contiguous(memory_format=torch.channels_last)))
        return out


def test_channels_last_training_pass_writes_no_other_layout() -> None:
    """Forward + backward of a channels-last encoder writes every activation and activation gradient channels-last: the
    stage pools' gradients are broadcast views, not NCHW tensors that turn the trunk's gradient sums NCHW."""
    torch.manual_seed(4)
    encoder = SliceEncoder(depth=18, embed_dim=16, channels_last=True).train()
    images = torch.randn(3, 1, 32, 32)
    layouts = ActivationLayouts(batch=3)
    with layouts:
        out = encoder.encode_images(images, return_features=False)
        (out.embedding.square().sum() + out.pooled.sum()).backward()
    assert len(layouts.layouts) > 100
    assert [name for name, channels_last in layouts.layouts if not channels_last] == []
