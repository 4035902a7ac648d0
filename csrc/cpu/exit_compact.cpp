// CPU kernels of the exit-masked execution family (lookfast/ops/exit.py):
//   exit_confidence_mask: one pass over the logits (confidence per row, threshold test), then the prefix positions
//                         of survivors and exited rows;
//   compact_rows:         every state's surviving rows gathered in one parallel region (a memcpy per row and state);
//   compact_rows_backward: the gather's adjoint (index_add into zeros);
//   exit_scatter:         rows written back to their batch positions (a memcpy per row), in place.
// Cost: the logits are read once (n x C elements, one exp each); the states' surviving bytes are read and written
// once, so the gather runs at memory-copy speed: the bar is one dst.copy_ of the same bytes.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/index_select.h>
#include <torch/library.h>

#include <cstring>
#include <limits>
#include <vector>

#include "common/exit_compact.h"
#include "common/exit_checks.h"
#include "cpu/row_buffer_pool.h"
#include "cpu/vector_math.h"

namespace lookfast {
namespace {

using namespace cpu_vec;

// RowStats of one contiguous float32 row, vectorised: the row (a few KB) is read twice from L1 instead of once
// through the scalar online update, whose exp and branches per element cost ~5 ns (a fifth of E1's time).
// Pass 1: lane-wise top two (ties counted) and a NaN flag; the lanes' top twos merge through RowStats::push's rule.
// Pass 2: s and t at the final max. Same conventions as the scalar path: NaN or +inf anywhere, or no finite
// maximum, gives NaN; a -inf logit adds nothing; exp is vexp2 (~2e-7 relative, below 2^-125 flushed to 0).
LF_MULTIVERSION void confidence_rows_f32(const float* base, int64_t row_stride, int64_t begin, int64_t end,
                                         int64_t classes, int64_t criterion, float threshold, uint8_t* passes) {
  typedef Vec<float>::type V;
  constexpr int VL = Vec<float>::size;
  constexpr float kLog2e = 1.4426950408889634f;
  const float inf = std::numeric_limits<float>::infinity();
  const int64_t full = classes / VL * VL;
  for (int64_t r = begin; r < end; ++r) {
    const float* x = base + r * row_stride;
    V m1 = vbroadcast(-inf), m2 = vbroadcast(-inf);
    vint16 nan = {};
    for (int64_t j = 0; j < full; j += VL) {
      const V v = vload(x + j);
      nan |= v != v;
      const V lo = v < m1 ? v : m1;
      m2 = vmax(m2, lo);
      m1 = vmax(m1, v);
    }
    RowStats<float> st = RowStats<float>::empty();
    const auto top2 = [&st](float y) {  // RowStats::push's rule for (m1, m2): a tie with m1 becomes m2
      if (y > st.m1) {
        st.m2 = st.m1;
        st.m1 = y;
      } else if (y > st.m2) {
        st.m2 = y;
      }
    };
    bool bad = false;
    for (int i = 0; i < VL; ++i) {
      bad |= nan[i] != 0;
      top2(m1[i]);
      top2(m2[i]);
    }
    for (int64_t j = full; j < classes; ++j) {
      bad |= x[j] != x[j];
      top2(x[j]);
    }
    if (bad || !(st.m1 > -inf) || st.m1 == inf) {
      passes[r] = 0;  // NaN confidence never exits
      continue;
    }
    const V mx = vbroadcast(st.m1);
    V s = {}, t = {};
    for (int64_t j = 0; j < full; j += VL) {
      const V d = vmax(vload(x + j) - mx, vbroadcast(-1e30f));  // -inf -> finite, so e * d is 0, not NaN
      const V e = vexp2(d * kLog2e);
      s += e;
      t += e * d;
    }
    float ss = 0.f, tt = 0.f;
    for (int i = 0; i < VL; ++i) {
      ss += s[i];
      tt += t[i];
    }
    for (int64_t j = full; j < classes; ++j) {
      if (x[j] == -inf) continue;
      const float d = x[j] - st.m1;
      const float e = std::exp(d);
      ss += e;
      tt += e * d;
    }
    st.s = ss;
    st.t = tt;
    passes[r] = exit_passes<float>(st.confidence(criterion), threshold, criterion) ? 1 : 0;
  }
}

// One state's row copy: rows of `bytes` bytes, `src_stride`/`dst_stride` bytes apart.
struct RowCopy {
  const char* src;
  char* dst;
  int64_t src_stride, dst_stride, bytes;

  static RowCopy between(const at::Tensor& from, const at::Tensor& to) {
    const int64_t es = static_cast<int64_t>(from.element_size());
    return {static_cast<const char*>(from.const_data_ptr()), static_cast<char*>(to.mutable_data_ptr()),
            from.stride(0) * es, to.stride(0) * es, from.numel() / std::max<int64_t>(from.size(0), 1) * es};
  }
  static RowCopy gather(const at::Tensor& state, const at::Tensor& out) { return between(state, out); }
  static RowCopy scatter(const at::Tensor& values, const at::Tensor& out) { return between(values, out); }
};

// An uninitialised output, contiguous or with `strides` (compacted_strides: dense, the same size); large ones come
// from RowBufferPool (see there: page faults would otherwise cost more than the copy).
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& opts,
                        const std::optional<std::vector<int64_t>>& strides = std::nullopt) {
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t bytes = static_cast<size_t>(numel) * opts.dtype().itemsize();
  RowBufferPool& pool = RowBufferPool::instance();
  size_t capacity = 0;
  void* p = pool.enabled() && bytes >= RowBufferPool::kMinPooledBytes ? pool.acquire(bytes, &capacity) : nullptr;
  if (p == nullptr) return compacted_empty(sizes, strides, opts);
  auto release = [capacity](void* q) { RowBufferPool::instance().release(q, capacity); };
  return strides ? at::from_blob(p, sizes, *strides, release, opts) : at::from_blob(p, sizes, release, opts);
}

// Row i of the work: copy source row idx[i] to destination row i (a gather), or source row i to destination row
// idx[i] (a scatter). All states' copies of a row happen in the same task, so one parallel region serves them all.
void copy_rows_parallel(const std::vector<RowCopy>& copies, const int64_t* idx, int64_t count,
                        bool indices_are_destinations) {
  if (copies.empty() || count == 0) return;
  int64_t row_bytes = 0;
  for (const RowCopy& c : copies) row_bytes += c.bytes;
  if (row_bytes == 0) return;
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / row_bytes);  // tasks of >= 64 KiB amortise the fork
  at::parallel_for(0, count, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t from = indices_are_destinations ? i : idx[i];
      const int64_t to = indices_are_destinations ? idx[i] : i;
      for (const RowCopy& c : copies) std::memcpy(c.dst + to * c.dst_stride, c.src + from * c.src_stride, c.bytes);
    }
  });
}

// The vectorised path covers contiguous float32 rows (the models' logits); other dtypes take the scalar path.
template <typename scalar_t>
bool confidence_rows_vectorized(const scalar_t*, int64_t, int64_t, int64_t, int64_t, int64_t, double, uint8_t*) {
  return false;
}
template <>
bool confidence_rows_vectorized<float>(const float* base, int64_t row_stride, int64_t begin, int64_t end,
                                       int64_t classes, int64_t criterion, double threshold, uint8_t* passes) {
  confidence_rows_f32(base, row_stride, begin, end, classes, criterion, static_cast<float>(threshold), passes);
  return true;
}

std::tuple<at::Tensor, at::Tensor> exit_confidence_mask_cpu(const at::Tensor& logits_in, const at::Tensor& threshold,
                                                            int64_t criterion) {
  check_confidence_args(logits_in, threshold, criterion);
  // One confidence definition per dtype, whatever the layout: float32 rows always take the vectorised path (a
  // strided row is copied first), so calibrate_thresholds, which finds thresholds with this op, and the runner,
  // whose logits may be laid out differently, compute bit-identical confidences.
  const at::Tensor logits =
      logits_in.scalar_type() == at::kFloat && logits_in.size(1) > 1 && logits_in.stride(1) != 1
          ? logits_in.contiguous()
          : logits_in;
  TORCH_CHECK(logits.is_cpu() && threshold.is_cpu(), "exit_confidence_mask: logits and threshold must be on the CPU");
  const int64_t n = logits.size(0), classes = logits.size(1);
  const double thr = threshold.item<double>();
  std::vector<uint8_t> passes(static_cast<size_t>(n));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "exit_confidence_mask_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* base = logits.const_data_ptr<scalar_t>();
    const int64_t s0 = logits.stride(0), s1 = logits.stride(1);
    const acc_t t = static_cast<acc_t>(thr);
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(classes, 1));
    at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
      if ((s1 == 1 || classes == 1) && confidence_rows_vectorized(base, s0, begin, end, classes, criterion, thr, passes.data())) {
        return;
      }
      for (int64_t i = begin; i < end; ++i) {
        const acc_t conf = row_confidence<scalar_t, acc_t>(base + i * s0, s1, classes, criterion);
        passes[i] = exit_passes<acc_t>(conf, t, criterion) ? 1 : 0;
      }
    });
  });
  int64_t exits = 0;
  for (int64_t i = 0; i < n; ++i) exits += passes[i];
  auto opts = logits.options().dtype(at::kLong);
  at::Tensor keep = at::empty({n - exits}, opts), exited = at::empty({exits}, opts);
  int64_t* k = keep.mutable_data_ptr<int64_t>();
  int64_t* e = exited.mutable_data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    if (passes[i]) *e++ = i; else *k++ = i;
  }
  return {keep, exited};
}

std::vector<at::Tensor> compact_rows_cpu(at::TensorList states, const at::Tensor& keep) {
  const int64_t rows = check_compact_args(states, keep);
  const at::Tensor index = keep.contiguous();
  const int64_t m = index.size(0);
  const int64_t* idx = index.const_data_ptr<int64_t>();
  check_row_indices(idx, m, rows, "keep");

  std::vector<at::Tensor> outs;
  std::vector<RowCopy> fast;
  outs.reserve(states.size());
  for (const at::Tensor& s : states) {
    auto sizes = s.sizes().vec();
    sizes[0] = m;
    // Rows that are dense blocks (contiguous, or e.g. channels_last images) keep their layout and copy as bytes.
    const auto strides = compacted_strides(s);
    at::Tensor out = empty_output(sizes, s.options(), strides);
    if (m > 0) {
      if (out.numel() == 0) {
        // zero-width rows: nothing to copy (and a null data pointer must not reach memcpy)
      } else if (strides || rows_are_contiguous(s)) {
        fast.push_back(RowCopy::gather(s, out));
      } else {
        at::index_select_out(out, s, 0, index);  // strided rows (rare: transposed states): ATen's strided gather
      }
    }
    outs.push_back(out);
  }
  copy_rows_parallel(fast, idx, m, /*indices_are_destinations=*/false);
  return outs;
}

std::vector<at::Tensor> compact_rows_backward_cpu(at::TensorList grads, const at::Tensor& keep, int64_t rows) {
  return compact_rows_backward_impl(grads, keep, rows);
}

void exit_scatter_cpu(const at::Tensor& out, const at::Tensor& batch_index, const at::Tensor& values) {
  check_scatter_args(out, batch_index, values);
  const at::Tensor index = batch_index.contiguous();
  const int64_t k = index.size(0);
  const int64_t* idx = index.const_data_ptr<int64_t>();
  check_row_indices(idx, k, out.size(0), "batch_index");
  if (k == 0 || values.numel() == 0) return;
  // Duplicate destinations: the LAST occurrence wins, deterministically. Copying every pair in parallel would race
  // (two threads memcpy into one row: a torn row mixing both values), so only each destination's last writer copies.
  std::vector<int64_t> last(k > 1 ? static_cast<size_t>(out.size(0)) : 0, -1);
  bool duplicates = false;
  for (int64_t j = 0; j < k && k > 1; ++j) {
    duplicates |= last[idx[j]] >= 0;
    last[idx[j]] = j;
  }
  std::vector<int64_t> src_rows, dst_rows;
  if (duplicates) {
    for (int64_t j = 0; j < k; ++j)
      if (last[idx[j]] == j) {
        src_rows.push_back(j);
        dst_rows.push_back(idx[j]);
      }
  }
  if (rows_are_contiguous(out) && rows_are_contiguous(values)) {
    std::vector<RowCopy> one{RowCopy::scatter(values, out)};
    if (!duplicates) {
      copy_rows_parallel(one, idx, k, /*indices_are_destinations=*/true);
    } else {
      // Winners only: value row src_rows[i] to out row dst_rows[i] (distinct destinations, so no race).
      const RowCopy& c = one[0];
      const int64_t count = static_cast<int64_t>(src_rows.size());
      const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(c.bytes, 1));
      at::parallel_for(0, count, grain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i)
          std::memcpy(c.dst + dst_rows[i] * c.dst_stride, c.src + src_rows[i] * c.src_stride, c.bytes);
      });
    }
  } else if (!duplicates) {
    const_cast<at::Tensor&>(out).index_copy_(0, index, values);
  } else {
    const auto opts = index.options();
    const at::Tensor src = at::from_blob(src_rows.data(), {static_cast<int64_t>(src_rows.size())}, opts);
    const at::Tensor dst = at::from_blob(dst_rows.data(), {static_cast<int64_t>(dst_rows.size())}, opts);
    const_cast<at::Tensor&>(out).index_copy_(0, dst, values.index_select(0, src));
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(lookfast, CPU, m) {
  m.impl("exit_confidence_mask", &exit_confidence_mask_cpu);
  m.impl("compact_rows", &compact_rows_cpu);
  m.impl("compact_rows_backward", &compact_rows_backward_cpu);
  m.impl("exit_scatter", &exit_scatter_cpu);
}

}  // namespace lookfast

// Plain C entry points (called through ctypes by lookfast.cpu_pool_empty_cache / cpu_pool_cached_bytes): the pool
// is process state, not tensor math, so it gets no dispatcher op.
extern "C" __attribute__((visibility("default"))) size_t lookfast_cpu_pool_empty_cache() {
  return lookfast::RowBufferPool::instance().empty_cache();
}
extern "C" __attribute__((visibility("default"))) size_t lookfast_cpu_pool_cached_bytes() {
  return lookfast::RowBufferPool::instance().cached_bytes();
}
