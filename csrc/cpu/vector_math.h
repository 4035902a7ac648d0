#pragma once
// Fixed-width (512-bit) vector helpers for the CPU kernels, written with GCC/Clang vector extensions so that one
// source compiles to AVX-512, AVX2+FMA or baseline code. Kernels mark their entry points LF_MULTIVERSION
// (target_clones: the loader picks the widest the CPU runs) and these helpers LF_INLINE, so every helper is inlined
// into, and compiled for, each clone.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#pragma GCC diagnostic ignored "-Wpsabi"

// The sanitizer build (setup.py LOOKFAST_SANITIZE=1) compiles one clone only: the clones share their source and
// memory accesses, and three instrumented copies would triple the CI build time.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && defined(__linux__) && \
    !defined(LOOKFAST_SANITIZE_BUILD)
#define LF_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LF_MULTIVERSION
#endif
#define LF_INLINE inline __attribute__((always_inline))

namespace lookfast {
namespace cpu_vec {

template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(64)));
  static constexpr int size = 64 / sizeof(T);
};
typedef int32_t vint16 __attribute__((vector_size(64)));

template <typename T>
LF_INLINE typename Vec<T>::type vload(const T* p) {
  typename Vec<T>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
LF_INLINE void vstore(T* p, typename Vec<T>::type v) {
  std::memcpy(p, &v, sizeof(v));
}
// Half-vector load (upper lanes zero) and store, for head dims of VL / 2 (width 8 in float).
template <typename T>
LF_INLINE typename Vec<T>::type vload_half(const T* p) {
  typedef T H __attribute__((vector_size(32)));
  H h;
  std::memcpy(&h, p, sizeof(h));
  const H z = {};
  if constexpr (Vec<T>::size == 16)
    return __builtin_shufflevector(h, z, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  else
    return __builtin_shufflevector(h, z, 0, 1, 2, 3, 4, 5, 6, 7);
}
template <typename T>
LF_INLINE void vstore_half(T* p, typename Vec<T>::type v) {
  typedef T H __attribute__((vector_size(32)));
  H h;
  if constexpr (Vec<T>::size == 16)
    h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
  else
    h = __builtin_shufflevector(v, v, 0, 1, 2, 3);
  std::memcpy(p, &h, sizeof(h));
}
template <typename T>
LF_INLINE typename Vec<T>::type vbroadcast(T x) {
  typename Vec<T>::type v = {};
  return v + x;
}
// maxps semantics: a NaN in `a` is dropped. The kernels do not rely on the max to surface NaN: vexp2 of
// (NaN - max) is NaN, which poisons the row's sum as softmax does.
template <typename V>
LF_INLINE V vmax(V a, V b) {
  return a > b ? a : b;
}

// exp2 for x <= ~0: Cody-Waite split x = n + f (|f| <= 1/2), 2^f by the Cephes exp2f polynomial (~2e-7 relative),
// 2^n added to the exponent bits; inputs below -125 (incl. -inf) flush to exactly 0. NaN in gives NaN out (the
// exponent arithmetic alone would turn it into a finite number or 0, hiding a diverging input).
LF_INLINE Vec<float>::type vexp2(Vec<float>::type x) {
  typedef Vec<float>::type V;
  const V in = x;
  const vint16 keep = x >= -125.0f;
  x = x > -125.0f ? x : vbroadcast(-125.0f);
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits
  const V r = x + magic;
  const V n = r - magic;
  const V f = x - n;
  V p = vbroadcast(1.535336188319500e-4f);
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  vint16 ni = __builtin_bit_cast(vint16, r) - 0x4B400000;  // bits of magic
  vint16 bits = __builtin_bit_cast(vint16, p) + (ni << 23);
  bits &= keep;
  return in != in ? in : __builtin_bit_cast(V, bits);
}
LF_INLINE Vec<double>::type vexp2(Vec<double>::type x) {
  for (int i = 0; i < Vec<double>::size; ++i) x[i] = std::exp2(x[i]);
  return x;
}

// Natural log for x > 0 (Cephes logf: mantissa in [sqrt(1/2), sqrt(2)), ~1 ulp); x == 0 gives -inf, NaN gives NaN.
LF_INLINE Vec<float>::type vlog(Vec<float>::type x) {
  typedef Vec<float>::type V;
  const V in = x;
  const vint16 zero = x <= 0.0f;
  vint16 bits = __builtin_bit_cast(vint16, x);
  vint16 e = (bits >> 23) - 127;
  V m = __builtin_bit_cast(V, (bits & 0x007FFFFF) | 0x3F800000);  // [1, 2)
  const vint16 big = m > 1.41421356f;
  m = big ? m * 0.5f : m;
  e = e - big;  // big is -1 where true
  const V t = m - 1.0f;
  const V z = t * t;
  V p = vbroadcast(7.0376836292e-2f);
  p = p * t - 1.1514610310e-1f;
  p = p * t + 1.1676998740e-1f;
  p = p * t - 1.2420140846e-1f;
  p = p * t + 1.4249322787e-1f;
  p = p * t - 1.6668057665e-1f;
  p = p * t + 2.0000714765e-1f;
  p = p * t - 2.4999993993e-1f;
  p = p * t + 3.3333331174e-1f;
  V y = t * z * p - 0.5f * z + t;
  y += __builtin_convertvector(e, V) * 0.693147180559945f;
  y = zero ? vbroadcast(-std::numeric_limits<float>::infinity()) : y;
  return in != in ? in : y;
}
LF_INLINE Vec<double>::type vlog(Vec<double>::type x) {
  for (int i = 0; i < Vec<double>::size; ++i) x[i] = std::log(x[i]);
  return x;
}

}  // namespace cpu_vec
}  // namespace lookfast
