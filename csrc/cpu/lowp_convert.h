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

}  // namespace lookfast
