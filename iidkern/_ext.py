"""Thin loader of the optional CUDA extension (``csrc/``); ``None`` when it is not built."""
try:  # pragma: no cover - only on machines that built it
    from . import _C as cuda_ext
except ImportError:
    cuda_ext = None
