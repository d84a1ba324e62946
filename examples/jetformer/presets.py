"""Named JetFormer set-ups: model, training recipe, task and data.

Parameter counts (trainable; ``python -m examples.jetformer presets`` prints them):

- ``imagenet256-350m``: decoder 355.5M (the spec's 350M: +1.6%); total 1.068B with Jet
  426.6M (spec ~0.43B), GMM head 269.7M and embeddings 16.6M.
- ``imagenet256-1.3b``: decoder 1.600B with the reference's sizes (depth 48, width 1536,
  gated MLP 6144, 16 heads of 96, one KV head): 23% above the "1.3B" label, which these
  sizes cannot give with a 3-matrix gated MLP; total 2.657B with Jet 628.4M (spec ~0.63B).
- ``cifar10-42m``: 42.22M in total (the port's 42M: +0.5%).
"""

from __future__ import annotations

import copy
from typing import Any

from jetblocks import JetConfig
from jetblocks.couplings import SPATIAL_PATTERNS

# Weight decay on the kernels only: the example trains with task.jetformer_optimizer.
_REFERENCE_RECIPE = dict(lr=1e-3, betas=(0.9, 0.95), weight_decay=1e-4)
# The CPU presets' decoder and, for the class-conditional ones, label prefix and recipe.
# The reference's noise on the soft tokens (input_noise_std 0.3) helps here too: cpu-tiny's
# class consistency at w = 2 went from 79% (800 steps, none) to 97% (2,400 steps, 0.3).
_CPU_DECODER = dict(width=128, depth=3, mlp_dim=512, num_heads=4, head_dim=32, num_mixtures=16,
                    input_noise_std=0.3)  # fmt: skip
_CLASS_PREFIX = dict(vocab_size=10, text_len=1, num_vocab_repeats=16)
_CPU_CLASS_RECIPE = dict(
    train=dict(_REFERENCE_RECIPE, steps=2400, batch_size=32, log_every=100,
               sample_temperatures=(0.8, 1.0), samples_per_temperature=10),
    task=dict(sigma_start=64.0, sigma_end=0.0, drop_prob=0.1, guidance=2.0),
    sample=dict(guidance=2.0, temperature=0.9),
)  # fmt: skip


# The decoders of big_vision's GIVT_MODELS, and the reference's regularisation: residual
# dropout 0.1 and up to 0.3 Gaussian noise on the (text-first) soft tokens.
_DECODERS = {
    "350m": dict(width=1024, depth=24, mlp_dim=4096, head_dim=64),
    "750m": dict(width=1536, depth=24, mlp_dim=6144, head_dim=96),
    "1.3b": dict(width=1536, depth=48, mlp_dim=6144, head_dim=96),
}
_REFERENCE_MODEL = dict(keep=128, num_heads=16, num_kv_heads=1, num_mixtures=1024, dropout=0.1,
                        input_noise_std=0.3)  # fmt: skip
# Jet ViT depth per decoder; the text-to-image config has no entry for 750M (its table
# raises a KeyError there), so 750M uses the 350M's Jet.
_JET_BLOCK_DEPTH = {"350m": 4, "750m": 4, "1.3b": 6}


def _imagenet(size: str, guidance: float, temperature: float) -> dict[str, Any]:
    """``configs/proj/jetformer/jetformer_imagenet2012.py``: 16 class tokens, flips."""
    jet = JetConfig.preset("jetformer_adaptor", block_depth=_JET_BLOCK_DEPTH[size])
    return dict(
        data="imagenet256/{split}",  # an image folder per split (or pass --data)
        conditioning="class",
        flip=True,  # random left-right flips of the training images
        model=dict(
            jet=jet.to_dict(),
            **_REFERENCE_MODEL,
            **_DECODERS[size],
            vocab_size=1000,
            text_len=1,
            num_vocab_repeats=16,
        ),
        train=dict(_REFERENCE_RECIPE, steps=312_500, batch_size=2048, bf16=True),
        task=dict(sigma_start=64.0, sigma_end=0.0, drop_prob=0.1, guidance=guidance),
        sample=dict(guidance=guidance, temperature=temperature, sampler="rejection"),
    )


def _text_to_image(size: str, guidance: float, temperature: float) -> dict[str, Any]:
    """``configs/proj/jetformer/jetformer_image_text.py``: 64-token captions, half of the
    examples image first (captioning), untied text output, curriculum 64 -> 3."""
    jet = JetConfig.preset("jetformer_adaptor", block_depth=_JET_BLOCK_DEPTH[size])
    return dict(
        data="captions256",  # a captioned image folder (--data; see the README)
        conditioning="text",
        model=dict(
            jet=jet.to_dict(),
            **_REFERENCE_MODEL,
            **_DECODERS[size],
            vocab_size=32_000,  # the reference's sentencepiece c4_en (pass --tokenizer)
            text_len=64,
            num_vocab_repeats=1,
            untie_output_vocab=True,
        ),
        train=dict(_REFERENCE_RECIPE, steps=500_000, batch_size=4096, bf16=True),
        task=dict(
            sigma_start=64.0,
            sigma_end=3.0,
            drop_prob=0.1,
            text_first_prob=0.5,
            text_weight=0.0025,
            rgb_noise_on_image_prefix=False,
            ignore_pad=False,
            guidance=guidance,
        ),
        sample=dict(guidance=guidance, temperature=temperature, sampler="rejection"),
    )


PRESETS: dict[str, dict[str, Any]] = {
    # Class-conditional MNIST (5k digits) on 2 CPU cores in about 12 minutes.
    "cpu-tiny": dict(
        data="mnist5k",
        conditioning="class",
        model=dict(
            jet=JetConfig.preset("mnist").to_dict(),  # 32 couplings: enough expansion
            keep=4,
            **_CPU_DECODER,
            **_CLASS_PREFIX,
        ),
        **_CPU_CLASS_RECIPE,
    ),
    # Class-conditional (or, with --conditioning text, captioned) 8x8 scikit-learn digits.
    "cpu-tiny-digits": dict(
        data="digits",
        conditioning="class",
        model=dict(
            jet=JetConfig(image_size=(8, 8), channels=1, patch_size=2, depth=16, emb_dim=32,
                          kinds=("channels", "spatial")).to_dict(),
            keep=2,
            **_CPU_DECODER,
            **_CLASS_PREFIX,
        ),
        **_CPU_CLASS_RECIPE,
    ),
    # Text-to-image (and captioning) on the example's 16x16 captioned shapes.
    "cpu-tiny-text": dict(
        data="shapes",
        conditioning="text",
        model=dict(
            jet=JetConfig(image_size=(16, 16), channels=3, patch_size=4, depth=8,
                          emb_dim=32, kinds=("channels", "channels", "spatial")).to_dict(),
            keep=24,  # keep 8 lost the shapes to the factored dims (scenes 0.43)
            **_CPU_DECODER,
            vocab_size=None,  # from the sentencepiece model trained on the captions
            text_len=16,
            num_vocab_repeats=1,
            # RoPE alone left captions at 0.87 (left and right swapped); learned absolute
            # positions: 0.95 / 0.93 at 8,000 steps (seeds 0 / 1), 0.97 / 0.95 at 12,000
            learned_positions=True,
        ),
        # RoPE only: 3,000 steps gave scene agreement 0.46 and captioning 0.86, 8,000 0.75 /
        # 0.87; learned positions: 8,000 steps 0.66 / 0.89 scenes (seeds 0 / 1), 12,000 0.82
        # / 0.95 (see the README's results)
        train=dict(_REFERENCE_RECIPE, steps=12_000, batch_size=32, log_every=200,
                   sample_temperatures=(0.8, 1.0), samples_per_temperature=8),
        task=dict(sigma_start=64.0, sigma_end=3.0, drop_prob=0.1, text_first_prob=0.5,
                  text_weight=0.5, guidance=2.0),
        sample=dict(guidance=2.0, temperature=0.9),
    ),
    # The public PyTorch port's CIFAR-10 model (42M parameters); --data a CIFAR-10 folder.
    "cifar10-42m": dict(
        data="cifar-10-batches-py",
        conditioning="class",
        model=dict(
            jet=JetConfig(image_size=(32, 32), channels=3, patch_size=4, depth=32,
                          block_depth=1, emb_dim=192, num_heads=4,
                          kinds=("channels",) * 4 + ("spatial",),
                          spatial_patterns=SPATIAL_PATTERNS).to_dict(),
            keep=8,
            width=384,
            depth=12,
            mlp_dim=1536,
            num_heads=6,
            head_dim=64,
            num_mixtures=256,
            vocab_size=10,
            text_len=1,
            num_vocab_repeats=16,
        ),
        train=dict(_REFERENCE_RECIPE, steps=100_000, batch_size=256, bf16=True,
                   samples_per_temperature=10),
        task=dict(sigma_start=64.0, sigma_end=0.0, drop_prob=0.1, guidance=2.0),
        sample=dict(guidance=2.0, temperature=0.7),
    ),
    "imagenet256-350m": _imagenet("350m", 3.0, 0.94),
    "imagenet256-1.3b": _imagenet("1.3b", 2.0, 0.93),
    "text256-350m": _text_to_image("350m", 9.0, 0.96),
    "text256-750m": _text_to_image("750m", 8.0, 0.94),
    "text256-1.3b": _text_to_image("1.3b", 6.0, 0.96),
}  # fmt: skip


def with_text_conditioning(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` conditioned on captions (16 tokens, the run's own tokenizer) instead of labels.

    With a labelled set (``mnist5k``, ``digits``) the captions are generated from the labels.
    """
    spec = copy.deepcopy(spec)
    spec["conditioning"] = "text"
    spec["model"].update(vocab_size=None, text_len=16, num_vocab_repeats=1)
    spec["task"].update(text_first_prob=0.75, text_weight=0.5)
    return spec


def preset(name: str) -> dict[str, Any]:
    """A deep copy of preset ``name``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


__all__ = ["PRESETS", "preset", "with_text_conditioning"]
