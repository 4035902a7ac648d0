#pragma once
// bf16 <-> fp32 by bit operations (round to nearest even, NaN kept quiet: the same results as c10::BFloat16), so
// the loops that use them auto-vectorise in each target clone (vector_math.h); fp16 goes through c10::Half. Other
// types convert with a plain cast (float -> float is the identity, double stays double).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu/vector_math.h"

namespace lookfast {

template <typename scalar_t, typename acc_t = float>
LF_INLINE acc_t widen(scalar_t x) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    uint32_t u = static_cast<uint32_t>(x.x) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return static_cast<acc_t>(f);
  } else {
    return static_cast<acc_t>(x);
  }
}

template <typename scalar_t, typename acc_t = float>
LF_INLINE scalar_t narrow(acc_t f) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    const uint16_t bits = std::isnan(f) ? uint16_t(0x7FC0) : uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    return c10::BFloat16(bits, c10::BFloat16::from_bits());
  } else {
    return static_cast<scalar_t>(f);
  }
}

namespace cpu_vec {

// Vector forms for the kernels' target clones (vector_math.h): 16 (or, _half, 8 with the upper lanes zero) elements
// of float or bf16 as float lanes, and float lanes stored as float or as bf16 rounded like narrow() above.
template <typename scalar_t>
constexpr bool kVectorWidens = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>;

template <typename scalar_t, int N = 16>
LF_INLINE Vec<float>::type vload_widen(const scalar_t* p) {
  static_assert(kVectorWidens<scalar_t> && (N == 16 || N == 8));
  if constexpr (std::is_same_v<scalar_t, float>) {
    if constexpr (N == 16) return vload(p);
    else return vload_half(p);
  } else {
    Vec<float>::type f = {};
    if constexpr (N == 16) {
      typedef uint16_t U16 __attribute__((vector_size(32)));
      typedef uint32_t U32 __attribute__((vector_size(64)));
      U16 h;
      std::memcpy(&h, p, sizeof(h));
      const U32 w = __builtin_convertvector(h, U32) << 16;
      std::memcpy(&f, &w, sizeof(w));
    } else {
      typedef uint16_t U16 __attribute__((vector_size(16)));
      typedef uint32_t U32 __attribute__((vector_size(32)));
      U16 h;
      std::memcpy(&h, p, sizeof(h));
      const U32 w = __builtin_convertvector(h, U32) << 16;
      std::memcpy(&f, &w, sizeof(w));  // lanes 8..15 stay zero
    }
    return f;
  }
}

template <typename scalar_t, int N = 16>
LF_INLINE void vstore_narrow(scalar_t* p, Vec<float>::type v) {
  static_assert(kVectorWidens<scalar_t> && (N == 16 || N == 8));
  if constexpr (std::is_same_v<scalar_t, float>) {
    if constexpr (N == 16) vstore(p, v);
    else vstore_half(p, v);
  } else {
    typedef uint16_t U16 __attribute__((vector_size(32)));
    typedef uint32_t U32 __attribute__((vector_size(64)));
    U32 u;
    std::memcpy(&u, &v, sizeof(u));
    U32 bits = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    bits = v != v ? U32{} + 0x7FC0u : bits;
    const U16 h = __builtin_convertvector(bits, U16);
    std::memcpy(p, &h, 2 * N);
  }
}

// N elements (N = the acc_t vector width, or half of it with the upper lanes zero) of a row as acc_t lanes, and
// acc_t lanes stored as N elements rounded once: plain loads / stores when scalar_t is acc_t (float or double), the
// bf16 <-> float conversions above otherwise, and (loads only) float widened to double lanes. The kernels read rows
// through these, with no widened copy: a buffer written and read back at once stalls every load on store forwarding.
template <typename scalar_t, typename acc_t, int N = Vec<acc_t>::size>
LF_INLINE typename Vec<acc_t>::type load_lanes(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, double>) {
    static_assert(N == Vec<double>::size);
    typedef float F8 __attribute__((vector_size(sizeof(float) * Vec<double>::size)));
    F8 f;
    std::memcpy(&f, p, sizeof(f));
    return __builtin_convertvector(f, Vec<double>::type);
  } else if constexpr (!std::is_same_v<scalar_t, acc_t>) {
    return vload_widen<scalar_t, N>(p);
  } else if constexpr (N == Vec<acc_t>::size) {
    return vload(p);
  } else {
    return vload_half(p);
  }
}
template <typename scalar_t, typename acc_t, int N = Vec<acc_t>::size>
LF_INLINE void store_lanes(scalar_t* p, typename Vec<acc_t>::type v) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if constexpr (N == Vec<acc_t>::size) vstore(p, v);
    else vstore_half(p, v);
  } else {
    vstore_narrow<scalar_t, N>(p, v);
  }
}

}  // namespace cpu_vec
}  // namespace lookfast
