"""jetblocks: the Jet normalizing flow as exact, invertible, composable PyTorch blocks.

Layers, each importing only from the ones above it:

1. The flow maths (torch and einops only): ``linear``, ``flow``, ``couplings``, ``vit``,
   ``latents``, ``likelihood``, ``memory``, ``heads``, ``jetformer``, ``autoregressive``; with
   ``checkpoint`` (safetensors files) and ``extras`` (optional dependencies), ``jet`` (the
   model and its latent API).
2. ``jetblocks.integrations``: adapters to other software: data sources and
   ``torchdata`` pipelines, image files and grids, big_vision checkpoints, sentencepiece,
   ``torchrun`` process groups and model wrapping (``distributed``).
3. ``train`` and ``cli``: the training loop and the ``jetblocks`` command, built on 1 and 2.

``jetblocks.testing`` (the property-test kit) depends on layer 1 only. Examples use the
public API of all three.
"""

from jetblocks.couplings import AffineCoupling, ChannelSplit, SpatialSplit
from jetblocks.flow import Flow, FlowSequence, Inverse
from jetblocks.heads import GaussianMixture, GMMHead, guided_gaussian, sample_guided
from jetblocks.jet import PRESETS, Jet, JetConfig
from jetblocks.jetformer import NoiseCurriculum, image_bits_per_dim
from jetblocks.latents import merge_tokens, patchify, split_tokens, unpatchify
from jetblocks.likelihood import (
    bin_centers,
    bits_per_dim,
    dequantize,
    standard_normal_log_prob,
    to_uint8,
)
from jetblocks.linear import Linear, cpu_linear_backend
from jetblocks.vit import ViTConditioner

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "AffineCoupling",
    "ChannelSplit",
    "Flow",
    "FlowSequence",
    "GMMHead",
    "GaussianMixture",
    "Inverse",
    "Jet",
    "JetConfig",
    "Linear",
    "NoiseCurriculum",
    "SpatialSplit",
    "ViTConditioner",
    "bin_centers",
    "bits_per_dim",
    "cpu_linear_backend",
    "dequantize",
    "guided_gaussian",
    "image_bits_per_dim",
    "merge_tokens",
    "patchify",
    "sample_guided",
    "split_tokens",
    "standard_normal_log_prob",
    "to_uint8",
    "unpatchify",
]
