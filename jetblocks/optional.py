"""Optional dependencies: the extra that installs each, and a one-line error when one is missing.

The core (``pip install jetblocks``: torch, einops, numpy, safetensors, tqdm) builds, encodes,
decodes, trains and saves models. Data pipelines, image files and the built-in datasets need
the ``data`` extra, the property-test kit the ``testing`` extra, xformers the ``gpu`` extra,
the Hugging Face Hub (:mod:`jetblocks.hub`) the ``hub`` extra,
ONNX export (:mod:`jetblocks.export`) the ``export`` extra, TensorBoard and W&B logs
(:mod:`jetblocks.loggers`) the ``logging`` extra.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = [
    "EXTRAS",
    "MissingDependencyError",
    "missing_dependency",
    "require",
]

# top-level module -> (pip package, jetblocks extra that installs it)
EXTRAS = {
    "PIL": ("pillow", "data"),
    "torchdata": ("torchdata", "data"),
    "mlxtend": ("mlxtend", "data"),
    "sklearn": ("scikit-learn", "data"),
    "skimage": ("scikit-image", "data"),
    "sentencepiece": ("sentencepiece", "data"),
    "hypothesis": ("hypothesis", "testing"),
    "xformers": ("xformers", "gpu"),
    "huggingface_hub": ("huggingface_hub", "hub"),
    "onnx": ("onnx", "export"),
    "onnxscript": ("onnxscript", "export"),
    "onnxruntime": ("onnxruntime", "export"),
    "tensorboard": ("tensorboard", "logging"),
    "wandb": ("wandb", "logging"),
}


class MissingDependencyError(ModuleNotFoundError):
    """An optional dependency is not installed; the message says how to install it."""


def missing_dependency(error: ModuleNotFoundError, feature: str = "this") -> ModuleNotFoundError:
    """``error`` (a failed import) restated as one line naming the package and its extra."""
    if isinstance(error, MissingDependencyError):
        return error
    top = (error.name or "").split(".")[0]
    package, extra = EXTRAS.get(top, (top, None))
    install = f"pip install 'jetblocks[{extra}]'" if extra else f"pip install {package}"
    return MissingDependencyError(
        f"{feature} needs {package}, which is not installed: {install}", name=error.name
    )


def require(module: str, feature: str) -> ModuleType:
    """Import ``module`` for ``feature``, or raise :class:`MissingDependencyError`."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        raise missing_dependency(error, feature) from None
