"""SliceTransformer and JointSSLNet: shapes, padding invariance, positions, masking and the pretraining outputs."""

from __future__ import annotations

import pytest
import torch

from custom_nets.engines.prepare_batch import choose_slices
from custom_nets.nets import JointSSLNet, SliceTransformer, sample_slice_mask, sample_slice_window


@pytest.fixture(scope="module")
def transformer() -> SliceTransformer:
    torch.manual_seed(0)
    transformer = SliceTransformer(embed_dim=32, num_layers=2, num_heads=4, num_points=2, ffn_dim=40).eval()
    with torch.no_grad():  # offsets and weights that depend on the query (and so on the position encoding)
        for layer in transformer.layers:
            layer.attention.sampling_proj.weight.normal_(std=0.3)
    return transformer


@pytest.mark.parametrize("num_slices", [1, 2, 7, 64, 300])
def test_shapes_and_unit_norm(transformer: SliceTransformer, num_slices: int) -> None:
    out = transformer(torch.randn(2, num_slices, 32))
    assert out.tokens.shape == (2, num_slices, 32)
    torch.testing.assert_close(out.volume_embedding.norm(dim=-1), torch.ones(2))


def test_padding_invariance(transformer: SliceTransformer) -> None:
    short = torch.randn(1, 6, 32)
    positions = torch.arange(6.0)[None] * 3.0
    padded = torch.cat([short, torch.randn(1, 5, 32)], dim=1)
    padded_positions = torch.cat([positions, torch.full((1, 5), 999.0)], dim=1)
    valid = torch.tensor([[True] * 6 + [False] * 5])
    expected = transformer(short, slice_position=positions)
    out = transformer(padded, valid, padded_positions)
    torch.testing.assert_close(out.tokens[:, :6], expected.tokens, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.volume_embedding, expected.volume_embedding, rtol=1e-4, atol=1e-5)


def test_positions_are_relative_and_in_mm(transformer: SliceTransformer) -> None:
    tokens = torch.randn(1, 5, 32)
    base = torch.arange(5.0)[None] * 2.5
    shifted = transformer(tokens, slice_position=base - 400.0).tokens
    torch.testing.assert_close(shifted, transformer(tokens, slice_position=base).tokens, rtol=1e-4, atol=1e-5)
    stretched = transformer(tokens, slice_position=base * 2).tokens
    assert not torch.allclose(stretched, transformer(tokens, slice_position=base).tokens)


def test_mask_token_replaces_masked_slices(transformer: SliceTransformer) -> None:
    tokens = torch.randn(1, 4, 32)
    mask = torch.tensor([[False, True, False, False]])
    other = tokens.clone()
    other[0, 1] = 50.0  # content under the mask must not matter
    torch.testing.assert_close(transformer(tokens, slice_mask=mask).tokens, transformer(other, slice_mask=mask).tokens)


def test_all_padding_volume_is_rejected(transformer: SliceTransformer) -> None:
    with pytest.raises(RuntimeError, match="at least one valid slice"):
        transformer(torch.randn(1, 3, 32), torch.zeros(1, 3, dtype=torch.bool))


def test_sample_slice_mask_respects_padding_and_minimum() -> None:
    valid = torch.tensor([[True] * 10, [True] * 3 + [False] * 7])
    mask = sample_slice_mask(valid, ratio=0.1)
    assert mask.sum(dim=1).tolist() == [1, 1]
    assert not (mask & ~valid).any()
    assert sample_slice_mask(valid, ratio=0.5).sum(dim=1).tolist() == [5, 2]


def tiny_net(**kwargs) -> JointSSLNet:
    torch.manual_seed(0)
    options = dict(
        encoder_depth=18,
        embed_dim=32,
        transformer_layers=1,
        num_heads=4,
        num_points=2,
        ffn_dim=40,
        projection_hidden_dim=64,
        projection_dim=16,
        intra_prototypes=(20, 10),
        inter_prototypes=(6,),
    )
    return JointSSLNet(**{**options, **kwargs})


def test_pretraining_outputs_mixed_batch() -> None:
    net = tiny_net().train()
    valid = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    batch = {
        "image_views": [torch.randn(3, 1, 32, 32), torch.randn(3, 1, 32, 32), torch.randn(3, 1, 16, 16)],
        "volume_views": [torch.randn(2, 1, 6, 32, 32), torch.randn(2, 1, 6, 32, 32)],
        "slice_valid": valid,
        "slice_position": torch.arange(6.0).expand(2, 6),
    }
    out = net(batch)
    assert [z.shape for z in out["intra_projection"]] == [(13, 16), (13, 16), (3, 16)]  # 3 images + 10 valid slices
    assert [[s.shape[1] for s in head] for head in out["intra_scores"]] == [[20] * 3, [10] * 3]
    assert [z.shape for z in out["inter_projection"]] == [(2, 16), (2, 16)]  # through the inter projection head
    assert out["inter_scores"][0][1].shape == (2, 6)
    torch.testing.assert_close(out["inter_projection"][1].norm(dim=1), torch.ones(2))
    assert out["mask_prediction"].shape == out["mask_target"].shape == (2, 2, 6, 32)
    assert not out["mask_target"].requires_grad
    assert (out["slice_mask"].sum(dim=1) >= 1).all() and not (out["slice_mask"] & ~valid).any()
    torch.testing.assert_close(out["intra_projection"][0].norm(dim=1), torch.ones(13))


def _identity_geometry(count: int) -> list[torch.Tensor]:
    return [torch.eye(3).expand(count, 3, 3) for _ in range(2)]


@pytest.mark.parametrize(("stage", "image_locations", "slice_locations"), [(3, 4, 9), (4, 1, 4)])
def test_dense_outputs_hold_every_location_of_the_global_views(stage, image_locations, slice_locations) -> None:
    net = tiny_net(dense_prototypes=5, dense_stage=stage).train()
    valid = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    shifted = torch.eye(3).repeat(2, 1, 1)
    shifted[1, :2, 2] = torch.tensor([10.0, -4.0])  # view 1 of volume 1: 10 px down, 4 px left in the source
    batch = {  # images 32 x 32 and volume slices 48 x 48: two groups with their own map sizes
        "image_views": [torch.randn(3, 1, 32, 32), torch.randn(3, 1, 32, 32), torch.randn(3, 1, 16, 16)],
        "image_view_geometry": _identity_geometry(3) + [torch.eye(3).expand(3, 3, 3)],
        "volume_views": [torch.randn(2, 1, 6, 48, 48), torch.randn(2, 1, 6, 48, 48)],
        "volume_view_geometry": [torch.eye(3).expand(2, 3, 3), shifted],
        "slice_valid": valid,
        "intra_slices": valid & (torch.arange(6) < 3),  # 3 slices of each volume enter the 2D losses
    }
    out = net(batch)
    for view in range(2):
        assert [g.shape for g in out["dense_scores"][view]] == [(3, image_locations, 5), (6, slice_locations, 5)]
        assert [g.shape for g in out["dense_coordinates"][view]] == [(3, image_locations, 2), (6, slice_locations, 2)]
        torch.testing.assert_close(out["dense_cell_size"][view][1], torch.full((6,), 48.0 / slice_locations**0.5))
    cells = round(slice_locations**0.5)  # cells per side of the slices' map, spread evenly over the 48 pixels
    centres = (torch.arange(cells) + 0.5) * (48 / cells) - 0.5
    first = torch.stack([centres[0].expand(2), centres[:2]], dim=1)
    torch.testing.assert_close(out["dense_coordinates"][0][1][0, :2], first)
    # slices 3-5 of the intra rows belong to volume 1, whose view 1 is shifted
    torch.testing.assert_close(
        out["dense_coordinates"][1][1][3:], out["dense_coordinates"][0][1][3:] + torch.tensor([10.0, -4.0])
    )
    out["dense_scores"][0][1].sum().backward()
    assert net.slice_encoder.trunk.layer1[0].conv1.weight.grad.abs().sum() > 0  # the dense term trains f_intra
    assert "dense_scores" not in tiny_net().train()(batch)  # off by default: the paper's network
    with pytest.raises(ValueError, match="image_view_geometry"):
        net({key: value for key, value in batch.items() if key != "image_view_geometry"})
    with pytest.raises(ValueError, match="dense_stage"):
        tiny_net(dense_prototypes=5, dense_stage=0)


def test_inter_clustering_on_projected_or_raw_volume_features() -> None:
    volumes = {"volume_views": [torch.randn(3, 1, 4, 32, 32), torch.randn(3, 1, 4, 32, 32)]}
    raw = tiny_net(inter_projection_head=False).train()
    assert raw.inter_projection_head is None
    out = raw(volumes)
    assert [z.shape for z in out["inter_projection"]] == [(3, 32), (3, 32)]  # the volume features themselves
    torch.testing.assert_close(out["inter_scores"][0][0], raw.inter_prototypes[0](out["inter_projection"][0]))
    projected = tiny_net().train()
    batch_norm = projected.inter_projection_head[1]
    out = projected(volumes)
    assert batch_norm.num_batches_tracked == 1  # both views pass the head in one batch (6 rows)
    assert out["inter_projection"][0].shape == (3, 16)
    # the head's batch norm removes what every volume shares: a common offset of the features changes nothing
    features = torch.nn.functional.normalize(torch.randn(6, 32), dim=1)
    head = projected.inter_projection_head.train()
    torch.testing.assert_close(head(features), head(features + 5.0), atol=1e-4, rtol=1e-4)


def test_slice_window_is_a_run_of_valid_slices() -> None:
    valid = torch.tensor([[True] * 10 + [False] * 2, [True] * 3 + [False] * 9, [False] * 12])
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        window = sample_slice_window(valid, (0.5, 1.0), generator)
        assert not (window & ~valid).any()
        lengths = window.sum(dim=1).tolist()
        assert 5 <= lengths[0] <= 10 and 2 <= lengths[1] <= 3 and lengths[2] == 0  # round(u * n), at least 1
        for row, length in zip(window, lengths, strict=True):
            if length:
                first = int(row.float().argmax())
                assert row[first : first + length].all()  # consecutive
    torch.testing.assert_close(sample_slice_window(valid, (1.0, 1.0)), valid)


def test_transformer_window_equals_embedding_the_cropped_volume() -> None:
    net = tiny_net(dropout=0.0).eval()
    volume = torch.randn(1, 1, 8, 32, 32)
    position = 2.5 * torch.arange(8.0)[None]
    window = torch.tensor([[False, False, True, True, True, True, False, False]])
    with torch.no_grad():
        windowed = net.embed_volume(volume, None, position, transformer_valid=window).volume_feature
        cropped = net.embed_volume(volume[:, :, 2:6], None, position[:, 2:6]).volume_feature
    torch.testing.assert_close(windowed, cropped, atol=1e-5, rtol=1e-5)


def test_inter_slice_scale_masks_slices_both_views_see() -> None:
    net = tiny_net(inter_slice_scale=(0.5, 0.5)).train()
    valid = torch.tensor([[True] * 8, [True] * 6 + [False] * 2])
    torch.manual_seed(1)
    out = net({"volume_views": [torch.randn(2, 1, 8, 32, 32)] * 2, "slice_valid": valid})
    assert out["mask_prediction"].shape == (2, 2, 8, 32)
    seen_by_both = out["slice_valid"]  # what the masked loss may score
    assert not (seen_by_both & ~valid).any()
    assert (seen_by_both.sum(dim=1) <= torch.tensor([4, 3])).all()  # within one run of half the valid slices
    assert not (out["slice_mask"] & ~seen_by_both).any()
    with pytest.raises(ValueError, match="inter_slice_scale"):
        tiny_net(inter_slice_scale=(0.0, 1.0))


def test_intra_slices_select_the_slices_of_the_2d_loss() -> None:
    net = tiny_net().train()
    valid = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    chosen = choose_slices(valid, 2)
    assert chosen.sum(dim=1).tolist() == [2, 2] and not (chosen & ~valid).any()
    volumes = [torch.randn(2, 1, 6, 32, 32), torch.randn(2, 1, 6, 32, 32)]
    out = net({"volume_views": volumes, "slice_valid": valid, "intra_slices": chosen})
    assert [z.shape[0] for z in out["intra_projection"]] == [4, 4]
    assert out["mask_prediction"].shape == (2, 2, 6, 32)  # f_inter still sees every valid slice


def test_pretraining_outputs_single_kind_batches() -> None:
    net = tiny_net().train()
    images_only = net({"image_views": [torch.randn(2, 1, 32, 32)] * 2})
    assert "inter_projection" not in images_only and images_only["intra_projection"][0].shape == (2, 16)
    volumes_only = net({"volume_views": [torch.randn(2, 1, 3, 32, 32)] * 2})
    assert volumes_only["intra_projection"][0].shape == (6, 16)
    with pytest.raises(ValueError, match="neither"):
        net({"image_views": [], "volume_views": []})


def test_eval_mode_returns_one_tensor() -> None:
    net = tiny_net().eval()
    assert net(torch.randn(2, 1, 32, 32)).shape == (2, 32)
    volume_feature = net(torch.randn(2, 1, 4, 32, 32))
    assert volume_feature.shape == (2, 32)
    torch.testing.assert_close(volume_feature.norm(dim=1), torch.ones(2))


def test_freeze_stem_keeps_the_first_convolution_at_its_initialisation() -> None:
    torch.manual_seed(0)
    net = tiny_net(freeze_stem=True).train()
    trunk = net.slice_encoder.trunk
    stem_before = {name: value.clone() for name, value in trunk.conv1.state_dict().items()}
    bn_before = {name: value.clone() for name, value in trunk.bn1.state_dict().items()}
    layer1_before = trunk.layer1[0].conv1.weight.clone()
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5, weight_decay=0.1)
    batch = {"image_views": [torch.randn(4, 1, 32, 32), torch.randn(4, 1, 32, 32)]}
    out = net(batch)
    loss = sum(z.square().sum() for head in out["intra_scores"] for z in head) + out["intra_projection"][0].sum()
    loss.backward()
    optimizer.step()
    assert not any(p.requires_grad for p in (*trunk.conv1.parameters(), *trunk.bn1.parameters()))
    torch.testing.assert_close(trunk.conv1.weight, stem_before["weight"], rtol=0, atol=0)
    torch.testing.assert_close(trunk.bn1.weight, bn_before["weight"], rtol=0, atol=0)
    torch.testing.assert_close(trunk.bn1.bias, bn_before["bias"], rtol=0, atol=0)
    assert not torch.equal(trunk.bn1.running_mean, bn_before["running_mean"])  # statistics still follow the data
    assert not torch.equal(trunk.layer1[0].conv1.weight, layer1_before)  # the rest of f_intra learns
    assert tiny_net().slice_encoder.trunk.conv1.weight.requires_grad  # off by default


def _grouping_batch() -> dict[str, object]:
    generator = torch.Generator().manual_seed(5)
    valid = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    return {
        "image_views": [torch.randn(3, 1, 32, 32, generator=generator) for _ in range(2)]
        + [torch.randn(3, 1, 16, 16, generator=generator) for _ in range(2)],
        "volume_views": [torch.randn(2, 1, 6, 32, 32, generator=generator) for _ in range(2)],
        "slice_valid": valid,
        "slice_position": torch.arange(6.0).expand(2, 6),
    }


@pytest.mark.parametrize(
    ("group_views", "expected"),
    [
        (False, [(3, True), (3, False), (3, False), (3, False), (10, True), (10, True)]),
        (True, [(6, True), (6, False), (20, True)]),
    ],
)
def test_group_views_encodes_each_kind_and_size_once(
    monkeypatch: pytest.MonkeyPatch, group_views: bool, expected: list[tuple[int, bool]]
) -> None:
    """group_views: the two 32 x 32 image views, the two 16 x 16 ones and the two volume views' 10 valid slices each
    go through f_intra as one batch (3 calls instead of 6); images and slices are never mixed. Either way the
    multi-scale embedding is computed only where it is used: image view 0 (``slice_embedding``) and the volume
    views (``f_inter``'s input)."""
    net = tiny_net(group_views=group_views).train()
    calls: list[tuple[int, bool]] = []
    encode = net.slice_encoder.encode_images

    def spy(images: torch.Tensor, return_features: bool = True, return_embedding: bool = True):
        calls.append((len(images), return_embedding))
        return encode(images, return_features, return_embedding)

    monkeypatch.setattr(net.slice_encoder, "encode_images", spy)
    out = net(_grouping_batch())
    assert calls == expected
    assert [z.shape for z in out["intra_projection"]] == [(13, 16), (13, 16), (3, 16), (3, 16)]
    assert out["slice_embedding"].shape == (3 + 10, net.slice_encoder.embed_dim)


@pytest.mark.parametrize("dense_prototypes", [0, 5])
def test_group_views_gives_the_per_view_outputs_when_batch_norm_uses_running_statistics(dense_prototypes) -> None:
    """With batch norm reading its running statistics (eval mode: no batch statistics to share between views) the
    grouped encoding gives every output and gradient of the per-view one, up to rounding."""
    results = []
    for group_views in (False, True):
        net = tiny_net(group_views=group_views, dense_prototypes=dense_prototypes, dense_stage=3).eval()
        batch = _grouping_batch()
        if dense_prototypes:
            batch["image_view_geometry"] = [torch.eye(3).expand(3, 3, 3) for _ in range(2)]
            batch["volume_view_geometry"] = [torch.eye(3).expand(2, 3, 3) for _ in range(2)]
        torch.manual_seed(7)  # the same masked slices
        out = net(batch)
        total = sum(z.sum() for z in out["intra_projection"] + out["inter_projection"]) + out["mask_prediction"].sum()
        if dense_prototypes:
            total = total + sum(scores.square().sum() for view in out["dense_scores"] for scores in view)
        total.backward()
        gradients = {name: p.grad for name, p in net.named_parameters() if p.grad is not None}
        results.append((out, gradients))
    (per_view, per_view_grads), (grouped, grouped_grads) = results
    for key in ("intra_projection", "inter_projection", "slice_embedding", "mask_prediction", "mask_target"):
        torch.testing.assert_close(grouped[key], per_view[key], rtol=1e-4, atol=1e-5)
    if dense_prototypes:
        torch.testing.assert_close(grouped["dense_scores"], per_view["dense_scores"], rtol=1e-4, atol=1e-5)
    assert grouped_grads.keys() == per_view_grads.keys() and len(grouped_grads) > 20
    for name, gradient in per_view_grads.items():
        torch.testing.assert_close(grouped_grads[name], gradient, rtol=1e-3, atol=1e-5, msg=name)


def test_compiled_slice_transformer_gives_the_eager_outputs_and_gradients() -> None:
    """compile_slice_transformer: f_inter compiled by torch.compile (inductor, CPU here) gives the eager network's
    pretraining outputs and parameter gradients, keeps the weight names, and a second slice count runs too."""
    results = []
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # other tests may have compiled in this process
    for mode in (None, "default"):
        net = tiny_net(compile_slice_transformer=mode, dropout=0.0).train()
        torch.manual_seed(7)  # the same masked slices
        out = net(_grouping_batch())
        total = sum(z.sum() for z in out["intra_projection"] + out["inter_projection"]) + out["mask_prediction"].sum()
        total.backward()
        results.append((net, out, {name: p.grad for name, p in net.named_parameters() if p.grad is not None}))
    (eager, eager_out, eager_grads), (compiled, compiled_out, compiled_grads) = results
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it was compiled
    assert not torch._dynamo.utils.counters["graph_break"]  # in one piece
    assert list(compiled.state_dict()) == list(eager.state_dict())
    for key in ("inter_projection", "mask_prediction", "mask_target", "volume_feature"):
        torch.testing.assert_close(compiled_out[key], eager_out[key], rtol=1e-4, atol=1e-5)
    assert compiled_grads.keys() == eager_grads.keys()
    transformer_grads = [name for name in eager_grads if name.startswith("slice_transformer.")]
    assert len(transformer_grads) > 10
    scale = max(float(gradient.abs().max()) for gradient in eager_grads.values())  # rounding follows the largest
    for name, gradient in eager_grads.items():  # (a bias before batch norm has a gradient of pure rounding)
        torch.testing.assert_close(compiled_grads[name], gradient, rtol=1e-3, atol=1e-6 * scale, msg=name)
    volume, valid = torch.randn(1, 1, 9, 32, 32), torch.tensor([[True] * 7 + [False] * 2])
    torch.testing.assert_close(
        compiled.eval()(volume, slice_valid=valid), eager.eval()(volume, slice_valid=valid), rtol=1e-4, atol=1e-5
    )


def test_compile_slice_transformer_rejects_an_unknown_mode() -> None:
    with pytest.raises(ValueError, match="compile_slice_transformer must be None"):
        tiny_net(compile_slice_transformer="fast")
