"""Every jetblocks flow block passes ``check_flow``: one registry, one parametrised test.

To test a new block, add one ``FlowCase`` line to ``BLOCKS`` (an id, a zero-argument
factory, the event shape without the batch dim and, for a conditioned flow, the context
shape). Factories (rather than modules) let the ``state_dict`` check load into a freshly
built instance.
"""

from __future__ import annotations

from functools import partial

import torch

from jetblocks import (
    AffineCoupling,
    ChannelSplit,
    FlowSequence,
    Inverse,
    Jet,
    JetConfig,
    SpatialSplit,
    ViTConditioner,
)
from jetblocks.couplings import SPATIAL_PATTERNS
from jetblocks.multiscale import (
    ConvConditioner,
    FactorOut,
    Logit,
    MultiScaleConfig,
    MultiScaleFlow,
    Repatchify,
)
from jetblocks.testing import CheckOptions, FlowCase, parametrize_flows

GRID, DIM = (2, 4), 4  # tokens [B, 8, 4]: every spatial pattern halves a 2x4 grid
TOKENS = (GRID[0] * GRID[1], DIM)
CONTEXT = (2, 3)  # a context of M=2 vectors of size 3 for the conditioned blocks
BF16 = torch.bfloat16  # the log-det must come back in float32 (checked under "shapes")


def vit(context_dim: int | None = None, attention_backend: str = "sdpa") -> ViTConditioner:
    """A one-block ViT conditioner for a coupling on ``TOKENS``."""
    return ViTConditioner(d_in=DIM // 2, d_out=DIM, num_tokens=TOKENS[0], emb_dim=8, depth=1,
                          num_heads=2, context_dim=context_dim,
                          attention_backend=attention_backend)  # fmt: skip


def channel_coupling(
    seed: int = 0, context_dim: int | None = None, attention_backend: str = "sdpa"
) -> AffineCoupling:
    return AffineCoupling(ChannelSplit(DIM, seed=seed), vit(context_dim, attention_backend))


def spatial_coupling(pattern: str = "checkerboard") -> AffineCoupling:
    return AffineCoupling(SpatialSplit(GRID, DIM, pattern), vit(), scale_factor=1.5)


def sequence(backprop: str = "standard") -> FlowSequence:
    flows = [channel_coupling(1), spatial_coupling("hstripes"), ChannelSplit(DIM, 2)]
    return FlowSequence(flows, backprop=backprop)


def small_jet(context_dim: int | None = None) -> Jet:
    """A 3-layer Jet on 3x4x4 images with 2x2 patches: tokens [B, 4, 12]."""
    config = JetConfig(image_size=(4, 4), channels=3, patch_size=2, depth=3, block_depth=1,
                       emb_dim=8, num_heads=2, kinds=("channels", "spatial"),
                       spatial_patterns=("checkerboard", "hstripes-inv"),
                       context_dim=context_dim)  # fmt: skip
    return Jet(config)


def conv_coupling(grid=GRID, dim=DIM, seed=0) -> AffineCoupling:
    return AffineCoupling(ChannelSplit(dim, seed), ConvConditioner(grid, dim // 2, dim, 8, 1))


def factor_out() -> FactorOut:
    """Couplings on the first 2 of 4 dims of tokens on a 2x4 grid, repatchified to 1x2."""
    squeeze = Repatchify(GRID, 2)
    inner = [squeeze, conv_coupling((1, 2), 8, seed=1), Inverse(squeeze)]
    return FactorOut(FlowSequence([conv_coupling(GRID, 2), *inner]), keep=2)


def small_multiscale() -> MultiScaleFlow:
    """Two scales on 1x8x8 images: 4x4x4 tokens, then 2x2x8 after factoring out half."""
    config = MultiScaleConfig(image_size=(8, 8), channels=1, patch_size=2, scales=2,
                              couplings_per_scale=2, width=8, blocks=1)  # fmt: skip
    return MultiScaleFlow(config)


IN_RANGE = CheckOptions(bound=0.9)  # the logit is defined on the pixel range only


BLOCKS = [
    FlowCase("channel_split", partial(ChannelSplit, DIM, seed=0), TOKENS),
    *(
        FlowCase(f"spatial_split_{pattern}", partial(SpatialSplit, GRID, DIM, pattern), TOKENS)
        for pattern in SPATIAL_PATTERNS
    ),
    FlowCase("affine_coupling_channels", channel_coupling, TOKENS),
    FlowCase("affine_coupling_spatial", spatial_coupling, TOKENS),
    FlowCase("affine_coupling_context", partial(channel_coupling, 0, 3), TOKENS, CONTEXT),
    FlowCase("affine_coupling_math_attention", partial(channel_coupling, 0, None, "math"), TOKENS),
    FlowCase("flow_sequence", sequence, TOKENS),
    FlowCase("flow_sequence_checkpointed", partial(sequence, "checkpoint"), TOKENS),
    FlowCase("inverse_coupling", lambda: Inverse(spatial_coupling("vstripes-inv")), TOKENS),
    FlowCase(
        "affine_coupling_bfloat16", channel_coupling, TOKENS, options=CheckOptions(dtype=BF16)
    ),
    FlowCase("jet", small_jet, (3, 4, 4)),
    FlowCase("jet_float32", small_jet, (3, 4, 4), options=CheckOptions(dtype=torch.float32)),
    FlowCase(
        "jet_context", partial(small_jet, 3), (3, 4, 4), CONTEXT, CheckOptions(max_examples=10)
    ),
    FlowCase("logit", Logit, TOKENS, options=IN_RANGE),
    FlowCase("repatchify", partial(Repatchify, GRID, DIM), TOKENS),
    FlowCase("affine_coupling_conv", conv_coupling, TOKENS),
    FlowCase("factor_out", factor_out, TOKENS),
    FlowCase("multiscale_flow", small_multiscale, (1, 8, 8), options=IN_RANGE),
    FlowCase(
        "multiscale_flow_float32",
        small_multiscale,
        (1, 8, 8),
        options=CheckOptions(bound=0.9, dtype=torch.float32),
    ),
]


@parametrize_flows(BLOCKS)
def test_block_follows_the_flow_contract(case: FlowCase) -> None:
    report = case.check()
    assert report.examples >= 1
    assert "forward_logdet" in report.properties
