"""`python -m lookfast gpucheck`: everything this project wants to know from a machine with a CUDA GPU, in one command.

1. Prints the device (name, compute capability, memory), torch / CUDA / Triton versions and which lookfast ops have a
   compiled CUDA kernel.
2. Runs the GPU-marked tests (`pytest -m gpu <tests>` through pytest.main in a subprocess, so a crash or a hung
   kernel cannot take the benchmark down with it; 5 minutes at most): tests/test_gpu.py, the GPU tests of the per-op
   files, and every test run on the `backend` fixture's CUDA parameters (tests/conftest.py marks those gpu).
3. Times the GPU benchmark rows in bf16 and fp16 with CUDA events (batches of calls between two events, median of
   the batches), after checking each lookfast backend against the first peer of its row:
     A1, A2  Dyn-Perceiver cross attention (x->z, z->x shapes: docs/benchmarks.md): lookfast (CUDA C++, Triton) vs SDPA
             with the flash backend (`sdpa_kernel(SDPBackend.FLASH_ATTENTION)`) and SDPA's default choice; samples
             have equal lengths here, so padded SDPA is the plain batched call.
     A3      LookWhere extractor self-attention, ragged (16 images of 5 + k_i tokens, 12 heads, Dh 64): lookfast vs
             SDPA flash per-sample loop and padded SDPA with a key mask (flash takes no mask).
             A1-A3 also time torch's own packed attention, `torch.nn.attention.varlen.varlen_attn`, where the torch
             has it (CUDA only), checked against the row's reference like lookfast's backends.
     A4      A3 forward + backward (dq, dk, dv): the same peers (torch's varlen_attn too), lookfast's CUDA C++ on the
             tensor cores and, with LOOKFAST_CUDA_MMA=0, on the SIMT kernels.
     G1, G2  top-k patch gather + embed + positions: lookfast (CUDA C++ = gather + cuBLAS + epilogue, Triton = one
             fused kernel) vs torch.compile(gather + linear).
     E1      exit_compact, n 256, 1000 classes, two states, half the rows exit: lookfast vs torch eager.
   Prints one table and writes everything as JSON (`--json`, default gpucheck.json), saved again after the tests
   and after every row ("partial": true until the end), so a run cut short keeps what it measured.
Without a CUDA GPU it prints why and exits with status 2. Budget: under 8 minutes on one GPU (tests ~1-3 min and at
most 4.5, compiles ~1-2 min, timing ~1 min); rows that would start after 7.5 minutes are listed as not timed.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

NO_GPU_STATUS = 2
TEST_TIMEOUT_S = 270
BUDGET_S = 450  # no new benchmark row starts after this many seconds: the whole check stays under 8 minutes
DTYPES = ("bfloat16", "float16")
CASE_IDS = ("A1", "A2", "A3", "A4", "G1", "G2", "E1")


@dataclass
class Peer:
    """One timed implementation of a row: `env` is set while it runs (LOOKFAST_GPU_BACKEND picks lookfast's backend),
    `check` says whether its result is compared with the row's reference (the first peer)."""
    name: str
    fn: Callable[[], object]
    env: dict = field(default_factory=dict)
    check: bool = False


@dataclass
class Row:
    id: str
    dtype: str
    shape: str
    flops: int
    peers: list  # of Peer; the first one is the reference that lookfast's outputs are checked against
    compare: Callable[[object, object], None]  # raises AssertionError on a mismatch


# ------------------------------------------------------------------------------------------------------- timing
@contextlib.contextmanager
def _env(values: dict):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def cuda_time(fn: Callable[[], object], min_seconds: float = 0.25, batches: int = 7) -> dict:
    """Seconds per call of `fn` on the current CUDA stream: warm-up, then `batches` batches of calls, each between
    two CUDA events and long enough (>= ~2 ms) that launch gaps between batches do not count; median over batches."""
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    one = max(start.elapsed_time(end) / 1e3, 1e-6)
    inner = max(1, min(1000, int(max(2e-3, min_seconds / batches) / one)))
    per_call = []
    for _ in range(batches):
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        per_call.append(start.elapsed_time(end) / 1e3 / inner)
    return {"median": statistics.median(per_call), "min": min(per_call), "calls_per_batch": inner,
            "batches": batches}


# ------------------------------------------------------------------------------------------------------- rows
def _close(dtype):
    import torch

    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3

    def compare(got, want):
        got = got if isinstance(got, (tuple, list)) else (got,)
        want = want if isinstance(want, (tuple, list)) else (want,)
        assert len(got) == len(want), f"{len(got)} outputs, expected {len(want)}"
        for g, w in zip(got, want):
            if g.is_floating_point():
                torch.testing.assert_close(g.float(), w.float(), rtol=tol, atol=tol)
            else:
                assert torch.equal(g, w)
    return compare


def _close_grads(dtype):
    """Gradients: each element within tol x (its own size + the largest of its tensor), tol as in _close. Gradients
    sum many rounded terms, so an element's error scales with its tensor's magnitude rather than with itself."""
    import torch

    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3

    def compare(got, want):
        assert len(got) == len(want), f"{len(got)} outputs, expected {len(want)}"
        for name, g, w in zip("qkv", got, want):
            w = w.float()
            torch.testing.assert_close(g.float(), w, rtol=tol, atol=tol * float(w.abs().max()),
                                       msg=lambda m, name=name: f"d{name}: {m}")
    return compare


def _lookfast_peers(fn) -> list:
    return [Peer("lookfast CUDA C++", fn, {"LOOKFAST_GPU_BACKEND": "cuda"}, check=True),
            Peer("lookfast Triton", fn, {"LOOKFAST_GPU_BACKEND": "triton"}, check=True)]


def _sdpa_flash(q, k, v):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v)


def _torch_varlen_peers(q, k, v, cu_q, cu_k, max_q: int, max_k: int) -> list:
    """torch's own packed attention (`torch.nn.attention.varlen.varlen_attn`, FlashAttention on CUDA), the peer a
    user of a recent torch would pick for ragged batches; none where this torch lacks it or the tensors are not on a
    GPU (it has no CPU kernel). Its result is checked against the row's reference too, so a wrong call shows."""
    if q.device.type != "cuda":
        return []
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return []
    return [Peer("torch varlen_attn", lambda: varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k), check=True)]


def cross_row(case_id: str, batch: int, len_q: int, len_k: int, width: int, dtype, device) -> Row:
    """A1/A2: one head, equal lengths (the Dyn-Perceiver cross attentions)."""
    import torch
    import torch.nn.functional as F

    import lookfast

    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(batch, n, width, generator=g).to(device, dtype) for n in (len_q, len_k, len_k))
    cu_q = (torch.arange(batch + 1, dtype=torch.int32) * len_q).to(device)
    cu_k = (torch.arange(batch + 1, dtype=torch.int32) * len_k).to(device)
    qp, kp, vp = (t.reshape(-1, 1, width) for t in (q, k, v))
    q4, k4, v4 = (t[:, None] for t in (q, k, v))
    flash = lambda: _sdpa_flash(q4, k4, v4).reshape(-1, 1, width)  # noqa: E731
    ours = lambda: lookfast.varlen_attention(qp, kp, vp, cu_q, cu_k, len_q, len_k)  # noqa: E731
    default = lambda: F.scaled_dot_product_attention(q4, k4, v4)  # noqa: E731
    return Row(case_id, str(dtype).replace("torch.", ""),
               f"B {batch}, {len_q} queries x {len_k} keys, 1 head, width {width}",
               2 * batch * len_q * len_k * 2 * width,
               [Peer("sdpa flash", flash)] + _lookfast_peers(ours) + [Peer("sdpa default (= padded)", default)]
               + _torch_varlen_peers(qp, kp, vp, cu_q, cu_k, len_q, len_k),
               _close(dtype))


def a3_lengths() -> list:
    import torch

    g = torch.Generator().manual_seed(3)
    return (5 + torch.randint(40, 281, (16,), generator=g)).tolist()


def _a3_problem(dtype, device):
    """The A3/A4 inputs: lengths, heads, dh, cu_seqlens, packed q, k, v (total, 12, 64), pad() (packed -> padded
    (B, H, longest, dh)), the key mask of padded SDPA and flash_loop(q, k, v) (SDPA flash, one call per sample)."""
    import torch

    lengths, heads, dh = a3_lengths(), 12, 64
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32).to(device)
    g = torch.Generator().manual_seed(4)
    total, longest = sum(lengths), max(lengths)
    q, k, v = (torch.randn(total, heads, dh, generator=g).to(device, dtype) for _ in range(3))
    bounds = list(zip(cu[:-1].tolist(), cu[1:].tolist()))

    def pad(x):
        out = x.new_zeros(len(lengths), longest, heads, dh)
        for b, (a, e) in enumerate(bounds):
            out[b, : e - a] = x[a:e]
        return out.transpose(1, 2)

    key_mask = (torch.arange(longest, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None])
    key_mask = key_mask[:, None, None, :]

    def flash_loop(q, k, v):
        outs = [_sdpa_flash(q[a:e].transpose(0, 1)[None], k[a:e].transpose(0, 1)[None], v[a:e].transpose(0, 1)[None])
                for a, e in bounds]
        return torch.cat([o[0].transpose(0, 1) for o in outs])

    return lengths, heads, dh, cu, (q, k, v), pad, key_mask, flash_loop


def a3_row(dtype, device) -> Row:
    import torch.nn.functional as F

    import lookfast

    lengths, heads, dh, cu, (q, k, v), pad, key_mask, loop = _a3_problem(dtype, device)
    total, longest = sum(lengths), max(lengths)
    qpad, kpad, vpad = pad(q), pad(k), pad(v)

    def flash_loop():
        return loop(q, k, v)

    def padded():
        return F.scaled_dot_product_attention(qpad, kpad, vpad, attn_mask=key_mask)

    ours = lambda: lookfast.varlen_attention(q, k, v, cu, cu, longest, longest)  # noqa: E731
    return Row("A3", str(dtype).replace("torch.", ""),
               f"B 16, 5+k_i tokens (total {total}, max {longest}), {heads} heads, Dh {dh}",
               sum(2 * heads * n * n * 2 * dh for n in lengths),
               [Peer("sdpa flash per-sample loop", flash_loop)] + _lookfast_peers(ours)
               + [Peer("sdpa padded + key mask", padded)] + _torch_varlen_peers(q, k, v, cu, cu, longest, longest),
               _close(dtype))


def a4_row(dtype, device) -> Row:
    """A4: the A3 problem forward + backward (gradients of q, k, v for one output gradient). lookfast's CUDA C++
    backend runs twice: on the tensor cores (bf16/fp16 wmma kernels) and with LOOKFAST_CUDA_MMA=0 on the SIMT
    kernels. The padded SDPA peer pads inside the timed call (its gradients must reach the packed inputs)."""
    import torch
    import torch.nn.functional as F

    import lookfast

    lengths, heads, dh, cu, (q, k, v), pad, key_mask, loop = _a3_problem(dtype, device)
    total, longest = sum(lengths), max(lengths)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(5)).to(device, dtype)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    bounds = list(zip(cu[:-1].tolist(), cu[1:].tolist()))

    def grads(forward):
        return lambda: torch.autograd.grad(forward(*leaves), leaves, dout)

    def padded(q, k, v):
        o = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=key_mask)
        return torch.cat([o[b, :, : e - a].transpose(0, 1) for b, (a, e) in enumerate(bounds)])

    ours = grads(lambda q, k, v: lookfast.varlen_attention(q, k, v, cu, cu, longest, longest))
    cuda, triton = _lookfast_peers(ours)
    simt = Peer("lookfast CUDA C++ SIMT", ours, {"LOOKFAST_GPU_BACKEND": "cuda", "LOOKFAST_CUDA_MMA": "0"},
                check=True)
    # FLOPs as FlashAttention counts them: forward 2 products, backward 5 (its recomputation of S not counted)
    return Row("A4", str(dtype).replace("torch.", ""),
               f"A3 forward + backward (total {total}, max {longest}), {heads} heads, Dh {dh}",
               sum(2 * heads * n * n * 7 * dh for n in lengths),
               [Peer("sdpa flash per-sample loop", grads(loop)), cuda, simt, triton,
                Peer("sdpa padded + key mask", grads(padded))]
               # torch's varlen_attn (CUDA only) on the same leaves, differentiated the same way
               + [Peer(t.name, lambda fn=t.fn: torch.autograd.grad(fn(), leaves, dout), check=True)
                  for t in _torch_varlen_peers(*leaves, cu, cu, longest, longest)],
               _close_grads(dtype))


def embed_row(case_id: str, b: int, size: int, p: int, k: int, d: int, dtype, device, compile_peer: bool = True) -> Row:
    """G1/G2: top-k patch gather + embed + bias + positions."""
    import torch

    import lookfast
    from lookfast.benchmarks.cases.topk_patch_gather import gather_then_linear

    gen = torch.Generator().manual_seed(0)
    grid = (size // p) ** 2
    images = torch.randn(b, 3, size, size, generator=gen).to(device, dtype)
    scores = torch.randn(b, grid, generator=gen).to(device)
    weight = (torch.randn(d, 3, p, p, generator=gen) * 0.02).to(device, dtype)
    bias = torch.randn(d, generator=gen).to(device, dtype)
    pos = torch.randn(1, grid, d, generator=gen).to(device, dtype)
    args = (images, scores, k, p, weight, bias, pos)
    eager = lambda: gather_then_linear(*args)[1].reshape(b * k, d)  # noqa: E731
    ours = lambda: lookfast.topk_patch_gather(*args)[1].reshape(b * k, d)  # noqa: E731
    peers = [Peer("gather+linear eager", eager)] + _lookfast_peers(ours)
    if compile_peer:
        compiled = torch.compile(gather_then_linear, dynamic=False)
        peers.append(Peer("gather+linear torch.compile", lambda: compiled(*args)))
    return Row(case_id, str(dtype).replace("torch.", ""),
               f"B {b}, 3x{size}x{size}, p {p} ({grid} patches), k {k}, D {d}, +bias +pos",
               2 * b * k * 3 * p * p * d, peers, _close(dtype))


def e1_row(dtype, device) -> Row:
    import torch

    import lookfast

    n, classes = 256, 1000
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(n, classes, generator=g) * 3).to(device, dtype)
    states = [torch.randn(s, generator=g).to(device, dtype) for s in ((n, 144, 28, 28), (n, 32, 144))]
    conf = logits.float().softmax(-1).amax(-1)
    threshold = float(conf.sort().values[n // 2 - 1: n // 2 + 1].mean())  # half the rows exit

    def eager():
        c = logits.float().softmax(-1).amax(-1)
        leave = c >= threshold
        keep = torch.nonzero(~leave).squeeze(1)
        return (keep, torch.nonzero(leave).squeeze(1), *(s.index_select(0, keep) for s in states))

    ours = lambda: lookfast.exit_compact(logits, threshold, *states)  # noqa: E731
    return Row("E1", str(dtype).replace("torch.", ""),
               f"n {n}, {classes} classes, states (n,144,28,28) + (n,32,144), 50% exit", 0,
               [Peer("torch eager", eager)] + _lookfast_peers(ours), _close(dtype))


def build_rows(dtype, device, only: Optional[list] = None, compile_peer: bool = True) -> list:
    """The benchmark rows for one dtype; `only` restricts them to some case ids."""
    makers = {
        "A1": lambda: cross_row("A1", 64, 128, 49, 32, dtype, device),
        "A2": lambda: cross_row("A2", 16, 3136, 64, 8, dtype, device),
        "A3": lambda: a3_row(dtype, device),
        "A4": lambda: a4_row(dtype, device),
        "G1": lambda: embed_row("G1", 4, 1036, 14, 274, 768, dtype, device, compile_peer),
        "G2": lambda: embed_row("G2", 8, 518, 14, 136, 768, dtype, device, compile_peer),
        "E1": lambda: e1_row(dtype, device),
    }
    return [makers[i]() for i in CASE_IDS if not only or i in only]


def _backends_that_ran(fn) -> dict:
    """{lookfast op: backend} of the library calls one call of `fn` made (a silent fallback would show here)."""
    from . import _backend

    _backend.last_backend.clear()
    fn()
    return dict(_backend.last_backend)


def run_row(row: Row, timer=cuda_time) -> dict:
    """Check every `check` peer against the row's first peer, then time every peer. Errors are recorded, not raised."""
    result = {"id": row.id, "dtype": row.dtype, "shape": row.shape, "flops": row.flops, "peers": {}}
    reference = None
    try:
        reference = row.peers[0].fn()
    except Exception as exc:  # noqa: BLE001  (a peer that cannot run is reported in the table)
        result["peers"][row.peers[0].name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    for peer in row.peers:
        if peer.name in result["peers"]:
            continue
        entry = {}
        try:
            with _env(peer.env):
                if peer.env.get("LOOKFAST_GPU_BACKEND"):
                    entry["ran"] = _backends_that_ran(peer.fn)
                if peer.check and reference is not None:
                    try:
                        row.compare(peer.fn(), reference)
                        entry["check"] = "ok"
                    except AssertionError as exc:
                        entry["check"] = f"MISMATCH: {str(exc)[:300]}"
                entry.update(timer(peer.fn))
        except Exception as exc:  # noqa: BLE001
            entry["error"] = f"{type(exc).__name__}: {exc}"[:300]
        result["peers"][peer.name] = entry
    return result


def format_table(results: list) -> str:
    """One line per (row, peer): time, TFLOP/s where the row counts FLOPs, and the peer's time over lookfast's best
    backend (> 1: lookfast faster), plus the correctness check of lookfast's backends."""
    lines = [f"{'row':<4} {'dtype':<9} {'implementation':<30} {'time':>10} {'TFLOP/s':>8} {'peer/lookfast':>13}  check"]
    for res in results:
        ours = [e["median"] for name, e in res["peers"].items() if name.startswith("lookfast") and "median" in e]
        best = min(ours) if ours else None
        for name, entry in res["peers"].items():
            if "median" not in entry:
                lines.append(f"{res['id']:<4} {res['dtype']:<9} {name:<30} {'ERROR':>10}  {entry.get('error', '')}")
                continue
            t = entry["median"]
            rate = f"{res['flops'] / t / 1e12:8.2f}" if res["flops"] else f"{'-':>8}"
            ratio = f"{t / best:13.2f}" if best and not name.startswith("lookfast") else f"{'':>13}"
            lines.append(f"{res['id']:<4} {res['dtype']:<9} {name:<30} {t * 1e6:8.1f}us {rate} {ratio}  "
                         f"{entry.get('check', '')}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------- tests
def find_tests(explicit: Optional[str] = None) -> Optional[str]:
    """The tests folder: `explicit`, else the source checkout's tests/ next to this package (None if absent, as in
    an installed wheel)."""
    if explicit:
        return explicit
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(here, "tests")
    return path if os.path.isfile(os.path.join(path, "conftest.py")) else None


def run_gpu_tests(tests: str, timeout: int = TEST_TIMEOUT_S) -> dict:
    """`pytest -m gpu tests` in a subprocess (TRITON_INTERPRET unset: the Triton kernels run on the GPU)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_INTERPRET"] = "0"  # conftest sets it to 1 only when unset
    root = os.path.dirname(os.path.abspath(tests))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    code = f"import sys, pytest; sys.exit(pytest.main(['-m', 'gpu', {tests!r}, '-q', '-rfEs', '-p', 'no:cacheprovider']))"
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout,
                              cwd=root)
        status, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        tail = [t.decode(errors="replace") if isinstance(t, bytes) else (t or "") for t in (exc.stdout, exc.stderr)]
        status, out = f"timeout after {timeout} s", "".join(tail)
    return {"status": status, "seconds": time.perf_counter() - start, "output_tail": out[-6000:]}


# ------------------------------------------------------------------------------------------------------- main
def device_report() -> dict:
    import torch

    props = torch.cuda.get_device_properties(0)
    info = {"device": props.name, "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1), "sms": props.multi_processor_count,
            "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    from . import _backend
    info["cuda_kernels"] = {op: _backend.has_kernel(op, "CUDA") for ops in _backend.FAMILIES.values() for op in ops}
    return info


def _save(report: dict, path: str) -> None:
    """Write the report as JSON, replacing the file whole each time (a reader never sees a half-written one)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(report, fh, indent=1, default=str)
    os.replace(tmp, path)


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lookfast gpucheck", description=__doc__.split("\n")[0])
    parser.add_argument("--json", default="gpucheck.json", metavar="PATH", help="where to write the results")
    parser.add_argument("--only", nargs="+", choices=CASE_IDS, help="benchmark only these rows")
    parser.add_argument("--tests", metavar="DIR", help="tests folder (default: the checkout's tests/)")
    parser.add_argument("--skip-tests", action="store_true", help="do not run the GPU-marked tests")
    parser.add_argument("--skip-bench", action="store_true", help="do not run the benchmark rows")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        reason = ("torch is a CPU-only build" if torch.version.cuda is None
                  else f"torch (CUDA {torch.version.cuda}) sees no CUDA device")
        print(f"gpucheck: no CUDA GPU available ({reason}); this check needs one. Nothing was run.", file=sys.stderr)
        return NO_GPU_STATUS

    started = time.perf_counter()
    report = {"device": device_report()}
    print("device: " + ", ".join(f"{k} {v}" for k, v in report["device"].items() if k != "cuda_kernels"))
    print("CUDA kernels: " + ", ".join(f"{op} {'yes' if ok else 'NO'}" for op, ok in report["device"]["cuda_kernels"].items()))
    ok = True
    if not args.skip_tests:
        tests = find_tests(args.tests)
        if tests is None:
            report["tests"] = {"status": "not found (installed without the source checkout; pass --tests DIR)"}
            ok = False
        else:
            print(f"running GPU-marked tests in {tests} ...", flush=True)
            report["tests"] = run_gpu_tests(tests)
            print(report["tests"]["output_tail"][-3000:])
            ok &= report["tests"]["status"] == 0
        print(f"tests: {report['tests']['status']}")
        _save(report, args.json)
    results = []
    if not args.skip_bench:
        torch.backends.cuda.matmul.allow_tf32 = False
        skipped = []
        for name in DTYPES:
            dtype = getattr(torch, name)
            for case in [i for i in CASE_IDS if not args.only or i in args.only]:
                if time.perf_counter() - started > BUDGET_S:
                    skipped.append(f"{case} {name}")
                    continue
                print(f"timing {case} {name} ...", flush=True)
                try:
                    (row,) = build_rows(dtype, torch.device("cuda"), [case])
                except Exception as exc:  # noqa: BLE001  (one row that cannot be set up does not stop the others)
                    results.append({"id": case, "dtype": name, "shape": "", "flops": 0,
                                    "peers": {"lookfast (row setup)": {"error": f"{type(exc).__name__}: {exc}"[:300]}}})
                else:
                    results.append(run_row(row))
                    del row
                torch.cuda.empty_cache()
                # saved after every row: a run cut short (a device lease, a hang) keeps what it measured
                _save(dict(report, bench=results, partial=True), args.json)
        if skipped:
            report["bench_skipped_for_time"] = skipped
            print(f"not timed (the {BUDGET_S} s budget was spent): {', '.join(skipped)}")
            ok = False
        report["bench"] = results
        table = format_table(results)
        print(table)
        bad = [f"{r['id']} {r['dtype']} {n}" for r in results for n, e in r["peers"].items()
               if n.startswith("lookfast") and ("error" in e or e.get("check", "ok") != "ok")]
        if bad:
            print("lookfast rows with errors or mismatches: " + "; ".join(bad))
            ok = False
    report["seconds"] = time.perf_counter() - started
    _save(report, args.json)
    print(f"gpucheck {'passed' if ok else 'FAILED'} in {report['seconds']:.0f} s; results in {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
