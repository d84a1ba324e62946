"""Fuzz every parser of a file a stranger may send (run by ``tests/test_fuzz.py``).

    python tests/fuzzing.py TARGET [TARGET ...] --examples N

For each TARGET, write a valid file of that kind, then feed its parser ``N`` hypothesis-chosen
mutations of it (random bytes, truncations, flipped bytes, rewritten length fields, bytes
inserted). Each must load or raise the library's clear error (a ``ValueError`` or
``TypeError`` subclass); any other exception is printed and the process exits 1. The caller
runs this under a memory limit and a timeout: a giant allocation or a hang fails too.
"""

from __future__ import annotations

import argparse
import json
import pickle
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SMALL = dict(image_size=(8, 8), channels=1, patch_size=2, depth=2, block_depth=1, emb_dim=8,
             num_heads=2, kinds=("channels", "spatial"))  # fmt: skip


def _jet():
    from jetblocks import Jet, JetConfig

    torch.manual_seed(0)
    return Jet(JetConfig(**SMALL))


# -- each target: (write a valid file into a folder -> its path, parse that path) ----------------
def _checkpoint(folder: Path) -> Path:
    _jet().save_pretrained(folder / "model")
    return folder / "model" / "model.safetensors"


def _config_json(folder: Path) -> Path:
    _jet().save_pretrained(folder / "model")
    return folder / "model" / "config.json"


def _load_pretrained(path: Path) -> None:
    from jetblocks.pretrained import load_pretrained

    load_pretrained(path.parent)


def _token_file(folder: Path) -> Path:
    from jetblocks.tokenfile import TokenFile, write_token_file

    path = folder / "tokens.safetensors"
    names = ["a.png", "b/c.png", "d.jpg"]
    contents = TokenFile(
        tokens=torch.randn(3, 16, 4), logdet=torch.randn(3), names=names, config=dict(SMALL)
    )
    write_token_file(path, contents)
    return path


def _read_token_file(path: Path) -> None:
    from jetblocks.tokenfile import read_token_file

    read_token_file(path)


def _trainer_state(folder: Path) -> Path:
    from jetblocks.checkpoint import save_state

    state = {"step": 3, "optimizer": {"state": {0: {"exp_avg": torch.randn(4)}}, "lr": 0.1},
             "scheduler": {"last_epoch": 3}, "ema": None, "loaders": [{"epoch": 1}],
             "noise_rng": torch.arange(4), "torch_rng": torch.arange(8, dtype=torch.uint8),
             "train_config": {"steps": 10}}  # fmt: skip
    save_state(folder, "trainer", state)
    return folder / "trainer.json"


def _read_trainer_state(path: Path) -> None:
    from jetblocks.checkpoint import load_state
    from jetblocks.train import _checked_trainer_state

    _checked_trainer_state(load_state(path.parent, "trainer"), path.parent)


def _trainer_tensors(folder: Path) -> Path:
    _trainer_state(folder)
    return folder / "trainer.safetensors"


def _big_vision(folder: Path) -> Path:
    from jetblocks.integrations.big_vision import save_jet

    save_jet(_jet(), folder / "jet.npz")
    return folder / "jet.npz"


def _load_big_vision(path: Path) -> None:
    from jetblocks.integrations.big_vision import load_jet

    load_jet(path)


def _image(suffix: str) -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        from PIL import Image

        pixels = np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)
        (folder / "images").mkdir()
        path = folder / "images" / f"x{suffix}"
        Image.fromarray(pixels).save(path)
        return path

    return write


def _image_folder(path: Path) -> None:
    from jetblocks.integrations.datasets import ImageFolder

    source = ImageFolder(path.parent, image_size=8)
    source[0]


def _cifar(folder: Path) -> Path:
    data = np.random.default_rng(0).integers(0, 256, (4, 3072), dtype=np.uint8)
    batch = {b"batch_label": b"testing batch", b"labels": [1, 2, 3, 4], b"data": data,
             b"filenames": [b"a.png", b"b.png", b"c.png", b"d.png"]}  # fmt: skip
    (folder / "cifar").mkdir()
    path = folder / "cifar" / "test_batch"
    path.write_bytes(pickle.dumps(batch, protocol=2))
    return path


def _load_cifar(path: Path) -> None:
    from jetblocks.integrations.datasets import load_cifar10

    load_cifar10(path.parent, "test")


def _sentencepiece(folder: Path) -> Path:
    from jetblocks.integrations.sentencepiece import SentencePieceTokenizer

    words = ["a", "red", "circle", "left", "of", "a", "blue", "square", "above", "the", "tree"]
    texts = [" ".join(words[i:] + words[:i]) for i in range(len(words))] * 4
    path = folder / "tokenizer.model"
    SentencePieceTokenizer.train(texts, vocab_size=40).save(path)
    return path


def _load_sentencepiece(path: Path) -> None:
    from jetblocks.integrations.sentencepiece import SentencePieceTokenizer

    SentencePieceTokenizer.load(path)


def _shard(folder: Path) -> Path:
    from jetblocks.integrations.datasets import ArraySource
    from jetblocks.integrations.shards import write_shards

    pixels = np.random.default_rng(0).integers(0, 256, (3, 1, 6, 6), dtype=np.uint8)
    source = ArraySource(torch.from_numpy(pixels), torch.tensor([0, 1, 2]))
    return write_shards(source, folder / "train", per_shard=3)[0]


def _read_shard(path: Path) -> None:
    from jetblocks.integrations.shards import decode_sample, read_samples

    for sample in read_samples(path):
        decode_sample(sample, 4, 1)


TARGETS: dict[str, tuple[Callable[[Path], Path], Callable[[Path], None]]] = {
    "checkpoint": (_checkpoint, _load_pretrained),
    "config-json": (_config_json, _load_pretrained),
    "token-file": (_token_file, _read_token_file),
    "trainer-json": (_trainer_state, _read_trainer_state),
    "trainer-tensors": (_trainer_tensors, _read_trainer_state),
    "big-vision-npz": (_big_vision, _load_big_vision),
    "png": (_image(".png"), _image_folder),
    "jpeg": (_image(".jpg"), _image_folder),
    "cifar-pickle": (_cifar, _load_cifar),
    "sentencepiece": (_sentencepiece, _load_sentencepiece),
    "tar-shard": (_shard, _read_shard),
}


# -- mutations ---------------------------------------------------------------------------------
@st.composite
def mutations(draw, original: bytes) -> bytes:
    """A hostile variant of ``original``."""
    size = len(original)
    kind = draw(st.sampled_from(["random", "truncate", "flip", "length", "insert", "splice"]))
    if kind == "random":
        return draw(st.binary(max_size=2 * size + 16))
    data = bytearray(original)
    if kind == "truncate":
        return bytes(data[: draw(st.integers(0, max(size - 1, 0)))])
    position = draw(st.integers(0, max(size - 1, 0)))
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            spot = min(size - 1, position + draw(st.integers(0, 64)))
            data[spot] ^= draw(st.integers(1, 255))
    elif kind == "length":  # a little-endian length field rewritten to a hostile value
        value = draw(st.sampled_from([0, 1, 2**31 - 1, 2**32 - 1, 2**40, 2**63 - 1, 2**64 - 1]))
        width = draw(st.sampled_from([4, 8]))
        packed = value.to_bytes(8, "little")[:width]
        data[position : position + width] = packed
    elif kind == "insert":
        data[position:position] = draw(st.binary(min_size=1, max_size=64))
    else:  # a header field's JSON text replaced (for JSON-headed formats)
        for needle in (b'"shape"', b'"data_offsets"', b'"dtype"', b'"names"', b'"step"'):
            at = data.find(needle)
            if at >= 0:
                junk = draw(st.sampled_from([b'"shape":[99999999999,99999999999]',
                                             b'"data_offsets":[0,1099511627776]',
                                             b'"dtype":"O"', b'"names":"[[[[[[[["',
                                             b'"step":1e999']))  # fmt: skip
                data[at : at + len(needle) + 1] = junk
                break
    return bytes(data)


def fuzz(target: str, examples: int) -> int:
    """Run ``examples`` mutations of ``target``; print failures; return how many failed."""
    write, parse = TARGETS[target]
    root = Path(tempfile.mkdtemp(prefix="jetblocks-fuzz-"))
    try:
        original_path = write(root)
        original = original_path.read_bytes()
        parse(original_path)  # the valid file must load
        failures: list[str] = []
        outcomes = {"loaded": 0, "refused": 0}

        @settings(max_examples=examples, derandomize=True, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(mutations(original))
        def one(mutated: bytes) -> None:
            original_path.write_bytes(mutated)
            try:
                parse(original_path)
                outcomes["loaded"] += 1
            except (ValueError, TypeError):
                outcomes["refused"] += 1
            except Exception as error:
                failures.append(f"{type(error).__name__}: {error} ({mutated[:60]!r}...)")

        one()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({"target": target, "examples": examples, **outcomes,
                      "failures": failures[:5], "failed": len(failures)}))  # fmt: skip
    return len(failures)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="+", choices=sorted(TARGETS))
    parser.add_argument("--examples", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    failed = sum(fuzz(target, args.examples) for target in args.targets)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    raise SystemExit(main())
