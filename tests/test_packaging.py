"""What an installed iidkern holds: the top-level kernels/ folder ships inside the package as
iidkern.kernels (a published package owns the import name ``kernels``), and the metadata a
build backend writes. CI installs the package as a wheel (``pip install ".[test]"``), so these
run there; an editable install maps the source tree instead, and skips them."""
import importlib.metadata
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed():
    # Not importlib.metadata.distribution(): an in-tree build leaves iidkern.egg-info in the
    # repository root, which is on sys.path under `python -m pytest` and would answer first.
    outside = [p for p in sys.path if Path(p or ".").resolve() != REPO]
    dists = [d for d in importlib.metadata.distributions(path=outside) if d.metadata["Name"] == "iidkern"]
    if not dists:
        pytest.skip("iidkern is not installed (tests run from the source tree)")
    dist = dists[0]
    direct_url = dist.read_text("direct_url.json")
    if direct_url and json.loads(direct_url).get("dir_info", {}).get("editable"):
        pytest.skip("an editable install: its files are the source tree's, not a wheel's")
    return dist


def test_the_wheel_ships_the_kernels_inside_the_package_only(installed):
    files = {f.as_posix() for f in installed.files}
    kernel_modules = sorted(p.name for p in (REPO / "kernels").glob("*.py"))
    assert kernel_modules, "no kernels/*.py in the source tree"
    missing = [name for name in kernel_modules if f"iidkern/kernels/{name}" not in files]
    assert not missing, f"iidkern/kernels lacks {missing} in the installed files"
    top_level = sorted(f for f in files if f.startswith("kernels/"))
    assert not top_level, f"a top-level kernels package was installed: {top_level[:5]}"


def test_the_metadata_names_the_license_and_the_cli(installed):
    assert installed.metadata["License-Expression"] == "Apache-2.0"
    scripts = {ep.name: ep.value for ep in installed.entry_points if ep.group == "console_scripts"}
    assert scripts.get("iidkern") == "iidkern.cli:main"
