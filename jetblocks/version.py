"""The version of jetblocks (``jetblocks.__version__``), importable from any module."""

__all__ = ["VERSION"]

VERSION = "0.1.0"
