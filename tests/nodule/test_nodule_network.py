"""NoduleClassifier: shapes, the pretrained f_intra + f_inter of a pretrain_joint export, frozen and random modes."""

from __future__ import annotations

import pytest
import torch

from custom_nets.nets import JointSSLNet
from custom_nets.nets.nodule import NoduleClassifier
from custom_nets.weights import export_pretrained

NET_OPTIONS = dict(encoder_depth=18, embed_dim=32, transformer_layers=1, num_heads=4, ffn_dim=40)
SSL_OPTIONS = dict(projection_hidden_dim=32, projection_dim=16, intra_prototypes=(8,), inter_prototypes=(4,))


@pytest.fixture
def pretrained(tmp_path):
    """A tiny pretraining network and its export, made by the project's own export command."""
    torch.manual_seed(0)
    net = JointSSLNet(**NET_OPTIONS, **SSL_OPTIONS)
    torch.save({"model": net.state_dict(), "trainer": {"epoch": 1, "iteration": 2}}, tmp_path / "checkpoint.pt")
    return net, export_pretrained(tmp_path / "checkpoint.pt", tmp_path / "pretrained.pt")


def test_pretrained_volume_feature_is_the_pretraining_networks(pretrained):
    net, export = pretrained
    model = NoduleClassifier(**NET_OPTIONS, slice_spacing_mm=1.5, pretrained_ckpt=export).eval()
    assert set(model.weight_reports) == {"slice_encoder", "slice_transformer"}
    assert all(not r.missing and not r.unexpected for r in model.weight_reports.values())
    cubes = torch.randn(2, 1, 6, 32, 32)
    positions = (torch.arange(6) * 1.5).expand(2, 6)
    with torch.no_grad():
        expected = net.eval()(cubes, slice_position=positions)
        torch.testing.assert_close(model.volume_feature(cubes), expected)
        logits = model(cubes)
    assert logits.shape == (2, 1)


def test_frozen_backbone_trains_only_the_head(pretrained):
    _, export = pretrained
    model = NoduleClassifier(**NET_OPTIONS, pretrained_ckpt=export, freeze_backbone=True).train()
    assert not model.slice_encoder.training and not model.slice_transformer.training and model.head.training
    groups = model.parameter_groups(backbone_lr=1e-4)
    assert len(groups) == 1 and groups[0]["params"] == list(model.head.parameters())
    before = model.slice_encoder.trunk.conv1.weight.clone()
    optimizer = torch.optim.SGD(groups, lr=0.1)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(torch.randn(2, 1, 4, 32, 32)), torch.ones(2, 1))
    loss.backward()
    optimizer.step()
    torch.testing.assert_close(model.slice_encoder.trunk.conv1.weight, before)
    assert model.head[1].weight.grad is not None


def test_fine_tuned_groups_and_random_init(pretrained):
    _, export = pretrained
    tuned = NoduleClassifier(**NET_OPTIONS, pretrained_ckpt=export)
    groups = tuned.parameter_groups(backbone_lr=1e-5)
    assert len(groups) == 2 and groups[0]["lr"] == 1e-5
    random = NoduleClassifier(**NET_OPTIONS)
    assert random.weight_reports == {}
    assert not torch.equal(random.slice_encoder.trunk.conv1.weight, tuned.slice_encoder.trunk.conv1.weight)


def test_mismatched_checkpoint_is_an_error(pretrained):
    _, export = pretrained
    with pytest.raises(RuntimeError, match="slice_transformer did not load completely"):
        NoduleClassifier(**{**NET_OPTIONS, "transformer_layers": 2}, pretrained_ckpt=export)
    with pytest.raises(ValueError, match=r"expects cubes \(B, 1, N, H, W\)"):
        NoduleClassifier(**NET_OPTIONS)(torch.randn(2, 4, 32, 32))
