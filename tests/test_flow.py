import ast
from pathlib import Path

import pytest
import torch
from torch import nn

from jetblocks import Flow, FlowSequence, Inverse, memory
from jetblocks import flow as flow_module
from jetblocks.testing.properties import per_example_log_abs_det as jacobian_logdet


class Affine(Flow):
    """``y = a * x + b`` elementwise: a tiny flow with a known log-det."""

    def __init__(self, a: float, b: float) -> None:
        super().__init__()
        self.a, self.b = nn.Parameter(torch.tensor(a)), nn.Parameter(torch.tensor(b))

    def forward(self, x, context=None):
        logdet = torch.log(self.a.abs()) * x[0].numel()
        return self.a * x + self.b, logdet.expand(x.shape[0]).to(x.dtype)

    def inverse(self, y, context=None):
        logdet = -torch.log(self.a.abs()) * y[0].numel()
        return (y - self.b) / self.a, logdet.expand(y.shape[0]).to(y.dtype)


def test_flow_is_abstract():
    with pytest.raises(TypeError):
        Flow()


def test_sequence_applies_flows_in_listed_order():
    x = torch.randn(4, 3, dtype=torch.float64)
    flow = FlowSequence([Affine(2.0, 1.0), Affine(3.0, -1.0)]).double()
    y, logdet = flow(x)
    torch.testing.assert_close(y, 3.0 * (2.0 * x + 1.0) - 1.0)
    torch.testing.assert_close(logdet, jacobian_logdet(flow, x, None))
    back, inv_logdet = flow.inverse(y)
    torch.testing.assert_close(back, x)
    torch.testing.assert_close(inv_logdet, -logdet)
    assert len(flow) == 2 and isinstance(flow[1], Affine)


def test_inverse_swaps_directions():
    x = torch.randn(4, 3, dtype=torch.float64)
    base = Affine(2.0, 1.0).double()
    flipped = Inverse(base)
    y, logdet = flipped(x)
    torch.testing.assert_close(y, (x - 1.0) / 2.0)
    torch.testing.assert_close(logdet, jacobian_logdet(flipped, x, None))
    torch.testing.assert_close(flipped.inverse(y)[0], x)


@pytest.mark.parametrize(
    ("dtype", "logdet_dtype"),
    [
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
        (torch.bfloat16, torch.float32),
    ],
)
def test_empty_sequence_logdet_dtype(dtype, logdet_dtype):
    x = torch.randn(5, 2).to(dtype)
    y, logdet = FlowSequence([])(x)
    assert y is x
    assert logdet.shape == (5,) and logdet.dtype == logdet_dtype


@pytest.mark.parametrize("inverse", [False, True])
def test_default_rebuild_input_inverts_then_reapplies_with_autograd(inverse):
    flow = Affine(2.0, 1.0).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    with torch.no_grad():
        y, logdet = (flow.inverse if inverse else flow)(x)
    parts, join, output, rebuilt_logdet = flow.rebuild_input(y, inverse=inverse)
    (leaf,) = parts
    assert leaf.is_leaf and leaf.requires_grad and join(leaf) is leaf
    torch.testing.assert_close(leaf, x)
    torch.testing.assert_close(output, y)
    torch.testing.assert_close(rebuilt_logdet, logdet)
    grad_a = torch.autograd.grad(output.sum(), flow.a)[0]
    torch.testing.assert_close(grad_a, (-(x - 1.0) / 4.0 if inverse else x).sum())


def test_the_composition_knows_no_concrete_flow():
    """``flow`` imports ``memory``, which imports nothing of jetblocks: each flow rebuilds
    its own input (``Flow.rebuild_input``), so there is no import cycle to dodge."""

    def imported(module):
        tree = ast.parse(Path(module.__file__).read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        return {name for name in names if name.startswith("jetblocks")}

    assert imported(flow_module) == {"jetblocks.memory"}
    assert imported(memory) == set()


def test_the_package_layers_point_down_and_have_no_import_cycle():
    """Every jetblocks import, module level or not: no cycle, and the flow maths never imports
    the integrations, the trainer, the CLI or the testing kit (see the package docstring)."""
    root = Path(flow_module.__file__).resolve().parents[1]
    files = {f"jetblocks.{p.stem}": p for p in (root / "jetblocks").glob("*.py")}
    files |= {f"jetblocks.testing.{p.stem}": p for p in (root / "jetblocks/testing").glob("*.py")}
    files |= {f"jetblocks.integrations.{p.stem}": p for p in (root / "integrations").glob("*.py")}
    modules = {name.removesuffix(".__init__"): path for name, path in files.items()}

    def imports(path):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
                          else node.module for a in node.names}  # fmt: skip
        return {name for name in found if name in modules}

    graph = {name: imports(path) - {name} for name, path in modules.items()}
    maths = {
        f"jetblocks.{m}"
        for m in ("flow", "couplings", "vit", "jet", "latents", "rng", "imageflow", "multiscale",
                  "likelihood", "memory", "heads", "jetformer", "checkpoint", "extras")
    }  # fmt: skip
    upper = ("jetblocks.integrations", "jetblocks.train", "jetblocks.cli", "jetblocks.testing")
    for name in maths:
        assert not {i for i in graph[name] if i.startswith(upper)}, (name, graph[name])

    def visit(name, path):
        assert name not in path, " -> ".join([*path, name])
        for target in graph[name]:
            visit(target, (*path, name))

    for name in graph:
        visit(name, ())
