"""bench/render.py on small synthetic benchmark outputs (CPU, fast): the tables carry the
right numbers and ratios, the issue-5 targets get the right verdicts, cut-off runs and
skipped cases are handled, and the plot is optional."""
import json
import random
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ lives in the checkout, it is not installed with the package
    sys.path.insert(0, str(ROOT))
from bench import render  # noqa: E402


def _case(shape, dtype, feature, impl, median_ms, **extra):
    batch, heads, tokens, head_dim = extra.pop("dims", (1, 24, 4608, 128))
    info = {"kind": "case", "id": f"{shape}-{dtype}-{feature}-{impl}", "group": f"{shape} {dtype} {feature}",
            "shape": shape, "dtype": dtype, "feature": feature, "impl": impl, "batch": batch, "heads": heads,
            "n_q": tokens, "n_k": tokens, "head_dim": head_dim, "text": 512, "image": tokens - 512,
            "median_ms": median_ms,
            "tflops": 4 * batch * heads * tokens * tokens * head_dim / (median_ms * 1e-3) / 1e12}
    info.update(extra)
    return info


@pytest.fixture
def synthetic():
    """Random times with known relations: probe 1.05x plain, head weights 1.2x plain, tags
    at 50% tiles skipped at 0.55x plain (efficiency 0.9)."""
    rng = random.Random()
    cudnn = rng.uniform(0.3, 0.6)
    plain = cudnn * rng.uniform(0.8, 1.3)
    flash = cudnn * rng.uniform(1.2, 2.0)
    naive = plain * rng.uniform(8, 15)
    peak_plain = rng.randint(20, 40) * render.MIB
    probe_bytes = rng.randint(8, 12) * render.MIB
    cases = [
        _case("flux_1024", "bf16", "plain", "iidkern", plain, graph_median_ms=plain * 0.97, peak_mem_bytes=peak_plain,
              first_call_s=rng.uniform(1, 5), check_errors={"out": 3e-3}, check_ok=True),
        _case("flux_1024", "bf16", "plain", "sdpa_cudnn", cudnn, graph_median_ms=cudnn * 0.99,
              peak_mem_bytes=peak_plain, check_against="self (reference)"),
        _case("flux_1024", "bf16", "plain", "sdpa_flash", flash, peak_mem_bytes=peak_plain),
        _case("flux_1024", "bf16", "probe", "iidkern", plain * 1.05, graph_median_ms=plain * 0.97 * 1.08,
              peak_mem_bytes=peak_plain + probe_bytes,
              probe_output_bytes=probe_bytes, check_errors={"out": 2e-3, "probe0": 1e-3}, check_ok=True),
        _case("flux_1024", "bf16", "probe", "naive", naive, peak_mem_bytes=5 * 2**30),
        _case("flux_1024", "bf16", "tags_50", "iidkern", plain * 0.55, tile_sparsity=0.5,
              check_errors={"out": 0.5}, check_ok=False),
        _case("flux_1024", "bf16", "head_weights", "iidkern", plain * 1.2),
        _case("flux_1024", "bf16", "head_weights", "sdpa_cudnn+torch", cudnn * 1.1),
    ]
    return {"cudnn": cudnn, "plain": plain, "flash": flash, "naive": naive, "cases": cases,
            "peak_plain": peak_plain, "probe_bytes": probe_bytes}


def _bench_json(cases, gpu="NVIDIA H100 80GB HBM3"):
    env = {"gpu": gpu, "torch": "2.11.0", "triton": "3.6.0", "date_utc": "2026-11-23 01:00 UTC", "sm_count": 132}
    return {"machine_info": {"iidkern_bench": env},
            "benchmarks": [{"group": c["group"], "name": c["id"], "extra_info": c,
                            "stats": {"median": c["median_ms"] * 1e-3}} for c in cases]}


def _write(tmp_path, data, name="bench.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def _rows(res, key):
    return {r["impl"]: r for r in render.group_rows(res, key)}


def test_group_rows_carry_times_and_ratios(tmp_path, synthetic):
    res = render.load_results(_write(tmp_path, _bench_json(synthetic["cases"])))
    plain = _rows(res, ("flux_1024", "bf16", "plain"))
    assert set(plain) == {"iidkern", "sdpa_cudnn", "sdpa_flash"}
    assert plain["iidkern"]["median_ms"] == pytest.approx(synthetic["plain"])
    assert plain["iidkern"]["vs_cudnn"] == pytest.approx(synthetic["plain"] / synthetic["cudnn"])
    assert plain["iidkern"]["vs_cudnn_graph"] == pytest.approx(synthetic["plain"] * 0.97 / (synthetic["cudnn"] * 0.99))
    assert plain["sdpa_flash"]["vs_cudnn"] == pytest.approx(synthetic["flash"] / synthetic["cudnn"])
    assert plain["sdpa_flash"]["vs_cudnn_graph"] is None  # flash has no graph time
    assert plain["sdpa_cudnn"]["vs_cudnn"] == pytest.approx(1.0)
    assert plain["iidkern"]["vs_own_plain"] is None

    probe = _rows(res, ("flux_1024", "bf16", "probe"))
    assert probe["iidkern"]["vs_own_plain"] == pytest.approx(1.05)
    assert probe["naive"]["vs_own_plain"] is None
    assert probe["naive"]["vs_cudnn"] == pytest.approx(synthetic["naive"] / synthetic["cudnn"])
    hw = _rows(res, ("flux_1024", "bf16", "head_weights"))
    assert hw["sdpa_cudnn+torch"]["vs_own_plain"] == pytest.approx(1.1)  # own plain = sdpa_cudnn
    assert hw["iidkern"]["vs_own_plain"] == pytest.approx(1.2)


def test_markdown_tables_show_the_numbers(tmp_path, synthetic):
    res = render.load_results(_write(tmp_path, _bench_json(synthetic["cases"])))
    md = render.render_markdown(res, command="bash bench/gpu_run.sh", tests_summary="12 passed in 3.0s")
    assert "NVIDIA H100 80GB HBM3" in md and "torch 2.11.0" in md and "triton 3.6.0" in md
    assert "2026-11-23" in md and "`bash bench/gpu_run.sh`" in md and "12 passed in 3.0s" in md
    p, c = synthetic["plain"], synthetic["cudnn"]
    iid_row = next(line for line in md.splitlines() if line.startswith(f"| iidkern | {p:.3f} |"))
    cells = [x.strip() for x in iid_row.strip("|").split("|")]
    assert cells[1] == f"{p:.3f}" and cells[2] == f"{p * 0.97:.3f}"
    assert cells[3] == f"{4 * 24 * 4608 * 4608 * 128 / (p * 1e-3) / 1e12:.0f}"
    assert cells[4] == f"{p / c:.2f}"
    assert cells[7] == f"{synthetic['peak_plain'] / render.MIB:.1f}"
    assert cells[9] == "ok 3.0e-03"
    assert f"| naive | {synthetic['naive']:.3f} |" in md
    assert "**FAIL** 5.0e-01" in md  # the tags case failed its correctness check
    assert "tiles skipped 50.0%" in md


def test_targets_verdicts(tmp_path, synthetic):
    res = render.load_results(_write(tmp_path, _bench_json(synthetic["cases"])))
    by_target = {t.target: t for t in render.targets(res)}
    t1 = by_target["1 plain <= cuDNN"]
    assert t1.verdict == ("met" if synthetic["plain"] <= synthetic["cudnn"] else "missed")
    assert f"{synthetic['plain'] / synthetic['cudnn']:.2f}x cuDNN" in t1.value
    probes = by_target["2 probes <= 1.10x plain"]
    assert probes.verdict == "met"  # the verdict is on launched calls (1.05x); the graph ratio is shown
    assert probes.value == "1.050x (graph 1.080x)"
    assert by_target["4 head_weights <= 1.03x plain"].value == "1.200x"  # no graph time: none shown
    tags = by_target["3 tags 50: >= 0.8 of ideal saving"]
    assert tags.verdict == "met" and "0.90 of ideal saving" in tags.value
    assert by_target["4 head_weights <= 1.03x plain"].verdict == "missed"
    mem = by_target["5 probe extra memory <= outputs + O(BHN)"]
    assert mem.verdict == "met" and f"{synthetic['probe_bytes'] / render.MIB:+.1f} MiB" in mem.value
    assert by_target["6 compile cached across processes"].verdict == "not measured"
    summary = render.summary_text(res)
    assert "2 probes <= 1.10x plain" in summary and f"{len(synthetic['cases'])} cases timed" in summary


def test_every_timed_feature_is_compared_with_the_hopper_plain(tmp_path, synthetic):
    """Since tags run on the Hopper kernel too, every timed feature's plain is iidkern's."""
    cases = synthetic["cases"] + [_case("flux_1024", "bf16", "plain", "iidkern_triton", synthetic["plain"] * 1.25)]
    res = render.load_results(_write(tmp_path, _bench_json(cases)))
    for feature in ("tags_0", "tags_50", "probe", "block_mult", "head_weights"):
        assert render.same_kernel_plain(res, "flux_1024", "bf16", feature)["impl"] == "iidkern"
    tags = {t.target: t for t in render.targets(res)}["3 tags 50: >= 0.8 of ideal saving"]
    assert "0.550x plain" in tags.value and "Triton" not in tags.value


def test_triton_kernel_features_are_compared_with_that_kernels_plain(tmp_path, synthetic, monkeypatch):
    """A feature the Hopper kernel does not serve (tags were one until 2026-11-27) is
    measured against the Triton kernel's own plain time; probes, head weights and the
    multiplier, which the Hopper kernel serves, against the Hopper plain."""
    monkeypatch.setattr(render, "TRITON_KERNEL_FEATURES", tuple(f for f in render.FEATURE_ORDER if f.startswith("tags")))
    triton_plain = synthetic["plain"] * 1.25
    cases = synthetic["cases"] + [_case("flux_1024", "bf16", "plain", "iidkern_triton", triton_plain)]
    res = render.load_results(_write(tmp_path, _bench_json(cases)))
    by_target = {t.target: t for t in render.targets(res)}
    probe = by_target["2 probes <= 1.10x plain"]
    assert probe.value.startswith("1.050x") and "Triton" not in probe.value
    assert probe.verdict == "met"
    tags = by_target["3 tags 50: >= 0.8 of ideal saving"]
    assert f"{synthetic['plain'] * 0.55 / triton_plain:.3f}x plain" in tags.value
    assert by_target["4 head_weights <= 1.03x plain"].value == "1.200x"
    assert render.same_kernel_plain(res, "flux_1024", "bf16", "block_mult")["impl"] == "iidkern"
    assert render.same_kernel_plain(res, "flux_1024", "bf16", "tags_50")["impl"] == "iidkern_triton"
    assert render.same_kernel_plain(res, "flux_1024", "bf16", "probe")["impl"] == "iidkern"
    assert render.same_kernel_plain(res, "flux_1024", "bf16", "head_weights")["impl"] == "iidkern"
    assert render.same_kernel_plain(res, "sd3_1024", "bf16", "tags_50") is None  # nothing timed there


def test_probe_memory_over_bound_is_missed(tmp_path, synthetic):
    for c in synthetic["cases"]:
        if (c["feature"], c["impl"]) == ("probe", "iidkern"):
            c["peak_mem_bytes"] = synthetic["peak_plain"] + 10 * synthetic["probe_bytes"]
    res = render.load_results(_write(tmp_path, _bench_json(synthetic["cases"])))
    mem = next(t for t in render.targets(res) if t.target.startswith("5 "))
    assert mem.verdict == "missed"


def test_records_only_cut_off_json_skips_and_first_call(tmp_path, synthetic):
    """A run stopped by its time limit: the JSON is empty, the records hold what finished."""
    records = tmp_path / "records.jsonl"
    lines = [{"kind": "environment", "gpu": "NVIDIA H200", "torch": "2.11.0"}] + synthetic["cases"]
    lines.append({"kind": "skip", "id": "flux_1024-bf16-plain-sdpa_efficient", "reason": "efficient: no | kernel"})
    records.write_text("\n".join(json.dumps(x) for x in lines) + "\n{\"kind\": \"ca")  # last line cut off
    (tmp_path / "bench.json").write_text("")
    first_call = tmp_path / "first_call.jsonl"
    cold, warm = random.uniform(5, 20), random.uniform(0.5, 2)
    first_call.write_text("\n".join(json.dumps({"label": label, "total_first_s": t,
                                                "cases": {"flux_1024 plain": {"first_s": t, "second_ms": 0.5}}})
                                    for label, t in (("cold", cold), ("warm", warm))))
    res = render.load_results(tmp_path / "bench.json", records, first_call)
    assert len(res.cases) == len(synthetic["cases"]) and res.env["gpu"] == "NVIDIA H200"
    assert [s["id"] for s in res.skips] == ["flux_1024-bf16-plain-sdpa_efficient"]
    md = render.render_markdown(res)
    assert "efficient: no / kernel" in md  # the reason, table-safe
    assert f"| flux_1024 plain | {cold:.2f} | {warm:.2f} | 0.500 |" in md
    t6 = next(t for t in render.targets(res) if t.target.startswith("6 "))
    assert t6.verdict == "met" and f"cold {cold:.1f} s" in t6.value


def test_json_supersedes_records_and_clears_their_skips(tmp_path, synthetic):
    records = tmp_path / "records.jsonl"
    stale = dict(synthetic["cases"][0], median_ms=99.0)
    skip = {"kind": "skip", "id": synthetic["cases"][1]["id"], "reason": "was skipped in an earlier attempt"}
    records.write_text(json.dumps(stale) + "\n" + json.dumps(skip) + "\n")
    res = render.load_results(_write(tmp_path, _bench_json(synthetic["cases"])), records)
    assert res.cases[stale["id"]]["median_ms"] == pytest.approx(synthetic["plain"])
    assert res.cases[stale["id"]]["pytest_benchmark_median_ms"] == pytest.approx(synthetic["plain"])
    assert res.skips == []


def test_plot_is_optional(tmp_path, synthetic, monkeypatch):
    res = render.load_results(_write(tmp_path, _bench_json(synthetic["cases"])))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    message = render.write_plot(res, tmp_path / "plot.png")
    assert message.startswith("plot skipped") and not (tmp_path / "plot.png").exists()


def test_plot_written_when_matplotlib_is_there(tmp_path, synthetic):
    pytest.importorskip("matplotlib")
    res = render.load_results(_write(tmp_path, _bench_json(synthetic["cases"])))
    assert render.write_plot(res, tmp_path / "plot.png").startswith("plot written")
    assert (tmp_path / "plot.png").stat().st_size > 1000


def test_cli_writes_results(tmp_path, synthetic, capsys):
    out = tmp_path / "RESULTS.md"
    rc = render.main(["--json", str(_write(tmp_path, _bench_json(synthetic["cases"]))), "--out", str(out),
                      "--command", "BENCH_QUICK=1 bash bench/gpu_run.sh", "--summary"])
    assert rc == 0
    text = out.read_text()
    assert "## Issue 5 targets" in text and "`BENCH_QUICK=1 bash bench/gpu_run.sh`" in text
    assert "2 probes <= 1.10x plain" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        render.main(["--out", str(out)])  # neither --json nor --records


def test_cli_refuses_missing_inputs_and_empty_runs_without_writing(tmp_path, synthetic, capsys):
    out = tmp_path / "RESULTS.md"
    out.write_text("kept\n")
    for option in ("--json", "--records"):
        with pytest.raises(SystemExit) as exit_:
            render.main([option, str(tmp_path / "typo.jsonl"), "--first-call", str(tmp_path / "none.jsonl"),
                         "--out", str(out)])
        assert exit_.value.code == 2 and "no input file to render" in capsys.readouterr().err
    empty = _write(tmp_path, {"benchmarks": []})
    assert render.main(["--json", str(empty), "--out", str(out)]) == 1
    assert "no timed cases" in capsys.readouterr().err
    assert out.read_text() == "kept\n"
    # A run cut off before some files (bench/gpu_run.sh names them all): the rest renders.
    data = _write(tmp_path, _bench_json(synthetic["cases"]))
    assert render.main(["--json", str(data), "--records", str(tmp_path / "none.jsonl"), "--first-call",
                        str(tmp_path / "none2.jsonl"), "--out", str(out)]) == 0
    assert "left out: --records" in capsys.readouterr().err and "## Issue 5 targets" in out.read_text()


def test_hand_written_notes_survive_a_render(tmp_path, synthetic, capsys):
    """Blocks between notes markers in the existing file come back at their slot; --fresh drops them."""
    data = _write(tmp_path, _bench_json(synthetic["cases"]))
    out = tmp_path / "RESULTS.md"
    render.main(["--json", str(data), "--out", str(out)])
    header, targets = "- run 7: what changed since run 6.\n  A second line.", "### Why row 2 missed\n\nBecause."
    text = out.read_text()
    assert "notes:" not in text
    text = text.replace("\n\nTimes are medians", f"\n<!-- notes:header -->\n{header}\n<!-- /notes:header -->"
                                                  f"\n\nTimes are medians")
    text = text.replace("\n## Results by shape", f"\n<!-- notes:targets -->\n{targets}\n<!-- /notes:targets -->"
                                                  f"\n\n## Results by shape")
    out.write_text(text)
    assert render.read_notes(text) == {"header": header + "\n", "targets": targets + "\n"}
    assert render.main(["--json", str(data), "--out", str(out)]) == 0
    assert out.read_text() == text  # rendered again: the same file, notes where they were
    assert "carried the hand-written notes ['header', 'targets']" in capsys.readouterr().out
    render.main(["--json", str(data), "--out", str(out), "--fresh"])
    assert "notes:" not in out.read_text() and header not in out.read_text()
    out.write_text("<!-- notes:footer -->\nx\n<!-- /notes:footer -->\n")
    with pytest.raises(SystemExit):  # a block the render has no place for is not dropped silently
        render.main(["--json", str(data), "--out", str(out)])
    assert "notes blocks ['footer'] with no slot" in capsys.readouterr().err
    malformed = {"<!-- notes:header  -->\nx\n<!-- /notes:header -->": None,  # spaces are fine
                 "<!-- notes:header -->\r\nx\r\n<!-- /notes:header -->": None,  # so is CRLF
                 "<!-- notes:header -->\nx\n": "never closed",
                 "<!-- notes: header -->\nx\n<!-- /notes:header -->": "does not read",
                 "<!-- notes:header -->\n<!-- notes:targets -->\n<!-- /notes:targets -->": "opens inside",
                 "<!-- /notes:header -->": "not open",
                 "<!-- notes:header -->a<!-- /notes:header --><!-- notes:header -->b<!-- /notes:header -->":
                     "appears twice"}
    for text, error in malformed.items():
        if error is None:
            assert render.read_notes(text)["header"].strip() == "x"
            continue
        out.write_text(text)
        with pytest.raises(SystemExit):
            render.main(["--json", str(data), "--out", str(out)])
        assert error in capsys.readouterr().err and out.read_text() == text  # nothing written


def test_checked_in_results_keep_their_notes_when_rendered_from_their_records(tmp_path):
    """bench/RESULTS.md is the render of its run's records plus its notes blocks: rendering the
    records over a copy of it changes nothing but the plot link (no matplotlib needed here)."""
    bench = Path(render.__file__).parent
    results = (bench / "RESULTS.md").read_text()
    records = re.search(r"raw records in `bench/runs/(\S+)_\*\.jsonl`", results)
    command = re.search(r"^- reproduce: `(.+)`$", results, re.M)
    assert records and command, "RESULTS.md names its raw records and its command"
    out = tmp_path / "RESULTS.md"
    out.write_text(results)
    stem = bench / "runs" / records[1]
    render.main(["--records", f"{stem}_records.jsonl", "--first-call", f"{stem}_first_call.jsonl", "--out", str(out),
                 "--command", command[1]])
    plot = "![time vs sequence length](attention_bench.png)\n\n"
    assert out.read_text() == results.replace(plot, "")


def test_targets_read_the_interleaved_pairs_where_measured(tmp_path, synthetic):
    """A case timed against its baseline in interleaved rounds (paired_*) gives the target its
    ratio; the separate medians' ratio is shown beside it, and a case without a pair keeps it."""
    rng = random.Random()
    plain_pair, probe_pair, tags_pair = rng.uniform(0.9, 0.99), rng.uniform(1.01, 1.09), rng.uniform(0.5, 0.6)
    cases = []
    for c in synthetic["cases"]:
        c = dict(c)
        if (c["feature"], c["impl"]) == ("plain", "iidkern"):
            c.update(paired_baseline="sdpa_cudnn", paired_ratio=plain_pair, paired_graph_ratio=0.98)
        elif (c["feature"], c["impl"]) == ("probe", "iidkern"):
            c.update(paired_baseline="iidkern", paired_ratio=probe_pair)
        elif (c["feature"], c["impl"]) == ("tags_50", "iidkern"):
            c.update(paired_baseline="iidkern", paired_ratio=tags_pair)
        cases.append(c)
    res = render.load_results(_write(tmp_path, _bench_json(cases)))
    by_target = {t.target: t for t in render.targets(res)}
    plain = by_target["1 plain <= cuDNN"]
    assert plain.value.startswith(f"{plain_pair:.2f}x cuDNN paired (graph 0.98x); separate medians "
                                  f"{synthetic['plain'] / synthetic['cudnn']:.2f}x")
    assert plain.verdict == "met"
    probe = by_target["2 probes <= 1.10x plain"]
    assert probe.value.startswith(f"{probe_pair:.3f}x paired") and "separate medians 1.050x" in probe.value
    assert probe.verdict == "met"
    tags = by_target["3 tags 50: >= 0.8 of ideal saving"]
    assert tags.value.startswith(f"{tags_pair:.3f}x plain (paired) at 50.0% skipped")
    # No pair: the separate medians, as before.
    assert by_target["4 head_weights <= 1.03x plain"].value == "1.200x"
    # A pair against another baseline than the target's is not used.
    assert render.paired({"paired_baseline": "iidkern", "paired_ratio": 0.5}, "sdpa_cudnn") is None


def test_host_bound_plain_rows_take_their_verdict_from_the_graph(tmp_path):
    """Calls shorter than HOST_BOUND_MS of GPU work: the launched-call ratio compares host
    paths, so target 1 is judged on the graph ratio (both ways: a fast host does not pass a
    slow kernel, a slow host does not fail a fast one)."""
    short = render.HOST_BOUND_MS / 3
    cases = [_case("flux_256", "bf16", "plain", "iidkern", short * 0.8, graph_median_ms=short * 1.2,
                   paired_baseline="sdpa_cudnn", paired_ratio=0.8, dims=(1, 24, 768, 128)),
             _case("flux_256", "bf16", "plain", "sdpa_cudnn", short, graph_median_ms=short, dims=(1, 24, 768, 128)),
             _case("sd3_512", "bf16", "plain", "iidkern", short * 1.3, graph_median_ms=short * 0.9,
                   paired_baseline="sdpa_cudnn", paired_ratio=1.3, dims=(1, 24, 1357, 64)),
             _case("sd3_512", "bf16", "plain", "sdpa_cudnn", short, graph_median_ms=short, dims=(1, 24, 1357, 64)),
             _case("flux_1024", "bf16", "plain", "iidkern", 0.5, graph_median_ms=0.4,
                   paired_baseline="sdpa_cudnn", paired_ratio=1.02),
             _case("flux_1024", "bf16", "plain", "sdpa_cudnn", 0.45, graph_median_ms=0.45)]
    res = render.load_results(_write(tmp_path, _bench_json(cases)))
    rows = {t.case: t for t in render.targets(res) if t.target.startswith("1 ")}
    assert rows["flux_256 bf16"].verdict == "missed" and "verdict on graph" in rows["flux_256 bf16"].value
    assert rows["sd3_512 bf16"].verdict == "met"
    assert rows["flux_1024 bf16"].verdict == "missed" and "verdict on graph" not in rows["flux_1024 bf16"].value
