"""The cached-compiled-kernel launcher (kernels/fast_launch.py), with a stand-in kernel.

On CPU the engine runs under the interpreter, which the launcher leaves alone; these
tests drive its key and dispatch logic with a fake ``JITFunction``/``CompiledKernel``
pair. The GPU half (same results as Triton's own launch path) is in test_gpu.py.
"""
import pytest
import torch

from iidkern.kernels import fast_launch


class _Param:
    def __init__(self, name, is_constexpr, default=None):
        self.name, self.is_constexpr, self.default = name, is_constexpr, default


class _Compiled:
    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):
        return lambda *args: self.log.append(("fast", grid, args))


class _FakeKernel:
    """Three run-time parameters (X, n, scale), then constexprs BLOCK and FLAG=False."""

    def __init__(self):
        self.params = [_Param("X", False), _Param("n", False), _Param("scale", False),
                       _Param("BLOCK", True), _Param("FLAG", True, False)]
        self.log = []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.log.append(("slow", grid, args, kwargs))
            return _Compiled(self.log)
        return run


@pytest.fixture
def launcher(monkeypatch):
    monkeypatch.setattr(fast_launch, "_DISABLED", False)
    kernel = _FakeKernel()
    return fast_launch.Launcher(kernel), kernel.log


def _kinds(log):
    return [entry[0] for entry in log]


def test_first_launch_per_key_goes_through_triton_then_the_compiled_kernel(launcher):
    run, log = launcher
    x = torch.zeros(64)
    run[(3, 1)](x, 32, 0.5, BLOCK=16, num_warps=4)
    run[(5, 2)](x, 32, 0.5, BLOCK=16, num_warps=4)
    assert _kinds(log) == ["slow", "fast"]
    # The compiled kernel gets every parameter in order, defaults of omitted constexprs included.
    assert log[1] == ("fast", (5, 2, 1), (x, 32, 0.5, 16, False))  # grid padded to 3 dims


@pytest.mark.parametrize("change", ["alignment", "dtype", "int_value", "int_one", "constexpr", "option"])
def test_any_specialization_change_takes_triton_path_again(launcher, change):
    run, log = launcher
    buf = torch.zeros(128)
    x = buf[:64]
    run[(1,)](x, 32, 0.5, BLOCK=16, num_warps=4)
    args, kwargs = [x, 32, 0.5], dict(BLOCK=16, num_warps=4)
    if change == "alignment":
        args[0] = buf[1:65]  # 4-byte offset: no longer 16-byte aligned
    elif change == "dtype":
        args[0] = torch.zeros(64, dtype=torch.float16)
    elif change == "int_value":
        args[1] = 48
    elif change == "int_one":
        args[1] = 1
    elif change == "constexpr":
        kwargs["BLOCK"] = 32
    else:
        kwargs["num_warps"] = 8
    run[(1,)](*args, **kwargs)
    run[(1,)](*args, **kwargs)
    assert _kinds(log) == ["slow", "slow", "fast"]


def test_disabled_launcher_always_uses_triton(monkeypatch):
    monkeypatch.setattr(fast_launch, "_DISABLED", True)
    kernel = _FakeKernel()
    run = fast_launch.Launcher(kernel)
    for _ in range(3):
        run[(1,)](torch.zeros(4), 4, 1.0, BLOCK=16)
    assert _kinds(kernel.log) == ["slow"] * 3


def test_constexprs_must_come_last(monkeypatch):
    monkeypatch.setattr(fast_launch, "_DISABLED", False)
    kernel = _FakeKernel()
    kernel.params = [_Param("BLOCK", True), _Param("X", False)]
    with pytest.raises(TypeError, match="constexpr parameters must come last"):
        fast_launch.Launcher(kernel)


def test_engine_kernels_satisfy_the_launcher_contract():
    # The three engine kernels are wrapped at import; under the interpreter the wrappers
    # are pass-through, on a GPU they must accept the parameter order.
    from iidkern.kernels import launch
    for wrapped in (launch._ATTN, launch._PROBE, launch._PAIR_STATS):
        assert isinstance(wrapped, fast_launch.Launcher)
