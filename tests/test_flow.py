import ast
from pathlib import Path

import pytest
import torch
from torch import nn

from jetblocks import Flow, FlowSequence, Inverse, memory, validation
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
    """``flow`` imports ``memory`` (and the value rules of ``validation``), which import
    nothing of jetblocks: each flow rebuilds its own input (``Flow.rebuild_input``), so
    there is no import cycle to dodge."""

    def imported(module):
        tree = ast.parse(Path(module.__file__).read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        return {name for name in names if name.startswith("jetblocks")}

    assert imported(flow_module) == {"jetblocks.memory", "jetblocks.validation"}
    assert imported(memory) == set() and imported(validation) == set()


# Every module's layer (see the package docstring); a module missing here fails the test.
LAYERS = {
    "maths and files": {
        "jetblocks", "jetblocks.validation", "jetblocks.config", "jetblocks.rng",
        "jetblocks.flow", "jetblocks.couplings", "jetblocks.vit", "jetblocks.linear",
        "jetblocks.acceleration", "jetblocks.latents", "jetblocks.likelihood",
        "jetblocks.memory", "jetblocks.heads", "jetblocks.jetformer", "jetblocks.curriculum",
        "jetblocks.autoregressive", "jetblocks.jet", "jetblocks.imageflow", "jetblocks.diagnostics",
        "jetblocks.multiscale", "jetblocks.checkpoint", "jetblocks.optional", "jetblocks.extras",
        "jetblocks.paths", "jetblocks.export",
        "jetblocks.pretrained", "jetblocks.tokenfile", "jetblocks.run_folder", "jetblocks.loggers",
        "jetblocks.hub", "jetblocks.model_card", "jetblocks.version",
    },
    "testing kit": {"jetblocks.testing"},  # and every jetblocks.testing.* module
    "integrations": {"jetblocks.integrations"},  # and every jetblocks.integrations.* module
    "training and the command line": {"jetblocks.train", "jetblocks.cli"},
}  # fmt: skip
MAY_IMPORT = {
    "maths and files": {"maths and files"},
    "testing kit": {"maths and files", "testing kit"},
    "integrations": {"maths and files", "integrations"},
    "training and the command line": {"maths and files", "integrations",
                                      "training and the command line"},
}  # fmt: skip


def _layer_of(module: str) -> str | None:
    if module.startswith("jetblocks.integrations"):
        return "integrations"
    if module.startswith("jetblocks.testing"):
        return "testing kit"
    return next((layer for layer, names in LAYERS.items() if module in names), None)


def test_the_package_layers_point_down_and_have_no_import_cycle():
    """Every jetblocks import, module level or not, absolute or relative: every module has
    a layer, imports only from its own layer or those below, and no import cycle exists."""
    root = Path(flow_module.__file__).resolve().parents[1]
    files = {f"jetblocks.{p.stem}": p for p in (root / "jetblocks").glob("*.py")}
    files |= {f"jetblocks.testing.{p.stem}": p for p in (root / "jetblocks/testing").glob("*.py")}
    files |= {f"jetblocks.integrations.{p.stem}": p for p in (root / "integrations").glob("*.py")}
    modules = {name.removesuffix(".__init__"): path for name, path in files.items()}

    def imports(name, path):
        package = name if path.stem == "__init__" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(max(node.level - 1, 0)):
                    base = base.rpartition(".")[0]
                module = (f"{base}.{node.module}" if node.module else base) if node.level else (
                    node.module)  # fmt: skip
                found |= {f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module
                          for a in node.names}  # fmt: skip
        return {name for name in found if name in modules}

    graph = {name: imports(name, path) - {name} for name, path in modules.items()}
    unplaced = sorted(name for name in graph if _layer_of(name) is None)
    assert not unplaced, f"modules without a layer in LAYERS: {unplaced}"
    for name, targets in graph.items():
        allowed = MAY_IMPORT[_layer_of(name)]
        wrong = {t for t in targets if _layer_of(t) not in allowed}
        assert not wrong, f"{name} ({_layer_of(name)}) imports {sorted(wrong)}"
    assert "jetblocks.vit" in graph["jetblocks.acceleration"]  # relative imports are seen
    assert "jetblocks.validation" in graph["jetblocks.vit"]

    def visit(name, path):
        assert name not in path, " -> ".join([*path, name])
        for target in graph[name]:
            visit(target, (*path, name))

    for name in graph:
        visit(name, ())


def test_every_module_opens_with_its_public_names():
    """``__all__`` before the first definition, naming only public, existing objects."""
    import importlib

    root = Path(flow_module.__file__).resolve().parents[1]
    paths = {f"jetblocks.{p.stem}": p for p in (root / "jetblocks").glob("*.py")}
    paths |= {f"jetblocks.testing.{p.stem}": p for p in (root / "jetblocks/testing").glob("*.py")}
    paths |= {f"jetblocks.integrations.{p.stem}": p for p in (root / "integrations").glob("*.py")}
    for name, path in sorted(paths.items()):
        tree = ast.parse(path.read_text())
        first = next((n.lineno for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)),
                     float("inf"))  # fmt: skip
        declared = [n for n in tree.body if isinstance(n, ast.Assign | ast.AnnAssign)
                    and "__all__" in ast.unparse(n).split("=")[0]]  # fmt: skip
        assert declared and declared[0].lineno < first, f"{name} has no __all__ at its top"
        module = importlib.import_module(name.removesuffix(".__init__"))
        for public in module.__all__:
            assert not public.startswith("_") and hasattr(module, public), (name, public)
