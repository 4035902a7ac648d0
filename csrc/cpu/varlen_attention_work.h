// The packed batch and the forward's work items of the CPU attention kernels: one definition shared by the float
// kernels (varlen_attention.cpp) and the bf16 dot-product kernel (varlen_attention_lowp.cpp).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace lookfast {

// Everything a kernel needs to find one sample's rows in the packed tensors (conventions: common/varlen_attention.h).
struct VarlenProblem {
  int64_t batch, heads, kv_heads, head_dim, v_dim;
  const int32_t* cu_q;
  const int32_t* cu_k;
  double scale;
  bool causal;
};

// One forward work item: sample b, query head h, and the sample-local query range [q_begin, q_end).
struct FwdItem {
  int32_t b, h, q_begin, q_end;
};

// The forward's work items: (sample, chunk of `chunk` queries, head), heads innermost within a chunk so that the
// K/V packing of a kv head is reused by its query heads.
inline std::vector<FwdItem> forward_work_items(const VarlenProblem& pb, int32_t chunk) {
  std::vector<FwdItem> items;
  for (int64_t b = 0; b < pb.batch; ++b) {
    const int32_t len_q = pb.cu_q[b + 1] - pb.cu_q[b];
    for (int32_t s = 0; s < len_q; s += chunk)
      for (int64_t h = 0; h < pb.heads; ++h)
        items.push_back({static_cast<int32_t>(b), static_cast<int32_t>(h), s, std::min(len_q, s + chunk)});
  }
  return items;
}

}  // namespace lookfast
