"""Adapters between jetblocks and other software (data loaders, checkpoint formats, kernels).

Importable as ``jetblocks.integrations``; the core flow maths never imports from here.
"""

__all__: list[str] = []  # a namespace: each adapter is its own module
