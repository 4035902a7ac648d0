// Run-time choice of the CPU kernel of varlen_attention for bf16/fp16 inputs, from the CPU's features and the
// LOOKFAST_CPU_ISA switch (the tests force each kernel with it; docs/ops.md section 2):
//   unset / auto  the automatic choice below
//   baseline      the portable kernel (any CPU)
//   avx512bf16    the hand-written AVX512-BF16 kernel (bf16, head dim >= 32; narrower heads stay portable)
//   brgemm        the oneDNN brgemm kernel (AMX, AVX512-BF16, or AVX512-FP16 for fp16), forward and backward, every
//                 head dim
// A forced kernel the CPU (or the dtype) lacks falls back to the automatic choice with a one-time warning; an
// unknown value too. float32/float64 always run the portable kernel.
//
// Automatic choice, bf16 and fp16, head dim >= kMinMatrixHeadDim (narrower heads: the portable kernel, whose
// queries-in-lanes softmax is what costs there; forced brgemm measured 1.2-1.6x slower than it on A2, width 8):
//   - With AMX (torch's cpublas::could_pack: AMX-BF16 for bf16, AMX-FP16 for fp16): brgemm, forward and backward,
//     the matrix engine. Measured on an Intel Xeon with AMX-BF16 (Sapphire Rapids class, 1 thread, best of 15
//     alternating calls per kernel in one process), time of brgemm / hand-written AVX512-BF16 / portable, ms:
//     A1 forward 1.06 / 1.62 / 1.56; A3 forward 13.4 / 29.0 / 24.4; A3 causal forward 11.5 / 18.9 / 19.6; A3 forward
//     + backward 51.5 / 95.7 / 82.0; A3 causal forward + backward 40.6 / 61.1 / 62.7. A2 (width 8, below
//     kMinMatrixHeadDim) forced onto brgemm: 5.5 ms against the portable kernel's 3.6.
//   - AVX512-BF16 without AMX, bf16: brgemm for the forward, the hand-written kernel for the backward. Both kernels
//     run vdpbf16ps for the products there. Measured side by side in one process (AMD EPYC Zen 5, family 26, 1
//     thread, quiet machine, 61 alternating calls per kernel, the ops alone; scratch script timing the A1/A3 bench
//     shapes and one 279-token, 12-head LookWhere sequence), brgemm / hand-written time, median (best): forward A1
//     0.78 (0.77), A3 0.97 (0.98), A3 causal 0.96 (0.96), LookWhere 279 tokens 0.94 (0.91); backward (A4, 21-31
//     calls) 1.24 (1.13-1.18). So the forward's choice flipped after the brgemm forward's two-loop softmax (3 Dec);
//     the backward's five oneDNN calls per (query tile, key block) still lose to the hand kernel's fused loops. The
//     backward reads only q, k, v, out, lse and dout, which both kernels define alike (lse in float32, out rounded
//     once), so a brgemm forward pairs with a hand-written backward. History (same machine type, 2 Dec, before the
//     brgemm kernel's AMX-side work): forward A1 0.95, A3 1.19-1.31; backward 1.5-1.9.
//   - fp16 without AMX-FP16: the portable kernel (the hand-written kernel is bf16 only). On AVX512-FP16 CPUs oneDNN
//     has an fp16 micro-kernel that takes B row-major and widens to float32 FMAs (no fp32-accumulating fp16 product
//     exists there); brgemm runs on it when forced, but measured slower than the portable kernel (Intel Xeon with
//     AMX-BF16 and AVX512-FP16, no AMX-FP16, 1 thread, best of 8 alternating calls, brgemm / portable time): A1
//     forward 1.05, A3 forward 1.18, A1 forward + backward 1.38, A3 forward + backward 1.45. Also tried there: the
//     forward with each fp16 value split exactly into two bf16 parts and three AMX-BF16 products (scalar splitting
//     while packing): 1.09x (A1) and 1.50x (A3) the portable kernel's time, so not kept.
#include "cpu/varlen_attention_isa.h"

#include <ATen/native/CPUBlas.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "cpu/varlen_attention_brgemm.h"
#include "cpu/varlen_attention_lowp.h"

namespace lookfast {
namespace varlen_isa {
namespace {

constexpr int64_t kMinMatrixHeadDim = varlen_lowp::kMinDotHeadDim;  // 32, as the hand-written kernel

// bf16 on AVX512-BF16 without AMX: brgemm (true) or the hand-written kernel (false), per direction (measured: the
// file's note above).
constexpr bool kBrgemmForwardWithoutAmx = true;
constexpr bool kBrgemmBackwardWithoutAmx = false;

enum class Request { kAuto, kBaseline, kAvx512Bf16, kBrgemm };

Request request() {
  const char* isa = std::getenv("LOOKFAST_CPU_ISA");
  if (isa == nullptr || *isa == '\0' || std::strcmp(isa, "auto") == 0) return Request::kAuto;
  if (std::strcmp(isa, "baseline") == 0) return Request::kBaseline;
  if (std::strcmp(isa, "avx512bf16") == 0) return Request::kAvx512Bf16;
  if (std::strcmp(isa, "brgemm") == 0) return Request::kBrgemm;
  TORCH_WARN_ONCE("lookfast: LOOKFAST_CPU_ISA=", isa,
                  " is not one of auto, baseline, avx512bf16, brgemm; varlen_attention uses the automatic choice");
  return Request::kAuto;
}

// The hand-written kernel where the CPU has AVX512-BF16, for bf16 and head dims >= 32 (its own rule).
bool dot_kernel(at::ScalarType dtype, int64_t head_dim) { return varlen_lowp::use_dot_kernel(dtype, head_dim); }

Kernel automatic(at::ScalarType dtype, int64_t head_dim, bool backward) {
  if (head_dim < kMinMatrixHeadDim) return Kernel::kPortable;
  const bool without_amx = dtype == at::kBFloat16 && (backward ? kBrgemmBackwardWithoutAmx : kBrgemmForwardWithoutAmx);
  if (varlen_brgemm::available(dtype) && (without_amx || at::native::cpublas::could_pack(dtype))) return Kernel::kBrgemm;
  if (dot_kernel(dtype, head_dim)) return Kernel::kDot;
  return Kernel::kPortable;  // fp16 without AMX-FP16 (AVX512-FP16's micro-kernel measured slower: note above)
}

// The kernel for one call: a forced kernel the CPU or dtype lacks falls back to the automatic choice, with a one-time
// warning (given by the forward, which runs first).
Kernel choose(at::ScalarType dtype, int64_t head_dim, bool backward) {
  const bool warn = !backward;
  if (dtype != at::kBFloat16 && dtype != at::kHalf) return Kernel::kPortable;
  switch (request()) {
    case Request::kBaseline:
      return Kernel::kPortable;
    case Request::kBrgemm:
      if (varlen_brgemm::available(dtype)) return Kernel::kBrgemm;
      if (warn)
        TORCH_WARN_ONCE("lookfast: LOOKFAST_CPU_ISA=brgemm, but torch's oneDNN brgemm has no ", dtype,
                        " micro-kernel on this CPU (bf16 needs AVX512-BF16 or AMX, fp16 AMX-FP16 or AVX512-FP16); varlen_attention "
                        "uses the automatic choice (",
                        name(automatic(dtype, head_dim, backward)), " for this call)");
      return automatic(dtype, head_dim, backward);
    case Request::kAvx512Bf16:
      if (dtype == at::kBFloat16 && dot_kernel(dtype, 64))
        return dot_kernel(dtype, head_dim) ? Kernel::kDot : Kernel::kPortable;
      if (warn)
        TORCH_WARN_ONCE("lookfast: LOOKFAST_CPU_ISA=avx512bf16, but the hand-written AVX512-BF16 kernel ",
                        dtype == at::kBFloat16 ? "needs a CPU with AVX512-BF16" : "covers bfloat16 only",
                        "; varlen_attention uses the automatic choice (", name(automatic(dtype, head_dim, backward)),
                        " for this call)");
      return automatic(dtype, head_dim, backward);
    case Request::kAuto:
    default:
      return automatic(dtype, head_dim, backward);
  }
}

}  // namespace

Kernel forward_kernel(at::ScalarType dtype, int64_t head_dim) { return choose(dtype, head_dim, false); }

Kernel backward_kernel(at::ScalarType dtype, int64_t head_dim) { return choose(dtype, head_dim, true); }

const char* name(Kernel k) {
  switch (k) {
    case Kernel::kDot: return "avx512bf16";
    case Kernel::kBrgemm: return "brgemm";
    case Kernel::kPortable:
    default: return "baseline";
  }
}

namespace {
std::string kernel_for(at::ScalarType dtype, int64_t head_dim, bool backward) {
  return name(backward ? backward_kernel(dtype, head_dim) : forward_kernel(dtype, head_dim));
}
}  // namespace

}  // namespace varlen_isa

// A diagnostic, not an op on tensors (its own namespace, outside lookfast._backend's families): the name of the CPU
// kernel ("brgemm", "avx512bf16" or "baseline", the LOOKFAST_CPU_ISA spellings) that varlen_attention's forward or
// backward runs now for this dtype and head dim. Tests use it to run each kernel present and skip the others
// honestly; benchmarks to label their rows.
TORCH_LIBRARY(lookfast_cpu, m) {
  m.def("varlen_attention_kernel(ScalarType dtype, int head_dim, bool backward=False) -> str",
        &varlen_isa::kernel_for);
}

}  // namespace lookfast
