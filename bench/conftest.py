"""Benchmark-suite set-up: skip without CUDA, let dynamo compile every shape, record results.

``BENCH_RECORDS=path.jsonl`` makes every case (timed or skipped) append one JSON line as
soon as it finishes, so a run cut off by a time limit still leaves its numbers (the
pytest-benchmark JSON is written only at the end of the session).
"""
import json
import os
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
BENCH_DIR = Path(__file__).resolve().parent
DYNAMO_LIMIT = 1024


def pytest_configure(config):
    if not HAS_CUDA:
        return
    import torch._dynamo.config as dynamo_config

    # FlexAttention is compiled once per shape/mask: every case must really get its own
    # static-shape kernel, not fall back to eager or to a dynamic-shape recompile.
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, DYNAMO_LIMIT)
    dynamo_config.automatic_dynamic_shapes = False


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="the benchmark suite needs a CUDA GPU; it runs on the device machine "
                                   "through bench/gpu_run.sh")
    for item in items:
        if BENCH_DIR in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config, machine_info):
    from bench.environment import environment_info

    machine_info["iidkern_bench"] = environment_info()


class RecordWriter:
    """Appends one JSON object per line to ``BENCH_RECORDS`` (a no-op when unset)."""

    def __init__(self, path):
        self.path = Path(path) if path else None
        if self.path is not None:
            from bench.environment import environment_info

            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.write({"kind": "environment", **environment_info()})

    def write(self, record: dict):
        if self.path is None:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=str) + "\n")


@pytest.fixture(scope="session")
def bench_records():
    return RecordWriter(os.environ.get("BENCH_RECORDS"))
