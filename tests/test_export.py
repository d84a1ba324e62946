"""Exported graphs (ONNX through onnxruntime, torch.export programs) compute what eager does.

Tiny perturbed flows, float32: tokens and images within 1e-4 of eager, log-dets within 1e-5
relative (to at least 1 nat), at two batch sizes through one export (the batch is dynamic);
the digits test set round-trips exactly to its pixels; a multi-scale flow and a context Jet
export as well; the ``jetblocks export`` command refuses to overwrite an export.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from jetblocks import Jet, accelerate, to_uint8
from jetblocks.cli import main
from jetblocks.export import export_files, export_flow
from jetblocks.likelihood import bin_centers
from jetblocks.multiscale import MultiScaleConfig, MultiScaleFlow
from jetblocks.testing import perturb_parameters_

ort = pytest.importorskip("onnxruntime")
ROOT = Path(__file__).resolve().parents[1]
# Log-dets are compared relative to their size, or to 1 nat where they are smaller: a sum of
# terms of both signs can land near 0, where float32 rounding of the terms (about 1e-6 nats,
# in eager as in the export) is no small fraction of it.
TOKENS_ATOL, LOGDET_RTOL = 1e-4, 1e-5


def _perturbed(model):
    torch.manual_seed(0)
    return perturb_parameters_(model, scale=0.05).eval()


class Runner:
    """An export folder's encode and decode, called with torch tensors, answering numpy."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.spec = json.loads((folder / "export.json").read_text())
        self.format = self.spec["format"]
        self.graphs = {}
        for graph in ("encode", "decode"):
            path = folder / self.spec[graph]["file"]
            if self.format == "onnx":
                options = ort.SessionOptions()
                options.intra_op_num_threads = 1
                self.graphs[graph] = ort.InferenceSession(
                    str(path), options, providers=["CPUExecutionProvider"]
                )
            else:
                self.graphs[graph] = torch.export.load(path).module()

    def __call__(self, graph: str, *inputs: torch.Tensor) -> list[np.ndarray]:
        if self.format == "onnx":
            names = [spec["name"] for spec in self.spec[graph]["inputs"]]
            feed = {name: x.numpy() for name, x in zip(names, inputs, strict=True)}
            return self.graphs[graph].run(None, feed)
        with torch.no_grad():
            out = self.graphs[graph](*inputs)
        return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]


def _check_parity(flow, runner: Runner, batch: int, context_tokens: int | None = None) -> dict:
    """Eager encode/decode against the exported graphs on random images; the differences."""
    cfg = flow.config
    generator = torch.Generator().manual_seed(batch)
    images = torch.rand(batch, cfg.channels, *cfg.image_size, generator=generator) * 2 - 1
    context = ()
    if context_tokens is not None:
        context = (torch.randn(batch, context_tokens, cfg.context_dim, generator=generator),)
    with torch.no_grad():
        tokens, logdet = flow.encode(images, *context)
        decoded = flow.decode(tokens, *context)
    got_tokens, got_logdet = runner("encode", images, *context)
    (got_images,) = runner("decode", tokens, *context)
    assert got_tokens.shape == tuple(tokens.shape) and got_logdet.shape == (batch,)
    assert got_images.shape == tuple(images.shape)
    assert got_tokens.dtype == got_logdet.dtype == got_images.dtype == np.float32
    found = {
        "tokens_max_abs": float(np.abs(got_tokens - tokens.numpy()).max()),
        "images_max_abs": float(np.abs(got_images - decoded.numpy()).max()),
        "logdet_max_rel": float(
            (np.abs(got_logdet - logdet.numpy()) / np.maximum(np.abs(logdet.numpy()), 1.0)).max()
        ),
    }
    assert found["tokens_max_abs"] <= TOKENS_ATOL, found
    assert found["images_max_abs"] <= TOKENS_ATOL, found
    assert found["logdet_max_rel"] <= LOGDET_RTOL, found
    return found


@pytest.fixture(scope="module")
def small_jet(digits_config):
    """A perturbed 2-coupling Jet (a channel and a spatial coupling) for the digits set:
    every kind of layer, at half the tracing time of ``digits_config``'s four."""
    return _perturbed(Jet(digits_config.replace(depth=2)))


@pytest.fixture(scope="module", params=["onnx", "torch"])
def exported(request, small_jet, tmp_path_factory):
    """The Jet exported in each format, from an accelerated copy (the export decelerates a
    copy of its own, so no custom op reaches the graphs), and loaded."""
    fast = accelerate(copy.deepcopy(small_jet), inference=True)
    classes = [type(m) for m in fast.modules()]
    folder = tmp_path_factory.mktemp(f"export-{request.param}")
    export_flow(fast, folder, request.param)
    runner = Runner(folder)
    runner.flow_kept = [type(m) for m in fast.modules()] == classes and all(
        torch.equal(a, b) for a, b in zip(fast.state_dict().values(),
                                          small_jet.state_dict().values(), strict=True)
    )  # fmt: skip
    return runner


def test_export_matches_eager_at_two_batch_sizes(small_jet, exported, one_thread):
    for batch in (1, 5):
        _check_parity(small_jet, exported, batch)
    names = {p.name for p in exported.folder.iterdir()}
    assert names == set(export_files(exported.format)), names  # no staging files left behind
    assert exported.flow_kept  # the exported flow keeps its layers and weights


def test_digits_round_trip_is_exact_through_the_export(exported, one_thread):
    from jetblocks.integrations.torchdata import open_source

    source = open_source("digits", "test")
    pixels = torch.stack([source[i][0] for i in range(len(source))])
    tokens, _ = exported("encode", bin_centers(pixels))
    (images,) = exported("decode", torch.from_numpy(tokens))
    assert torch.equal(to_uint8(torch.from_numpy(images)), pixels)


def test_export_json_describes_the_graphs(small_jet, exported):
    spec = exported.spec
    assert spec["model"] == "Jet"
    assert spec["config"] == json.loads(json.dumps(small_jet.config.to_dict()))
    assert spec["encode"]["inputs"] == [
        {"name": "images", "dtype": "float32", "shape": ["batch", 1, 8, 8]}
    ]
    assert [o["shape"] for o in spec["encode"]["outputs"]] == [["batch", 16, 4], ["batch"]]
    assert [i["name"] for i in spec["decode"]["inputs"]] == ["tokens"]
    assert spec["dynamic_dims"] == ["batch"]
    if spec["format"] == "onnx":
        import onnx

        model = onnx.load(str(exported.folder / "encode.onnx"))
        assert spec["opset"] == next(o.version for o in model.opset_import if o.domain == "")
        assert [i.name for i in model.graph.input] == ["images"]
        assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
        assert {n.domain for n in model.graph.node} == {""}  # standard ONNX operators only
    else:
        program = torch.export.load(exported.folder / "encode.pt2")
        targets = {str(node.target) for node in program.graph.nodes}
        assert not any("jetblocks" in target for target in targets)  # no oneDNN custom op


@pytest.mark.parametrize("format", ["onnx", "torch"])
def test_multiscale_flow_exports(format, tmp_path, one_thread):
    config = MultiScaleConfig.preset(
        "mnist-multiscale", scales=2, couplings_per_scale=1, width=8, blocks=0
    )
    flow = _perturbed(MultiScaleFlow(config))
    export_flow(flow, tmp_path, format)
    runner = Runner(tmp_path)
    assert runner.spec["model"] == "MultiScaleFlow"
    for batch in (2, 3):
        _check_parity(flow, runner, batch)


@pytest.mark.parametrize("format", ["onnx", "torch"])
def test_context_jet_takes_the_context_as_an_input(format, digits_config, tmp_path, one_thread):
    flow = _perturbed(Jet(digits_config.replace(depth=1, context_dim=6)))
    export_flow(flow, tmp_path, format)
    runner = Runner(tmp_path)
    spec = runner.spec
    assert [i["name"] for i in spec["encode"]["inputs"]] == ["images", "context"]
    assert spec["decode"]["inputs"][1]["shape"] == ["batch", "context_tokens", 6]
    assert spec["dynamic_dims"] == ["batch", "context_tokens"]
    for batch, context_tokens in ((2, 3), (4, 1)):
        _check_parity(flow, runner, batch, context_tokens)


def test_export_refuses_bad_arguments(small_jet, tmp_path):
    with pytest.raises(ValueError, match="format"):
        export_flow(small_jet, tmp_path, "tflite")
    with pytest.raises(ValueError, match="batch"):
        export_flow(small_jet, tmp_path, "torch", batch=1)
    with pytest.raises(TypeError, match="ImageFlow"):
        export_flow(torch.nn.Linear(2, 2), tmp_path)
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError):
        export_flow(small_jet, tmp_path / "file", "torch")


@pytest.fixture
def saved_jet(digits_config, tmp_path):
    """A saved one-coupling Jet, and the Jet."""
    jet = _perturbed(Jet(digits_config.replace(depth=1, kinds=("channels",))))
    jet.save_pretrained(tmp_path / "model")
    return tmp_path / "model", jet


def test_cli_exports_and_refuses_to_overwrite(saved_jet, tmp_path, capsys, one_thread):
    model, jet = saved_jet
    out = tmp_path / "exported"
    argv = ["export", "--checkpoint", str(model), "--format", "torch", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert (
        "exported Jet" in printed and "encode.pt2 (" in printed and "B), export.json (" in printed
    )
    _check_parity(jet, Runner(out), 2)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert error.startswith("jetblocks export: error: ") and error.count("\n") == 1
    assert "encode.pt2, decode.pt2, export.json; refusing to overwrite" in error
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_cli_names_the_extra_when_onnx_is_missing(saved_jet, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    argv = ["export", "--checkpoint", str(saved_jet[0]), "--out", str(tmp_path / "x")]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "pip install 'jetblocks[export]'" in error
    assert not (tmp_path / "x").exists()


def test_cli_refuses_a_checkpoint_that_is_not_there(tmp_path, capsys):
    argv = ["export", "--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "x")]
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("jetblocks export: error: ")


def test_the_onnx_example_needs_neither_torch_nor_jetblocks(exported):
    if exported.format != "onnx":
        pytest.skip("the example runs the ONNX export")
    blocker = (
        "import runpy, sys\n"
        "sys.modules['torch'] = None; sys.modules['jetblocks'] = None\n"
        f"sys.argv = ['onnx_tokenizer.py', {str(exported.folder)!r}, '--batch', '3']\n"
        f"runpy.run_path({str(ROOT / 'examples' / 'onnx_tokenizer.py')!r}, run_name='__main__')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", blocker],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "round trip exact: True" in result.stdout
