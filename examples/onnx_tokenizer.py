"""A Jet as an image tokenizer with onnxruntime and numpy alone: no torch, no jetblocks.

Export a trained flow first (``pip install 'jetblocks[export]'``)::

    jetblocks export --checkpoint runs/demo-jet --format onnx --out exported/
    python examples/onnx_tokenizer.py exported/            # random pixels
    python examples/onnx_tokenizer.py exported/ --npz images.npz   # uint8 [B, C, H, W] "images"

It encodes uint8 pixels to tokens and log-dets, decodes the tokens and checks that the
pixels come back exactly, then prints the shapes and the images' bits per dimension at
their bin centres. What it needs from the export is in ``export.json``: the inputs' names
and shapes, and the pixel conventions (which this file spells out in numpy below).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort


def bin_centers(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels ``k`` to float32 ``(k + 0.5) / 127.5 - 1`` (``jetblocks.bin_centers``)."""
    unit = pixels.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    return unit + np.float32(0.5 / 127.5)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images to the uint8 bins they fall in (``jetblocks.to_uint8``)."""
    return np.clip(np.floor((images + np.float32(1.0)) * np.float32(127.5)), 0, 255).astype(
        np.uint8
    )


class OnnxTokenizer:
    """``encode(pixels) -> (tokens, logdet)`` and ``decode(tokens) -> images`` of an export."""

    def __init__(self, folder: str | Path, threads: int | None = None) -> None:
        folder = Path(folder)
        self.spec = json.loads((folder / "export.json").read_text())
        if self.spec["format"] != "onnx":
            raise SystemExit(
                f"{folder} holds a {self.spec['format']!r} export; export with --format onnx"
            )
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.sessions = {
            graph: ort.InferenceSession(
                str(folder / self.spec[graph]["file"]), options, providers=["CPUExecutionProvider"]
            )
            for graph in ("encode", "decode")
        }

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.spec["encode"]["inputs"][0]["shape"][1:])

    def _run(self, graph: str, first: np.ndarray, context: np.ndarray | None) -> list[np.ndarray]:
        names = [spec["name"] for spec in self.spec[graph]["inputs"]]
        if (context is None) != (len(names) == 1):
            raise ValueError(f"this export's {graph} takes {names}")
        feed = {names[0]: first} if context is None else {names[0]: first, names[1]: context}
        return self.sessions[graph].run(None, feed)

    def encode(
        self, pixels: np.ndarray, context: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """uint8 pixels ``[B, C, H, W]`` -> tokens ``[B, N, D]`` and log-dets ``[B]``."""
        if pixels.dtype != np.uint8 or pixels.shape[1:] != self.image_shape:
            raise ValueError(
                f"expected uint8 pixels [B, {self.image_shape}], got {pixels.dtype} {pixels.shape}"
            )
        tokens, logdet = self._run("encode", bin_centers(pixels), context)
        return tokens, logdet

    def decode(self, tokens: np.ndarray, context: np.ndarray | None = None) -> np.ndarray:
        """Tokens ``[B, N, D]`` -> float images ``[B, C, H, W]`` (:func:`to_uint8` for pixels)."""
        if not np.isfinite(tokens).all():
            raise ValueError("tokens contain NaN or inf")
        return self._run("decode", tokens.astype(np.float32), context)[0]


def bits_per_dim(tokens: np.ndarray, logdet: np.ndarray) -> np.ndarray:
    """Bits per dimension ``[B]`` of the images at their bin centres (``jetblocks``' bits/dim
    adds uniform dequantization noise first; this is the same formula without it)."""
    dims = math.prod(tokens.shape[1:])
    log_prior = -0.5 * (tokens.astype(np.float64) ** 2 + math.log(2 * math.pi)).sum(axis=(1, 2))
    nats = -(log_prior + logdet) / dims + math.log(127.5)
    return nats / math.log(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="a folder written by `jetblocks export --format onnx`")
    parser.add_argument("--npz", help='an .npz with uint8 "images" [B, C, H, W] (default: random)')
    parser.add_argument("--batch", type=int, default=8, help="random images to make")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads")
    args = parser.parse_args()

    tokenizer = OnnxTokenizer(args.folder, args.threads)
    if args.npz:
        pixels = np.load(args.npz)["images"]
    else:
        rng = np.random.default_rng(0)
        pixels = rng.integers(0, 256, (args.batch, *tokenizer.image_shape), dtype=np.uint8)
    context = None
    if len(tokenizer.spec["encode"]["inputs"]) == 2:  # a Jet with context_dim
        dim = tokenizer.spec["encode"]["inputs"][1]["shape"][-1]
        context = np.zeros((len(pixels), 1, dim), np.float32)
    tokens, logdet = tokenizer.encode(pixels, context)
    decoded = to_uint8(tokenizer.decode(tokens, context))
    print(f"{tokenizer.spec['model']}: pixels {list(pixels.shape)} -> tokens {list(tokens.shape)}")
    print(f"bits/dim at bin centres: {bits_per_dim(tokens, logdet).mean():.3f}")
    print(f"round trip exact: {bool(np.array_equal(decoded, pixels))}")


if __name__ == "__main__":
    main()
