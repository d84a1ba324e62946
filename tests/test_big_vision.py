"""big_vision checkpoints: the documented layout, exact round trips and refusals.

The checkpoints here are written by the tests themselves, following the layout that
``jetblocks.integrations.big_vision`` documents. ``reference_forward`` is an independent
NumPy transcription of big_vision's ``proj.jet.jet`` forward pass that reads those arrays
directly (mask matrices multiplied in, Flax kernel shapes), so the mapping is checked
against the reference's maths, not only against itself.
"""

from __future__ import annotations

import copy
import dataclasses
import re

import numpy as np
import pytest
import torch

from jetblocks import Jet, JetConfig
from jetblocks.checkpoint import CheckpointError
from jetblocks.integrations import big_vision as bv

CONFIG = JetConfig(
    image_size=(8, 8),
    patch_size=2,
    depth=5,
    block_depth=2,
    emb_dim=16,
    num_heads=2,
    kinds=("channels", "spatial"),
    spatial_patterns=("checkerboard-inv", "hstripes"),
    context_dim=3,
)


def perturbed_jet(config: JetConfig = CONFIG, seed: int = 0) -> Jet:
    torch.manual_seed(seed)
    jet = Jet(config)
    with torch.no_grad():
        for parameter in jet.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return jet


@pytest.fixture(scope="module")
def jet() -> Jet:
    return perturbed_jet()


@pytest.fixture(scope="module")
def arrays(jet) -> dict[str, np.ndarray]:
    return bv.jet_to_arrays(jet)


def save(tmp_path, arrays, name="ckpt.npz"):
    path = tmp_path / name
    with open(path, "wb") as file:
        np.savez(file, **arrays)
    return path


# -- an independent NumPy transcription of the reference -----------------------------------
def _layer_norm(x, p, name):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6) * p[f"{name}/scale"] + p[f"{name}/bias"]


def _attention(x, source, p, name):
    q, k, v = (
        np.einsum("bnd,dhk->bnhk", inp, p[f"{name}/{part}/kernel"]) + p[f"{name}/{part}/bias"]
        for part, inp in (("query", x), ("key", source), ("value", source))
    )
    logits = np.einsum("bqhk,bmhk->bhqm", q / np.sqrt(q.shape[-1]), k)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    out = np.einsum("bhqm,bmhk->bqhk", weights, v)
    return np.einsum("bqhk,hke->bqe", out, p[f"{name}/out/kernel"]) + p[f"{name}/out/bias"]


def _dense(x, p, name):
    return x @ p[f"{name}/kernel"] + p[f"{name}/bias"]


def _gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _dnn(x, p, context, block_depth):
    x = _dense(x, p, "init_proj") + p["posemb"]
    if context is not None:
        x = x + _attention(x, context, p, "MultiHeadDotProductAttention_0")
    for j in range(block_depth):
        block = f"vit/encoderblock_{j}"
        y = _layer_norm(x, p, f"{block}/LayerNorm_0")
        x = x + _attention(y, y, p, f"{block}/MultiHeadDotProductAttention_0")
        y = _layer_norm(x, p, f"{block}/LayerNorm_1")
        y = _gelu(_dense(y, p, f"{block}/MlpBlock_0/Dense_0"))
        x = x + _dense(y, p, f"{block}/MlpBlock_0/Dense_1")
    out = _dense(_layer_norm(x, p, "vit/encoder_norm"), p, "final_proj")
    return np.split(out, 2, axis=-1)


def reference_forward(arrays, images_nhwc, ps, context=None):
    """big_vision's ``Model.forward`` on the arrays: tokens ``[B, N, D]`` and the log-det."""
    b, h, w, c = images_nhwc.shape
    x = images_nhwc.reshape(b, h // ps, ps, w // ps, ps, c).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, (h // ps) * (w // ps), ps * ps * c)
    channel, spatial = arrays[bv.CHANNEL_MASKS], arrays[bv.SPATIAL_MASKS]
    block_depth = len({n.split("/")[3] for n in arrays if "encoderblock_" in n})
    logdet = np.zeros(b)
    for i in range(len(channel)):
        p = {n.removeprefix("couplings/dnn/"): a[i] for n, a in arrays.items() if "/" in n}
        if channel[i].any():
            x1, x2 = np.split(np.einsum("ntk,km->ntm", x, channel[i]), 2, axis=-1)
        else:
            halves = np.split(np.einsum("ntk,tm->nmk", x, spatial[i]), 2, axis=-2)
            x1, x2 = (a.reshape(b, a.shape[1] * 2, -1) for a in halves)  # the "cut"
        bias, raw = _dnn(x1, p, context, block_depth)
        x2 = (x2 + bias) * 2 / (1 + np.exp(-raw))
        logdet += (-np.log1p(np.exp(-raw)) + np.log(2)).sum(axis=(1, 2))
        if channel[i].any():
            x = np.einsum("ntk,km->ntm", np.concatenate([x1, x2], -1), channel[i].T)
        else:
            halves = [a.reshape(b, a.shape[1] // 2, -1) for a in (x1, x2)]  # the "uncut"
            x = np.einsum("ntk,tm->nmk", np.concatenate(halves, -2), spatial[i].T)
    return x, logdet


# -- the layout ---------------------------------------------------------------------------
def test_reference_transcription_computes_what_the_jet_computes(jet, arrays):
    images = np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 3))
    context = np.random.default_rng(1).normal(size=(2, 4, 3))
    z_ref, logdet_ref = reference_forward(
        {n: a.astype(np.float64) for n, a in arrays.items()}, images, ps=2, context=context
    )
    with torch.no_grad():
        z, logdet = copy.deepcopy(jet).double()(
            torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(context)
        )
    assert np.abs(logdet_ref).max() > 1.0  # the perturbed couplings are far from the identity
    np.testing.assert_allclose(z.numpy(), z_ref, atol=1e-6)  # arrays are float32-rounded
    np.testing.assert_allclose(logdet.numpy(), logdet_ref, atol=1e-5)


def test_names_and_shapes_follow_the_documented_mapping(jet, arrays):
    depth, dim, tokens, emb, heads = 5, 12, 16, 16, 2
    assert arrays[bv.CHANNEL_MASKS].shape == (depth, dim, dim)
    assert arrays[bv.SPATIAL_MASKS].shape == (depth, tokens, tokens)
    mha = "couplings/dnn/vit/encoderblock_1/MultiHeadDotProductAttention_0"
    expected_shapes = {
        "couplings/dnn/init_proj/kernel": (depth, dim // 2, emb),
        "couplings/dnn/posemb": (depth, 1, tokens, emb),
        "couplings/dnn/MultiHeadDotProductAttention_0/key/kernel": (depth, 3, heads, emb // 2),
        f"{mha}/query/kernel": (depth, emb, heads, emb // heads),
        f"{mha}/query/bias": (depth, heads, emb // heads),
        f"{mha}/out/kernel": (depth, heads, emb // heads, emb),
        "couplings/dnn/vit/encoderblock_1/MlpBlock_0/Dense_0/kernel": (depth, emb, 4 * emb),
        "couplings/dnn/vit/encoder_norm/scale": (depth, emb),
        "couplings/dnn/final_proj/kernel": (depth, emb, dim),
    }
    for name, shape in expected_shapes.items():
        assert arrays[name].shape == shape, name
    assert len(arrays) == 2 + len(bv.name_mapping(CONFIG)) == 2 + 3 + 8 + 2 * 16 + 4
    conditioner = jet.couplings[3].conditioner
    attention = conditioner.blocks[1].attention
    query, key, value = attention.qkv.weight.detach().chunk(3)  # the fused projection's rows
    np.testing.assert_array_equal(arrays[f"{mha}/query/kernel"][3].reshape(emb, emb), query.T)
    np.testing.assert_array_equal(arrays[f"{mha}/key/kernel"][3].reshape(emb, emb), key.T)
    np.testing.assert_array_equal(arrays[f"{mha}/value/kernel"][3].reshape(emb, emb), value.T)
    np.testing.assert_array_equal(
        arrays[f"{mha}/value/bias"][3].ravel(), attention.qkv.bias.detach().chunk(3)[2]
    )
    cross, context_mha = conditioner.cross_attention, "couplings/dnn/MultiHeadDotProductAttention_0"
    np.testing.assert_array_equal(
        arrays[f"{context_mha}/query/kernel"][3].reshape(emb, emb), cross.query.weight.detach().T
    )
    key, value = cross.kv.weight.detach().chunk(2)
    np.testing.assert_array_equal(arrays[f"{context_mha}/key/kernel"][3].reshape(3, emb), key.T)
    np.testing.assert_array_equal(arrays[f"{context_mha}/value/kernel"][3].reshape(3, emb), value.T)
    np.testing.assert_array_equal(
        arrays[f"{context_mha}/key/bias"][3].ravel(), cross.kv.bias.detach().chunk(2)[0]
    )
    np.testing.assert_array_equal(
        arrays[f"{mha}/out/kernel"][3].reshape(emb, emb), attention.out.weight.detach().T
    )
    np.testing.assert_array_equal(
        arrays["couplings/dnn/vit/encoderblock_1/LayerNorm_1/scale"][3],
        conditioner.blocks[1].mlp_norm.weight.detach(),
    )
    np.testing.assert_array_equal(
        arrays["couplings/dnn/final_proj/kernel"][3], conditioner.final_proj.weight.detach().T
    )
    perm, order = jet.couplings[0].split.perm, jet.couplings[1].split.order
    assert (arrays[bv.CHANNEL_MASKS][0][perm, np.arange(dim)] == 1).all()
    assert arrays[bv.CHANNEL_MASKS][0].sum() == dim and not arrays[bv.SPATIAL_MASKS][0].any()
    assert (arrays[bv.SPATIAL_MASKS][1][order, np.arange(tokens)] == 1).all()
    assert arrays[bv.SPATIAL_MASKS][1].sum() == tokens and not arrays[bv.CHANNEL_MASKS][1].any()


def test_hand_built_arrays_load_into_the_right_places():
    config = JetConfig(
        image_size=(4, 4), patch_size=2, depth=2, block_depth=1, emb_dim=4, num_heads=2,
        kinds=("spatial", "channels"), spatial_patterns=("vstripes",),
    )  # fmt: skip
    rng = np.random.default_rng(0)
    shapes = {name: a.shape for name, a in bv.jet_to_arrays(Jet(config)).items()}
    arrays = {name: rng.normal(size=shape).astype(np.float32) for name, shape in shapes.items()}
    perm = np.array([5, 0, 11, 3, 2, 9, 1, 10, 4, 8, 7, 6])
    channel = np.zeros((2, 12, 12), np.float32)
    channel[1, perm, np.arange(12)] = 1
    spatial = np.zeros((2, 4, 4), np.float32)
    spatial[0, [0, 2, 1, 3], np.arange(4)] = 1  # vstripes: even raster indices condition
    arrays |= {bv.CHANNEL_MASKS: channel, bv.SPATIAL_MASKS: spatial}
    jet = bv.jet_from_arrays(arrays)
    assert jet.config.layer_plan() == config.layer_plan()
    assert jet.couplings[1].split.perm.tolist() == perm.tolist()
    assert jet.couplings[0].split.order.tolist() == [0, 2, 1, 3]
    qkv = jet.couplings[1].conditioner.blocks[0].attention.qkv.weight.detach()
    mha = "couplings/dnn/vit/encoderblock_0/MultiHeadDotProductAttention_0"
    for part, weight in zip(("query", "key", "value"), qkv.chunk(3), strict=True):
        kernel = arrays[f"{mha}/{part}/kernel"]
        for head in range(2):
            for k in range(2):  # feature head * head_dim + k of the part's rows
                np.testing.assert_array_equal(weight[head * 2 + k], kernel[1, :, head, k])
    init = jet.couplings[0].conditioner.init_proj
    np.testing.assert_array_equal(
        init.weight.detach().T, arrays["couplings/dnn/init_proj/kernel"][0]
    )
    assert bv.jet_to_arrays(jet).keys() == arrays.keys()
    for name, array in bv.jet_to_arrays(jet).items():
        np.testing.assert_array_equal(array, arrays[name], err_msg=name)


# -- round trips --------------------------------------------------------------------------
def test_save_then_load_is_exact_and_infers_an_equivalent_config(jet, tmp_path):
    path = tmp_path / "jet.npz"
    bv.save_jet(jet, path)
    loaded = bv.load_jet(path)
    assert loaded.config.layer_plan() == CONFIG.layer_plan()
    assert dataclasses.replace(loaded.config, spatial_patterns=CONFIG.spatial_patterns) == CONFIG
    state, expected = loaded.state_dict(), jet.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[name], expected[name]) for name in expected)
    x, context = torch.rand(2, 3, 8, 8) * 2 - 1, torch.randn(2, 4, 3)
    with torch.no_grad():
        for a, b in zip(jet(x, context), loaded(x, context), strict=True):
            assert torch.equal(a, b)
    same = bv.load_jet(path, CONFIG)  # a given config is checked and used as is
    assert same.config == CONFIG
    assert torch.equal(same.couplings[0].split.perm, jet.couplings[0].split.perm)


def test_jetformer_and_training_state_layouts_are_found(arrays, tmp_path):
    nested: dict = {}
    for name, array in arrays.items():  # a nested tree, as Flax holds it
        node = nested
        *parents, leaf = name.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = array
    expected = bv.jet_from_arrays(arrays).state_dict()
    layouts = {
        "jetformer": {f"params_adaptor/{n}": a for n, a in arrays.items()}
        | {"decoder/embedder/input_embedding": np.zeros((3, 2))},
        "state": {f"params/{n}": a for n, a in arrays.items()}
        | {f"opt/1/0/mu/{n}": a for n, a in arrays.items()},
        "old_state": {f"opt/target/{n}": a for n, a in arrays.items()},
    }
    for label, layout in layouts.items():
        state = bv.load_jet(save(tmp_path, layout, f"{label}.npz")).state_dict()
        assert all(torch.equal(state[n], expected[n]) for n in expected), label
    state = bv.jet_from_arrays({"params_adaptor": nested}).state_dict()
    assert all(torch.equal(state[n], expected[n]) for n in expected)
    mu = bv.load_jet(tmp_path / "state.npz", key="opt/1/0/mu")
    assert torch.equal(
        mu.couplings[0].split.perm, bv.jet_from_arrays(arrays).couplings[0].split.perm
    )
    with pytest.raises(ValueError, match=r"several Jets.*\['a/', 'b/'\]; pass key="):
        bv.jet_from_arrays({f"{p}/{n}": a for n, a in arrays.items() for p in "ab"})
    with pytest.raises(ValueError, match="no big_vision Jet under key='params'"):
        bv.jet_from_arrays(arrays, key="params")


def test_bfloat16_saved_as_void_is_recovered():
    config = JetConfig(
        image_size=(4, 4), patch_size=2, depth=2, block_depth=1, emb_dim=4, num_heads=2,
        kinds=("channels",), spatial_patterns=(),
    )  # fmt: skip
    arrays = bv.jet_to_arrays(perturbed_jet(config))
    as_void = {}
    for name, array in arrays.items():  # what np.save makes of jax's bfloat16
        bits = torch.from_numpy(array).to(torch.bfloat16).view(torch.int16).numpy()
        as_void[name] = bits.view(np.dtype("V2"))
    loaded = bv.jet_to_arrays(bv.jet_from_arrays(as_void))
    for name, array in arrays.items():
        np.testing.assert_allclose(loaded[name], array, rtol=2**-8, err_msg=name)


def test_big_vision_model_kwargs_describe_the_architecture():
    assert bv.big_vision_model_kwargs(CONFIG) == dict(
        depth=5, block_depth=2, emb_dim=16, num_heads=2, scale_factor=2.0, ps=2,
        channels_coupling_projs=("random",),
        spatial_coupling_projs=("checkerboard-inv", "hstripes"),
        kinds=("channels", "spatial"),
    )  # fmt: skip


# -- config inference ---------------------------------------------------------------------
def test_infer_config_finds_shortest_cycles_and_takes_hints():
    config = JetConfig(
        image_size=(8, 8), patch_size=4, channels=1, depth=6, block_depth=1, emb_dim=8,
        num_heads=2, kinds=("channels", "channels", "spatial", "channels", "channels", "spatial"),
        spatial_patterns=("hstripes", "hstripes"),
    )  # fmt: skip
    arrays = bv.jet_to_arrays(Jet(config))
    inferred = bv.infer_config(arrays)  # D = 16: not RGB, so grayscale 4x4 patches
    assert inferred.kinds == ("channels", "channels", "spatial")
    assert inferred.spatial_patterns == ("hstripes",)
    assert (inferred.channels, inferred.patch_size, inferred.image_size) == (1, 4, (8, 8))
    assert inferred.layer_plan() == config.layer_plan()
    hinted = bv.infer_config(arrays, channels=4, scale_factor=1.5, attention_backend="math")
    assert (hinted.channels, hinted.patch_size, hinted.image_size) == (4, 2, (4, 4))
    assert (hinted.scale_factor, hinted.attention_backend) == (1.5, "math")
    with pytest.raises(ValueError, match="pass channels="):
        bv.infer_config(arrays, channels=3)


def test_infer_config_says_what_to_pass_when_the_grid_is_not_square():
    config = JetConfig(
        image_size=(4, 8), patch_size=2, depth=2, block_depth=1, emb_dim=4, num_heads=2,
        kinds=("channels",), spatial_patterns=(),
    )  # fmt: skip
    arrays = bv.jet_to_arrays(Jet(config))
    with pytest.raises(ValueError, match="do not form a square grid.*pass config="):
        bv.infer_config(arrays)
    loaded = bv.jet_from_arrays(arrays, config)  # with the config, it loads
    assert loaded.config == config


# -- refusals -----------------------------------------------------------------------------
def test_missing_unexpected_and_misshapen_arrays_are_refused(arrays):
    name = "couplings/dnn/vit/encoderblock_1/MlpBlock_0/Dense_1/bias"
    with pytest.raises(ValueError, match=f"missing \\['{name}'\\]"):
        bv.jet_from_arrays({n: a for n, a in arrays.items() if n != name})
    with pytest.raises(ValueError, match=r"unexpected \['couplings/dnn/extra'\]"):
        bv.jet_from_arrays(arrays | {"couplings/dnn/extra": np.zeros(3)})
    bad = arrays | {name: arrays[name][:, :-1]}
    with pytest.raises(ValueError, match=f"'{name}' has shape \\[5, 15\\], expected \\[5, 16\\]"):
        bv.jet_from_arrays(bad)
    with pytest.raises(ValueError, match="lacks 'couplings/dnn/init_proj/kernel'"):
        bv.jet_from_arrays({n: a for n, a in arrays.items() if "init_proj" not in n})
    with pytest.raises(ValueError, match="no big_vision Jet in the checkpoint"):
        bv.jet_from_arrays({n: a for n, a in arrays.items() if n != bv.CHANNEL_MASKS})
    with pytest.raises(ValueError, match="does not match the config"):
        bv.jet_from_arrays(arrays, dataclasses.replace(CONFIG, block_depth=1))
    with pytest.raises(ValueError, match=r"init_proj/kernel' has shape \[5, 6, 16\], expected"):
        bv.jet_from_arrays(arrays, dataclasses.replace(CONFIG, emb_dim=8))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda c, s: c[0].__setitem__((0, slice(None)), 1),
            "layer 0's channel mask is not a perm",
        ),
        (lambda c, s: c[2].__setitem__(c[2] == 1, 0.5), "layer 2's channel mask is not a perm"),
        (lambda c, s: s[1].__setitem__((0, 0), 2.0), "layer 1's spatial mask is not a perm"),
        (lambda c, s: s[3].fill(0), "layer 3: .* both all-zero"),
        (lambda c, s: s[0].__setitem__((0, 0), 1), "layer 0: .* both non-zero"),
        (lambda c, s: s.__setitem__(1, np.eye(16)), "layer 1's spatial mask is a permutation but"),
    ],
)
def test_masks_that_are_not_the_reference_permutations_are_refused(arrays, edit, message):
    channel, spatial = arrays[bv.CHANNEL_MASKS].copy(), arrays[bv.SPATIAL_MASKS].copy()
    edit(channel, spatial)
    with pytest.raises(ValueError, match=message):
        bv.jet_from_arrays(arrays | {bv.CHANNEL_MASKS: channel, bv.SPATIAL_MASKS: spatial})


def test_a_config_that_disagrees_with_the_masks_is_refused(arrays):
    with pytest.raises(ValueError, match="layer 0 is a channels coupling .* but spatial"):
        bv.jet_from_arrays(arrays, dataclasses.replace(CONFIG, kinds=("spatial", "channels")))
    wrong = dataclasses.replace(CONFIG, spatial_patterns=("checkerboard", "hstripes"))
    with pytest.raises(ValueError, match="'checkerboard-inv' pattern but the config says"):
        bv.jet_from_arrays(arrays, wrong)


def test_bad_files_and_unportable_jets_are_refused(tmp_path, jet):
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    with pytest.raises(ValueError, match="not a readable .npz"):
        bv.load_jet(single)
    with pytest.raises(ValueError, match=r"\.npz"):
        bv.save_jet(jet, tmp_path / "jet.ckpt")
    wide = perturbed_jet(
        dataclasses.replace(CONFIG, image_size=(8, 16), spatial_patterns=("vstripes",))
    )
    with pytest.raises(ValueError, match="square token grid"):
        bv.save_jet(wide, tmp_path / "wide.npz")
    with pytest.raises(ValueError, match="tensorstore"):
        bv.load_jet(tmp_path)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, **{bv.CHANNEL_MASKS: np.array([object()], dtype=object)})
    with pytest.raises(ValueError, match="holds Python objects"):
        bv.load_jet(pickled)


@pytest.mark.parametrize(
    "content",
    [lambda whole: whole[: len(whole) // 2], lambda whole: b"", lambda whole: b"not a zip\n"],
    ids=["truncated", "empty", "text"],
)
def test_unreadable_npz_files_are_named(tmp_path, arrays, content):
    whole = save(tmp_path, arrays).read_bytes()
    broken = tmp_path / "broken.npz"
    broken.write_bytes(content(whole))
    with pytest.raises(CheckpointError, match=re.escape(f"{broken} is not a readable .npz")):
        bv.load_jet(broken)


def test_a_corrupt_member_of_the_npz_is_named(tmp_path, arrays):
    whole = bytearray(save(tmp_path, arrays).read_bytes())
    whole[len(whole) // 2] ^= 0xFF  # zip's CRC check catches it while reading
    (tmp_path / "flipped.npz").write_bytes(whole)
    with pytest.raises(CheckpointError, match="flipped.npz is not a readable .npz.*CRC"):
        bv.load_jet(tmp_path / "flipped.npz")


LEAF = "couplings/dnn/vit/encoderblock_1/MlpBlock_0/Dense_0/kernel"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_parameters_are_refused_by_name(arrays, tmp_path, bad):
    leaf = arrays[LEAF].copy()
    leaf[3, 0, 1] = bad
    with pytest.raises(CheckpointError, match=f"'{LEAF}' holds 1 non-finite .* layers \\[3\\]"):
        bv.jet_from_arrays(arrays | {LEAF: leaf})
    with pytest.raises(CheckpointError, match=LEAF):
        bv.load_jet(save(tmp_path, arrays | {LEAF: leaf}))


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.bool_])
def test_integer_and_bool_parameters_are_refused_by_name(arrays, dtype):
    leaf = arrays[LEAF].astype(dtype)
    message = f"'{LEAF}' must hold floating-point parameters, got dtype {np.dtype(dtype)}"
    with pytest.raises(CheckpointError, match=message):
        bv.jet_from_arrays(arrays | {LEAF: leaf})


@pytest.mark.parametrize("dtype", [np.float16, np.float64, np.int8, np.bool_])
def test_masks_of_any_0_1_dtype_and_parameters_of_any_float_dtype_load(jet, arrays, dtype):
    masks = {name: arrays[name].astype(dtype) for name in (bv.CHANNEL_MASKS, bv.SPATIAL_MASKS)}
    loaded = bv.jet_from_arrays(arrays | masks | {LEAF: arrays[LEAF].astype(np.float64)})
    expected = jet.state_dict()
    assert all(torch.equal(t, expected[n]) for n, t in loaded.state_dict().items())
