// CUDA kernels of the exit-masked execution family (lookfast/ops/exit.py); the confidence math is
// csrc/common/exit_compact.h, shared with the CPU kernels.
//
// Roofline (E1: n 256, C 1000, states (256,144,28,28) + (256,32,144) fp32, half the rows exit):
//   exit_confidence_mask: one warp per row reads its C logits once (1 MB in all, one exp per logit): latency-bound,
//     a few microseconds. Then one at::cumsum over n int32 flags and one positions kernel.
//   compact_rows / exit_scatter: 16-byte vector copies of each surviving row: reads + writes 2 x 60 MB, so
//     bandwidth-bound (~40 us at ~3 TB/s on H100). No FLOPs.
// Host synchronisation: exactly one per exit_confidence_mask call, reading the exit count that sizes keep / exited
// (the API gives them exact shapes); the threshold, flags and prefix sums never leave the device. Indices outside
// the source / destination rows are skipped on the device (never followed); the Python wrapper reports them.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/index_select.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "common/exit_checks.h"
#include "common/exit_compact.h"

namespace lookfast {
namespace {

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 8;  // one warp per row, 256 threads per block

template <typename acc_t>
__device__ __forceinline__ RowStats<acc_t> shfl_xor(const RowStats<acc_t>& v, int lane_mask) {
  RowStats<acc_t> o;
  o.m1 = __shfl_xor_sync(0xffffffffu, v.m1, lane_mask);
  o.m2 = __shfl_xor_sync(0xffffffffu, v.m2, lane_mask);
  o.s = __shfl_xor_sync(0xffffffffu, v.s, lane_mask);
  o.t = __shfl_xor_sync(0xffffffffu, v.t, lane_mask);
  return o;
}

template <typename scalar_t, typename acc_t>
__global__ void exit_confidence_kernel(const scalar_t* __restrict__ logits, int64_t s0, int64_t s1, int64_t n,
                                       int64_t classes, const double* __restrict__ threshold_ptr,
                                       double threshold_value, int64_t criterion,
                                       int32_t* __restrict__ passes) {
  const int lane = threadIdx.x % kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (row >= n) return;  // whole warps leave together: the shuffles below see full warps
  const scalar_t* base = logits + row * s0;
  RowStats<acc_t> st = RowStats<acc_t>::empty();
  for (int64_t j = lane; j < classes; j += kWarp) st.push(static_cast<acc_t>(base[j * s1]));
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) st.merge(shfl_xor(st, offset));
  if (lane == 0) {
    const acc_t conf = st.confidence(criterion);
    const double thr = threshold_ptr != nullptr ? *threshold_ptr : threshold_value;
    passes[row] = exit_passes<acc_t>(conf, static_cast<acc_t>(thr), criterion) ? 1 : 0;
  }
}

__global__ void exit_positions_kernel(const int32_t* __restrict__ passes, const int32_t* __restrict__ inclusive,
                                      int64_t n, int64_t* __restrict__ keep, int64_t* __restrict__ exited) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int32_t p = passes[i];
  const int64_t before = static_cast<int64_t>(inclusive[i]) - p;  // exits among rows 0..i-1
  if (p) exited[before] = i; else keep[i - before] = i;
}

// Row copies in words of `word_t` (16, 8, 4 or 1 bytes, the widest that every row start and length allows).
// Gather: dst row r <- src row index[r]; scatter: dst row index[r] <- src row r. grid.x covers a row's words,
// grid.y strides over the rows.
template <typename word_t, bool kScatter>
__global__ void copy_rows_kernel(const char* __restrict__ src, char* __restrict__ dst,
                                 const int64_t* __restrict__ index, int64_t rows, int64_t index_bound,
                                 int64_t src_stride, int64_t dst_stride, int64_t row_words) {
  const int64_t w = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (w >= row_words) return;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const int64_t target = index[r];
    if (target < 0 || target >= index_bound) continue;
    const int64_t from = kScatter ? r : target, to = kScatter ? target : r;
    const word_t* s = reinterpret_cast<const word_t*>(src + from * src_stride);
    word_t* d = reinterpret_cast<word_t*>(dst + to * dst_stride);
    d[w] = s[w];
  }
}

template <bool kScatter>
void launch_copy_rows(const at::Tensor& from, const at::Tensor& to, const at::Tensor& index, int64_t index_bound) {
  const int64_t rows = index.size(0);
  const int64_t es = static_cast<int64_t>(from.element_size());
  const int64_t row_bytes = from.numel() / std::max<int64_t>(from.size(0), 1) * es;
  if (rows == 0 || row_bytes == 0) return;
  const char* src = static_cast<const char*>(from.const_data_ptr());
  char* dst = static_cast<char*>(to.mutable_data_ptr());
  const int64_t src_stride = from.stride(0) * es, dst_stride = to.stride(0) * es;
  auto aligned = [&](int64_t a) {
    return row_bytes % a == 0 && src_stride % a == 0 && dst_stride % a == 0 &&
           reinterpret_cast<uintptr_t>(src) % a == 0 && reinterpret_cast<uintptr_t>(dst) % a == 0;
  };
  const int64_t word = aligned(16) ? 16 : aligned(8) ? 8 : aligned(4) ? 4 : 1;
  const int64_t row_words = row_bytes / word;
  const int threads = 256;
  const dim3 grid(static_cast<unsigned>((row_words + threads - 1) / threads),
                  static_cast<unsigned>(std::min<int64_t>(rows, 65535)));
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t* idx = index.const_data_ptr<int64_t>();
#define LOOKFAST_COPY(T)                                                                                    \
  copy_rows_kernel<T, kScatter><<<grid, threads, 0, stream>>>(src, dst, idx, rows, index_bound, src_stride, \
                                                              dst_stride, row_words)
  if (word == 16) LOOKFAST_COPY(uint4);
  else if (word == 8) LOOKFAST_COPY(uint2);
  else if (word == 4) LOOKFAST_COPY(uint32_t);
  else LOOKFAST_COPY(uint8_t);
#undef LOOKFAST_COPY
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> exit_confidence_mask_cuda(const at::Tensor& logits, const at::Tensor& threshold,
                                                             int64_t criterion) {
  check_confidence_args(logits, threshold, criterion);
  TORCH_CHECK(logits.is_cuda(), "exit_confidence_mask: logits must be on a CUDA device here, got ", logits.device());
  TORCH_CHECK(threshold.is_cpu() || threshold.device() == logits.device(),
              "exit_confidence_mask: threshold must be on the CPU or on logits' device, got ", threshold.device());
  c10::cuda::CUDAGuard guard(logits.device());
  const int64_t n = logits.size(0), classes = logits.size(1);
  auto long_opts = logits.options().dtype(at::kLong);
  if (n == 0) return {at::empty({0}, long_opts), at::empty({0}, long_opts)};
  // A CPU threshold is passed by value (read on the host, no device sync); a device threshold is read by the kernel.
  const bool on_device = threshold.is_cuda();
  const at::Tensor thr = on_device ? threshold.reshape({}).to(at::kDouble).contiguous() : at::Tensor();
  const double thr_value = on_device ? 0.0 : threshold.item<double>();
  at::Tensor passes = at::empty({n}, logits.options().dtype(at::kInt));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "exit_confidence_mask_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const unsigned blocks = static_cast<unsigned>((n + kRowsPerBlock - 1) / kRowsPerBlock);
    exit_confidence_kernel<scalar_t, acc_t><<<blocks, kRowsPerBlock * kWarp, 0, stream>>>(
        logits.const_data_ptr<scalar_t>(), logits.stride(0), logits.stride(1), n, classes,
        on_device ? thr.const_data_ptr<double>() : nullptr, thr_value, criterion, passes.mutable_data_ptr<int32_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor inclusive = at::cumsum(passes, 0, at::kInt);
  const int64_t exits = inclusive[n - 1].item<int64_t>();  // the one host sync: it sizes the outputs
  at::Tensor keep = at::empty({n - exits}, long_opts), exited = at::empty({exits}, long_opts);
  exit_positions_kernel<<<static_cast<unsigned>((n + 255) / 256), 256, 0, stream>>>(
      passes.const_data_ptr<int32_t>(), inclusive.const_data_ptr<int32_t>(), n, keep.mutable_data_ptr<int64_t>(),
      exited.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {keep, exited};
}

std::vector<at::Tensor> compact_rows_cuda(at::TensorList states, const at::Tensor& keep) {
  const int64_t rows = check_compact_args(states, keep);
  c10::cuda::CUDAGuard guard(keep.device());
  const at::Tensor index = keep.contiguous();
  const int64_t m = index.size(0);
  std::vector<at::Tensor> outs;
  outs.reserve(states.size());
  for (const at::Tensor& s : states) {
    auto sizes = s.sizes().vec();
    sizes[0] = m;
    const auto strides = compacted_strides(s);  // dense-block rows (e.g. channels_last) keep their layout
    at::Tensor out = compacted_empty(sizes, strides, s.options());
    if (m > 0 && out.numel() > 0) {
      if (strides || rows_are_contiguous(s)) {
        launch_copy_rows<false>(s, out, index, rows);
      } else {
        at::index_select_out(out, s, 0, index);
      }
    }
    outs.push_back(out);
  }
  return outs;
}

std::vector<at::Tensor> compact_rows_backward_cuda(at::TensorList grads, const at::Tensor& keep, int64_t rows) {
  c10::cuda::CUDAGuard guard(keep.device());
  return compact_rows_backward_impl(grads, keep, rows);
}

void exit_scatter_cuda(const at::Tensor& out, const at::Tensor& batch_index, const at::Tensor& values) {
  check_scatter_args(out, batch_index, values);
  c10::cuda::CUDAGuard guard(out.device());
  const at::Tensor index = batch_index.contiguous();
  if (index.size(0) == 0 || values.numel() == 0) return;
  if (rows_are_contiguous(out)) {
    const at::Tensor v = rows_are_contiguous(values) ? values : values.contiguous();
    launch_copy_rows<true>(v, out, index, out.size(0));
  } else {
    const_cast<at::Tensor&>(out).index_copy_(0, index, values);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(lookfast, CUDA, m) {
  m.impl("exit_confidence_mask", &exit_confidence_mask_cuda);
  m.impl("compact_rows", &compact_rows_cuda);
  m.impl("compact_rows_backward", &compact_rows_backward_cuda);
  m.impl("exit_scatter", &exit_scatter_cuda);
}

}  // namespace lookfast
