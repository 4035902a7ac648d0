#pragma once
// Argument checks of the exit-masked execution ops, shared by the CPU and CUDA kernels (host code only). The
// Python wrappers check first with friendlier messages; these keep the kernels safe when called directly
// (torch.ops.lookfast.*): no op reads or writes out of bounds, whatever it is given. Also the one host-only op
// body that is the same on both devices (compact_rows_backward, composed of ATen ops).
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

#include "common/exit_compact.h"

namespace lookfast {

inline void check_confidence_args(const at::Tensor& logits, const at::Tensor& threshold, int64_t criterion) {
  TORCH_CHECK(logits.dim() == 2, "exit_confidence_mask: logits must be 2-D (n, classes), got ", logits.sizes());
  TORCH_CHECK(logits.size(1) > 0 || logits.size(0) == 0, "exit_confidence_mask: logits need at least one class");
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), "exit_confidence_mask: logits must be floating point");
  TORCH_CHECK(threshold.numel() == 1, "exit_confidence_mask: threshold must hold one value, got shape ",
              threshold.sizes());
  TORCH_CHECK(criterion == kMaxSoftmax || criterion == kEntropy || criterion == kMargin,
              "exit_confidence_mask: criterion must be 0 (max_softmax), 1 (entropy) or 2 (margin), got ", criterion);
}

// Checks the states of compact_rows and returns their common row count (0 when there are none).
inline int64_t check_compact_args(at::TensorList states, const at::Tensor& keep) {
  TORCH_CHECK(keep.dim() == 1 && keep.scalar_type() == at::kLong, "compact_rows: keep must be a 1-D int64 tensor");
  int64_t rows = -1;
  for (size_t i = 0; i < states.size(); ++i) {
    const at::Tensor& s = states[i];
    TORCH_CHECK(s.dim() >= 1, "compact_rows: states[", i, "] must have a leading row dimension");
    TORCH_CHECK(s.device() == keep.device(), "compact_rows: states[", i, "] is on ", s.device(), ", keep on ",
                keep.device());
    if (rows < 0) rows = s.size(0);
    TORCH_CHECK(s.size(0) == rows, "compact_rows: states[", i, "] has ", s.size(0), " rows, states[0] has ", rows);
  }
  return rows < 0 ? 0 : rows;
}

inline void check_scatter_args(const at::Tensor& out, const at::Tensor& batch_index, const at::Tensor& values) {
  TORCH_CHECK(batch_index.dim() == 1 && batch_index.scalar_type() == at::kLong,
              "exit_scatter: batch_index must be a 1-D int64 tensor");
  TORCH_CHECK(out.dim() >= 1 && values.dim() == out.dim(), "exit_scatter: values must have out's number of dims");
  TORCH_CHECK(values.size(0) == batch_index.size(0), "exit_scatter: values has ", values.size(0),
              " rows but batch_index has ", batch_index.size(0));
  for (int64_t d = 1; d < out.dim(); ++d)
    TORCH_CHECK(values.size(d) == out.size(d), "exit_scatter: values and out differ in dim ", d);
  TORCH_CHECK(values.scalar_type() == out.scalar_type(), "exit_scatter: values and out must share a dtype");
  TORCH_CHECK(values.device() == out.device() && batch_index.device() == out.device(),
              "exit_scatter: out, batch_index and values must be on one device");
  // As index_copy_: an expanded `out` (rows sharing memory) or `values` overlapping `out` would make the result
  // depend on the copy order.
  TORCH_CHECK(at::has_internal_overlap(out) != at::MemOverlap::Yes,
              "exit_scatter: out has rows that share memory (an expanded tensor); pass a materialised out");
  const at::MemOverlapStatus overlap = at::get_overlap_status(out, values);
  TORCH_CHECK(overlap == at::MemOverlapStatus::No ||
                  (overlap == at::MemOverlapStatus::TooHard && !out.storage().is_alias_of(values.storage())),
              "exit_scatter: values overlaps out's memory; pass a copy of values");
}

// Host-side bounds check of row indices (CPU: the index is already in host memory).
inline void check_row_indices(const int64_t* idx, int64_t count, int64_t rows, const char* name) {
  for (int64_t i = 0; i < count; ++i)
    TORCH_CHECK(idx[i] >= 0 && idx[i] < rows, name, "[", i, "] = ", idx[i], " is out of range for ", rows, " rows");
}

// True when each row t[i] is one dense block of memory (any stride between rows): rows can then be memcpy'd.
inline bool rows_are_contiguous(const at::Tensor& t) {
  int64_t expected = 1;
  for (int64_t d = t.dim() - 1; d >= 1; --d) {
    if (t.size(d) != 1 && t.stride(d) != expected) return false;
    expected *= t.size(d);
  }
  return true;
}

// The strides compact_rows gives its output for a state t with m rows: t's own strides within a row when each row
// is one dense block in some dimension order (a channels_last image batch, say), so the rows copy as raw bytes and
// the layout the next layer expects survives; else none (the output is contiguous). Rows copy as raw bytes exactly
// when this has a value or rows_are_contiguous(t). lookfast/ops/exit_compact.py's
// compacted_strides is the same rule for the reference and Triton backends and the fake kernel.
inline std::optional<std::vector<int64_t>> compacted_strides(const at::Tensor& t) {
  if (t.dim() < 2 || rows_are_contiguous(t)) return std::nullopt;
  std::vector<int64_t> dims;
  for (int64_t d = 1; d < t.dim(); ++d)
    if (t.size(d) != 1) dims.push_back(d);
  std::sort(dims.begin(), dims.end(), [&](int64_t a, int64_t b) { return t.stride(a) < t.stride(b); });
  int64_t expected = 1;
  for (int64_t d : dims) {
    if (t.stride(d) != expected) return std::nullopt;  // a gap or an overlap within the row
    expected *= t.size(d);
  }
  std::vector<int64_t> strides(t.strides().begin(), t.strides().end());
  strides[0] = expected;  // the row's element count: rows back to back
  return strides;
}

// An uninitialised output of `sizes` (sizes[0] = m rows) with `strides` (compacted_strides), or contiguous.
inline at::Tensor compacted_empty(at::IntArrayRef sizes, const std::optional<std::vector<int64_t>>& strides,
                                  const at::TensorOptions& opts) {
  return strides ? at::empty_strided(sizes, *strides, opts) : at::empty(sizes, opts);
}

// compact_rows_backward on any device: the gather's adjoint, each grad's rows added into zeros at `keep`
// (index_add_ accumulates, so repeated indices are summed). The caller sets the device guard.
inline std::vector<at::Tensor> compact_rows_backward_impl(at::TensorList grads, const at::Tensor& keep,
                                                          int64_t rows) {
  TORCH_CHECK(keep.dim() == 1 && keep.scalar_type() == at::kLong, "compact_rows_backward: keep must be 1-D int64");
  std::vector<at::Tensor> outs;
  outs.reserve(grads.size());
  for (const at::Tensor& g : grads) {
    TORCH_CHECK(g.dim() >= 1 && g.size(0) == keep.size(0), "compact_rows_backward: grad rows must match keep");
    auto sizes = g.sizes().vec();
    sizes[0] = rows;
    outs.push_back(at::zeros(sizes, g.options()).index_add_(0, keep, g));
  }
  return outs;
}

}  // namespace lookfast
