"""Turn a benchmark run into ``RESULTS.md`` (tables, issue-5 targets) and a PNG plot.

    python -m bench.render --json bench.json [--records bench_records.jsonl]
        [--first-call first_call.jsonl] [--out bench/RESULTS.md] [--plot bench/attention_bench.png]
        [--command "bash bench/gpu_run.sh"] [--tests-summary "..."] [--summary]

Inputs: the pytest-benchmark JSON (``--benchmark-json``) and/or the line-per-case records
(``BENCH_RECORDS``; they survive a run cut off by a time limit and also list skipped
cases). Every number comes from each case's ``extra_info`` (see bench/test_attention_bench.py):
``median_ms`` is the median of per-call CUDA-event times, ``graph_median_ms`` the same
from CUDA-graph replays. Standard library only; the plot needs matplotlib and is skipped
with a message without it.

Hand-written notes survive a render: a block between ``<!-- notes:NAME -->`` and
``<!-- /notes:NAME -->`` in the existing ``--out`` file (NAME: ``header``, after the run's
facts; ``targets``, after the targets table and the plot) is carried into the new file at
the same place (``--fresh`` drops them; they describe the run they were written for, so
update them). With no ``--json`` / ``--records`` file found, or no timed case in them, it
writes nothing and fails (exit 2 / 1); a missing file beside a found one is left out, with a
message.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

SHAPE_ORDER = ["flux_256", "flux_512", "flux_1024", "flux_edit", "flux_2048", "sd3_256", "sd3_512", "sd3_1024",
               "sd3_2048", "flux_1024_b2"]
FEATURE_ORDER = ["plain", "probe", "tags_0", "tags_50", "tags_75", "tags_iid", "head_weights", "block_mult",
                 "pair_stats"]
IMPL_ORDER = ["iidkern", "iidkern_triton", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "flex", "sdpa_cudnn+torch",
              "naive"]
REFERENCE_IMPL = "sdpa_cudnn"
# Issue 5 targets.
PLAIN_VS_CUDNN = 1.00
PROBE_OVERHEAD = 1.10
TAGS_ZERO_OVERHEAD = 1.05
TAGS_EFFICIENCY = 0.80
EXTRA_OVERHEAD = 1.03
PROBE_MEMORY_SLACK_ROWS = 4  # "O(B*H*N)": allow this many fp32 [B, H, N] buffers beyond the probe outputs
MIB = 2 ** 20


NOTE_SLOTS = ("header", "targets")
_NOTE_MARKER = re.compile(r"<!--\s*(?P<close>/?)notes:(?P<name>[\w.-]+)\s*-->")
_NOTE_MARKER_LIKE = re.compile(r"<!--\s*/?\s*notes\b")  # what a reader would take for a marker


def read_notes(text: str) -> Dict[str, str]:
    """The hand-written blocks of a rendered file, by name (their bodies, without the markers
    and the line break after the opening one). A marker that does not parse, a block opened
    inside another or twice, or one left open, is a ValueError: its notes would be lost."""
    markers = list(_NOTE_MARKER.finditer(text))
    if len(markers) != len(_NOTE_MARKER_LIKE.findall(text)):
        raise ValueError("a notes marker does not read '<!-- notes:NAME -->' / '<!-- /notes:NAME -->'")
    notes, opened = {}, None
    for m in markers:
        name = m["name"]
        if not m["close"]:
            if opened is not None:
                raise ValueError(f"notes block {name!r} opens inside block {opened[0]!r}")
            if name in notes:
                raise ValueError(f"notes block {name!r} appears twice")
            opened = (name, m.end())
        elif opened is None or opened[0] != name:
            raise ValueError(f"'<!-- /notes:{name} -->' closes a block that is not open")
        else:
            body = text[opened[1]:m.start()]
            notes[name] = body[2:] if body.startswith("\r\n") else body[1:] if body.startswith("\n") else body
            opened = None
    if opened is not None:
        raise ValueError(f"notes block {opened[0]!r} is never closed")
    return notes


def _note_lines(notes: Optional[Dict[str, str]], slot: str) -> List[str]:
    body = (notes or {}).get(slot)
    if not body:
        return []
    return [f"<!-- notes:{slot} -->", body.rstrip("\n"), f"<!-- /notes:{slot} -->"]


# --------------------------------------------------------------------------- loading
@dataclass
class Results:
    env: dict = field(default_factory=dict)
    cases: Dict[str, dict] = field(default_factory=dict)  # id -> extra_info
    skips: List[dict] = field(default_factory=list)  # records of kind skip / error
    first_call: List[dict] = field(default_factory=list)  # first_call.jsonl lines

    def find(self, shape: str, dtype: str, feature: str, impl: str) -> Optional[dict]:
        for c in self.cases.values():
            if (c["shape"], c["dtype"], c["feature"], c["impl"]) == (shape, dtype, feature, impl):
                return c
        return None


def _read_jsonl(path: Path) -> List[dict]:
    lines = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut off by a killed run
    return lines


def load_results(json_path: Optional[Path] = None, records_path: Optional[Path] = None,
                 first_call_path: Optional[Path] = None) -> Results:
    res = Results()
    if records_path is not None and Path(records_path).exists():
        for rec in _read_jsonl(Path(records_path)):
            kind = rec.get("kind")
            if kind == "environment":
                res.env = {k: v for k, v in rec.items() if k != "kind"}
            elif kind == "case":
                res.cases[rec["id"]] = rec
            elif kind in ("skip", "error"):
                res.skips.append(rec)
    data = {}
    if json_path is not None and Path(json_path).exists():
        try:
            data = json.loads(Path(json_path).read_text())
        except json.JSONDecodeError:  # empty or cut off: the session never finished
            print(f"render: {json_path} is not valid JSON (run cut off?); using the records only")
    if data:
        env = data.get("machine_info", {}).get("iidkern_bench")
        if env:
            res.env = env
        for bench in data.get("benchmarks", []):
            info = dict(bench.get("extra_info", {}))
            if "id" not in info:
                continue
            stats = bench.get("stats") or {}
            if "median" in stats:
                info["pytest_benchmark_median_ms"] = stats["median"] * 1e3
            res.cases[info["id"]] = info
    timed = set(res.cases)
    res.skips = [s for s in res.skips if s.get("id") not in timed]
    if first_call_path is not None and Path(first_call_path).exists():
        res.first_call = _read_jsonl(Path(first_call_path))
    return res


# --------------------------------------------------------------------------- derived numbers
def _order(value, order: Sequence[str]):
    return (order.index(value), "") if value in order else (len(order), str(value))


def group_keys(res: Results) -> List[tuple]:
    keys = {(c["shape"], c["dtype"], c["feature"]) for c in res.cases.values()}
    return sorted(keys, key=lambda k: (_order(k[0], SHAPE_ORDER), k[1], _order(k[2], FEATURE_ORDER)))


def own_plain(res: Results, case: dict) -> Optional[dict]:
    """The same implementation without the feature (``sdpa_cudnn+torch`` -> ``sdpa_cudnn``)."""
    if case["feature"] == "plain" or case["impl"] == "naive":
        return None
    return res.find(case["shape"], case["dtype"], "plain", case["impl"].split("+")[0])


# Features the Hopper kernel does not have run on the Triton kernel, and "plain" for them
# means that kernel's plain time (iidkern_triton) where the suite timed it. Every timed
# feature now runs on the Hopper kernel at D=128: probes (the key-group probe in its main
# pass, the map in the probe pass after), the block multiplier and, since 2026-11-27, tags.
# Value probes and tile counts still take the Triton kernel but are not timed.
TRITON_KERNEL_FEATURES: tuple = ()


def same_kernel_plain(res: Results, shape: str, dtype: str, feature: str) -> Optional[dict]:
    """The plain iidkern case that ran on the kernel serving ``feature`` at this shape."""
    if feature in TRITON_KERNEL_FEATURES:
        pinned = res.find(shape, dtype, "plain", "iidkern_triton")
        if pinned is not None:
            return pinned
    return res.find(shape, dtype, "plain", "iidkern")


def _ratio(a: Optional[dict], b: Optional[dict], key: str) -> Optional[float]:
    if not a or not b or a.get(key) is None or b.get(key) is None or not b[key]:
        return None
    return a[key] / b[key]


def group_rows(res: Results, key: tuple) -> List[dict]:
    """One row per implementation of a (shape, dtype, feature) group, with the ratios."""
    shape, dtype, feature = key
    cudnn = res.find(shape, dtype, "plain", REFERENCE_IMPL)
    rows = []
    for c in res.cases.values():
        if (c["shape"], c["dtype"], c["feature"]) != key:
            continue
        plain = own_plain(res, c)
        rows.append({
            "impl": c["impl"],
            "median_ms": c.get("median_ms"),
            "graph_ms": c.get("graph_median_ms"),
            "tflops": c.get("tflops"),
            "vs_cudnn": _ratio(c, cudnn, "median_ms"),
            "vs_cudnn_graph": _ratio(c, cudnn, "graph_median_ms"),
            "vs_own_plain": _ratio(c, plain, "median_ms"),
            "peak_mib": c["peak_mem_bytes"] / MIB if c.get("peak_mem_bytes") is not None else None,
            "first_call_s": c.get("first_call_s"),
            "check": _check_text(c),
            "notes": _notes(c),
        })
    rows.sort(key=lambda r: _order(r["impl"], IMPL_ORDER))
    return rows


def _check_text(c: dict) -> str:
    errors = c.get("check_errors")
    if not errors:
        return c.get("check_against", "—").split(" (")[0]
    worst = max(errors.values())
    return ("ok " if c.get("check_ok") else "**FAIL** ") + f"{worst:.1e}"


def _notes(c: dict) -> str:
    notes = []
    if c["impl"] == "iidkern" and c.get("tile_sparsity") is not None:
        shape = "x".join(str(t) for t in c.get("tile_shape", ()))
        notes.append(f"tiles skipped {100 * c['tile_sparsity']:.1f}%" + (f" ({shape})" if shape else ""))
    if c["impl"] == "flex" and c.get("flex_block_sparsity") is not None:
        notes.append(f"blocks skipped {100 * c['flex_block_sparsity']:.1f}%")
    if c["impl"].startswith("sdpa") and c.get("element_sparsity") is not None:
        notes.append(f"dense mask, {100 * c['element_sparsity']:.1f}% of pairs masked")
    if c.get("graph_error"):
        notes.append("no graph: " + c["graph_error"][:80])
    return "; ".join(notes)


@dataclass
class Target:
    target: str
    case: str
    value: str
    bound: str
    verdict: str  # "met" | "missed" | "not measured" | "info"


def _verdict(ok: Optional[bool]) -> str:
    return "not measured" if ok is None else ("met" if ok else "missed")


def paired(case: Optional[dict], baseline_impl: str) -> Optional[Tuple[float, Optional[float]]]:
    """(eager, graph) ratio of ``case`` over ``baseline_impl`` from calls interleaved in the
    case itself (bench/timing.paired_ratios), or None where the suite did not pair them."""
    if not case or case.get("paired_baseline") != baseline_impl or case.get("paired_ratio") is None:
        return None
    return case["paired_ratio"], case.get("paired_graph_ratio")


HOST_BOUND_MS = 0.15  # GPU work per call under ~3x the ~50 us host time of a launched call


def host_bound(reference: Optional[dict]) -> bool:
    """Whether a shape's calls are too short for launched-call times to show GPU time."""
    return bool(reference) and reference.get("graph_median_ms") is not None and \
        reference["graph_median_ms"] < HOST_BOUND_MS


def _paired_text(r: float, rg: Optional[float], separate: Optional[float], fmt: str, unit: str) -> str:
    """A paired ratio as the targets table shows it: the paired graph ratio and the ratio of
    the separately timed medians beside it, where measured."""
    return f"{r:{fmt}}{unit} paired" + (f" (graph {rg:{fmt}}x)" if rg is not None else "") + \
        (f"; separate medians {separate:{fmt}}x" if separate is not None else "")


def targets(res: Results) -> List[Target]:
    """The issue's targets. Ratios come from the interleaved pairs where the suite measured
    them (steadier: drift between separately timed cases cancels), else from the cases'
    separate medians; the text names which, and shows the separate ratio beside a pair."""
    out: List[Target] = []
    # 1. plain <= cuDNN
    for shape, dtype, feature in group_keys(res):
        if feature != "plain":
            continue
        mine, ref = res.find(shape, dtype, "plain", "iidkern"), res.find(shape, dtype, "plain", REFERENCE_IMPL)
        r = _ratio(mine, ref, "median_ms")
        rg = _ratio(mine, ref, "graph_median_ms")
        pair = paired(mine, REFERENCE_IMPL)
        if pair is not None:
            separate = r
            r, rg = pair[0], pair[1] if pair[1] is not None else rg
            value = _paired_text(r, rg, separate, ".2f", "x cuDNN")
        else:
            value = "—" if r is None else f"{r:.2f}x cuDNN" + (f" (graph {rg:.2f}x)" if rg is not None else "")
        if host_bound(ref) and rg is not None:
            # Launched calls this short measure the host paths (iidkern's and cuDNN's launch
            # overhead), not the kernels: the verdict takes the graph ratio, the GPU time.
            r = rg
            value += "; host-bound, verdict on graph"
        out.append(Target("1 plain <= cuDNN", f"{shape} {dtype}", value, f"<= {PLAIN_VS_CUDNN:.2f}x",
                          _verdict(None if r is None else r <= PLAIN_VS_CUDNN)))
    features = {k[2] for k in group_keys(res)}
    feature_shapes = sorted({(k[0], k[1]) for k in group_keys(res) if k[2] != "plain"},
                            key=lambda sd: (_order(sd[0], SHAPE_ORDER), sd[1]))

    def pair_of(shape, dtype, feature):
        mine, plain = res.find(shape, dtype, feature, "iidkern"), same_kernel_plain(res, shape, dtype, feature)
        # A pair's baseline is iidkern's plain call: it stands for the plain only where that is it.
        return paired(mine, "iidkern") if plain is not None and plain["impl"] == "iidkern" else None

    def overhead(shape, dtype, feature):
        mine = res.find(shape, dtype, feature, "iidkern")
        pair = pair_of(shape, dtype, feature)
        return mine, pair[0] if pair is not None else _ratio(mine, same_kernel_plain(res, shape, dtype, feature),
                                                             "median_ms")

    def overhead_text(shape, dtype, feature, r):
        # The verdict stays on the launched-calls ratio; the graph ratio beside it shows how
        # much of a gap is run-to-run noise or host time rather than kernel time.
        mine, plain = res.find(shape, dtype, feature, "iidkern"), same_kernel_plain(res, shape, dtype, feature)
        rg = _ratio(mine, plain, "graph_median_ms")
        pair = pair_of(shape, dtype, feature)
        if pair is not None:
            separate = _ratio(mine, plain, "median_ms")
            rg = pair[1] if pair[1] is not None else rg
            return _paired_text(r, rg, separate, ".3f", "x")
        text = "—" if r is None else f"{r:.3f}x" + (f" (graph {rg:.3f}x)" if rg is not None else "")
        fastest = res.find(shape, dtype, "plain", "iidkern")
        if r is not None and plain is not fastest:
            vs_hopper = _fmt(_ratio(mine, fastest, "median_ms"), ".3f")
            text += f" of the Triton kernel's plain; {vs_hopper}x the Hopper plain"
        return text

    for shape, dtype in feature_shapes:
        if "probe" in features and res.find(shape, dtype, "probe", "iidkern"):
            _, r = overhead(shape, dtype, "probe")
            out.append(Target("2 probes <= 1.10x plain", f"{shape} {dtype}", overhead_text(shape, dtype, "probe", r),
                              f"<= {PROBE_OVERHEAD:.2f}x", _verdict(None if r is None else r <= PROBE_OVERHEAD)))
    for shape, dtype in feature_shapes:
        for feature in ("tags_0", "tags_50", "tags_75", "tags_iid"):
            mine, r = overhead(shape, dtype, feature)
            if mine is None:
                continue
            s = mine.get("tile_sparsity")
            if feature == "tags_0":
                out.append(Target("3 tags, 0% skipped: <= 1.05x plain", f"{shape} {dtype}",
                                  overhead_text(shape, dtype, feature, r), f"<= {TAGS_ZERO_OVERHEAD:.2f}x",
                                  _verdict(None if r is None else r <= TAGS_ZERO_OVERHEAD)))
                continue
            eff = None if r is None or not s else (1.0 - r) / s
            how = " (paired)" if pair_of(shape, dtype, feature) is not None else ""
            value = "—" if eff is None else f"{r:.3f}x plain{how} at {100 * s:.1f}% skipped: {eff:.2f} of ideal saving"
            verdict = _verdict(None if eff is None else eff >= TAGS_EFFICIENCY)
            out.append(Target(f"3 tags {feature[5:]}: >= 0.8 of ideal saving", f"{shape} {dtype}", value,
                              f">= {TAGS_EFFICIENCY:.2f}", verdict if feature == "tags_50" else "info: " + verdict))
    for shape, dtype in feature_shapes:
        for feature in ("head_weights", "block_mult", "pair_stats"):
            mine, r = overhead(shape, dtype, feature)
            if mine is None:
                continue
            out.append(Target(f"4 {feature} <= 1.03x plain", f"{shape} {dtype}", overhead_text(shape, dtype, feature, r),
                              f"<= {EXTRA_OVERHEAD:.2f}x", _verdict(None if r is None else r <= EXTRA_OVERHEAD)))
    for shape, dtype in feature_shapes:
        mine = res.find(shape, dtype, "probe", "iidkern")
        plain = res.find(shape, dtype, "plain", "iidkern")
        if mine is None:
            continue
        if plain is None or mine.get("peak_mem_bytes") is None or plain.get("peak_mem_bytes") is None:
            out.append(Target("5 probe memory", f"{shape} {dtype}", "—", "—", "not measured"))
            continue
        extra = mine["peak_mem_bytes"] - plain["peak_mem_bytes"]
        rows = PROBE_MEMORY_SLACK_ROWS * 4 * mine["batch"] * mine["heads"] * mine["n_q"]
        bound = mine.get("probe_output_bytes", 0) + rows
        naive = res.find(shape, dtype, "probe", "naive")
        naive_txt = f"; naive +{naive['peak_mem_bytes'] / MIB:.0f} MiB" if naive and naive.get("peak_mem_bytes") else ""
        out.append(Target("5 probe extra memory <= outputs + O(BHN)", f"{shape} {dtype}",
                          f"{extra / MIB:+.1f} MiB over plain{naive_txt}", f"<= {bound / MIB:.1f} MiB",
                          _verdict(extra <= bound)))
    cold = next((f for f in res.first_call if f.get("label") == "cold"), None)
    warm = next((f for f in res.first_call if f.get("label") == "warm"), None)
    if cold and warm:
        c, w = cold.get("total_first_s"), warm.get("total_first_s")
        out.append(Target("6 compile cached across processes", "first calls (see table)",
                          f"cold {c:.1f} s, warm {w:.1f} s", "warm < cold", _verdict(w < c)))
    else:
        out.append(Target("6 compile cached across processes", "—", "—", "warm < cold", "not measured"))
    return out


# --------------------------------------------------------------------------- markdown
def _fmt(x: Optional[float], spec: str, suffix: str = "") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return format(x, spec) + suffix


def _cell(value) -> str:
    """Table-safe text: no column separators or line breaks from error messages."""
    return " ".join(str(value).replace("|", "/").split())


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


GROUP_HEADER = ("impl", "median ms", "graph ms", "TFLOP/s", "x cuDNN", "x cuDNN (graph)", "x own plain",
                "peak MiB", "first call s", "check", "notes")


def _group_table(res: Results, key: tuple) -> List[str]:
    rows = [(r["impl"], _fmt(r["median_ms"], ".3f"), _fmt(r["graph_ms"], ".3f"), _fmt(r["tflops"], ".0f"),
             _fmt(r["vs_cudnn"], ".2f"), _fmt(r["vs_cudnn_graph"], ".2f"), _fmt(r["vs_own_plain"], ".3f"),
             _fmt(r["peak_mib"], ".1f"), _fmt(r["first_call_s"], ".2f"), r["check"], r["notes"])
            for r in group_rows(res, key)]
    return _table(GROUP_HEADER, rows)


def _shape_text(c: dict) -> str:
    return (f"B={c['batch']}, H={c['heads']}, {c['text']} text + {c['image']} image = {c['n_q']} tokens, "
            f"D={c['head_dim']}")


def render_markdown(res: Results, command: str = "bash bench/gpu_run.sh", tests_summary: str = "",
                    plot_name: Optional[str] = None, notes: Optional[Dict[str, str]] = None) -> str:
    """The markdown of ``res``; ``notes``: hand-written blocks by slot (see :data:`NOTE_SLOTS`)."""
    env = res.env
    lines = ["# iidkern benchmark results", "",
             f"- device: {env.get('gpu', '?')} ({env.get('sm_count', '?')} SMs, {env.get('gpu_memory_gib', '?')} GiB, "
             f"L2 {env.get('l2_mib', '?')} MiB, driver {env.get('driver', '?')})",
             f"- software: torch {env.get('torch', '?')}, triton {env.get('triton', '?')}, "
             f"CUDA {env.get('cuda', '?')}, cuDNN {env.get('cudnn', '?')}, Python {env.get('python', '?')}",
             f"- date: {env.get('date_utc', '?')}",
             f"- reproduce: `{command}`"]
    if tests_summary:
        lines.append(f"- GPU tests (`python -m pytest -m cuda tests`): {tests_summary}")
    lines += _note_lines(notes, "header")
    lines += ["", "Times are medians of per-call CUDA-event times with calls launched back to back "
                  "(inputs rotated when they fit in L2); *graph* times replay the same calls from a CUDA graph "
                  "(no Python launch overhead). TFLOP/s = 4·B·H·Nq·Nk·D / median time (dense-equivalent, "
                  "also for masked cases). *x cuDNN*: time over SDPA cuDNN's plain time at the same shape and "
                  "dtype; *x own plain*: over the same implementation without the feature. Peak MiB: growth of "
                  "`max_memory_allocated` during one call, outputs included. *check*: largest relative error "
                  "against an independent implementation (SDPA + PyTorch ops, or the naive path for maps).", ""]

    lines += ["## Issue 5 targets", ""]
    lines += _table(("target", "case", "measured", "bound", "verdict"),
                    [(t.target, t.case, t.value, t.bound, f"**{t.verdict}**" if t.verdict == "missed" else t.verdict)
                     for t in targets(res)])
    lines.append("")

    if plot_name:
        lines += [f"![time vs sequence length]({plot_name})", ""]
    if _note_lines(notes, "targets"):
        lines += _note_lines(notes, "targets") + [""]

    lines += ["## Results by shape and feature", ""]
    current_shape = None
    for key in group_keys(res):
        shape, dtype, feature = key
        if shape != current_shape:
            sample = next(c for c in res.cases.values() if c["shape"] == shape)
            lines += [f"### {shape} ({_shape_text(sample)})", ""]
            current_shape = shape
        lines += [f"**{feature}**, {dtype}", ""] + _group_table(res, key) + [""]

    if res.first_call:
        lines += ["## First-call (compile) cost of iidkern in a fresh process", "",
                  "Same cases in two fresh processes sharing one Triton cache directory: *cold* compiles, "
                  "*warm* loads the cached kernels.", ""]
        names = sorted({n for f in res.first_call for n in f.get("cases", {})})
        rows = []
        for n in names:
            row = [n]
            for label in ("cold", "warm"):
                f = next((x for x in res.first_call if x.get("label") == label), {})
                row.append(_fmt(f.get("cases", {}).get(n, {}).get("first_s"), ".2f"))
            f = next((x for x in res.first_call if x.get("label") == "warm"), {})
            row.append(_fmt(f.get("cases", {}).get(n, {}).get("second_ms"), ".3f"))
            rows.append(row)
        lines += _table(("case", "cold first call s", "warm first call s", "next call ms"), rows) + [""]

    if res.skips:
        lines += ["## Skipped or failed cases", ""]
        lines += _table(("case", "kind", "reason"),
                        [(s.get("id", "?"), s.get("kind", "?"), str(s.get("reason", ""))[:300])
                         for s in res.skips]) + [""]
    return "\n".join(lines) + "\n"


def summary_text(res: Results) -> str:
    """A short plain-text table for the end of the device log."""
    lines = [f"{'target':42s} {'case':22s} {'verdict':13s} measured"]
    for t in targets(res):
        lines.append(f"{t.target[:42]:42s} {t.case[:22]:22s} {t.verdict[:13]:13s} {t.value}")
    lines.append(f"{len(res.cases)} cases timed, {len(res.skips)} skipped/failed")
    return "\n".join(lines)


# --------------------------------------------------------------------------- plot
def write_plot(res: Results, path: Path, dtype: str = "bf16") -> str:
    """Time and TFLOP/s vs sequence length for plain attention at the Flux-family shapes
    (B=1, D=128), one line per implementation. Returns a message (written, or why not)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed"
    series: Dict[str, List[tuple]] = {}
    for c in res.cases.values():
        if (c["feature"] == "plain" and c["dtype"] == dtype and c["batch"] == 1 and c["head_dim"] == 128
                and c.get("median_ms")):
            series.setdefault(c["impl"], []).append((c["n_q"], c["median_ms"], c.get("tflops")))
    if not series:
        return "plot skipped: no plain bf16 Flux-family cases in the results"
    fig, (ax_t, ax_f) = plt.subplots(1, 2, figsize=(12, 4.5))
    for impl in sorted(series, key=lambda i: _order(i, IMPL_ORDER)):
        pts = sorted(series[impl])
        ax_t.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
        ax_f.plot([p[0] for p in pts], [p[2] or 0 for p in pts], marker="o", label=impl)
    ax_t.set(xscale="log", yscale="log", xlabel="tokens (512 text + image)", ylabel="median ms",
             title=f"plain attention, H=24, D=128, {dtype}")
    ax_f.set(xscale="log", xlabel="tokens (512 text + image)", ylabel="TFLOP/s", title="throughput")
    for ax in (ax_t, ax_f):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(res.env.get("gpu", ""))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot written to {path}"


# --------------------------------------------------------------------------- main
def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="pytest-benchmark JSON (--benchmark-json)")
    ap.add_argument("--records", type=Path, help="BENCH_RECORDS line-per-case file")
    ap.add_argument("--first-call", type=Path, help="first_call.jsonl from bench/first_call.py")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    ap.add_argument("--plot", type=Path, help="PNG path (the markdown links it by file name)")
    ap.add_argument("--command", default="bash bench/gpu_run.sh")
    ap.add_argument("--tests-summary", default="")
    ap.add_argument("--summary", action="store_true", help="print the short targets table")
    ap.add_argument("--fresh", action="store_true",
                    help="do not carry the hand-written <!-- notes:NAME --> blocks of an existing --out over")
    args = ap.parse_args(argv)
    if args.json is None and args.records is None:
        ap.error("give --json and/or --records")
    # bench/gpu_run.sh names every file; a cut-off run may not have written each of them.
    given = [(option, path) for option, path in (("--json", args.json), ("--records", args.records),
                                                 ("--first-call", args.first_call)) if path is not None]
    missing = [f"{option} {path}" for option, path in given if not path.is_file()]
    if not [path for option, path in given if option != "--first-call" and path.is_file()]:
        ap.error(f"no input file to render: {', '.join(missing)} not found")
    if missing:
        print(f"render: not found, left out: {', '.join(missing)}", file=sys.stderr)
    res = load_results(args.json, args.records, args.first_call)
    if not res.cases:
        print(f"render: no timed cases in the inputs; {args.out} left as it was", file=sys.stderr)
        return 1
    notes = {}
    if not args.fresh and args.out.is_file():
        try:
            notes = read_notes(args.out.read_text())
        except ValueError as error:
            ap.error(f"{args.out}: {error} (fix it, or pass --fresh to drop every notes block)")
        unknown = sorted(set(notes) - set(NOTE_SLOTS))
        if unknown:
            ap.error(f"{args.out} has notes blocks {unknown} with no slot in the render (slots: {list(NOTE_SLOTS)}); "
                     f"rename them, or pass --fresh to drop every block")
        if notes:
            print(f"render: carried the hand-written notes {sorted(notes)} of {args.out} over: update them for this run")
    plot_name = None
    if args.plot is not None:
        message = write_plot(res, args.plot)
        print(message)
        if message.startswith("plot written"):
            plot_name = args.plot.name
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render_markdown(res, args.command, args.tests_summary, plot_name, notes))
    print(f"results written to {args.out}")
    if args.summary:
        print(summary_text(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
