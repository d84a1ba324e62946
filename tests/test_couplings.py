import math

import pytest
import torch
from torch import nn

from jetblocks import AffineCoupling, ChannelSplit, Flow, Inverse, SpatialSplit, ViTConditioner
from jetblocks.couplings import SPATIAL_PATTERNS, spatial_halves
from jetblocks.testing import perturb_parameters_
from jetblocks.testing.properties import per_example_log_abs_det as jacobian_logdet

GRID, DIM = (2, 4), 6
NUM_TOKENS = GRID[0] * GRID[1]


def reference_halves(pattern, nh, nw):
    """The reference's index sets, written out with explicit loops over (row, column)."""
    ones, zeros = [], []
    for r in range(nh):
        for c in range(nw):
            i = r * nw + c
            value = {"vstripes": i, "hstripes": r, "checkerboard": i + r}[pattern.split("-")[0]]
            (ones if value % 2 else zeros).append(i)
    return (ones, zeros) if pattern.endswith("-inv") else (zeros, ones)


@pytest.mark.parametrize("pattern", SPATIAL_PATTERNS)
@pytest.mark.parametrize("grid", [(2, 2), (2, 4), (4, 4), (4, 6), (8, 8), (3, 4)])
def test_spatial_halves_follow_the_reference_formula(pattern, grid):
    expected = reference_halves(pattern, *grid)
    if len(expected[0]) != len(expected[1]):
        with pytest.raises(ValueError, match="unequal halves"):
            spatial_halves(pattern, grid)
        return
    idx1, idx2 = spatial_halves(pattern, grid)
    assert idx1.tolist() == expected[0] and idx2.tolist() == expected[1]


def test_checkerboard_on_a_2x2_grid():
    assert [t.tolist() for t in spatial_halves("checkerboard", (2, 2))] == [[0, 3], [1, 2]]
    assert [t.tolist() for t in spatial_halves("checkerboard-inv", (2, 2))] == [[1, 2], [0, 3]]


def test_unbalanced_patterns_are_refused():
    with pytest.raises(ValueError, match="hstripes.*3x4.*image_size or patch_size"):
        spatial_halves("hstripes", (3, 4))
    # With an odd grid width the reference checkerboard is column parity: never balanced.
    with pytest.raises(ValueError, match="checkerboard.*2x3"):
        spatial_halves("checkerboard", (2, 3))
    with pytest.raises(ValueError, match="unknown spatial pattern"):
        spatial_halves("diagonal", (2, 2))


def test_spatial_split_gathers_then_cuts_tokens():
    x = torch.arange(NUM_TOKENS * DIM, dtype=torch.float32).reshape(1, NUM_TOKENS, DIM)
    split = SpatialSplit(GRID, DIM, "vstripes")
    x1, x2 = split(x)[0].chunk(2, dim=-1)
    assert x1.shape == x2.shape == (1, NUM_TOKENS, DIM // 2)
    # Token 2 (the second even one) becomes half-tokens 2 and 3 of x1.
    torch.testing.assert_close(x1[0, 2], x[0, 2, : DIM // 2])
    torch.testing.assert_close(x1[0, 3], x[0, 2, DIM // 2 :])
    torch.testing.assert_close(x2[0, 0], x[0, 1, : DIM // 2])


def test_channel_split_uses_its_permutation():
    split = ChannelSplit(DIM, seed=3)
    x = torch.randn(2, 5, DIM)
    x1, x2 = split(x)[0].chunk(2, dim=-1)
    torch.testing.assert_close(x1, x[..., split.perm[: DIM // 2]])
    torch.testing.assert_close(x2, x[..., split.perm[DIM // 2 :]])
    assert torch.equal(split.perm, ChannelSplit(DIM, seed=3).perm)
    assert sorted(split.perm.tolist()) == list(range(DIM))
    assert any(not torch.equal(split.perm, ChannelSplit(DIM, seed=s).perm) for s in range(4, 8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(
    "split",
    [ChannelSplit(DIM, seed=0), *(SpatialSplit(GRID, DIM, p) for p in SPATIAL_PATTERNS)],
    ids=lambda s: getattr(s, "pattern", "channels"),
)
def test_splits_are_exact_permutations(split, dtype):
    x = torch.randn(3, NUM_TOKENS, DIM).to(dtype)
    y, logdet = split(x)
    assert torch.equal(split.inverse(y)[0], x)
    assert torch.equal(y.flatten().sort().values, x.flatten().sort().values)
    assert torch.equal(logdet, torch.zeros(3, dtype=logdet.dtype))


def make_coupling(split, context_dim=None):
    conditioner = ViTConditioner(
        d_in=DIM // 2,
        d_out=DIM,
        num_tokens=NUM_TOKENS,
        emb_dim=8,
        depth=1,
        num_heads=2,
        context_dim=context_dim,
    )
    return AffineCoupling(split, conditioner)


BLOCKS = {
    "channel-split": lambda: ChannelSplit(DIM, seed=1),
    **{f"spatial-split-{p}": (lambda p=p: SpatialSplit(GRID, DIM, p)) for p in SPATIAL_PATTERNS},
    "channel-coupling": lambda: make_coupling(ChannelSplit(DIM, seed=1)),
    **{
        f"spatial-coupling-{p}": (lambda p=p: make_coupling(SpatialSplit(GRID, DIM, p)))
        for p in SPATIAL_PATTERNS
    },
}


@pytest.mark.parametrize("name", BLOCKS)
def test_logdet_matches_the_jacobian_both_ways(name):
    flow = perturb_parameters_(BLOCKS[name]().double(), scale=0.3, seed=1)
    x = torch.randn(2, NUM_TOKENS, DIM, dtype=torch.float64)
    y, logdet = flow(x)
    back, inverse_logdet = flow.inverse(y)
    torch.testing.assert_close(back, x, rtol=0, atol=1e-12)
    expected = jacobian_logdet(flow, x, None)
    expected_inverse = jacobian_logdet(flow.inverse, y, None)
    assert (logdet - expected).abs().max() < 1e-8
    assert (inverse_logdet - expected_inverse).abs().max() < 1e-8
    if "coupling" in name:  # a perturbed coupling is not volume preserving
        assert expected.abs().min() > 1e-3


def test_conditioned_coupling_logdet_matches_the_jacobian():
    flow = perturb_parameters_(
        make_coupling(ChannelSplit(DIM, 2), context_dim=5).double(), scale=0.3, seed=2
    )
    x = torch.randn(2, NUM_TOKENS, DIM, dtype=torch.float64)
    context = torch.randn(2, 3, 5, dtype=torch.float64)
    y, logdet = flow(x, context)
    torch.testing.assert_close(flow.inverse(y, context)[0], x, rtol=0, atol=1e-12)
    assert (logdet - jacobian_logdet(flow, x, context)).abs().max() < 1e-8
    other = flow(x, torch.randn(2, 3, 5, dtype=torch.float64))[0]
    assert not torch.allclose(other, y)


@pytest.mark.parametrize("split", [ChannelSplit(DIM, 0), SpatialSplit(GRID, DIM, "hstripes")])
def test_coupling_is_the_exact_identity_at_init(split):
    coupling = make_coupling(split)
    x = torch.randn(3, NUM_TOKENS, DIM)
    y, logdet = coupling(x)
    assert torch.equal(y, x) and torch.equal(logdet, torch.zeros(3))
    assert torch.equal(coupling.inverse(x)[0], x)


class FixedConditioner(nn.Module):
    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x1):
        return self.out.expand(x1.shape[0], -1, -1)


def test_affine_map_adds_bias_before_the_bounded_scale():
    torch.manual_seed(1)
    bias, raw = torch.randn(1, 4, 3, dtype=torch.float64), torch.randn(1, 4, 3) * 3
    coupling = AffineCoupling(ChannelSplit(6, 0), FixedConditioner(torch.cat([bias, raw], -1)))
    x = torch.randn(2, 4, 6, dtype=torch.float64)
    y, logdet = coupling(x)
    x1, x2 = coupling.split(x)[0].chunk(2, -1)
    y1, y2 = coupling.split(y)[0].chunk(2, -1)
    torch.testing.assert_close(y1, x1)
    torch.testing.assert_close(y2, (x2 + bias) * 2 * torch.sigmoid(raw.double()))
    expected = (torch.log(torch.sigmoid(raw.double())) + math.log(2)).sum().expand(2)
    torch.testing.assert_close(logdet, expected)


def test_conditioner_output_shape_is_checked():
    coupling = AffineCoupling(ChannelSplit(6, 0), nn.Linear(3, 5))
    with pytest.raises(ValueError, match=r"conditioner must return \[..., 6\]"):
        coupling(torch.randn(2, 4, 6))


def test_affine_update_runs_in_float32_under_bf16_autocast():
    coupling = perturb_parameters_(make_coupling(ChannelSplit(DIM, 0)), scale=0.3)
    x = torch.randn(2, NUM_TOKENS, DIM)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, logdet = coupling(x)
        back = coupling.inverse(y)[0]
    assert y.dtype == torch.float32 and logdet.dtype == torch.float32
    assert (back - x).abs().max() < 1e-5  # the same bf16 bias and scale both ways


def test_splits_refuse_odd_dims_and_wrong_shapes():
    with pytest.raises(ValueError, match="even token dim"):
        ChannelSplit(5, 0)
    with pytest.raises(ValueError, match=r"expects tokens of shape \[B, 8, 6\], got \[2, 7, 6\]"):
        SpatialSplit(GRID, DIM, "vstripes")(torch.randn(2, 7, 6))
    with pytest.raises(ValueError, match=r"\[B, N, 6\], got \[2, 4, 4\]"):
        ChannelSplit(DIM, 0)(torch.randn(2, 4, 4))


def _vjp(rebuilt, params, seed=0):
    """``(input, its gradient, the gradients of params)`` of ``sum(w * output) + sum(logdet)``
    at a rebuilt flow, random ``w`` from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    weights = torch.randn(rebuilt.output.shape, generator=generator, dtype=torch.float64)
    n = len(rebuilt.parts)
    grads = torch.autograd.grad(
        (rebuilt.output, rebuilt.logdet),
        [*rebuilt.parts, *params],
        (weights, torch.ones_like(rebuilt.logdet)),
    )
    with torch.no_grad():
        return rebuilt.join(*rebuilt.parts), rebuilt.join(*grads[:n]), grads[n:]


@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("split", [ChannelSplit(DIM, 3), SpatialSplit(GRID, DIM, "checkerboard")])
def test_one_pass_rebuild_equals_inverting_and_reapplying(split, inverse):
    """The coupling's :meth:`rebuild_input` (one conditioner pass, two parts) gives the input,
    output, log-det and gradients of the generic one (``f^-1`` then ``f``)."""
    coupling = perturb_parameters_(make_coupling(split, context_dim=5).double(), scale=0.3)
    x = torch.randn(2, NUM_TOKENS, DIM, dtype=torch.float64)
    context = torch.randn(2, 3, 5, dtype=torch.float64).requires_grad_()
    with torch.no_grad():
        y, logdet = (coupling.inverse if inverse else coupling)(x, context)
    fast = coupling.rebuild_input(y, context, inverse=inverse)
    generic = Flow.rebuild_input(coupling, y, context, inverse=inverse)
    assert [len(r.parts) for r in (fast, generic)] == [2, 1]
    params = [*coupling.parameters(), context]
    for rebuilt in (fast, generic):
        torch.testing.assert_close(rebuilt.output, y, rtol=0, atol=1e-12)
        torch.testing.assert_close(rebuilt.logdet, logdet, rtol=0, atol=1e-12)
    (x_fast, grad_fast, params_fast), (x_generic, grad_generic, params_generic) = (
        _vjp(fast, params),
        _vjp(generic, params),
    )
    torch.testing.assert_close(x_fast, x, rtol=0, atol=1e-12)
    torch.testing.assert_close(x_generic, x, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad_fast, grad_generic, rtol=1e-10, atol=1e-12)
    for got, expected in zip(params_fast, params_generic, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_a_split_that_is_not_a_known_permutation_rebuilds_the_generic_way():
    coupling = make_coupling(Inverse(ChannelSplit(DIM, 3))).double()
    y = torch.randn(2, NUM_TOKENS, DIM, dtype=torch.float64)
    assert len(coupling.rebuild_input(y).parts) == 1


def test_every_block_refuses_a_wrong_shape_by_the_one_rule():
    """Blocks declare what they accept (``jetblocks.validation.Shape``); one check words it."""
    from jetblocks import GMMHead, Jet, JetConfig, ViTConditioner
    from jetblocks.multiscale import Repatchify
    from jetblocks.validation import InvalidValue

    jet = Jet(JetConfig(image_size=(8, 8), channels=1, patch_size=2, depth=1, block_depth=1,
                        emb_dim=8, num_heads=2))  # fmt: skip
    vit = ViTConditioner(d_in=2, d_out=4, num_tokens=16, emb_dim=8, depth=1, num_heads=2)
    cases = [
        (lambda: ChannelSplit(6, seed=0)(torch.zeros(2, 4, 5)), "ChannelSplit", "[B, N, 6]"),
        (lambda: SpatialSplit((2, 4), 6, "checkerboard")(torch.zeros(2, 7, 6)), "SpatialSplit",
         "[B, 8, 6]"),
        (lambda: Repatchify((4, 4), 3)(torch.zeros(2, 16, 2)), "Repatchify", "[B, 16, 3]"),
        (lambda: vit(torch.zeros(2, 16, 3)), "ViTConditioner", "[B, 16, 2]"),
        (lambda: GMMHead(8, 2, 3)(torch.zeros(2, 5, 7)), "GMMHead", "[..., 8]"),
        (lambda: jet.decode(torch.zeros(2, 16, 5)), "Jet", "[B, 16, 4]"),
    ]  # fmt: skip
    for call, who, shape in cases:
        with pytest.raises(InvalidValue) as refused:
            call()
        message = str(refused.value)
        assert message.startswith(f"{who}") and f"of shape {shape}, got [" in message, message
