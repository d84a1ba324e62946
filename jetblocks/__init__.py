"""jetblocks: the Jet normalizing flow as exact, invertible, composable PyTorch blocks."""

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
    "NoiseCurriculum",
    "SpatialSplit",
    "ViTConditioner",
    "bin_centers",
    "bits_per_dim",
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
