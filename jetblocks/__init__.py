"""jetblocks: the Jet normalizing flow as exact, invertible, composable PyTorch blocks.

Layers, each importing only from the ones above it:

1. The flow maths (torch and einops only): ``linear``, ``flow``, ``couplings``, ``vit``,
   ``latents``, ``likelihood``, ``memory``, ``heads``, ``curriculum``, ``autoregressive``; with
   ``checkpoint`` (safetensors files), ``model_card`` (the README.md beside every save),
   ``hub`` (the Hugging Face Hub) and ``optional`` (optional dependencies), ``jet`` (the
   model and its latent API) and ``export`` (its graphs for ONNX and ``torch.export``).
2. ``jetblocks.integrations``: adapters to other software: data sources and
   ``torchdata`` pipelines, image files and grids, big_vision checkpoints, sentencepiece,
   ``torchrun`` process groups and model wrapping (``distributed``).
3. ``train`` and ``cli``: the training loop and the ``jetblocks`` command, built on 1 and 2.

``jetblocks.testing`` (the property-test kit) depends on layer 1 only. Examples use the
public API of all three.
"""

from jetblocks import multiscale as _multiscale  # noqa: F401 (registers it for load_pretrained)
from jetblocks.acceleration import accelerate, decelerate
from jetblocks.couplings import AffineCoupling, ChannelSplit, SpatialSplit
from jetblocks.curriculum import NoiseCurriculum
from jetblocks.flow import Flow, FlowSequence, Inverse
from jetblocks.heads import GaussianMixture, GMMHead, guided_gaussian, sample_guided
from jetblocks.jet import PRESETS, Jet, JetConfig
from jetblocks.latents import merge_tokens, patchify, split_tokens, unpatchify
from jetblocks.likelihood import (
    bin_centers,
    bits_per_dim,
    dequantize,
    image_bits_per_dim,
    standard_normal_log_prob,
    to_uint8,
)
from jetblocks.pretrained import load_pretrained
from jetblocks.version import VERSION
from jetblocks.vit import ViTConditioner

__version__ = VERSION

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
    "accelerate",
    "bin_centers",
    "bits_per_dim",
    "decelerate",
    "dequantize",
    "guided_gaussian",
    "image_bits_per_dim",
    "load_pretrained",
    "merge_tokens",
    "patchify",
    "sample_guided",
    "split_tokens",
    "standard_normal_log_prob",
    "to_uint8",
    "unpatchify",
]


def __getattr__(name: str):
    if name == "Linear":
        import warnings

        from jetblocks.linear import OneDNNLinear

        warnings.warn(
            "jetblocks.Linear is now jetblocks.linear.OneDNNLinear; models use nn.Linear and "
            "jetblocks.accelerate(model) swaps them",
            DeprecationWarning,
            stacklevel=2,
        )
        return OneDNNLinear
    if name == "cpu_linear_backend":
        raise AttributeError(
            "jetblocks.cpu_linear_backend was removed: models are plain PyTorch unless "
            "jetblocks.accelerate(model) is applied; undo it with jetblocks.decelerate(model) "
            "or turn the library's defaults off with JETBLOCKS_ACCELERATE=0"
        )
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
