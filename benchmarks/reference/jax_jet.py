"""Images per second of the authors' JAX Jet: encode, decode and a training step; writes JSON.

A re-implementation in Flax of the reference, ``big_vision/models/proj/jet/jet.py``
(google-research/big_vision) with ``big_vision/models/vit.py``'s encoder, module for module
and with the reference's parameter names, so that a big_vision checkpoint (and a jetblocks
model exported by ``jetblocks.integrations.big_vision.save_jet``) loads into it. As in the
reference: NHWC images are patchified to tokens; the couplings run under ``nn.scan`` over
one ``nn.remat`` coupling (nothing saved, ``prevent_cse=False``), so training recomputes each
coupling in its backward pass; ``jax.lax.cond`` picks the channel or the spatial split,
which is a product with a frozen 0/1 mask matrix (``precision="highest"``); the conditioner
is ``Dense`` + position embedding + pre-LN ViT blocks (Flax attention, tanh GELU) + final
LayerNorm + zero-initialised ``Dense``; the output is un-patchified back to NHWC. (The
reference's optional cross-attention to a context is left out: the benchmarks have none.)

Timed with ``block_until_ready`` on float32 images in [-1, 1], after a call that compiles,
with the weights perturbed by ``N(0, 0.02^2)`` as ``throughput.py``'s are:

- ``encode``: ``jit(forward)``; ``decode``: ``jit(inverse)`` of encode's output;
- ``train``: one ``jit`` step: forward, bits/dim, gradients, and big_vision's optimizer as
  optax: the trainable parameters clipped at global norm 1.0 and updated by AdamW (b1 0.9,
  b2 0.95, eps 1e-8, lr 3e-4, decoupled weight decay 1e-5 not scaled by the lr), the frozen
  masks left alone. Like ``benchmarks/throughput.py``'s step: no dequantization noise, a
  constant learning rate.

It runs in an environment of its own (``requirements.txt`` beside it), which
``benchmarks/side_by_side.py`` calls with the configurations of ``benchmarks/throughput.py``
as JSON (``JetConfig`` fields) and, with ``--check``, an ``.npz`` of a jetblocks model's
weights, images and outputs, whose differences from this model's outputs it reports.
``--smoke`` times a tiny Jet (2 couplings, width 16, 8x8 images) at batch 4 for 0.05 s.

    python benchmarks/reference/jax_jet.py --smoke --out /tmp/jax_jet.json
    python benchmarks/reference/jax_jet.py --configs '{"A": {"image_size": [32, 32], ...}}' \\
        --out jax.json
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import platform
import statistics
import time

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

SMOKE = {"smoke": dict(image_size=[8, 8], channels=3, patch_size=2, depth=2, block_depth=1,
                       emb_dim=16, num_heads=2, kinds=["channels", "spatial"])}  # fmt: skip
DEFAULTS = dict(channel_patterns=["random"], spatial_patterns=["checkerboard", "checkerboard-inv"],
                kinds=["channels", "channels", "spatial"], scale_factor=2.0)  # fmt: skip
FROZEN = "FREEZE_ME"


# -- the model (big_vision's names) ----------------------------------------------------------
class MlpBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        inits = dict(kernel_init=nn.initializers.xavier_uniform(),
                     bias_init=nn.initializers.normal(stddev=1e-6))  # fmt: skip
        width = x.shape[-1]
        x = nn.gelu(nn.Dense(4 * width, **inits)(x))
        return nn.Dense(width, **inits)(x)


class Encoder1DBlock(nn.Module):
    num_heads: int

    @nn.compact
    def __call__(self, x):
        y = nn.LayerNorm()(x)
        attention = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads, kernel_init=nn.initializers.xavier_uniform()
        )
        x = x + attention(y, y)
        return x + MlpBlock()(nn.LayerNorm()(x))


class Encoder(nn.Module):
    depth: int
    num_heads: int

    @nn.compact
    def __call__(self, x):
        for layer in range(self.depth):
            x = Encoder1DBlock(self.num_heads, name=f"encoderblock_{layer}")(x)
        return nn.LayerNorm(name="encoder_norm")(x)


class DNN(nn.Module):
    """A coupling's conditioner: ``(bias, raw scale)`` of the half it is given."""

    depth: int
    emb_dim: int
    num_heads: int

    @nn.compact
    def __call__(self, x):
        out_dim = x.shape[-1]
        x = nn.Dense(self.emb_dim, name="init_proj")(x)
        init = nn.initializers.normal(stddev=1 / np.sqrt(self.emb_dim))
        x = x + self.param("posemb", init, (1, *x.shape[1:]), jnp.float32)
        x = Encoder(self.depth, self.num_heads, name="vit")(x)
        out = nn.Dense(2 * out_dim, kernel_init=nn.initializers.zeros, name="final_proj")(x)
        return jnp.split(out, 2, axis=-1)


def _cut(x):  # [B, N/2, D] -> [B, N, D/2]: each token becomes two consecutive half-tokens
    b, n, d = x.shape
    return x.reshape(b, 2 * n, d // 2)


def _uncut(x):
    b, n, d = x.shape
    return x.reshape(b, n // 2, 2 * d)


class Coupling(nn.Module):
    """One affine coupling; ``kind`` 1 splits channels, 0 splits tokens (the reference's)."""

    depth: int
    emb_dim: int
    num_heads: int
    scale_factor: float

    @nn.compact
    def halves(self, x, kind, channel_proj, spatial_proj):
        def split_channels(x):
            x = jnp.einsum("ntk,km->ntm", x, channel_proj, precision="highest")
            return jnp.split(x, 2, axis=-1)

        def split_spatial(x):
            x = jnp.einsum("ntk,tm->nmk", x, spatial_proj, precision="highest")
            return [_cut(half) for half in jnp.split(x, 2, axis=-2)]

        x1, x2 = jax.lax.cond(kind, split_channels, split_spatial, x)
        bias, raw = DNN(self.depth, self.emb_dim, self.num_heads, name="dnn")(x1)
        scale = jax.nn.sigmoid(raw) * self.scale_factor
        logdet = jax.nn.log_sigmoid(raw) + jnp.log(self.scale_factor)
        return x1, x2, bias, scale, jnp.sum(logdet, axis=(1, 2))

    def merge(self, kind, channel_proj, spatial_proj, x1, x2):
        def merge_channels(x1, x2):
            x = jnp.concatenate([x1, x2], axis=-1)
            return jnp.einsum("ntk,km->ntm", x, channel_proj.T, precision="highest")

        def merge_spatial(x1, x2):
            x = jnp.concatenate([_uncut(x1), _uncut(x2)], axis=-2)
            return jnp.einsum("ntk,tm->nmk", x, spatial_proj.T, precision="highest")

        return jax.lax.cond(kind, merge_channels, merge_spatial, x1, x2)

    def forward(self, x, kind, channel_proj, spatial_proj):
        x1, x2, bias, scale, logdet = self.halves(x, kind, channel_proj, spatial_proj)
        return self.merge(kind, channel_proj, spatial_proj, x1, (x2 + bias) * scale), logdet

    def inverse(self, x, kind, channel_proj, spatial_proj):
        x1, x2, bias, scale, logdet = self.halves(x, kind, channel_proj, spatial_proj)
        return self.merge(kind, channel_proj, spatial_proj, x1, x2 / scale - bias), -logdet


def layer_plan(config: dict) -> list[tuple[int, str]]:
    """``(kind, pattern)`` of every coupling: kind 1 for channels, 0 for spatial."""
    patterns = {"channels": itertools.cycle(config["channel_patterns"]),
                "spatial": itertools.cycle(config["spatial_patterns"])}  # fmt: skip
    kinds = itertools.islice(itertools.cycle(config["kinds"]), config["depth"])
    return [(int(kind == "channels"), next(patterns[kind])) for kind in kinds]


def spatial_halves(pattern: str, nh: int, nw: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference's token sets (conditioning, transformed) of a spatial pattern."""
    index = np.arange(nh * nw)
    parity = {"vstripes": index % 2, "hstripes": (index // nw) % 2,
              "checkerboard": (index + index // nw) % 2}[pattern.removesuffix("-inv")]  # fmt: skip
    first, second = np.flatnonzero(parity == 0), np.flatnonzero(parity == 1)
    return (second, first) if pattern.endswith("-inv") else (first, second)


class Jet(nn.Module):
    config: dict

    @nn.compact
    def couplings(self):
        cfg = self.config
        nh, nw = (size // cfg["patch_size"] for size in cfg["image_size"])
        dim, tokens, plan = cfg["patch_size"] ** 2 * cfg["channels"], nh * nw, layer_plan(cfg)

        def channel_masks(key, dtype):  # W[perm[j], j] = 1
            w = jnp.zeros((cfg["depth"], dim, dim), dtype)
            for i, (kind, _) in enumerate(plan):
                if kind:
                    perm = jax.random.permutation(jax.random.fold_in(key, i), dim)
                    w = w.at[i, perm, jnp.arange(dim)].set(1)
            return w

        def spatial_masks(key, dtype):  # W[order[j], j] = 1: conditioning, then transformed
            w = jnp.zeros((cfg["depth"], tokens, tokens), dtype)
            for i, (kind, pattern) in enumerate(plan):
                if not kind:
                    order = np.concatenate(spatial_halves(pattern, nh, nw))
                    w = w.at[i, order, jnp.arange(tokens)].set(1)
            return w

        c_proj = self.param(f"channel_coupling_masks-{FROZEN}", channel_masks, jnp.float32)
        s_proj = self.param(f"spatial_coupling_masks-{FROZEN}", spatial_masks, jnp.float32)
        remat = nn.remat(Coupling, prevent_cse=False, methods=("forward", "inverse"),
                         policy=jax.checkpoint_policies.nothing_saveable)  # fmt: skip
        block = remat(cfg["block_depth"], cfg["emb_dim"], cfg["num_heads"], cfg["scale_factor"],
                      name="couplings")  # fmt: skip
        scan = dict(variable_axes={"params": 0}, split_rngs={"params": True},
                    in_axes=(0, 0, 0), length=cfg["depth"])  # fmt: skip
        forward = nn.scan(lambda m, x, *a: m.forward(x, *a), **scan)
        inverse = nn.scan(lambda m, x, *a: m.inverse(x, *a), **scan, reverse=True)
        kinds = jnp.array([kind for kind, _ in plan])
        return block, forward, inverse, (kinds, c_proj, s_proj)

    def _run(self, images, inverse: bool):
        p = self.config["patch_size"]
        b, h, w, c = images.shape
        x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        block, forward, backward, layers = self.couplings()
        x, logdet = (backward if inverse else forward)(block, x.reshape(b, -1, p * p * c), *layers)
        x = x.reshape(b, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, h, w, c), jnp.sum(logdet, axis=0)

    def forward(self, images):
        return self._run(images, inverse=False)

    def inverse(self, tokens):
        return self._run(tokens, inverse=True)


# -- training ------------------------------------------------------------------------------------
def bits_per_dim(z, logdet):
    nll = jnp.sum(0.5 * z**2 + 0.5 * jnp.log(2 * jnp.pi) + jnp.log(127.5), axis=(1, 2, 3))
    return (nll - logdet) / (np.prod(z.shape[1:]) * jnp.log(2.0))


def optimizer(params, lr: float = 3e-4, wd: float = 1e-5) -> optax.GradientTransformation:
    """big_vision's: clipping and AdamW on the trainable parameters, nothing on the masks."""
    labels = flax.traverse_util.path_aware_map(
        lambda path, _: "frozen" if FROZEN in path[-1] else "train", params
    )
    adamw = optax.adamw(lr, b1=0.9, b2=0.95, eps=1e-8, weight_decay=wd / lr)
    train = optax.chain(optax.clip_by_global_norm(1.0), adamw)
    return optax.multi_transform({"train": train, "frozen": optax.set_to_zero()}, labels)


def workloads(config: dict, batch: int, seed: int = 0) -> dict:
    """The three timed callables, each returning what ``block_until_ready`` waits for."""
    model = Jet(config)
    key_init, key_images = jax.random.split(jax.random.PRNGKey(seed))
    images = jax.random.uniform(
        key_images, (batch, *config["image_size"], config["channels"]), minval=-1.0, maxval=1.0
    )
    params = model.init(key_init, images, method=Jet.forward)["params"]
    params = perturbed(params, seed)
    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=Jet.forward))
    decode = jax.jit(lambda p, z: model.apply({"params": p}, z, method=Jet.inverse))
    tokens = encode(params, images)[0]
    tx = optimizer(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, images):
        def loss(params):
            z, logdet = model.apply({"params": params}, images, method=Jet.forward)
            return jnp.mean(bits_per_dim(z, logdet))

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    state = [params, tx.init(params)]

    def train():
        state[0], state[1], value = step(*state, images)
        return value

    return {"encode": lambda: encode(params, images), "decode": lambda: decode(params, tokens),
            "train": train}  # fmt: skip


def perturbed(params, seed: int, scale: float = 0.02):
    """Trainable parameters plus ``N(0, scale^2)`` noise (the zero-initialised projections would
    otherwise make every coupling the identity); the masks unchanged."""
    leaves, tree = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    noisy = [leaf if FROZEN in jax.tree_util.keystr(path)
             else leaf + scale * jax.random.normal(key, leaf.shape, leaf.dtype)
             for (path, leaf), key in zip(leaves, keys, strict=True)]  # fmt: skip
    return jax.tree_util.tree_unflatten(tree, noisy)


# -- measuring -----------------------------------------------------------------------------------
def measure(fn, batch: int, seconds: float) -> dict[str, float]:
    """Images/s: the first (compiling) call alone, one warm-up call, then calls for ``seconds``."""
    started = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - started
    jax.block_until_ready(fn())
    times, started = [], time.perf_counter()
    while len(times) < 3 or time.perf_counter() - started < seconds:
        begin = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - begin)
    median = statistics.median(times)
    return {"images_per_s": batch / median, "images_per_s_best": batch / min(times),
            "ms_median": 1e3 * median, "runs": len(times), "first_call_s": first}  # fmt: skip


def check(path: str) -> dict[str, float]:
    """Largest absolute differences from a jetblocks model's outputs saved in ``path``: its
    weights (big_vision names), its config (``check/config``), images, outputs and log-dets."""
    with np.load(path) as saved:
        arrays = dict(saved)
    config = {**DEFAULTS, **json.loads(str(arrays.pop("check/config")))}
    images, z, logdet = (arrays.pop(f"check/{name}") for name in ("images", "z", "logdet"))
    params = flax.traverse_util.unflatten_dict(arrays, sep="/")
    model = Jet(config)
    ours_z, ours_logdet = model.apply({"params": params}, images, method=Jet.forward)
    back, back_logdet = model.apply({"params": params}, z, method=Jet.inverse)
    return {
        "config": config,
        "encode_max_abs_diff": float(jnp.max(jnp.abs(ours_z - z))),
        "logdet_max_abs_diff": float(jnp.max(jnp.abs(ours_logdet - logdet))),
        "decode_max_abs_diff": float(jnp.max(jnp.abs(back - images))),
        "inverse_logdet_max_abs_diff": float(jnp.max(jnp.abs(back_logdet + logdet))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", type=json.loads, help="JSON: {name: JetConfig fields}")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--ops", nargs="+", default=["encode", "decode", "train"])
    parser.add_argument("--seconds", type=float, default=3.0, help="timing per measurement")
    parser.add_argument("--check", help="an .npz of a jetblocks model's weights and outputs")
    parser.add_argument("--smoke", action="store_true", help="seconds-long check of the script")
    parser.add_argument("--out", required=True, help="the JSON report")
    args = parser.parse_args()
    if args.smoke:
        args.configs, args.batch, args.seconds = args.configs or SMOKE, 4, 0.05
    if not args.configs:
        parser.error("--configs is required (side_by_side.py passes throughput.py's A and B)")

    load_before = os.getloadavg()
    results = []
    for name, fields in args.configs.items():
        calls = workloads({**DEFAULTS, **fields}, args.batch)
        for op in args.ops:
            row = {"config": name, "batch": args.batch, "precision": "fp32", "op": op,
                   "load_1min": os.getloadavg()[0]}  # fmt: skip
            row |= measure(calls[op], args.batch, args.seconds)
            results.append(row)
            print(f"{name:>6} b{args.batch} {op:>6}: {row['images_per_s']:8.1f} img/s "
                  f"(best {row['images_per_s_best']:.1f})", flush=True)  # fmt: skip
    report = {
        "benchmark": "jax_reference",
        "versions": {module.__name__: module.__version__ for module in (jax, flax, optax, np)},
        "devices": [str(device) for device in jax.devices()],
        "python": platform.python_version(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "check")},
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "results": results,
    }
    if args.check:
        report["check"] = check(args.check)
        print(f"check: {report['check']}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as file:
        file.write(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
