"""Read and write big_vision checkpoints of Jet (``proj.jet.jet``) and of JetFormer's Jet.

**File format.** big_vision saves parameters as an ``.npz`` (``np.savez``) whose entries are
the leaves of the Flax parameter tree, named by their path joined with ``"/"``
(``utils.tree_flatten_with_names``); bfloat16 leaves are stored as 2-byte ``void`` and
recovered on load. Released checkpoints hold the parameters at the top level; a training
state holds them under ``params/`` (or ``opt/target/`` in old Flax-optimizer checkpoints);
a JetFormer keeps its Jet under ``params_adaptor/``. :func:`load_jet` finds the Jet wherever
it sits (``key=`` picks one when a file holds several); :func:`save_jet` writes the released
layout, which ``big_vision.utils.load_params`` and ``proj.jet.jet.load`` accept. Tensorstore
checkpoint folders (big_vision's newer training checkpoints) are not read: export them to
``.npz`` with ``tree_flatten_with_names`` + ``np.savez`` first.

**API.** :func:`load_jet` and :func:`save_jet` for files; :func:`jet_from_arrays` and
:func:`jet_to_arrays` for arrays in memory (flat names or a nested tree such as a Flax
``params`` dict); :func:`infer_config`; :func:`big_vision_model_kwargs` for the matching
``proj.jet.jet.Model``; :func:`name_mapping` lists the correspondence below.

**Name mapping.** Flax runs the couplings under ``nn.scan``, so every coupling parameter is
stacked along a leading ``depth`` axis; entry ``i`` belongs to ``jet.couplings[i]``. With
``c = couplings.flows.{i}.conditioner``, ``vit = couplings/dnn/vit``, ``E`` the embedding
width, ``H`` heads of ``d = E/H`` dims, ``D`` token dims and ``N`` tokens:

==========================================================  ====================================
big_vision (stacked, leading ``depth``)                      jetblocks (layer ``i``)
==========================================================  ====================================
``channel_coupling_masks-FREEZE_ME`` ``[D, D]``              ``couplings.flows.{i}.split.perm``
``spatial_coupling_masks-FREEZE_ME`` ``[N, N]``              ``couplings.flows.{i}.split.order``
``couplings/dnn/init_proj/{kernel,bias}``                    ``c.init_proj.{weight,bias}``
``couplings/dnn/posemb`` ``[1, N, E]``                       ``c.posemb``
``couplings/dnn/MultiHeadDotProductAttention_0/*``           ``c.cross_attention.*`` (context)
``vit/encoderblock_{j}/LayerNorm_0/{scale,bias}``            ``c.blocks.{j}.attention_norm``
``vit/encoderblock_{j}/MultiHeadDotProductAttention_0/*``    ``c.blocks.{j}.attention.*``
``vit/encoderblock_{j}/LayerNorm_1/{scale,bias}``            ``c.blocks.{j}.mlp_norm``
``vit/encoderblock_{j}/MlpBlock_0/Dense_{0,1}``              ``c.blocks.{j}.mlp.{0,2}``
``vit/encoder_norm/{scale,bias}``                            ``c.norm.{weight,bias}``
``couplings/dnn/final_proj/{kernel,bias}``                   ``c.final_proj.{weight,bias}``
==========================================================  ====================================

A ``Dense`` kernel ``[in, out]`` is the transposed ``Linear`` weight; attention
``query/key/value`` kernels ``[in, H, d]`` and biases ``[H, d]`` are the weight ``[H*d, in]``
and bias split by head; the ``out`` kernel ``[H, d, E]`` is the weight ``[E, H*d]``; a
LayerNorm ``scale`` is its ``weight``. jetblocks fuses projections
(:data:`FUSED_PROJECTIONS`): the table's ``attention.{query,key,value}`` are
the thirds of ``attention.qkv`` and ``cross_attention.{key,value}`` the halves of
``cross_attention.kv``, split on export and concatenated on import. The frozen masks are
0/1 matrices with ``W[perm[j], j] = 1`` (channel layers) and ``W[order[j], j] = 1``
(spatial layers, ``order`` the conditioning tokens then the transformed ones); a layer of
the other kind holds an all-zero placeholder. Masks that are not permutation matrices are
refused, and so are missing or unexpected names and wrong shapes. Every other leaf must be
a floating-point array of finite values. A file that is not a readable ``.npz``, or a
parameter that is not finite floats, raises :class:`~jetblocks.checkpoint.CheckpointError`
(a ``ValueError``).

**Configs.** The file holds no config, but almost all of it follows from the arrays: depth,
ViT depth, width, heads, context width, the token count ``N`` (a square grid, as the
reference requires) and dims ``D``, and each layer's kind and spatial pattern (from which
mask is non-zero and what it permutes). ``kinds`` and ``spatial_patterns`` are inferred as
the shortest cycles that reproduce the layers. What the arrays cannot tell: how ``D`` splits
into patch size and channels (inferred as RGB when ``D/3`` is a square, else grayscale
when ``D`` is; pass ``channels=`` to :func:`infer_config` otherwise) and ``scale_factor``
(assumed 2.0, the reference default). JetFormer's Jet (``ps=1`` over 16x16 patches of
256x256 RGB images) is inferred as ``image_size=(256, 256), patch_size=16``, whose tokens are
the same ``[B, 256, 768]``.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from jetblocks.checkpoint import CheckpointError, atomic_file
from jetblocks.couplings import SPATIAL_PATTERNS, ChannelSplit, spatial_halves
from jetblocks.integrations.datasets import read_npz
from jetblocks.jet import Jet, JetConfig

__all__ = [
    "CHANNEL_MASKS",
    "FUSED_PROJECTIONS",
    "SPATIAL_MASKS",
    "big_vision_model_kwargs",
    "fuse_projections",
    "infer_config",
    "jet_from_arrays",
    "jet_to_arrays",
    "load_jet",
    "name_mapping",
    "read_arrays",
    "save_jet",
    "unfuse_projections",
]

CHANNEL_MASKS = "channel_coupling_masks-FREEZE_ME"
SPATIAL_MASKS = "spatial_coupling_masks-FREEZE_ME"
_DNN = "couplings/dnn"
_CONTEXT_ATTENTION = f"{_DNN}/MultiHeadDotProductAttention_0"

PathLike = str | os.PathLike


# Attention's fused projections and the reference's projections stacked in them, in order:
# the fused weight is the parts' weights ``[E, in]`` stacked by rows, and likewise the bias.
FUSED_PROJECTIONS = {"qkv": ("query", "key", "value"), "kv": ("key", "value")}


def _fused_name(name: str) -> tuple[str, tuple[str, ...], str]:
    """``(parent module, the projections fused in the module, leaf)`` of a parameter name."""
    module, _, leaf = name.rpartition(".")
    parent, _, layer = module.rpartition(".")
    return parent, FUSED_PROJECTIONS.get(layer, ()), leaf


def unfuse_projections(params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Named parameters with every fused projection split into the reference's projections
    (``....attention.qkv.weight`` into ``....attention.{query,key,value}.weight``, as views)."""
    split = {}
    for name, tensor in params.items():
        parent, parts, leaf = _fused_name(name)
        if parts:
            for part, chunk in zip(parts, tensor.chunk(len(parts)), strict=True):
                split[f"{parent}.{part}.{leaf}"] = chunk
        else:
            split[name] = tensor
    return split


def fuse_projections(state: Mapping[str, Tensor], names: Iterable[str]) -> dict[str, Tensor]:
    """The inverse of :func:`unfuse_projections`: ``state`` with the reference's projections
    concatenated into each fused parameter among ``names`` (a model's parameter names)."""
    state = dict(state)
    for name in names:
        parent, parts, leaf = _fused_name(name)
        if parts:
            state[name] = torch.cat([state.pop(f"{parent}.{part}.{leaf}") for part in parts])
    return state


# How one layer's leaf converts: (torch -> Flax given the head count, Flax -> torch).
_CONVERSIONS: dict[str, tuple[Callable[[Tensor, int], Tensor], Callable[[Tensor], Tensor]]] = {
    "dense": (lambda w, h: w.T, lambda k: k.T),
    "qkv_kernel": (
        lambda w, h: w.T.reshape(w.shape[1], h, -1),
        lambda k: k.reshape(k.shape[0], -1).T,
    ),
    "qkv_bias": (lambda b, h: b.reshape(h, -1), lambda b: b.reshape(-1)),
    "out_kernel": (
        lambda w, h: w.T.reshape(h, -1, w.shape[0]),
        lambda k: k.reshape(-1, k.shape[-1]).T,
    ),
    "same": (lambda t, h: t, lambda a: a),
}


def _attention_leaves(bv: str, pt: str) -> Iterator[tuple[str, str, str]]:
    for part in ("query", "key", "value"):
        yield f"{bv}/{part}/kernel", f"{pt}.{part}.weight", "qkv_kernel"
        yield f"{bv}/{part}/bias", f"{pt}.{part}.bias", "qkv_bias"
    yield f"{bv}/out/kernel", f"{pt}.out.weight", "out_kernel"
    yield f"{bv}/out/bias", f"{pt}.out.bias", "same"


def _dense_leaves(bv: str, pt: str) -> Iterator[tuple[str, str, str]]:
    yield f"{bv}/kernel", f"{pt}.weight", "dense"
    yield f"{bv}/bias", f"{pt}.bias", "same"


def _norm_leaves(bv: str, pt: str) -> Iterator[tuple[str, str, str]]:
    yield f"{bv}/scale", f"{pt}.weight", "same"
    yield f"{bv}/bias", f"{pt}.bias", "same"


def name_mapping(config: JetConfig) -> list[tuple[str, str, str]]:
    """``(big_vision name, conditioner parameter name, conversion)`` for every stacked leaf.

    The conditioner names are relative to ``couplings.flows.{i}.conditioner``, with the
    attention projections by the reference's names (see
    :func:`unfuse_projections`); conversions are ``dense``, ``qkv_kernel``,
    ``qkv_bias``, ``out_kernel`` or ``same``.
    """
    leaves = [*_dense_leaves(f"{_DNN}/init_proj", "init_proj")]
    leaves.append((f"{_DNN}/posemb", "posemb", "same"))
    if config.context_dim is not None:
        leaves += _attention_leaves(_CONTEXT_ATTENTION, "cross_attention")
    for j in range(config.block_depth):
        bv, pt = f"{_DNN}/vit/encoderblock_{j}", f"blocks.{j}"
        leaves += _norm_leaves(f"{bv}/LayerNorm_0", f"{pt}.attention_norm")
        leaves += _attention_leaves(f"{bv}/MultiHeadDotProductAttention_0", f"{pt}.attention")
        leaves += _norm_leaves(f"{bv}/LayerNorm_1", f"{pt}.mlp_norm")
        leaves += _dense_leaves(f"{bv}/MlpBlock_0/Dense_0", f"{pt}.mlp.0")
        leaves += _dense_leaves(f"{bv}/MlpBlock_0/Dense_1", f"{pt}.mlp.2")
    leaves += _norm_leaves(f"{_DNN}/vit/encoder_norm", "norm")
    leaves += _dense_leaves(f"{_DNN}/final_proj", "final_proj")
    return leaves


# -- jetblocks -> big_vision -------------------------------------------------------------------
def jet_to_arrays(jet: Jet) -> dict[str, np.ndarray]:
    """A Jet's parameters as big_vision's flat ``{name: float32 array}`` (names as above)."""
    config, layers = jet.config, list(jet.couplings)
    params = unfuse_projections({name: t.detach() for name, t in jet.named_parameters()})
    arrays = {}
    for bv, pt, kind in name_mapping(config):
        to_flax = _CONVERSIONS[kind][0]
        stacked = torch.stack(
            [
                to_flax(params[f"couplings.flows.{i}.conditioner.{pt}"], config.num_heads)
                for i in range(len(layers))
            ]
        )
        arrays[bv] = stacked.to(torch.float32).cpu().numpy()
    depth, dim, tokens = config.depth, config.token_dim, config.num_tokens
    channel = np.zeros((depth, dim, dim), np.float32)
    spatial = np.zeros((depth, tokens, tokens), np.float32)
    for i, layer in enumerate(layers):
        if isinstance(layer.split, ChannelSplit):
            channel[i, layer.split.perm.cpu().numpy(), np.arange(dim)] = 1.0
        else:
            spatial[i, layer.split.order.cpu().numpy(), np.arange(tokens)] = 1.0
    return {CHANNEL_MASKS: channel, SPATIAL_MASKS: spatial, **arrays}


def big_vision_model_kwargs(config: JetConfig) -> dict[str, Any]:
    """The ``proj.jet.jet.Model(**kwargs)`` that has this config's architecture.

    The reference patchifies NHWC images of ``config.channels`` channels with ``ps``; its
    ``context`` input (if any) is the one jetblocks takes. JetFormer runs its Jet with
    ``ps=1`` on the ``[B, h, w, D]`` grid of patch tokens instead: the same weights.
    """
    return dict(
        depth=config.depth,
        block_depth=config.block_depth,
        emb_dim=config.emb_dim,
        num_heads=config.num_heads,
        scale_factor=config.scale_factor,
        ps=config.patch_size,
        channels_coupling_projs=config.channel_patterns,
        spatial_coupling_projs=config.spatial_patterns,
        kinds=config.kinds,
    )


def save_jet(jet: Jet, path: PathLike) -> None:
    """Write ``jet`` as a big_vision ``.npz`` checkpoint (released layout, float32).

    Load it in big_vision with ``proj.jet.jet.load(None, path)`` or ``utils.load_params``,
    into a model built with :func:`big_vision_model_kwargs`. big_vision decides the format by
    the name, so ``path`` must end in ``.npz``; the reference only handles square images.
    """
    if not isinstance(jet, Jet):
        raise TypeError(
            f"only a Jet can be exported to big_vision (it has no other flow), got "
            f"{type(jet).__name__}"
        )
    if not os.fspath(path).endswith(".npz"):
        raise ValueError(f"path must end in .npz (big_vision picks its reader by name), got {path}")
    nh, nw = jet.config.grid
    if nh != nw:
        raise ValueError(
            f"big_vision's Jet assumes a square token grid, but this Jet's grid is {nh}x{nw} "
            f"(image_size {jet.config.image_size}); it could not run these weights"
        )
    arrays = jet_to_arrays(jet)
    with atomic_file(path) as staging, open(staging, "wb") as file:
        np.savez(file, **arrays)


# -- big_vision -> jetblocks -------------------------------------------------------------------
def read_arrays(path: PathLike) -> dict[str, np.ndarray]:
    """Every array of a big_vision ``.npz`` by its ``"/"``-joined name (nothing is unpickled).

    A file that is not a zip of ``.npy`` arrays (truncated, corrupt, pickled objects) raises
    :class:`~jetblocks.checkpoint.CheckpointError` naming it.
    """
    if os.path.isdir(path):
        raise CheckpointError(
            f"{path} is a folder (a tensorstore checkpoint?); only .npz files are read: export "
            "the params with big_vision's tree_flatten_with_names and np.savez"
        )
    return read_npz(path, error=CheckpointError)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for name, value in tree.items():
        if isinstance(value, Mapping):
            flat |= _flatten(value, f"{prefix}{name}/")
        else:
            flat[f"{prefix}{name}"] = value
    return flat


# Where big_vision files keep a Jet, most likely first: released params, a training state,
# an old Flax-optimizer state, and the same for a JetFormer's Jet.
_ROOTS = ("", "params/", "opt/target/")
_KNOWN_PREFIXES = (*_ROOTS, *(f"{root}params_adaptor/" for root in _ROOTS))


def _find_jet(arrays: Mapping[str, Any], key: str | None) -> dict[str, Any]:
    """The Jet's arrays, without their prefix (``params/``, ``params_adaptor/``, ...)."""
    arrays = _flatten(arrays)
    found = [name[: -len(CHANNEL_MASKS)] for name in arrays if name.endswith(CHANNEL_MASKS)]
    if key is not None:
        prefix = key.strip("/") + "/" if key.strip("/") else ""
        if prefix not in found:
            raise ValueError(
                f"no big_vision Jet under key={key!r} (no '{prefix}{CHANNEL_MASKS}'); "
                f"Jets were found under {found}"
            )
    else:
        known = [p for p in _KNOWN_PREFIXES if p in found]
        if not found:
            raise ValueError(
                f"no big_vision Jet in the checkpoint (no '{CHANNEL_MASKS}' anywhere); "
                "is this a proj.jet.jet or JetFormer checkpoint?"
            )
        if not known and len(found) > 1:
            raise ValueError(f"several Jets in the checkpoint, under {found}; pass key=")
        prefix = known[0] if known else found[0]
    return {name[len(prefix) :]: value for name, value in arrays.items() if name.startswith(prefix)}


def _tensor(array: Any, name: str) -> Tensor:
    """Leaf ``name`` as a tensor; numpy's 2-byte ``void`` is big_vision's saved bfloat16."""
    array = np.asarray(array)
    if array.dtype.kind == "V" and array.dtype.itemsize == 2:
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    if array.dtype.kind not in "fiub":
        raise CheckpointError(f"'{name}' must be a numeric array, got dtype {array.dtype}")
    return torch.from_numpy(np.array(array))


def _parameter(array: Any, name: str) -> Tensor:
    """Leaf ``name`` as a tensor, refused unless it holds finite floating-point values."""
    tensor = _tensor(array, name)
    if not tensor.is_floating_point():
        raise CheckpointError(
            f"'{name}' must hold floating-point parameters, got dtype {np.asarray(array).dtype}"
        )
    finite = torch.isfinite(tensor)
    if not finite.all():
        layers = (~finite).flatten(1).any(1).nonzero().flatten().tolist()
        raise CheckpointError(
            f"'{name}' holds {int((~finite).sum())} non-finite values (NaN or inf), in "
            f"coupling layers {layers}"
        )
    return tensor


def _permutation(matrix: Tensor, what: str) -> Tensor:
    """``perm`` with ``matrix[perm[j], j] = 1``; refuses anything but a permutation matrix."""
    binary = bool(((matrix == 0) | (matrix == 1)).all())
    ones = matrix == 1
    if not (binary and (ones.sum(0) == 1).all() and (ones.sum(1) == 1).all()):
        raise ValueError(f"{what} is not a permutation matrix (one 1 per row and column)")
    return ones.float().argmax(dim=0)


def _layer_splits(arrays: Mapping[str, Any]) -> list[tuple[str, Tensor]]:
    """``(kind, perm or order)`` of every layer, from the two mask stacks."""
    for name in (CHANNEL_MASKS, SPATIAL_MASKS):
        if name not in arrays:
            raise ValueError(f"the checkpoint lacks '{name}'")
    channel = _tensor(arrays[CHANNEL_MASKS], CHANNEL_MASKS)
    spatial = _tensor(arrays[SPATIAL_MASKS], SPATIAL_MASKS)
    for name, mask in ((CHANNEL_MASKS, channel), (SPATIAL_MASKS, spatial)):
        if mask.dim() != 3 or mask.shape[1] != mask.shape[2]:
            raise ValueError(f"'{name}' must have shape [depth, n, n], got {list(mask.shape)}")
    if channel.shape[0] != spatial.shape[0]:
        raise ValueError(
            f"the mask stacks disagree on the depth: {channel.shape[0]} vs {spatial.shape[0]}"
        )
    splits = []
    for i, (c, s) in enumerate(zip(channel, spatial, strict=True)):
        used_c, used_s = bool(c.any()), bool(s.any())
        if used_c == used_s:
            state = "both non-zero" if used_c else "both all-zero"
            raise ValueError(
                f"layer {i}: its channel and spatial masks are {state}; exactly one must be "
                "a permutation matrix (the other is big_vision's zero placeholder)"
            )
        if used_c:
            splits.append(("channels", _permutation(c, f"layer {i}'s channel mask")))
        else:
            splits.append(("spatial", _permutation(s, f"layer {i}'s spatial mask")))
    return splits


def _pattern_of(order: Tensor, grid: tuple[int, int], layer: int) -> str:
    for pattern in SPATIAL_PATTERNS:
        try:
            if torch.equal(torch.cat(spatial_halves(pattern, grid)), order):
                return pattern
        except ValueError:
            continue
    raise ValueError(
        f"layer {layer}'s spatial mask is a permutation but none of the reference's patterns "
        f"{SPATIAL_PATTERNS} on a {grid[0]}x{grid[1]} token grid"
    )


def _shortest_cycle(items: list[str]) -> tuple[str, ...]:
    """The shortest ``c`` with ``cycle(c)`` starting with ``items``."""
    for period in range(1, len(items) + 1):
        if all(item == items[i % period] for i, item in enumerate(items)):
            return tuple(items[:period])
    return ()


def _square_root(value: int) -> int | None:
    root = math.isqrt(value)
    return root if root * root == value else None


def _shape(arrays: Mapping[str, Any], name: str) -> tuple[int, ...]:
    if name not in arrays:
        raise ValueError(f"the checkpoint lacks '{name}'")
    return tuple(np.shape(arrays[name]))


def infer_config(
    source: PathLike | Mapping[str, Any],
    *,
    channels: int | None = None,
    key: str | None = None,
    **overrides: Any,
) -> JetConfig:
    """The :class:`JetConfig` of the Jet in a big_vision checkpoint (a path or its arrays).

    ``channels`` fixes how token dims split into patch and channels (default: 3 if that
    fits, else 1); ``overrides`` set what the arrays do not hold (``scale_factor``,
    ``attention_backend``, ``seed``). Raises ``ValueError`` naming what to pass when the
    arrays leave a choice open.
    """
    arrays = source if isinstance(source, Mapping) else read_arrays(source)
    arrays = _find_jet(arrays, key)
    splits = _layer_splits(arrays)
    dim, tokens = _shape(arrays, CHANNEL_MASKS)[1], _shape(arrays, SPATIAL_MASKS)[1]
    side = _square_root(tokens)
    if side is None:
        raise ValueError(
            f"{tokens} tokens do not form a square grid (the reference's layout); pass "
            "config=JetConfig(...) with the image_size and patch_size"
        )
    choices = [channels] if channels is not None else [3, 1]
    fits = [c for c in choices if dim % c == 0 and _square_root(dim // c)]
    if not fits:
        raise ValueError(
            f"cannot tell the patch size and channels of {dim}-dim tokens; pass channels= "
            "to infer_config, or config=JetConfig(...)"
        )
    patch = _square_root(dim // fits[0])
    query = f"{_DNN}/vit/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel"
    block_depth = len({m[1] for n in arrays if (m := re.search(r"encoderblock_(\d+)/", n))})
    context = f"{_CONTEXT_ATTENTION}/key/kernel"
    spatial = [
        _pattern_of(order, (side, side), i)
        for i, (kind, order) in enumerate(splits)
        if kind == "spatial"
    ]
    values = dict(
        image_size=(side * patch, side * patch),
        channels=fits[0],
        patch_size=patch,
        depth=len(splits),
        block_depth=block_depth,
        emb_dim=_shape(arrays, f"{_DNN}/init_proj/kernel")[-1],
        num_heads=_shape(arrays, query)[2],
        kinds=_shortest_cycle([kind for kind, _ in splits]),
        channel_patterns=("random",),
        spatial_patterns=_shortest_cycle(spatial),
        context_dim=_shape(arrays, context)[1] if context in arrays else None,
    )
    return JetConfig(**{**values, **overrides})


def jet_from_arrays(
    arrays: Mapping[str, Any], config: JetConfig | None = None, *, key: str | None = None
) -> Jet:
    """A Jet holding the parameters of big_vision arrays (flat ``"/"`` names or a nested tree).

    Every name, shape and mask is checked against ``config`` (inferred where ``None``).
    """
    arrays = _find_jet(arrays, key)
    config = infer_config(arrays) if config is None else config
    jet = Jet(config)
    _check_names_and_shapes(arrays, jet)
    state = {}
    for i, ((kind, index), (plan_kind, pattern)) in enumerate(
        zip(_layer_splits(arrays), config.layer_plan(), strict=True)
    ):
        if kind != plan_kind:
            raise ValueError(
                f"layer {i} is a {kind} coupling in the checkpoint but {plan_kind} in the "
                f"config (kinds={config.kinds}); pass a config whose kinds match, or config=None"
            )
        if kind == "spatial" and not torch.equal(index, jet.couplings[i].split.order):
            found = _pattern_of(index, config.grid, i)
            raise ValueError(
                f"layer {i}'s spatial mask is the {found!r} pattern but the config says "
                f"{pattern!r}; pass a config whose spatial_patterns match, or config=None"
            )
        state[f"couplings.flows.{i}.split.{'perm' if kind == 'channels' else 'order'}"] = index
    for bv, pt, kind in name_mapping(config):
        for i, leaf in enumerate(_parameter(arrays[bv], bv)):
            state[f"couplings.flows.{i}.conditioner.{pt}"] = _CONVERSIONS[kind][1](leaf)
    jet.load_state_dict(fuse_projections(state, dict(jet.named_parameters())), strict=True)
    return jet


def _check_names_and_shapes(arrays: Mapping[str, Any], jet: Jet) -> None:
    cfg, dim, tokens = jet.config, jet.config.token_dim, jet.config.num_tokens
    expected = {
        CHANNEL_MASKS: (cfg.depth, dim, dim),
        SPATIAL_MASKS: (cfg.depth, tokens, tokens),
    }
    params = unfuse_projections(dict(jet.couplings[0].conditioner.named_parameters()))
    for bv, pt, kind in name_mapping(cfg):
        leaf = _CONVERSIONS[kind][0](params[pt].detach().to("meta"), cfg.num_heads)
        expected[bv] = (cfg.depth, *leaf.shape)
    missing = sorted(set(expected) - set(arrays))
    unexpected = sorted(set(arrays) - set(expected))
    if missing or unexpected:
        raise ValueError(
            "the checkpoint does not match the config: "
            + (f"missing {missing}" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"unexpected {unexpected}" if unexpected else "")
        )
    for name, shape in expected.items():
        if tuple(np.shape(arrays[name])) != shape:
            raise ValueError(
                f"'{name}' has shape {list(np.shape(arrays[name]))}, expected {list(shape)} "
                "for the config"
            )


def load_jet(path: PathLike, config: JetConfig | None = None, *, key: str | None = None) -> Jet:
    """A Jet with the parameters of a big_vision ``.npz`` checkpoint (Jet or JetFormer).

    ``config`` is inferred from the arrays when ``None`` (see :func:`infer_config` for what
    it assumes); a given config is checked against them. ``key`` selects the Jet's subtree
    (``"params_adaptor"``, ...) when the file holds more than one.
    """
    return jet_from_arrays(read_arrays(path), config, key=key)
