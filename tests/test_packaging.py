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


def test_the_wheel_carries_the_license(installed):
    files = {f.as_posix() for f in installed.files}
    assert any(f.endswith("licenses/LICENSE") for f in files), sorted(f for f in files if "dist-info" in f)


def test_the_sdist_holds_what_building_and_testing_need(tmp_path):
    """The source distribution (built from a copy of the tree, so no build files land in it):
    the package with its kernels, the CUDA extension's source, the tests with their helpers, the
    docs and the license; no scratch work or benchmark records."""
    import shutil
    import subprocess
    import tarfile

    pytest.importorskip("setuptools", minversion="77", reason="pyproject.toml's build backend needs setuptools >= 77")
    tree = tmp_path / "tree"
    tree.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")
    for name in ("iidkern", "kernels", "csrc", "docs", "tests", "bench", "scratch"):
        if (REPO / name).exists():
            shutil.copytree(REPO / name, tree / name, symlinks=True, ignore=skip)
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE", "MANIFEST.in"):
        shutil.copy2(REPO / name, tree / name)
    code = f"from setuptools import build_meta; print(build_meta.build_sdist({str(tmp_path / 'dist')!r}))"
    (tmp_path / "dist").mkdir()
    res = subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    with tarfile.open(tmp_path / "dist" / res.stdout.strip().splitlines()[-1]) as sdist:
        names = {n.split("/", 1)[1] for n in sdist.getnames() if "/" in n}
    needed = ["LICENSE", "README.md", "setup.py", "pyproject.toml", "csrc/tile_classify.cu", "docs/METHODS.md",
              "tests/conftest.py", "tests/helpers.py", "tests/oracle.py", "iidkern/kernels/launch.py",
              "iidkern/kernels/hopper_fwd.py"]
    assert not [n for n in needed if n not in names], sorted(names)
    assert not [n for n in names if n.startswith(("scratch/", "bench/runs/", "kernels/"))]
