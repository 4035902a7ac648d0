#pragma once
// Run-time CPU feature checks shared by the kernels that carry their own AVX512-BF16 code paths (the library is
// built for baseline x86-64 and chooses kernels from the CPU it finds).

namespace lookfast {

// AVX512-BF16 with the AVX-512 subsets its kernels use (F, BW, VL, DQ); false off x86 or without GCC/clang builtins.
inline bool cpu_has_avx512bf16() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512bf16");
  return has;
#else
  return false;
#endif
}

}  // namespace lookfast
