import math

import pytest
import torch

from jetblocks import Jet, JetConfig
from jetblocks.checkpoint import CheckpointError, read_metadata, read_tensors, write_tensors
from jetblocks.integrations.big_vision import fuse_projections, unfuse_projections
from jetblocks.vit import LAYER_NORM_EPS, Attention, EncoderBlock, ViTConditioner


def make(context_dim=None, emb_dim=64):
    return ViTConditioner(
        d_in=6,
        d_out=12,
        num_tokens=16,
        emb_dim=emb_dim,
        depth=2,
        num_heads=4,
        context_dim=context_dim,
    )


def test_outputs_start_at_zero_and_shapes_follow_the_spec():
    net = make()
    out = net(torch.randn(3, 16, 6))
    assert out.shape == (3, 16, 12) and torch.equal(out, torch.zeros_like(out))
    assert net.posemb.shape == (1, 16, 64)
    assert len(net.blocks) == 2
    assert net.blocks[0].mlp[0].out_features == 4 * 64
    assert net.blocks[0].mlp[1].approximate == "tanh"
    norms = [m for m in net.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 5 and all(m.eps == LAYER_NORM_EPS == 1e-6 for m in norms)


def test_initialisers_follow_the_reference():
    torch.manual_seed(0)
    net = make(emb_dim=256)
    assert abs(net.posemb.std().item() * math.sqrt(256) - 1) < 0.05
    block = net.blocks[0]
    bound = math.sqrt(6 / (256 + 256))  # xavier-uniform of an E x E kernel
    for weight in (*block.attention.projection_weights(), block.attention.out.weight):
        assert weight.shape == (256, 256)  # q, k, v: each third of the fused qkv on its own
        assert weight.abs().max() <= bound
        assert weight.abs().max() > 0.95 * bound
    for layer in block.attention.children():
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
    for layer in (block.mlp[0], block.mlp[2]):
        assert 0 < layer.bias.abs().max() < 1e-5
    init = net.init_proj.weight  # LeCun normal, truncated at two std
    assert abs(init.std().item() - math.sqrt(1 / 6)) < 0.05
    assert init.abs().max() <= 2 * math.sqrt(1 / 6) / 0.87962566103423978
    assert torch.equal(net.final_proj.weight, torch.zeros_like(net.final_proj.weight))


def test_attention_matches_softmax_of_scaled_dot_products():
    torch.manual_seed(1)
    attention = Attention(16, num_heads=4, source_dim=8).double()
    for layer in attention.children():
        torch.nn.init.normal_(layer.bias)
    x, source = torch.randn(2, 5, 16).double(), torch.randn(2, 7, 8).double()
    q = attention.query(x).reshape(2, 5, 4, 4).transpose(1, 2)
    k, v = (t.reshape(2, 7, 4, 4).transpose(1, 2) for t in attention.kv(source).chunk(2, dim=-1))
    weights = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1)
    expected = attention.out((weights @ v).transpose(1, 2).reshape(2, 5, 16))
    torch.testing.assert_close(attention(x, source), expected)
    self_attention = Attention(16, num_heads=4).double()
    torch.nn.init.normal_(self_attention.qkv.bias)
    q, k, v = (
        t.reshape(2, 5, 4, 4).transpose(1, 2) for t in self_attention.qkv(x).chunk(3, dim=-1)
    )
    weights = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1)
    expected = self_attention.out((weights @ v).transpose(1, 2).reshape(2, 5, 16))
    torch.testing.assert_close(self_attention(x), expected)


def test_fused_projections_split_into_the_reference_names_and_back():
    net = make(context_dim=5)
    params = dict(net.named_parameters())
    split = unfuse_projections(params)
    assert "blocks.0.attention.qkv.weight" not in split and "cross_attention.kv.bias" not in split
    assert split["blocks.1.attention.key.weight"].shape == (64, 64)
    assert torch.equal(
        split["blocks.1.attention.value.bias"], params["blocks.1.attention.qkv.bias"][128:]
    )
    assert torch.equal(
        split["cross_attention.key.weight"], params["cross_attention.kv.weight"][:64]
    )
    assert split["cross_attention.query.weight"] is params["cross_attention.query.weight"]
    fused = fuse_projections(split, params)
    assert fused.keys() == params.keys()
    assert all(torch.equal(fused[name], params[name]) for name in params)


def test_a_checkpoint_of_the_unfused_layout_is_refused_by_name(tmp_path):
    """Weights saved before the projections were fused (version 0.1) do not load."""
    config = JetConfig(image_size=(8, 8), patch_size=2, depth=2, block_depth=1, emb_dim=8,
                       num_heads=2, kinds=("channels",), spatial_patterns=())  # fmt: skip
    weights = Jet(config).save_pretrained(tmp_path) / "model.safetensors"
    old = unfuse_projections(read_tensors(weights))  # query/key/value, as they were saved
    write_tensors(weights, old, read_metadata(weights))
    message = r"does not fit its configuration: missing .*qkv\.bias.*unexpected .*attention\.key"
    with pytest.raises(CheckpointError, match=message):
        Jet.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="self-attention takes no source"):
        Attention(8, 2)(torch.randn(2, 3, 8), torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="cross-attention needs a source"):
        Attention(8, 2, source_dim=4)(torch.randn(2, 3, 8))


def test_encoder_block_is_pre_ln_residual():
    block = EncoderBlock(8, 2)
    x = torch.randn(2, 3, 8)
    expected = x + block.attention(block.attention_norm(x))
    expected = expected + block.mlp(block.mlp_norm(expected))
    torch.testing.assert_close(block(x), expected)


def test_cross_attention_starts_at_zero_and_learns_from_context():
    net = make(context_dim=5)
    assert torch.equal(net.cross_attention.out.weight, torch.zeros(64, 64))
    torch.nn.init.normal_(net.final_proj.weight)
    x = torch.randn(2, 16, 6)
    a, b = net(x, torch.randn(2, 3, 5)), net(x, torch.randn(2, 3, 5))
    torch.testing.assert_close(a, b)  # zero-initialised cross-attention ignores the context
    torch.nn.init.normal_(net.cross_attention.out.weight)
    assert not torch.allclose(net(x, torch.randn(2, 3, 5)), a)


def test_bad_inputs_and_contexts_are_refused():
    message = r"ViTConditioner expects tokens of shape \[B, 16, 6\], got \[2, 16, 5\]"
    with pytest.raises(ValueError, match=message):
        make()(torch.randn(2, 16, 5))
    with pytest.raises(ValueError, match="context_dim=None"):
        make()(torch.randn(2, 16, 6), torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="pass a context"):
        make(context_dim=5)(torch.randn(2, 16, 6))
    with pytest.raises(ValueError, match=r"expects context of shape \[2, M, 5\], got \[2, 3, 4\]"):
        make(context_dim=5)(torch.randn(2, 16, 6), torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="divisible by num_heads"):
        Attention(10, 4)
