"""Triton kernels of iidkern (installed as ``iidkern.kernels``).

On a machine without CUDA the kernels run under Triton's interpreter: importing this
package sets ``TRITON_INTERPRET=1`` (unless already set) before any kernel is decorated,
because Triton decides between compiling and interpreting at decoration time, and builds
its own helpers when it is first imported: if something imported Triton earlier without the
variable, the interpreter cannot run them (``INTERPRETER_UNAVAILABLE`` says so, and
``backend="triton"`` on CPU raises it).
"""
import os
import sys

import torch

# Why the interpreter cannot run the kernels in this process, or None.
INTERPRETER_UNAVAILABLE = None
if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    if "triton.language" in sys.modules:
        # Triton builds its library helpers (tl.zeros, ...) for compiling or for its interpreter
        # when it is first imported: set the variable now and the kernels would be interpreted
        # but call compiled-mode helpers, which fails inside every kernel.
        INTERPRETER_UNAVAILABLE = (
            "Triton was imported before iidkern without TRITON_INTERPRET=1 (diffusers and "
            "torch._inductor import it), so its interpreter cannot run iidkern's kernels: set "
            "TRITON_INTERPRET=1 in the environment before Python starts, or import iidkern first")
    else:
        os.environ["TRITON_INTERPRET"] = "1"

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

from .fast_launch import recording  # noqa: E402
from .launch import output_allocator, placeholders, triton_attention  # noqa: E402
from .replay import LaunchReplay  # noqa: E402

__all__ = ["triton_attention", "INTERPRETING", "INTERPRETER_UNAVAILABLE", "recording", "LaunchReplay", "placeholders", "output_allocator"]
