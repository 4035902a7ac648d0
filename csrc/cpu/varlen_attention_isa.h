#pragma once
// Which CPU kernel runs varlen_attention for bf16/fp16 inputs: the one place that reads the CPU's features and the
// LOOKFAST_CPU_ISA switch (implementation: varlen_attention_isa.cpp; docs/ops.md section 2).
#include <c10/core/ScalarType.h>

#include <cstdint>

namespace lookfast {
namespace varlen_isa {

enum class Kernel {
  kPortable,  // cpu/varlen_attention.cpp: widened to float32, float32 FMAs (every CPU, every dtype)
  kDot,       // cpu/varlen_attention_lowp.cpp: hand-written AVX512-BF16 (vdpbf16ps), bf16, head dim >= 32
  kBrgemm,    // cpu/varlen_attention_brgemm.cpp: oneDNN brgemm (AMX / AVX512-BF16), bf16 (and fp16 where oneDNN has it)
};

// The forward kernel for these inputs now (reads LOOKFAST_CPU_ISA on every call, so tests can switch it).
Kernel forward_kernel(at::ScalarType dtype, int64_t head_dim);
// The backward kernel (the same switch; its automatic choice can differ from the forward's, see the .cpp).
Kernel backward_kernel(at::ScalarType dtype, int64_t head_dim);

const char* name(Kernel k);

}  // namespace varlen_isa
}  // namespace lookfast
