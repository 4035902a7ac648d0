// CPU kernels of the packed linear (lookfast/models/packed_linear.py): the models' bf16/fp16 nn.Linear layers on
// oneDNN's brgemm micro-kernel (at::native::cpublas::brgemm: AMX tiles or AVX512-BF16 dot products, fp32
// accumulation) over a weight packed once into the micro-kernel's layout (cpu/brgemm_pack.h), with the layer's
// epilogue fused: out = round(residual + scale * (x . W^T + bias)), each output rounded once.
//
// pack_linear_weight(weight (N, K)) -> (N * K_pad,) the weight in column slabs of 64, VNNI-2 or row-major as this CPU's
//   micro-kernel takes it (brgemm_layout.h), K_pad = K rounded up to 32 (zero rows after K).
// packed_linear(x (M, K), packed, N, bias?, scale?, residual?) -> (M, N): 64 x 64 blocks of the output, each one
//   micro-kernel call over all of K into an fp32 scratch in L1, then the epilogue rounds it into the output. Tasks
//   run slab after slab (consecutive tasks share a 64-column slab of the weight, which stays in L1/L2).
// Why not oneDNN's matmul on its own packed weight (torch.ops.mkldnn._linear_pointwise)? At ViT-B's ~280-row GEMMs
//   on one Zen 5 core its calls ran at 400-470 GFLOP/s against 470-500 for these micro-kernel loops (the same
//   micro-kernel, without its per-call primitive overhead), and the residual and layer-scale steps after it
//   (x + gamma * y: two more rounded passes over the output) fold into this epilogue.
// Roofline (ViT-B fc1 at M 279: 279 x 768 x 3072): 1.3 GFLOP against ~6.8 MB (the 4.7 MB weight once, x, the output):
//   ~190 FLOP/byte, compute-bound on the matrix engine at any M above ~40 rows.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "cpu/brgemm_layout.h"
#include "cpu/brgemm_pack.h"
#include "cpu/lowp_convert.h"
#include "vector_math.h"

namespace lookfast {
namespace packed_linear {
namespace {

using at::Tensor;
using brgemm_pack::kBlockM;
using brgemm_pack::kBlockN;

BrgemmLayout layout_for(at::ScalarType dtype) {
  if (dtype == at::kBFloat16) return enabled_brgemm_b_layout<at::BFloat16>();
  if (dtype == at::kHalf) return enabled_brgemm_b_layout<at::Half>();
  return BrgemmLayout::kNone;
}

// The Python names users write (torch.bfloat16 ...), not ATen's (BFloat16 ...).
const char* dtype_name(at::ScalarType dtype) {
  switch (dtype) {
    case at::kBFloat16: return "bfloat16";
    case at::kHalf: return "float16";
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    default: return c10::toString(dtype);
  }
}

// out[r, n0 + j] = round(res[r, n0 + j] + scale[n0 + j] * (acc[r - r0, j] + bias[n0 + j])) for the rows [r0, r1)
// and the `width` columns of one block; each of bias / scale / residual may be absent. Sums in fp32, one rounding.
template <typename scalar_t>
LF_INLINE void epilogue_impl(scalar_t* __restrict__ out, const float* __restrict__ acc, const scalar_t* __restrict__ bias,
                             const scalar_t* __restrict__ scale, const scalar_t* __restrict__ res, int64_t r0,
                             int64_t r1, int64_t n0, int64_t width, int64_t n) {
  using namespace cpu_vec;
  constexpr int64_t kLanes = Vec<float>::size;
  constexpr bool kVector = kVectorWidens<scalar_t>;
  const int64_t wv = kVector ? width / kLanes * kLanes : 0;
  for (int64_t r = r0; r < r1; ++r) {
    const float* a = acc + (r - r0) * kBlockN;
    scalar_t* o = out + r * n + n0;
    const scalar_t* rr = res ? res + r * n + n0 : nullptr;
    if constexpr (kVector) {
      for (int64_t j = 0; j < wv; j += kLanes) {
        Vec<float>::type v = vload(a + j);
        if (bias) v = v + vload_widen(bias + n0 + j);
        if (scale) v = v * vload_widen(scale + n0 + j);
        if (rr) v = v + vload_widen(rr + j);
        vstore_narrow(o + j, v);
      }
    }
    for (int64_t j = wv; j < width; ++j) {
      float v = a[j];
      if (bias) v += widen(bias[n0 + j]);
      if (scale) v *= widen(scale[n0 + j]);
      if (rr) v += widen(rr[j]);
      o[j] = narrow<scalar_t>(v);
    }
  }
}

// One target clone set per dtype (GCC's target_clones does not apply to templates).
#define LF_DEFINE_EPILOGUE(scalar_t)                                                                               \
  LF_MULTIVERSION void epilogue(scalar_t* out, const float* acc, const scalar_t* bias, const scalar_t* scale,      \
                                const scalar_t* res, int64_t r0, int64_t r1, int64_t n0, int64_t width, int64_t n) { \
    epilogue_impl<scalar_t>(out, acc, bias, scale, res, r0, r1, n0, width, n);                                    \
  }
LF_DEFINE_EPILOGUE(at::BFloat16)
LF_DEFINE_EPILOGUE(at::Half)
#undef LF_DEFINE_EPILOGUE

void check_low_precision(const char* name, const Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), "packed_linear: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf,
              "packed_linear: ", name, " must be bfloat16 or float16, got ", dtype_name(t.scalar_type()));
}

Tensor pack_linear_weight_cpu(const Tensor& weight) {
  check_low_precision("weight", weight);
  TORCH_CHECK(weight.dim() == 2, "pack_linear_weight: weight must be 2-D (out_features, in_features), got ",
              weight.dim(), "-D");
  TORCH_CHECK(weight.size(0) > 0 && weight.size(1) > 0, "pack_linear_weight: weight must not be empty, got shape ",
              weight.sizes());
  const BrgemmLayout layout = layout_for(weight.scalar_type());
  TORCH_CHECK(layout != BrgemmLayout::kNone, "pack_linear_weight: this CPU (or this torch build) has no ",
              dtype_name(weight.scalar_type()), " matrix-engine micro-kernel; lookfast.models.packed_linear.brgemm_available(dtype) asks this first");
  return brgemm_pack::pack_b_slabs(weight, brgemm_pack::padded_depth(weight.size(1)),
                                   layout == BrgemmLayout::kVnni2);
}

Tensor packed_linear_cpu(const Tensor& x, const Tensor& packed, int64_t n, const std::optional<Tensor>& bias,
                         const std::optional<Tensor>& scale, const std::optional<Tensor>& residual) {
  check_low_precision("x", x);
  TORCH_CHECK(x.dim() == 2, "packed_linear: x must be 2-D (rows, in_features), got ", x.dim(), "-D");
  TORCH_CHECK(n > 0, "packed_linear: out_features must be positive, got ", n);
  const int64_t m = x.size(0), k = x.size(1), k_pad = brgemm_pack::padded_depth(k);
  TORCH_CHECK(k > 0, "packed_linear: x must have in_features > 0");
  TORCH_CHECK(packed.scalar_type() == x.scalar_type(), "packed_linear: packed_weight has dtype ",
              dtype_name(packed.scalar_type()), " but x has ", dtype_name(x.scalar_type()));
  TORCH_CHECK(packed.dim() == 1 && packed.numel() == n * k_pad && packed.is_contiguous(),
              "packed_linear: packed_weight must be pack_linear_weight's (", n * k_pad, ",) tensor for ", n,
              " outputs and ", k, " inputs, got shape ", packed.sizes());
  const auto vector_arg = [&](const char* name, const std::optional<Tensor>& t) -> Tensor {
    if (!t.has_value()) return Tensor();
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "packed_linear: ", name, " has dtype ",
                dtype_name(t->scalar_type()), " but x has ", dtype_name(x.scalar_type()));
    TORCH_CHECK(t->dim() == 1 && t->size(0) == n, "packed_linear: ", name, " must have shape (", n, ",), got ",
                t->sizes());
    return t->contiguous();
  };
  const Tensor b = vector_arg("bias", bias), s = vector_arg("scale", scale);
  Tensor res;
  if (residual.has_value()) {
    TORCH_CHECK(residual->scalar_type() == x.scalar_type(), "packed_linear: residual has dtype ",
                dtype_name(residual->scalar_type()), " but x has ", dtype_name(x.scalar_type()));
    TORCH_CHECK(residual->dim() == 2 && residual->size(0) == m && residual->size(1) == n,
                "packed_linear: residual must have shape (", m, ", ", n, "), got ", residual->sizes());
    res = residual->contiguous();
  }
  const BrgemmLayout layout = layout_for(x.scalar_type());
  TORCH_CHECK(layout != BrgemmLayout::kNone, "packed_linear: this CPU (or this torch build) has no ",
              dtype_name(x.scalar_type()), " matrix-engine micro-kernel");
  Tensor out = at::empty({m, n}, x.options());
  if (m == 0) return out;
  // The micro-kernel reads K_pad columns of every row of A, rows lda apart: x in place when its rows are dense (any
  // row stride), else a copy; rows padded with zeros when K is not a multiple of 32.
  const bool in_place = k_pad == k && x.stride(1) == 1 && (m == 1 || x.stride(0) >= k);
  const Tensor a_t = in_place ? x : k_pad == k ? x.contiguous() : at::constant_pad_nd(x, {0, k_pad - k}, 0);
  const int64_t lda = in_place ? std::max<int64_t>(x.stride(0), k) : k_pad;
  AT_DISPATCH_REDUCED_FLOATING_TYPES(x.scalar_type(), "packed_linear_cpu", [&] {
    const scalar_t* a = a_t.const_data_ptr<scalar_t>();
    const scalar_t* w = packed.const_data_ptr<scalar_t>();
    const scalar_t* bp = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* sp = s.defined() ? s.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* rp = res.defined() ? res.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const int64_t blocks_m = (m + kBlockM - 1) / kBlockM, slabs = (n + kBlockN - 1) / kBlockN;
    at::parallel_for(0, blocks_m * slabs, 1, [&](int64_t t0, int64_t t1) {
      alignas(64) float acc[kBlockM * kBlockN];
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t slab = t / blocks_m, i = t % blocks_m;
        const int64_t m0 = i * kBlockM, rows = std::min(kBlockM, m - m0);
        const int64_t n0 = slab * kBlockN, width = std::min(kBlockN, n - n0);
        at::native::cpublas::brgemm(rows, width, k_pad, lda, width, kBlockN, /*add_C=*/false, a + m0 * lda,
                                    w + n0 * k_pad, acc, /*is_vnni=*/true);
        epilogue(o, acc, bp, sp, rp, m0, m0 + rows, n0, width, n);
      }
      at::native::cpublas::brgemm_release(true);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lookfast, CPU, m) {
  m.impl("pack_linear_weight", &pack_linear_weight_cpu);
  m.impl("packed_linear", &packed_linear_cpu);
}

}  // namespace packed_linear
}  // namespace lookfast
