"""Ahead-of-time compilation of Triton kernels for real GPUs (sm_80, sm_90) on a machine without one.

The interpreter forgives what a GPU does not (dot shapes under 16, layouts, shared-memory overflow); compiling to
PTX and running Triton's bundled ptxas catches those and reports registers and spills. Import this module only in a
process where TRITON_INTERPRET is unset (the tests run it in a subprocess for that reason).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

def _ptxas(ptx_text: str) -> str:
    # Triton bundles two assemblers; the newer one (ptxas-blackwell) accepts the newer PTX ISA versions Triton emits
    # for some targets. Pick the one whose version covers the PTX's `.version`.
    import triton

    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    m = re.search(r"^\.version (\d+)\.(\d+)", ptx_text, re.M)
    wanted = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    for name in ("ptxas", "ptxas-blackwell"):
        path = os.path.join(bindir, name)
        if not os.path.exists(path):
            continue
        version = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
        v = re.search(r"release (\d+)\.(\d+)", version)
        # CUDA 12.x ptxas reads PTX ISA 8.x; CUDA 13.x reads 9.x
        if v and wanted <= (int(v.group(1)) - 4, 9):
            return path
    return os.path.join(bindir, "ptxas-blackwell")


_BATCH_SCRIPT = r"""
import importlib, json, sys
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
out = []
for module_name, kernel_name, signature, constexprs, arch, num_warps, num_stages, divisible in json.loads(sys.stdin.read()):
    kernel = getattr(importlib.import_module(module_name), kernel_name)
    try:
        attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible}
        src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": num_warps, "num_stages": num_stages})
        out.append({"ptx": compiled.asm["ptx"], "shared": compiled.metadata.shared})
    except Exception as exc:
        out.append({"error": f"{type(exc).__name__}: {exc}"})
print(json.dumps(out))
"""


def _assemble(ptx_text: str, arch: int) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as fh:
            fh.write(ptx_text)
        sm = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        out = subprocess.run([_ptxas(ptx_text), "-v", f"-arch={sm}", ptx, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"ptxas failed for sm_{arch}:\n{out.stderr[-4000:]}")
    return out.stderr + out.stdout


def _tensor_core_instructions(ptx_text: str) -> int:
    """Count of tensor-core instructions in the PTX: mma.sync (sm_80 and later) and wgmma (sm_90a)."""
    return len(re.findall(r"^\s*(?:mma\.sync|wgmma\.mma_async)\b", ptx_text, re.M))


def _summary(text: str, shared: int) -> dict:
    def grab(pattern: str) -> int:
        m = re.search(pattern, text)
        return int(m.group(1)) if m else 0
    return {
        "registers": grab(r"Used (\d+) registers"),
        "spill_stores": grab(r"(\d+) bytes spill stores"),
        "spill_loads": grab(r"(\d+) bytes spill loads"),
        "stack": grab(r"(\d+) bytes stack frame"),
        "shared": shared,
        "ptxas": text,
    }


def compile_reports(jobs: list) -> list:
    """Batch form of compile_report: one subprocess (one torch/triton import) compiles every job.

    jobs: dicts with keys module, kernel, signature, constexprs, arch and optionally num_warps, num_stages and
    divisible (names of pointer / integer arguments declared 16-divisible, as the JIT specialises them for aligned
    tensors and strides; none by default).
    Returns one dict per job: compile_report's keys plus "tensor_core" (how many mma.sync / wgmma instructions the PTX
    holds), or {"error": message} when that job failed to compile or assemble.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    payload = json.dumps([[j["module"], j["kernel"], j["signature"], j["constexprs"], j["arch"],
                           j.get("num_warps", 4), j.get("num_stages", 2), list(j.get("divisible", ()))] for j in jobs])
    proc = subprocess.run([sys.executable, "-c", _BATCH_SCRIPT], input=payload, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"Triton AOT batch compile failed:\n{proc.stderr[-4000:]}")
    results = []
    for job, res in zip(jobs, json.loads(proc.stdout.strip().splitlines()[-1])):
        if "error" in res:
            results.append(res)
            continue
        try:
            summary = _summary(_assemble(res["ptx"], job["arch"]), res["shared"])
            summary["tensor_core"] = _tensor_core_instructions(res["ptx"])
            results.append(summary)
        except RuntimeError as exc:
            results.append({"error": str(exc)})
    return results


def compile_report(module: str, kernel: str, signature: dict, constexprs: dict, arch: int,
                   num_warps: int = 4, num_stages: int = 2) -> dict:
    """Compile `module.kernel` for sm_<arch> and return {"registers", "spill_stores", "spill_loads", "stack", "shared"}.

    signature: {argument name: Triton type string such as "*fp32", "i32", "constexpr"}; constexprs: {name: value}.
    Raises RuntimeError with the compiler's message when compilation fails.
    """
    job = dict(module=module, kernel=kernel, signature=signature, constexprs=constexprs, arch=arch,
               num_warps=num_warps, num_stages=num_stages)
    report = compile_reports([job])[0]
    if "error" in report:
        raise RuntimeError(f"Triton AOT compile of {module}.{kernel} for sm_{arch} failed:\n{report['error']}")
    return report
