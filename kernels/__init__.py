"""Triton kernels of iidkern (installed as ``iidkern.kernels``).

On a machine without CUDA the kernels run under Triton's interpreter: importing this
package sets ``TRITON_INTERPRET=1`` (unless already set) before any kernel is decorated,
because Triton decides between compiling and interpreting at decoration time.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

from .fast_launch import recording  # noqa: E402
from .launch import output_allocator, placeholders, triton_attention  # noqa: E402
from .replay import LaunchReplay  # noqa: E402

__all__ = ["triton_attention", "INTERPRETING", "recording", "LaunchReplay", "placeholders", "output_allocator"]
