"""Runs the suite: ceilings, then every case at each thread count, with a progress display; prints one table and
writes JSON (pytest-benchmark's layout: machine_info + benchmarks[] with stats and extra_info) and, when matplotlib is
installed, a PNG of the speedups."""
from __future__ import annotations

import importlib
import json
import platform
import sys
import time
from typing import Any

import torch

from . import ceilings
from .case import Case
from .cases import CASE_MODULES
from .timing import measure, summarize_samples


def load_cases(quick: bool, only: list[str] | None, dtypes: list[torch.dtype] | None = None) -> list[Case]:
    """The suite's cases: all, or the quick ones; only those named in `only` (ids, id prefixes or op names); and
    among precision variants only those in `dtypes` (None: every dtype). Cases without a dtype always run."""
    cases: list[Case] = []
    for name in CASE_MODULES:
        module = importlib.import_module(f"{__package__}.cases.{name}")
        cases += module.cases()
    if dtypes is not None:
        cases = [c for c in cases if c.dtype is None or c.dtype in dtypes]
    if quick:
        cases = [c for c in cases if c.quick]
    if only:
        wanted = {o.upper() for o in only}
        cases = [c for c in cases if c.id.upper() in wanted or c.id.split("-")[0].upper() in wanted or c.op in only]
    return cases


def thread_jobs(cases: list[Case], threads: list[int] | None, quick: bool) -> list[tuple[Case, int]]:
    """(case, intra-op thread count) pairs to run, in order. Asked-for counts (`--threads`) apply to every case; by
    default a quick run uses 1 thread and a full run 1 and 2, except that cases with multi_thread=False (the models,
    serving: minutes per count) run at 1 only."""
    if threads:
        return [(c, t) for c in cases for t in threads]
    return [(c, t) for c in cases for t in ([1] if quick else [1, 2]) if t == 1 or c.multi_thread]


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _run_case(case: Case, threads: int, min_seconds: float, ceil: dict[str, float]) -> list[dict[str, Any]]:
    torch.set_num_threads(threads)
    impls = case.setup()
    ours = next(iter(impls))
    times: dict[str, float] = {}
    rows = []
    samples: dict[str, list[float]] = {}
    failed: dict[str, str] = {}
    for turn in range(case.turns):
        for impl, fn in impls.items():
            if impl in failed:
                continue
            if turn == 0:
                _progress(f"    {case.id:<8} {impl:<34} threads={threads} ...")
            try:
                stats = measure(fn, min_seconds / case.turns, min_rounds=1 if case.turns > 1 else 3,
                                warmup=turn == 0)
            except Exception as exc:  # a peer that cannot run this shape is reported, not fatal
                failed[impl] = f"{type(exc).__name__}: {exc}"
                continue
            samples.setdefault(impl, []).extend(stats["samples"])
    for impl in impls:
        if impl in failed:
            rows.append({"case": case, "impl": impl, "threads": threads, "error": failed[impl]})
            continue
        stats = summarize_samples(samples[impl])
        times[impl] = stats["median"]
        rows.append({"case": case, "impl": impl, "threads": threads, "stats": stats})
    for row in rows:
        if "stats" not in row:
            continue
        t = row["stats"]["median"]
        row["is_lookfast"] = row["impl"] == ours
        row["speedup_of_lookfast"] = (t / times[ours]) if ours in times else None
        if row["impl"] == ours:
            row["gbs"] = case.bytes / t / 1e9 if case.bytes else None
            row["gflops"] = case.flops / t / 1e9 if case.flops else None
        bar = case.bars.get(row["impl"])
        if bar is not None and row["speedup_of_lookfast"] is not None:
            row["bar"] = bar
            row["bar_met"] = row["speedup_of_lookfast"] >= bar
    notes = case.summarize(times) if case.summarize and times else []
    if rows:
        rows[0]["notes"] = notes
    del impls
    return rows


def _format_table(rows: list[dict[str, Any]], ceil: dict[str, float]) -> str:
    header = f"{'id':<12} {'op':<20} {'impl':<34} {'thr':>3} {'median ms':>10} {'lookfast x':>10} {'GB/s':>7} {'GFLOP/s':>8}  bar"
    bf16 = f", bf16 mm {ceil['mm_bf16_gflops']:.1f} GFLOP/s" if ceil.get("mm_bf16_gflops") else ""
    lines = [
        f"machine ceilings: copy {ceil['copy_gbs']:.1f} GB/s, fp32 mm {ceil['mm_gflops']:.1f} GFLOP/s{bf16} (1 thread); "
        f"matrix features: {', '.join(ceil['matrix_features']) or 'none (bf16 runs as fp32 FMAs)'}",
        header,
        "-" * len(header),
    ]
    for row in rows:
        case: Case = row["case"]
        if "error" in row:
            lines.append(f"{case.id:<12} {case.op:<20} {row['impl']:<34} {row['threads']:>3}  failed: {row['error'][:80]}")
            continue
        sp = row.get("speedup_of_lookfast")
        gbs = f"{row['gbs']:.1f}" if row.get("gbs") else ""
        gfl = f"{row['gflops']:.1f}" if row.get("gflops") else ""
        bar = ""
        if "bar" in row:
            bar = f">= {row['bar']:g}x {'met' if row['bar_met'] else 'NOT met'}"
        sp_text = f"{sp:.2f}" if sp is not None else ""
        lines.append(
            f"{case.id:<12} {case.op:<20} {row['impl']:<34} {row['threads']:>3} {row['stats']['median'] * 1e3:>10.3f} "
            f"{sp_text:>10} {gbs:>7} {gfl:>8}  {bar}"
        )
        for note in row.get("notes", []):
            lines.append(f"{'':<12} note: {note}")
    return "\n".join(lines)


def _json_doc(rows: list[dict[str, Any]], ceil: dict[str, float], quick: bool) -> dict[str, Any]:
    benchmarks = []
    for row in rows:
        case: Case = row["case"]
        extra = {
            "op": case.op,
            "shape": case.shape,
            "dtype": str(case.dtype).replace("torch.", "") if case.dtype is not None else None,
            "threads": row["threads"],
            "bytes": case.bytes,
            "flops": case.flops,
            "speedup_of_lookfast": row.get("speedup_of_lookfast"),
            "gbs": row.get("gbs"),
            "gflops": row.get("gflops"),
            "bar": row.get("bar"),
            "bar_met": row.get("bar_met"),
            "notes": row.get("notes", []),
            "error": row.get("error"),
        }
        benchmarks.append(
            {
                "group": case.id,
                "name": f"{case.id}[{row['impl']}-t{row['threads']}]",
                "fullname": f"{case.op}::{case.id}::{row['impl']}::threads={row['threads']}",
                "params": {"impl": row["impl"], "threads": row["threads"]},
                "stats": row.get("stats"),
                "extra_info": extra,
            }
        )
    return {
        "machine_info": {
            "node": platform.node(),
            "processor": platform.processor(),
            "machine": platform.machine(),
            "python_version": platform.python_version(),
            "torch_version": torch.__version__,
            "copy_gbs": ceil["copy_gbs"],
            "mm_gflops": ceil["mm_gflops"],
            "mm_bf16_gflops": ceil.get("mm_bf16_gflops"),
            "matrix_features": ceil["matrix_features"],
        },
        "dtypes": ceil["dtypes"],
        "quick": quick,
        "datetime": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "benchmarks": benchmarks,
    }


def _plot(rows: list[dict[str, Any]], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    labels, values = [], []
    for row in rows:
        sp = row.get("speedup_of_lookfast")
        if sp is None or row.get("is_lookfast"):
            continue
        labels.append(f"{row['case'].id} vs {row['impl']} (t{row['threads']})")
        values.append(sp)
    if not values:
        return
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(values) + 1))
    ax.barh(labels, values)
    ax.axvline(1.0, color="k", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("lookfast speedup over peer (x)")
    fig.tight_layout()
    fig.savefig(path)


def main(quick: bool, json_path: str | None, only: list[str] | None, threads: list[int] | None, plot: str | None,
         dtypes: list[torch.dtype] | None = None) -> int:
    """Run the suite. `dtypes`: the precisions of the cases that have variants (None: `ceilings.default_dtypes()`,
    bf16 where the CPU has AMX or AVX512-BF16, else float32)."""
    start = time.perf_counter()
    min_seconds = 0.2 if quick else 0.5
    dtypes = dtypes or ceilings.default_dtypes()
    cases = load_cases(quick, only, dtypes)
    jobs = thread_jobs(cases, threads, quick)
    torch.set_num_threads(1)
    names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
    _progress(f"lookfast bench: {len(cases)} cases, threads {sorted({t for _, t in jobs})}, dtypes {names}, "
              f"{'quick' if quick else 'full'} run")
    _progress("  measuring machine ceilings ...")
    n_mm = 1024 if quick else 2048
    ceil: dict[str, Any] = {
        "copy_gbs": ceilings.copy_bandwidth_gbs(128 if quick else 256, min_seconds),
        "mm_gflops": ceilings.matmul_gflops(n_mm, min_seconds),
        "mm_bf16_gflops": ceilings.matmul_gflops(n_mm, min_seconds, torch.bfloat16),
        "matrix_features": ceilings.matrix_features(),
        "dtypes": [str(d).replace("torch.", "") for d in dtypes],
    }
    rows: list[dict[str, Any]] = []
    for i, (case, t) in enumerate(jobs, 1):
        _progress(f"  [{i}/{len(jobs)}] {case.id} {case.op}: {case.shape} (threads={t})")
        rows += _run_case(case, t, min_seconds, ceil)
    torch.set_num_threads(1)
    print(_format_table(rows, ceil))
    print(f"\n{len(jobs)} case runs in {time.perf_counter() - start:.1f} s; lookfast x = peer time / lookfast time")
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(_json_doc(rows, ceil, quick), fh, indent=1)
        print(f"JSON written to {json_path}")
    if plot:
        _plot(rows, plot)
    return 0
