"""A trained image flow for use outside PyTorch: ONNX graphs, or ``torch.export`` programs.

:func:`export_flow` writes two graphs of any :class:`~jetblocks.imageflow.ImageFlow` (a
:class:`~jetblocks.Jet`, a :class:`~jetblocks.multiscale.MultiScaleFlow`), each with a
dynamic batch dimension ``B``:

- ``encode``: ``images`` float32 ``[B, C, H, W]`` in ``[-1, 1]`` -> ``tokens [B, N, D]``,
  ``logdet [B]`` (``flow.encode`` of float images);
- ``decode``: ``tokens [B, N, D]`` -> ``images [B, C, H, W]`` (``flow.decode``);

with a ``context [B, M, context_dim]`` (``M`` dynamic too) as a second input of both for a
Jet built with ``context_dim``. ``format="onnx"`` writes ``encode.onnx`` and
``decode.onnx`` (the dynamo exporter, opset :data:`ONNX_OPSET`; run them with onnxruntime),
``format="torch"`` writes ``encode.pt2`` and ``decode.pt2`` (``torch.export.save``; load
with ``torch.export.load(path).module()``). ``export.json`` describes the files, their
inputs and outputs with shapes (``"batch"`` and ``"context_tokens"`` for the dynamic dims),
the pixel conventions and the model's config.

The graphs compute the flow's maths in float32 from a plain copy of the model (the layers
:func:`~jetblocks.acceleration.decelerate` gives back: no custom operator); the flow itself
is left untouched. What the graphs cannot hold is left to the caller, as ``export.json``
says: uint8 pixels ``k`` enter at their bin centres ``(k + 0.5) / 127.5 - 1``, decoded
images become pixels by ``floor((x + 1) * 127.5)`` clipped to ``[0, 255]``, and inputs are
not checked for range or NaN.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from jetblocks.acceleration import decelerate
from jetblocks.checkpoint import atomic_file
from jetblocks.flow import FlowSequence
from jetblocks.imageflow import ImageFlow
from jetblocks.optional import require
from jetblocks.validation import Choice, Number, checked

__all__ = ["EXPORT_FORMATS", "ONNX_OPSET", "export_files", "export_flow"]

EXPORT_FORMATS = ("onnx", "torch")
ONNX_OPSET = 21  # ONNX 1.16 (2024): onnxruntime 1.18 and later run it
_SUFFIX = {"onnx": ".onnx", "torch": ".pt2"}
_GRAPHS = ("encode", "decode")
_PRIVATE_METADATA = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node")
_EXAMPLE_BATCH = Number(int, low=2, high=2**16)  # 0 and 1 would be specialised into the graph


class _Encode(nn.Module):
    """``flow.encode`` of float images, as a module whose ``forward`` is what is exported."""

    def __init__(self, flow: ImageFlow) -> None:
        super().__init__()
        self.flow = flow

    def forward(self, images: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.flow.encode(images, context)


class _Decode(nn.Module):
    """``flow.decode``, as a module whose ``forward`` is what is exported."""

    def __init__(self, flow: ImageFlow) -> None:
        super().__init__()
        self.flow = flow

    def forward(self, tokens: Tensor, context: Tensor | None = None) -> Tensor:
        return self.flow.decode(tokens, context)


def export_files(format: str) -> list[str]:
    """The names :func:`export_flow` writes for ``format`` (ONNX weights over 1.5 GB go to
    ``NAME.onnx.data`` files beside the graphs as well)."""
    Choice(EXPORT_FORMATS).check(format, "export: format")
    return [f"{graph}{_SUFFIX[format]}" for graph in _GRAPHS] + ["export.json"]


def _plain_copy(flow: ImageFlow) -> ImageFlow:
    """A float32 CPU copy of ``flow`` with plain PyTorch layers, in eval mode, whose flow
    sequences run the plain loop (no memory-saving backprop to trace)."""
    plain = decelerate(copy.deepcopy(flow)).to("cpu", torch.float32).eval()
    for module in plain.modules():
        if isinstance(module, FlowSequence):
            module.backprop = "standard"
    plain.requires_grad_(False)
    return plain


def _context_dim(flow: ImageFlow) -> int | None:
    return getattr(flow.config, "context_dim", None)


def _specs(flow: ImageFlow) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Every graph's inputs and outputs: name, dtype and shape (``"batch"`` and
    ``"context_tokens"`` for the dynamic dims)."""
    cfg = flow.config
    images = {
        "name": "images",
        "dtype": "float32",
        "shape": ["batch", cfg.channels, *cfg.image_size],
    }
    tokens = {"name": "tokens", "dtype": "float32", "shape": ["batch", *flow.latent_shape]}
    logdet = {"name": "logdet", "dtype": "float32", "shape": ["batch"]}
    context = []
    if (dim := _context_dim(flow)) is not None:
        context = [
            {"name": "context", "dtype": "float32", "shape": ["batch", "context_tokens", dim]}
        ]
    return {
        "encode": {"inputs": [images, *context], "outputs": [tokens, logdet]},
        "decode": {"inputs": [tokens, *context], "outputs": [images]},
    }


def _example(spec: dict[str, Any], batch: int, context_tokens: int) -> Tensor:
    sizes = {"batch": batch, "context_tokens": context_tokens}
    shape = [sizes.get(dim, dim) for dim in spec["shape"]]
    generator = torch.Generator().manual_seed(0)
    return torch.rand(shape, generator=generator) * 2 - 1


def _programs(
    flow: ImageFlow, specs: dict[str, Any], batch: int
) -> dict[str, torch.export.ExportedProgram]:
    """``torch.export`` programs of encode and decode, batch (and context length) dynamic."""
    dims = {
        "batch": torch.export.Dim("batch", min=1),
        "context_tokens": torch.export.Dim("context_tokens", min=1),
    }
    programs = {}
    for graph, module in (("encode", _Encode(flow)), ("decode", _Decode(flow))):
        inputs = specs[graph]["inputs"]
        args = tuple(_example(spec, batch, 3) for spec in inputs)
        dynamic = {
            spec["name"]: {i: dims[d] for i, d in enumerate(spec["shape"]) if d in dims}
            for spec in inputs
        }
        with torch.no_grad():
            programs[graph] = torch.export.export(
                module, args, dynamic_shapes=dynamic, strict=False
            )
    return programs


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Without the ONNX exporter's notes that concern no jetblocks model: that torchvision's
    operators are not registered, and a deprecation inside ``torch.export``'s own code."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\)", FutureWarning)
            yield
    finally:
        registration.setLevel(level)


def _write_onnx(
    program: torch.export.ExportedProgram, spec: dict[str, Any], folder: Path, name: str
) -> list[Path]:
    """``program`` as ONNX in ``folder/name`` (and ``name.data`` for weights over 1.5 GB)."""
    with _quiet_exporter():
        onnx_program = torch.onnx.export(
            program,
            dynamo=True,
            input_names=[s["name"] for s in spec["inputs"]],
            output_names=[s["name"] for s in spec["outputs"]],
            opset_version=ONNX_OPSET,
            optimize=True,
            verbose=False,
        )
    for node in onnx_program.model.graph.all_nodes():  # keep each node's module path, drop
        for key in _PRIVATE_METADATA:  # the Python stack traces that name this machine's files
            node.metadata_props.pop(key, None)
    onnx_program.save(folder / name, external_data=False)
    return sorted(folder.glob(f"{name}*"))


@checked(format=Choice(EXPORT_FORMATS), batch=_EXAMPLE_BATCH)
def export_flow(
    flow: ImageFlow,
    out_dir: str | os.PathLike,
    format: str = "onnx",
    *,
    batch: int = 2,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write ``flow``'s encode and decode graphs and ``export.json`` into ``out_dir``.

    ``format`` is ``"onnx"`` or ``"torch"`` (see the module docstring); ``batch`` is the
    example batch the graphs are traced with (the batch stays dynamic in them). Files that
    would be replaced are refused (``FileExistsError`` naming them) unless ``overwrite``;
    every file is written atomically, ``export.json`` last. Returns ``export.json``'s
    contents. ``flow`` itself is not changed.
    """
    if not isinstance(flow, ImageFlow):
        raise TypeError(
            f"export_flow takes an ImageFlow (a Jet, a MultiScaleFlow), got {type(flow).__name__}"
        )
    if format == "onnx":
        for module in ("onnx", "onnxscript"):
            require(module, "ONNX export")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} is a file; expected a folder for the exported files")
    names = export_files(format)
    if format == "onnx":
        names += [f"{graph}.onnx.data" for graph in _GRAPHS]
    existing = [name for name in names if (out / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds {', '.join(existing)}; refusing to overwrite")

    plain = _plain_copy(flow)
    specs = _specs(plain)
    programs = _programs(plain, specs, batch)
    description: dict[str, Any] = {
        "format": format,
        "model": type(flow).__name__,
        "config": plain.config.to_dict(),
        "latent_shape": list(plain.latent_shape),
        "dynamic_dims": ["batch"] + (["context_tokens"] if _context_dim(plain) else []),
        "pixels": {
            "to_images": "uint8 pixels k enter at their bin centres (k + 0.5) / 127.5 - 1",
            "to_pixels": "decoded images x become pixels floor((x + 1) * 127.5) clipped to "
            "[0, 255]",
        },
        "checks": "the graphs check no values: images must lie in [-1, 1 + 1/127.5], "
        "tokens and contexts must be finite",
        "torch": torch.__version__,
    }
    if format == "onnx":
        description["opset"] = ONNX_OPSET
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".export.", suffix=".tmp", dir=out))
    try:
        written: dict[str, list[Path]] = {}
        for graph in _GRAPHS:
            name = f"{graph}{_SUFFIX[format]}"
            if format == "onnx":
                written[graph] = _write_onnx(programs[graph], specs[graph], scratch, name)
            else:
                torch.export.save(programs[graph], scratch / name)
                written[graph] = [scratch / name]
            description[graph] = {"file": name, **specs[graph]}
        for graph in _GRAPHS:
            for path in written[graph]:
                with atomic_file(out / path.name) as staging:
                    shutil.move(path, staging)
        with atomic_file(out / "export.json") as staging:
            staging.write_text(json.dumps(description, indent=2) + "\n")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return description
