"""A thinner launch path for the engine's kernels: ``Launcher(kernel)[grid](*args, **constexprs)``.

``JITFunction.run`` does a lot per launch: it binds every argument, rebuilds the
specialization list, turns the compile options into a cache-key string, checks global
values. On the H100 host that was ~45 us per launch (triton 3.6), more than the GPU time
of a whole attention call at 256^2 images, so small shapes were host-bound.

This launcher goes through ``JITFunction.run`` once per *key* (which compiles the kernel,
or loads it from Triton's caches, and launches it) and keeps the ``CompiledKernel`` it
returns; later launches with the same key call that compiled kernel directly. The key is
finer than Triton's own specialization, so it never picks a kernel compiled for other
argument properties: the device, the exact values of every non-tensor argument (sizes, strides,
scalars), each tensor's dtype and 16-byte alignment, each TMA descriptor's dtype, alignment,
shape, strides, block and layout (the Hopper kernel), the constexprs and launch options.
A diffusion run uses a handful of shapes, so the cache stays small (it is bounded anyway).

The interpreter, and Tritons whose ``CompiledKernel`` cannot be launched on its own, take
the normal path; ``IIDKERN_FAST_LAUNCH=0`` forces it (for comparisons).

Inside ``with recording() as launches:`` every ``Launcher.launch`` is also noted (launcher,
grid, args, kwargs), on this thread only, and so is every scratch tensor made by
:func:`workspace` (``launches.workspaces``): ``replay.LaunchReplay`` builds on that. (A replay
that calls the compiled kernel through :meth:`Launcher.compiled_runner` is not noted.)

``Launcher(kernel, generic_when_one=("n_q", "n_k"))`` launches calls whose named integer
arguments hold 1 through a twin of the kernel that does not specialize them (see
:func:`generic_twin`).
"""
from __future__ import annotations

import contextlib
import inspect
import operator
import os
import threading

import torch

_DISABLED = os.environ.get("IIDKERN_FAST_LAUNCH", "1") == "0" or \
    os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_MAX_ENTRIES = 4096  # distinct (shape, options) keys kept per kernel before the cache restarts
_THREAD = threading.local()  # .launches: the Recording a recording() on this thread appends to


class Recording(list):
    """The launches noted by a ``recording()`` block, in order, and in ``workspaces`` the
    scratch tensors made by :func:`workspace` inside it."""

    def __init__(self):
        super().__init__()
        self.workspaces = []


def on_other_gpu(device: torch.device) -> bool:
    """Whether ``device`` is a GPU other than the current one. Triton launches (and torch's
    "current stream" queries) go to the current device, so such calls need its guard."""
    return device.type == "cuda" and device.index != torch.cuda.current_device()


def device_guard(device: torch.device):
    """The tensors' GPU as the current CUDA device for the launches. Triton launches on the
    current device's current stream, whatever device the pointers are on, so tensors on
    ``cuda:1`` under a current ``cuda:0`` would run on the wrong GPU (and outside the caller's
    stream there); torch's own ops guard the device the same way."""
    return torch.cuda.device(device) if on_other_gpu(device) else contextlib.nullcontext()


def capturing(t: torch.Tensor) -> bool:
    """Whether ``t`` is on a GPU whose current stream is capturing a CUDA graph: what is
    built then holds values only once the graph replays, and cannot be read back. (The
    current stream of ``t``'s GPU, which need not be the current device.) Caches must not
    keep such tensors for other calls."""
    if not t.is_cuda:
        return False
    if not on_other_gpu(t.device):
        return torch.cuda.is_current_stream_capturing()
    with torch.cuda.device(t.device):
        return torch.cuda.is_current_stream_capturing()


@contextlib.contextmanager
def recording():
    """Note every ``Launcher.launch`` on this thread inside the block, as (launcher, grid, args, kwargs)."""
    outer = getattr(_THREAD, "launches", None)
    _THREAD.launches = launches = Recording()
    try:
        yield launches
    finally:
        _THREAD.launches = outer


def workspace(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty`` for a kernel's scratch tensor that lives for one call; a recording
    notes it, so that a replay of the call can make its own."""
    t = torch.empty(shape, dtype=dtype, device=device)
    launches = getattr(_THREAD, "launches", None)
    if launches is not None:
        launches.workspaces.append(t)
    return t


def generic_twin(kernel, names):
    """The same kernel (a ``@triton.jit`` or ``@gluon.jit`` function, or the interpreter's),
    with its options, whose integer parameters ``names`` are never specialized.

    Triton compiles an integer argument that equals 1 as the constant 1: a code path of its
    own, which no other value takes. With triton 3.6 on an H200 the main pass compiled for one
    key read shared memory out of bounds beside a value probe and a fused key-group probe (an
    illegal address, or wrong group sums), and the Gluon kernel with a fused key-group probe
    failed to compile for one key (an LLVM assertion), while other lengths ran right
    (bench/NOTES.md 80). The twin compiles its own binary, in which those lengths are
    run-time values as in the code of every length other than 1. (``do_not_specialize``
    also drops the 16-divisibility hint, which changes the compiled code of ordinary
    lengths: hence a twin for launches that hold a 1, rather than the option on the kernel.)
    Other integer arguments still become the constant 1 where they hold it."""
    if hasattr(kernel, "params"):  # compiled Triton or Gluon
        kept = list(kernel.do_not_specialize or [])
        return type(kernel)(kernel.fn, version=kernel.version, do_not_specialize=[*kept, *names],
                            do_not_specialize_on_alignment=kernel.do_not_specialize_on_alignment,
                            debug=kernel.debug, noinline=kernel.noinline, repr=kernel._repr,
                            launch_metadata=kernel.launch_metadata)
    options = dict(getattr(kernel, "kwargs", {}))  # the interpreter keeps the decorator's options
    options["do_not_specialize"] = [*(options.get("do_not_specialize") or []), *names]
    return type(kernel)(kernel.fn, **options)


class Launcher:
    """Wraps a ``@triton.jit`` function whose constexpr parameters all come after the others
    (so positional arguments fill exactly the run-time parameters). Launches whose
    ``generic_when_one`` arguments (parameter names) include a 1 go to a
    :func:`generic_twin` of the kernel, which has its own launcher."""

    def __init__(self, kernel, generic_when_one=()):
        self.kernel = kernel
        self.enabled = not _DISABLED and hasattr(kernel, "params")
        self._cache = {}
        self._tensor_pos = None
        self._twin, self._one_pos = None, ()
        if generic_when_one:
            params = inspect.signature(kernel.fn).parameters
            wrong = [name for name in generic_when_one if name not in params or _is_constexpr(params[name])]
            if wrong:
                raise TypeError(f"{kernel.fn.__name__}: generic_when_one names {wrong}, which are not run-time "
                                f"parameters")
            self._one_pos = tuple(list(params).index(name) for name in generic_when_one)
            self._twin = Launcher(generic_twin(kernel, generic_when_one))
        if self.enabled:
            params = kernel.params
            self._n_runtime = sum(1 for p in params if not p.is_constexpr)
            if any(p.is_constexpr for p in params[:self._n_runtime]):
                name = getattr(getattr(kernel, "fn", None), "__name__", repr(kernel))
                raise TypeError(f"{name}: constexpr parameters must come last for Launcher")
            self._constexprs = [(p.name, p.default) for p in params[self._n_runtime:]]

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def _takes_twin(self, args) -> bool:
        # Plain ints only (Triton specializes those): lengths are passed positionally.
        return self._twin is not None and any(i < len(args) and type(args[i]) is int and args[i] == 1
                                              for i in self._one_pos)

    def launch(self, grid, args, kwargs):
        if self._takes_twin(args):
            self._twin.launch(grid, args, kwargs)  # it notes the launch in a recording
            return
        launches = getattr(_THREAD, "launches", None)
        if launches is not None:
            launches.append((self, grid, args, kwargs))
        if not self.enabled:
            self.kernel[grid](*args, **kwargs)
            return
        if self._tensor_pos is None:
            # Pointer parameters always receive tensors (placeholders when unused), so the
            # positions of tensors and of plain values are fixed per kernel.
            tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
            descriptors = [i for i, a in enumerate(args) if _is_descriptor(a)]
            others = [i for i, a in enumerate(args) if not isinstance(a, torch.Tensor) and i not in descriptors]
            self._descriptor_pos = descriptors
            self._tensor_pos = operator.itemgetter(*tensors) if len(tensors) > 1 else (lambda a: (a[tensors[0]],))
            self._other_pos = operator.itemgetter(*others) if len(others) > 1 else (lambda a: tuple(a[i] for i in others))
            self._first_tensor = tensors[0]  # the device comes from it
        try:
            key = self._key(args, kwargs)
        except AttributeError:  # a tensor where a value was expected, or the reverse: no shortcut
            self.kernel[grid](*args, **kwargs)
            return
        entry = self._cache.get(key)
        if entry is None:
            # First launch with this key: Triton's own path compiles (or loads) and launches.
            compiled = self.kernel[grid](*args, **kwargs)
            if not _can_launch(compiled):
                self.enabled = False
                return
            if len(self._cache) >= _MAX_ENTRIES:
                self._cache.clear()
            # The constexpr values are part of the key, so their argument tuple is kept with it.
            constexprs = tuple(kwargs[name] if name in kwargs else default for name, default in self._constexprs)
            self._cache[key] = (compiled, constexprs)
            return
        compiled, constexprs = entry
        compiled[grid + (1,) * (3 - len(grid))](*args, *constexprs)  # a compiled kernel wants all 3 grid dims

    def _key(self, args, kwargs):
        return (args[self._first_tensor].get_device(), tuple(kwargs.items()), self._other_pos(args),
                tuple([(t.dtype, t.data_ptr() & 15 == 0) for t in self._tensor_pos(args)]),
                tuple([_descriptor_key(args[i]) for i in self._descriptor_pos]))

    def compiled_runner(self, grid, args, kwargs):
        """``run(*args)`` launching the compiled kernel this launcher holds for these arguments
        (same key as :meth:`launch`), or None when it holds none: disabled, or never launched
        with this key. The caller promises later ``args`` differ only in what the key ignores."""
        if self._takes_twin(args):
            return self._twin.compiled_runner(grid, args, kwargs)
        if not self.enabled or self._tensor_pos is None:
            return None
        try:
            entry = self._cache.get(self._key(args, kwargs))
        except AttributeError:
            return None
        if entry is None:
            return None
        compiled, constexprs = entry
        launch = compiled[grid + (1,) * (3 - len(grid))]
        return lambda *run_args: launch(*run_args, *constexprs)


def _is_constexpr(param: inspect.Parameter) -> bool:
    annotation = param.annotation
    return "constexpr" in (annotation if isinstance(annotation, str) else getattr(annotation, "__name__", ""))


def _is_descriptor(a) -> bool:
    """A host-side TMA descriptor (``TensorDescriptor`` of Triton or Gluon)."""
    return hasattr(a, "block_shape") and isinstance(getattr(a, "base", None), torch.Tensor)


def _descriptor_key(d):
    # The compiled kernel is specialized on the block shape, layout and dtype; the shape and
    # strides are launch values, keyed exactly like the other non-tensor arguments.
    return (d.base.dtype, d.base.data_ptr() & 15 == 0, tuple(d.shape), tuple(d.strides), tuple(d.block_shape),
            getattr(d, "layout", None), getattr(d, "padding", None))


def _can_launch(compiled) -> bool:
    return compiled is not None and hasattr(type(compiled), "__getitem__")
