"""The ``iidkern`` command in a subprocess: demo and edit write valid PNGs, bad arguments exit 2."""
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, timeout=240):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "iidkern", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=REPO)


def assert_png(path, size=None):
    assert os.path.isfile(path), f"missing {path}"
    with Image.open(path) as img:
        assert img.format == "PNG"
        img.verify()
    with Image.open(path) as img:
        if size is not None:
            assert img.size == size, f"{path}: size {img.size} != {size}"


@pytest.fixture(scope="module")
def input_png(tmp_path_factory):
    from iidkern.edit.codec import demo_picture, save_png, to_uint8

    path = tmp_path_factory.mktemp("cli_input") / "in.png"
    save_png(to_uint8(demo_picture(80)), path)  # 80 -> resized to 64 by --size 64
    return str(path)


def test_demo_writes_every_output(tmp_path):
    out = tmp_path / "demo"
    res = run_cli("demo", "--out", str(out), "--steps", "3", "--size", "64", "--no-progress", "--device", "cpu")
    assert res.returncode == 0, res.stderr
    assert "meaningless" in res.stdout  # says plainly what a tiny random model gives
    for method in ("iid", "step", "combined", "headrouter"):
        assert_png(out / method / "edited.png", (64, 64))
        assert_png(out / method / "overlay.png", (64, 64))
        report = json.loads((out / method / "timings.json").read_text())
        assert report["tiny_random_model"] and report["timings_s"]["total"] > 0
    masks = sorted(p for p in os.listdir(out / "iid") if p.startswith("mask_"))
    assert len(masks) == 2
    for m in masks:
        assert_png(out / "iid" / m, (64, 64))
    assert_png(out / "headrouter" / "reconstruction.png", (64, 64))


@pytest.mark.parametrize("method", ["iid", "headrouter"])
def test_edit_writes_pngs(tmp_path, input_png, method):
    out = tmp_path / method
    text = (["--source", "a house on a hill", "--target", "a castle on a hill"] if method == "headrouter" else
            ["--instruction", "make the sky red", "--instruction", "add a tree", "--sigma", "0.5"])
    res = run_cli("edit", "--image", input_png, *text, "--method", method, "--steps", "3", "--size", "64",
                  "--out", str(out), "--no-progress", "--device", "cpu")
    assert res.returncode == 0, res.stderr
    assert "meaningless" in res.stderr  # no --model: the embedded tiny model, said so
    for name in ("edited.png", "source.png", "overlay.png"):
        assert_png(out / name, (64, 64))
    report = json.loads((out / "timings.json").read_text())
    assert report["method"] == method and report["steps"] == 3 and len(report["mask_labels"]) >= 1


@pytest.mark.parametrize("args,message", [
    (["edit", "--image", "/no/such/file.png", "--instruction", "x"], "file not found"),
    (["edit", "--image", "{input}"], "at least one --instruction"),
    (["edit", "--image", "{input}", "--instruction", "x", "--method", "magic"], "invalid choice"),
    (["edit", "--image", "{input}", "--method", "headrouter", "--source", "a"], "--target"),
    (["edit", "--image", "{input}", "--instruction", "x", "--model", "/no/such/dir"], "directory not found"),
    (["edit", "--image", "{input}", "--instruction", "x", "--steps", "0"], "--steps"),
    ([], "required"),
    (["edit", "--image", "{input}", "--instruction", "x", "--device", "tpu"], "--device must be cuda, cuda:N or cpu"),
    (["edit", "--image", "{input}", "--instruction", "x", "--device", "gpu0"], "--device must be"),
    (["edit", "--image", "{input}", "--instruction", "x", "--out", "{input}"], "is a file, not a directory"),
    (["edit", "--image", "{input}", "--instruction", "x", "--out", ""], "--out must name a directory"),
    (["edit", "--image", "{input}", "--instruction", "x", "--seed", str(2**70)], "--seed must be in [-2**63, 2**64)"),
    (["demo", "--steps", str(10**20)], "--steps must be in [1, 10000], got 100000000000000000000"),
    (["edit", "--image", "{input}", "--instruction", "x", "--size", str(10**9)],
     "--size must be 0 (keep) or in [32, 16384], got 1000000000"),
    (["demo", "--size", str(10**20)], "--size must be 0 (keep) or in [32, 16384]"),
    (["edit", "--image", "{input}", *["--instruction", "w"] * 63], "--method iid masks at most 62 instructions"),
    # IID's options with another method, which would ignore them
    (["edit", "--image", "{input}", "--method", "headrouter", "--source", "a", "--target", "b", "--map-step", "3"],
     "--map-step: IID options belong to --method iid, not --method headrouter"),
    (["edit", "--image", "{input}", "--instruction", "x", "--method", "step", "--sigma", "0", "--threshold", "top"],
     "--sigma, --threshold: IID options belong to --method iid, not --method step"),
    (["edit", "--image", "{input}", "--instruction", "x", "--device", "cpu:5"], "--device must be cuda, cuda:N or cpu"),
])
def test_bad_arguments_exit_2_with_a_message(input_png, args, message):
    res = run_cli(*[a.replace("{input}", input_png) for a in args], timeout=60)
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert message in res.stderr, res.stderr


@pytest.mark.parametrize("args,message", [
    (["--map-layer", "100"], "--map-layer must be in [-4, 3] for this model (4 attention layers"),
    (["--map-layer", "-100"], "--map-layer must be in [-4, 3]"),
    (["--sigma", "-1"], "--sigma must be a finite number in [0, 1000] latent tokens"),
    (["--sigma", "nan"], "--sigma must be a finite number in [0, 1000] latent tokens (0: no smoothing), got nan"),
    (["--sigma", "1e300"], "--sigma must be a finite number in [0, 1000] latent tokens (0: no smoothing), got 1e+300"),
    (["--threshold", "fixed", "--threshold-value", "2"], "--threshold-value: rule 'fixed' takes a value in [0, 1]"),
    (["--threshold", "top", "--threshold-value", "0"], "--threshold-value: rule 'top' takes a value in (0, 1]"),
    (["--threshold", "top", "--threshold-value", "nan"], "(0, 1] (a fraction of tokens), got nan"),
])
def test_bad_iid_options_exit_2_before_sampling(tmp_path, input_png, args, message):
    """Named option, accepted range, exit 2: no traceback, nothing sampled or written."""
    out = tmp_path / "out"
    res = run_cli("edit", "--image", input_png, "--instruction", "add a tree", "--steps", "2", "--size", "32",
                  "--no-progress", "--device", "cpu", "--out", str(out), *args, timeout=120)
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert message in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert not out.exists()


def test_layout_with_headrouter_is_refused(input_png):
    res = run_cli("edit", "--image", input_png, "--method", "headrouter", "--source", "a house", "--target",
                  "a castle", "--layout", "concat", timeout=60)
    assert res.returncode == 2 and "--layout" in res.stderr and "headrouter" in res.stderr, res.stderr


def test_the_cli_bounds_steps_as_the_pipelines_do():
    from iidkern import cli
    from iidkern.edit import iid, pipeline
    assert cli.MAX_STEPS == pipeline.MAX_STEPS
    assert cli.MAX_IID_INSTRUCTIONS == iid.MAX_MASKED_INSTRUCTIONS


@pytest.mark.parametrize("seed", [-2**63 - 1, -2**63, -1, 0, 2**63, 2**64 - 1, 2**64])
def test_the_cli_bounds_seeds_as_the_pipelines_do(tmp_path, seed):
    """The CLI keeps its own copy of the seed range (``--help`` imports no torch): at and
    around both ends it accepts exactly the seeds the pipelines accept."""
    import argparse

    from iidkern import cli
    from iidkern.edit import pipeline

    class Refuse(argparse.ArgumentParser):
        def error(self, message):
            raise ValueError(message)

    args = argparse.Namespace(steps=1, size=0, device=None, seed=seed, out=str(tmp_path / "out"))
    try:
        cli._check_run_args(Refuse(), args)
        cli_accepts = True
    except ValueError as e:
        assert "--seed" in str(e)
        cli_accepts = False
    try:
        pipeline._check_run(1, seed)
        pipeline_accepts = True
    except ValueError:
        pipeline_accepts = False
    assert cli_accepts == pipeline_accepts == (-2**63 <= seed < 2**64)


def test_bench_on_cpu_says_it_needs_a_gpu():
    res = run_cli("bench", timeout=60)
    assert res.returncode == 1 and "GPU" in res.stderr


def test_edit_with_a_local_model_directory(tmp_path, input_png):
    """--model DIR goes through the runner's strict loader; missing encoders are a clear exit-2 error."""
    import json as _json

    from iidkern.mmdit import FluxConfig, FluxTransformer, save_weights

    cfg = FluxConfig.tiny(in_channels=32, out_channels=16, num_layers=2, num_single_layers=1)
    (tmp_path / "model" / "transformer").mkdir(parents=True)
    save_weights(FluxTransformer.random(cfg, seed=4), tmp_path / "model" / "transformer" / "model.safetensors")
    (tmp_path / "model" / "transformer" / "config.json").write_text(_json.dumps(cfg.to_dict()))
    common = ["edit", "--image", input_png, "--instruction", "add a tree", "--model", str(tmp_path / "model"),
              "--steps", "2", "--size", "64", "--no-progress", "--device", "cpu", "--out", str(tmp_path / "out")]
    res = run_cli(*common)
    assert res.returncode == 2 and "no text encoders" in res.stderr and "--allow-stand-ins" in res.stderr
    res = run_cli(*common, "--allow-stand-ins")
    assert res.returncode == 0, res.stderr
    assert_png(tmp_path / "out" / "edited.png", (64, 64))
    assert not _json.loads((tmp_path / "out" / "timings.json").read_text())["tiny_random_model"]
    (tmp_path / "model" / "transformer" / "config.json").write_text(_json.dumps({**cfg.to_dict(), "num_layers": 3}))
    res = run_cli(*common, "--allow-stand-ins")  # weights that do not fit the config: the strict loader's report
    assert res.returncode == 2 and "missing keys" in res.stderr
    (tmp_path / "model" / "transformer" / "config.json").write_text("{bad")
    res = run_cli(*common, "--allow-stand-ins")  # malformed JSON: the file is named
    assert res.returncode == 2 and "transformer/config.json' is not valid JSON" in res.stderr, res.stderr
    (tmp_path / "model" / "transformer" / "config.json").write_text(_json.dumps(cfg.to_dict()))
    for name in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):  # present but empty
        (tmp_path / "model" / name).mkdir()
    res = run_cli(*common, "--allow-stand-ins")  # (the VAE is a stand-in; the text encoders are not)
    assert res.returncode == 2 and "cannot load its text encoders or VAE" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    weights = tmp_path / "model" / "transformer" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    res = run_cli(*common, "--allow-stand-ins")
    assert res.returncode == 2 and "cannot read the weights file" in res.stderr and "Traceback" not in res.stderr


def test_a_model_directory_without_the_optional_dependencies_says_which(tmp_path, monkeypatch):
    """A base install (no transformers / diffusers) loading real text encoders: a ValueError
    naming the extra to install (the CLI turns it into exit 2), not a ModuleNotFoundError."""
    import json as _json

    from iidkern.edit import models
    from iidkern.mmdit import FluxConfig, FluxTransformer, save_weights

    cfg = FluxConfig.tiny(in_channels=32, out_channels=16, num_layers=1, num_single_layers=1)
    (tmp_path / "transformer").mkdir()
    save_weights(FluxTransformer.random(cfg, seed=4), tmp_path / "transformer" / "model.safetensors")
    (tmp_path / "transformer" / "config.json").write_text(_json.dumps(cfg.to_dict()))
    for name in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
        (tmp_path / name).mkdir()

    def no_transformers(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'transformers'")

    monkeypatch.setattr(models.FluxPromptEncoder, "from_pretrained", no_transformers)
    with pytest.raises(ValueError, match=r"needs the optional dependencies: pip install 'iidkern\[diffusers\]' "
                                         r"\(No module named 'transformers'\)"):
        models.EditModel.from_dir(tmp_path, device="cpu", stand_ins=True)
