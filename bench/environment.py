"""What machine and software a benchmark ran on (stored with the results, shown in RESULTS.md)."""
from __future__ import annotations

import datetime as _dt
import platform
import subprocess

import torch


def _version(module: str) -> str:
    try:
        mod = __import__(module)
        return str(getattr(mod, "__version__", "?"))
    except Exception:  # noqa: BLE001 - a missing optional package is just reported as such
        return "not installed"


def _driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "?"
    except Exception:  # noqa: BLE001
        return "?"


def environment_info() -> dict:
    info = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "iidkern": _version("iidkern"),
        "cuda": str(torch.version.cuda),
        "cudnn": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "n/a",
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            sm_count=props.multi_processor_count,
            l2_mib=round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
            capability=f"{props.major}.{props.minor}",
            driver=_driver(),
        )
    else:
        info["gpu"] = "none (CPU)"
    return info
