"""Caption tokenizer: train a sentencepiece model from text, load it, encode and decode.

Ids of a trained model: ``0`` pad, ``1`` unknown, ``2`` end of sentence, then the learned
pieces (no BOS: the model that consumes the ids adds its own). A loaded model may number
them otherwise (T5's ``c4_en``, the JetFormer reference's: pad 0, eos 1): ``pad_id`` and
``eos_id`` are read from it. :meth:`SentencePieceTokenizer.encode_batch` pads
or cuts captions to a fixed length and appends EOS, returning the ids and a mask of the
positions a caption loss should cover (the caption and its EOS).

Needs ``sentencepiece`` (``pip install "jetblocks[data]"``).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from jetblocks.checkpoint import atomic_file
from jetblocks.integrations.datasets import DataError
from jetblocks.optional import require

__all__ = ["EOS_ID", "PAD_ID", "UNK_ID", "SentencePieceTokenizer"]

PAD_ID, UNK_ID, EOS_ID = 0, 1, 2
MAX_MODEL_BYTES = 256 << 20  # large vocabularies (256k pieces) take a few MiB


def _spm():
    return require("sentencepiece", "the caption tokenizer")


class SentencePieceTokenizer:
    """A loaded sentencepiece model (its serialized bytes are kept, so it can be saved)."""

    def __init__(self, model_proto: bytes) -> None:
        if not isinstance(model_proto, bytes):
            raise TypeError(f"model_proto must be bytes, got {type(model_proto).__name__}")
        self.model_proto = model_proto
        try:
            self.processor = _spm().SentencePieceProcessor(model_proto=model_proto)
        except RuntimeError as error:  # sentencepiece's parse error
            raise DataError(f"not a sentencepiece model ({' '.join(str(error).split())})") from None
        self.pad_id, self.eos_id = self.processor.pad_id(), self.processor.eos_id()
        if self.pad_id < 0 or self.eos_id < 0:
            raise ValueError(
                f"the sentencepiece model needs a pad and an eos id, it has pad id "
                f"{self.pad_id} and eos id {self.eos_id} (-1: none)"
            )

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int = 64,
        *,
        model_type: str = "unigram",
    ) -> SentencePieceTokenizer:
        """Learn a model of at most ``vocab_size`` ids from ``texts`` (one thread, seeded)."""
        proto = io.BytesIO()
        _spm().SentencePieceTrainer.train(
            sentence_iterator=iter(list(texts)),
            model_writer=proto,
            vocab_size=vocab_size,
            model_type=model_type,
            hard_vocab_limit=False,
            character_coverage=1.0,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            eos_id=EOS_ID,
            bos_id=-1,
            num_threads=1,
            minloglevel=2,
        )
        return cls(proto.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike) -> SentencePieceTokenizer:
        """Read a ``.model`` file written by :meth:`save` (or by sentencepiece itself); one
        that is not a sentencepiece model, or larger than ``MAX_MODEL_BYTES``, raises
        :class:`~jetblocks.integrations.datasets.DataError` naming it."""
        path = Path(path)
        with open(path, "rb") as handle:
            proto = handle.read(MAX_MODEL_BYTES + 1)
        if len(proto) > MAX_MODEL_BYTES:
            raise DataError(f"{path} is larger than a sentencepiece model may be here "
                            f"({MAX_MODEL_BYTES >> 20} MiB)")  # fmt: skip
        try:
            return cls(proto)
        except (DataError, ValueError) as error:
            raise DataError(f"{path}: {error}") from None

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model to ``path`` atomically."""
        with atomic_file(path) as staging:
            staging.write_bytes(self.model_proto)
        return Path(path)

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.processor.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, stopping at the first EOS and skipping padding."""
        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.processor.decode([i for i in ids if i != self.pad_id])

    def encode_batch(self, texts: Sequence[str], length: int) -> tuple[Tensor, Tensor]:
        """``(ids int64 [B, length], loss mask bool [B, length])``: caption + EOS, then pads.

        Captions longer than ``length - 1`` pieces are cut (the EOS is always kept).
        """
        ids = torch.full((len(texts), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(texts), length), dtype=torch.bool)
        for row, text in enumerate(texts):
            pieces = [*self.encode(text)[: length - 1], self.eos_id]
            ids[row, : len(pieces)] = torch.tensor(pieces)
            mask[row, : len(pieces)] = True
        return ids, mask
