"""Build lookfast._C: the C++ CPU kernels always, the CUDA kernels when a CUDA build of torch and nvcc exist.

Environment switches:
  LOOKFAST_CUDA=1   force the CUDA kernels (fails loudly if torch or nvcc cannot build them)
  LOOKFAST_CUDA=0   never build them
  (unset)           build them when torch is a CUDA build and CUDA_HOME has nvcc
  TORCH_CUDA_ARCH_LIST  defaults to "8.0;9.0+PTX" when unset (torch's own detection needs a visible GPU): machine
                    code for sm_80 and sm_90, and sm_90 PTX that the driver compiles for newer GPUs (sm_100, sm_120),
                    which would otherwise find no kernel image
  MAX_JOBS          parallel compile jobs (ninja)
  LOOKFAST_SANITIZE=1  CPU build with AddressSanitizer + UndefinedBehaviorSanitizer (-O1 -g, UBSan reports abort);
                    for the CI sanitizer job only: run it with LD_PRELOAD of libasan and libstdc++ (see .ci/run)

Install with `pip install --no-build-isolation .` after torch is installed: the extension must be compiled
against the torch it will run with.
"""
import glob
import os
import site

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    flag = os.environ.get("LOOKFAST_CUDA", "").strip()
    if flag == "0":
        return False
    import torch

    available = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if flag == "1":
        if not available:
            raise RuntimeError(
                "LOOKFAST_CUDA=1 but this torch has no CUDA build or CUDA_HOME is unset "
                f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME})"
            )
        return True
    return available


def _cuda_include_dirs():
    # The CUDA wheels of torch ship headers (cusparse.h, ...) the system CUDA folder may lack.
    dirs = []
    for sp in site.getsitepackages():
        dirs += glob.glob(os.path.join(sp, "nvidia", "cu*", "include"))
        dirs += glob.glob(os.path.join(sp, "nvidia", "*", "include"))
    return sorted(set(dirs))


def _extension():
    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))
    sources = ["csrc/lookfast.cpp"] + rel("csrc/cpu/*.cpp")
    include_dirs = [os.path.join(ROOT, "csrc")]
    # No -std flag: torch.utils.cpp_extension picks the standard the installed torch needs (C++17 or C++20).
    cxx = ["-O3", "-fopenmp", "-fvisibility=hidden"]
    link = ["-fopenmp"]
    if os.environ.get("LOOKFAST_SANITIZE", "") == "1":
        san = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g", "-fno-wrapv"]
        # -fno-wrapv undoes Python's -fwrapv (signed overflow would otherwise be defined, hence never reported);
        # LOOKFAST_SANITIZE_BUILD: one target clone instead of three (csrc/cpu/vector_math.h).
        cxx = ["-O1", "-fopenmp", "-fvisibility=hidden", "-DLOOKFAST_SANITIZE_BUILD"] + san
        link = link + san
    if _want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        sources += rel("csrc/cuda/*.cu")
        nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        return cpp_extension.CUDAExtension(
            "lookfast._C",
            sources,
            include_dirs=include_dirs + _cuda_include_dirs(),
            define_macros=[("LOOKFAST_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=link,
        )
    return cpp_extension.CppExtension(
        "lookfast._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx},
        extra_link_args=link,
    )


setup(
    name="lookfast",
    version="0.1.0",
    description="Sparse token compute kernels for efficient vision models (top-k patch gather, varlen attention, early exit)",
    packages=find_packages(include=["lookfast", "lookfast.*"]) + ["lookfast.kernels"],
    package_dir={"lookfast.kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "numpy", "ninja"],
    extras_require={
        "triton": ["triton>=3.6"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "httpx"],
        # `python -m lookfast infer` and lookfast.images: image decoding, Parquet output, the progress bar.
        "infer": ["pillow", "pyarrow", "tqdm"],
        # `python -m lookfast infer --ray`: the same job on Ray Data (lookfast.integrations.ray). Tested with 2.60
        # (ActorPoolStrategy's max_concurrent_calls_per_actor and enable_true_multi_threading).
        "ray": ["ray[data]>=2.60", "pillow", "pyarrow", "tqdm"],
        # `python -m lookfast serve`: the HTTP server (lookfast.serving.server).
        "serve": ["fastapi", "uvicorn", "python-multipart", "pillow"],
    },
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    zip_safe=False,
)
