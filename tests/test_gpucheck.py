"""`python -m lookfast gpucheck` on a machine without a GPU: the no-GPU exit, and the CPU-side logic (row building,
the correctness check of lookfast's outputs against the row's reference, the table) with real ops on CPU tensors."""
import os
import subprocess
import sys

import pytest
import torch

from lookfast import gpucheck

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_without_a_gpu_exits_nonzero_with_a_clear_message(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "lookfast", "gpucheck", "--json", str(tmp_path / "r.json")],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == gpucheck.NO_GPU_STATUS, proc.stdout + proc.stderr
    assert "no CUDA GPU available" in proc.stderr and "Nothing was run" in proc.stderr
    assert not (tmp_path / "r.json").exists()


def test_other_commands_still_refuse_unknown_arguments():
    from lookfast.__main__ import main

    with pytest.raises(SystemExit):
        main(["info", "--bogus"])


def _fake_timer(fn):
    fn()
    return {"median": 1e-3, "min": 1e-3, "calls_per_batch": 1, "batches": 1}


@pytest.mark.parametrize("case", ["A1", "A3", "A4", "E1", "G2"])
def test_rows_check_lookfast_against_the_reference_on_cpu(case):
    # the same rows the GPU run times, on CPU tensors in bf16 (SDPA's flash backend has a CPU kernel too); the
    # compiled peer is left out (minutes of compilation on 2 cores), timing is faked
    (row,) = gpucheck.build_rows(torch.bfloat16, torch.device("cpu"), only=[case], compile_peer=False)
    assert row.id == case and row.dtype == "bfloat16"
    result = gpucheck.run_row(row, timer=_fake_timer)
    checked = {n: e for n, e in result["peers"].items() if n.startswith("lookfast")}
    assert len(checked) == (3 if case == "A4" else 2)  # A4: CUDA C++ on the tensor cores and on SIMT, Triton
    for name, entry in result["peers"].items():
        assert "error" not in entry, (name, entry)
    for name, entry in checked.items():
        assert entry["check"] == "ok", (name, entry)
        assert entry["ran"] and all(b in ("library", "triton") for b in entry["ran"].values()), entry


def test_a_wrong_result_is_reported_as_a_mismatch():
    ref = torch.ones(4, 3)
    row = gpucheck.Row("X1", "float32", "toy", 24,
                       [gpucheck.Peer("reference", lambda: ref),
                        gpucheck.Peer("lookfast wrong", lambda: ref * 1.5, check=True),
                        gpucheck.Peer("lookfast broken", lambda: 1 / 0, check=True)],
                       gpucheck._close(torch.bfloat16))
    result = gpucheck.run_row(row, timer=_fake_timer)
    assert result["peers"]["lookfast wrong"]["check"].startswith("MISMATCH")
    assert "ZeroDivisionError" in result["peers"]["lookfast broken"]["error"]
    table = gpucheck.format_table([result])
    assert "MISMATCH" in table and "ERROR" in table


def test_table_ratios_are_peer_time_over_lookfasts_best():
    results = [{"id": "A3", "dtype": "bfloat16", "shape": "s", "flops": 2e9, "peers": {
        "sdpa flash per-sample loop": {"median": 300e-6},
        "lookfast CUDA C++": {"median": 100e-6, "check": "ok"},
        "lookfast Triton": {"median": 150e-6, "check": "ok"},
        "sdpa padded + key mask": {"error": "RuntimeError: no kernel"}}}]
    lines = gpucheck.format_table(results).splitlines()
    flash = next(line for line in lines if "flash" in line)
    assert "300.0us" in flash and flash.split()[-1] == "3.00" and "6.67" in flash  # 2 GFLOP / 300 us = 6.67 TFLOP/s
    cuda = next(line for line in lines if "CUDA C++" in line)
    assert "20.00" in cuda and cuda.split()[-1] == "ok"
    assert "ERROR" in next(line for line in lines if "padded" in line)


def test_finds_the_checkout_tests():
    assert gpucheck.find_tests() == os.path.join(ROOT, "tests")
    assert gpucheck.find_tests("/some/where") == "/some/where"


def test_main_loop_on_cpu_rows(tmp_path, monkeypatch, capsys):
    # main() past the GPU gate, with the device query, the rows' device and the timer swapped for CPU stand-ins: the
    # loop, the budget bookkeeping, the table and the JSON report
    import json

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(gpucheck, "device_report", lambda: {"device": "stand-in", "cuda_kernels": {}})
    build = gpucheck.build_rows
    monkeypatch.setattr(gpucheck, "build_rows",
                        lambda dtype, device, only=None: build(dtype, torch.device("cpu"), only, compile_peer=False))
    run = gpucheck.run_row
    monkeypatch.setattr(gpucheck, "run_row", lambda row: run(row, timer=_fake_timer))
    out = tmp_path / "report.json"
    assert gpucheck.main(["--skip-tests", "--only", "A1", "E1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [(r["id"], r["dtype"]) for r in report["bench"]] == [
        ("A1", "bfloat16"), ("E1", "bfloat16"), ("A1", "float16"), ("E1", "float16")]
    printed = capsys.readouterr().out
    assert "lookfast Triton" in printed and "gpucheck passed" in printed


def test_main_loop_survives_a_row_that_cannot_be_set_up_and_saves_each_row(tmp_path, monkeypatch, capsys):
    # A row whose setup raises (an out-of-memory, a compile failure) is reported and the check goes on; the JSON is
    # rewritten after every row, so a run cut short (a device lease ending) keeps the rows already measured.
    import json

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(gpucheck, "device_report", lambda: {"device": "stand-in", "cuda_kernels": {}})
    build = gpucheck.build_rows
    out = tmp_path / "report.json"
    seen = []

    def flaky_build(dtype, device, only=None):
        if out.exists():  # what the file held when this row started
            seen.append([(r["id"], r["dtype"]) for r in json.loads(out.read_text())["bench"]])
        if only == ["A2"]:
            raise RuntimeError("CUDA out of memory (stand-in)")
        return build(dtype, torch.device("cpu"), only, compile_peer=False)

    monkeypatch.setattr(gpucheck, "build_rows", flaky_build)
    run = gpucheck.run_row
    monkeypatch.setattr(gpucheck, "run_row", lambda row: run(row, timer=_fake_timer))
    monkeypatch.setattr(gpucheck, "DTYPES", ("bfloat16",))
    assert gpucheck.main(["--skip-tests", "--only", "A1", "A2", "E1", "--json", str(out)]) == 1
    report = json.loads(out.read_text())
    assert [(r["id"], r["dtype"]) for r in report["bench"]] == [("A1", "bfloat16"), ("A2", "bfloat16"),
                                                               ("E1", "bfloat16")]
    assert "out of memory" in report["bench"][1]["peers"]["lookfast (row setup)"]["error"]
    assert "partial" not in report and seen == [[("A1", "bfloat16")], [("A1", "bfloat16"), ("A2", "bfloat16")]]
    printed = capsys.readouterr().out
    assert "A2 bfloat16 lookfast (row setup)" in printed and "gpucheck FAILED" in printed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", ["A1", "A2", "A3"])
def test_torch_varlen_attn_peer_matches_the_reference_on_gpu(case):
    # torch's own packed attention is a peer of the attention rows where this torch has it; its call (layout,
    # cumulative lengths, maxima) must give the reference's result, or its time would compare different work
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        pytest.skip("this torch has no torch.nn.attention.varlen.varlen_attn")
    (row,) = gpucheck.build_rows(torch.bfloat16, torch.device("cuda"), only=[case], compile_peer=False)
    assert "torch varlen_attn" in [p.name for p in row.peers]
    result = gpucheck.run_row(row, timer=_fake_timer)
    assert result["peers"]["torch varlen_attn"].get("check") == "ok", result["peers"]["torch varlen_attn"]


def test_torch_varlen_attn_is_no_peer_on_cpu():
    # it has no CPU kernel: the CPU rows must not list a peer that can only fail
    (row,) = gpucheck.build_rows(torch.bfloat16, torch.device("cpu"), only=["A3"], compile_peer=False)
    assert "torch varlen_attn" not in [p.name for p in row.peers]
