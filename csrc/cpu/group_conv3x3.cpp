// CPU kernel of the bf16 grouped 3x3 convolution with 16-channel groups (lookfast/models/dyn_perceiver/layers.py),
// the RegNetY bottleneck's middle conv in Dyn-Perceiver's fused path: out = act(conv(x, weight, padding 1, stride s,
// groups C / 16) + bias), x and out channels-last bf16, weight (C, 16, 3, 3) bf16 (BatchNorm folded), bias fp32.
//
// Why a kernel of its own: oneDNN (what torch's convolution and inductor run) took ~65 GFLOP/s on the stride-2 ones
// at 112 and 56 px (one Zen 5 core, B 16: 14.6 ms at 64 channels, 7.3 ms at 144), where the matrix engine allows
// several times that; this kernel ran them at 170-230 GFLOP/s (5.1 and 3.1 ms). oneDNN stays faster on the
// stride-1 and the narrower late-stage ones, which the model leaves to it (layers.py says which).
// How: AVX512-BF16 `vdpbf16ps` with the 16 output channels of a group in the 16 fp32 lanes: each weight vector (one
// tap, one pair of input channels, 16 outputs) is loaded once and multiplied into 8 consecutive output pixels, whose
// input pairs are broadcast from the channels-last rows (8 accumulators, 9 taps x 8 pairs per pixel); bias + ReLU in
// fp32, each output rounded once. Border pixels (a tap outside the image) take a per-pixel path with bounds checks.
// Roofline (64 channels, 112 -> 56 px, B 16): 0.92 GFLOP against ~32 MB (input 25.7 MB, output 6.4 MB): ~29
// FLOP/byte, compute-bound on one core (~450 GFLOP/s bf16 peak) above ~16 GB/s.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cpu/cpu_features.h"

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define LF_HAVE_GROUP_CONV 1
#define LF_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#else
#define LF_HAVE_GROUP_CONV 0
#endif

namespace lookfast {
namespace group_conv3x3 {
namespace {

using at::Tensor;

constexpr int64_t kGroup = 16;                       // channels per group (inputs and outputs)
constexpr int64_t kPairs = kGroup / 2;               // input-channel pairs per tap
constexpr int64_t kGroupWeights = 9 * kPairs * 32;   // bf16 per packed group: 9 taps x 8 pairs x (16 outputs x 2)
constexpr int kPixels = 8;                           // output pixels per register block

// weight (C, 16, 3, 3) -> per group, per tap t = 3 kh + kw, per input pair p: 16 outputs x (w[o, 2p], w[o, 2p + 1]),
// the operand order of vdpbf16ps.
void pack_weight(const uint16_t* w, uint16_t* packed, int64_t groups) {
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t t = 0; t < 9; ++t)
      for (int64_t p = 0; p < kPairs; ++p)
        for (int64_t o = 0; o < kGroup; ++o)
          for (int64_t j = 0; j < 2; ++j)
            packed[g * kGroupWeights + ((t * kPairs + p) * kGroup + o) * 2 + j] =
                w[((g * kGroup + o) * kGroup + 2 * p + j) * 9 + t];
}

struct Geometry {
  int64_t h, w, c, stride, ho, wo;
  bool relu;
};

#if LF_HAVE_GROUP_CONV
LF_BF16_TARGET inline __attribute__((always_inline)) void store_pixel(uint16_t* out, __m512 acc, bool relu) {
  // maxps returns its second operand when either is NaN: max(0, acc) keeps a NaN, as torch's relu does.
  if (relu) acc = _mm512_max_ps(_mm512_setzero_ps(), acc);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(acc)));
}

// N consecutive output pixels ow0.. of row oh, every tap inside the image's columns (rows are checked).
template <int N>
LF_BF16_TARGET inline __attribute__((always_inline)) void pixel_block(const uint16_t* x, const uint16_t* wg,
                                                                      __m512 bias, uint16_t* out, int64_t oh,
                                                                      int64_t ow0, const Geometry& g) {
  __m512 acc[N];
  for (int j = 0; j < N; ++j) acc[j] = bias;
  const int64_t step = g.stride * g.c;  // elements between the inputs of adjacent output pixels
  for (int kh = 0; kh < 3; ++kh) {
    const int64_t ih = oh * g.stride - 1 + kh;
    if (ih < 0 || ih >= g.h) continue;
    for (int kw = 0; kw < 3; ++kw) {
      const uint16_t* px = x + (ih * g.w + ow0 * g.stride - 1 + kw) * g.c;
      const uint16_t* wt = wg + (kh * 3 + kw) * kPairs * 32;
#pragma GCC unroll 8
      for (int p = 0; p < kPairs; ++p) {
        const __m512bh wv = reinterpret_cast<__m512bh>(_mm512_loadu_si512(wt + p * 32));
#pragma GCC unroll 8
        for (int j = 0; j < N; ++j) {
          int32_t pair;
          std::memcpy(&pair, px + j * step + 2 * p, 4);
          acc[j] = _mm512_dpbf16_ps(acc[j], reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair)), wv);
        }
      }
    }
  }
  for (int j = 0; j < N; ++j) store_pixel(out + j * g.c, acc[j], g.relu);
}

// One output pixel with every tap bounds-checked (the image's borders).
LF_BF16_TARGET void border_pixel(const uint16_t* x, const uint16_t* wg, __m512 bias, uint16_t* out, int64_t oh,
                                 int64_t ow, const Geometry& g) {
  __m512 acc = bias;
  for (int kh = 0; kh < 3; ++kh) {
    const int64_t ih = oh * g.stride - 1 + kh;
    if (ih < 0 || ih >= g.h) continue;
    for (int kw = 0; kw < 3; ++kw) {
      const int64_t iw = ow * g.stride - 1 + kw;
      if (iw < 0 || iw >= g.w) continue;
      const uint16_t* px = x + (ih * g.w + iw) * g.c;
      const uint16_t* wt = wg + (kh * 3 + kw) * kPairs * 32;
      for (int p = 0; p < kPairs; ++p) {
        int32_t pair;
        std::memcpy(&pair, px + 2 * p, 4);
        acc = _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair)),
                               reinterpret_cast<__m512bh>(_mm512_loadu_si512(wt + p * 32)));
      }
    }
  }
  store_pixel(out, acc, g.relu);
}

// Output rows [r0, r1) of the (B * Ho) rows, every group.
LF_BF16_TARGET void conv_rows(const uint16_t* x, const uint16_t* packed, const float* bias, uint16_t* out, int64_t r0,
                              int64_t r1, const Geometry& g) {
  // Columns whose three taps all lie inside the image: ow >= 1 and ow * s + 1 <= W - 1.
  const int64_t lo = std::min<int64_t>(1, g.wo), hi = std::max(lo, std::min(g.wo, (g.w - 2) / g.stride + 1));
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / g.ho, oh = r % g.ho;
    const uint16_t* xb = x + b * g.h * g.w * g.c;
    uint16_t* orow = out + r * g.wo * g.c;
    for (int64_t grp = 0; grp < g.c / kGroup; ++grp) {
      const uint16_t* xg = xb + grp * kGroup;
      const uint16_t* wg = packed + grp * kGroupWeights;
      const __m512 bv = _mm512_loadu_ps(bias + grp * kGroup);
      uint16_t* og = orow + grp * kGroup;
      int64_t ow = 0;
      for (; ow < lo; ++ow) border_pixel(xg, wg, bv, og + ow * g.c, oh, ow, g);
      for (; ow + kPixels <= hi; ow += kPixels) pixel_block<kPixels>(xg, wg, bv, og + ow * g.c, oh, ow, g);
      for (; ow < hi; ++ow) pixel_block<1>(xg, wg, bv, og + ow * g.c, oh, ow, g);
      for (; ow < g.wo; ++ow) border_pixel(xg, wg, bv, og + ow * g.c, oh, ow, g);
    }
  }
}
#endif

Tensor group_conv3x3_cpu(const Tensor& x, const Tensor& weight, const Tensor& bias, int64_t stride, bool relu) {
  TORCH_CHECK(x.dim() == 4, "group_conv3x3: x must be (B, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16,
              "group_conv3x3: x and weight must be bfloat16");
  TORCH_CHECK(bias.scalar_type() == at::kFloat, "group_conv3x3: bias must be float32");
  const int64_t b = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  TORCH_CHECK(c > 0 && c % kGroup == 0, "group_conv3x3: channels must be a positive multiple of 16, got ", c);
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == c && weight.size(1) == kGroup && weight.size(2) == 3 &&
                  weight.size(3) == 3,
              "group_conv3x3: weight must be (C, 16, 3, 3) = (", c, ", 16, 3, 3), got ", weight.sizes());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == c, "group_conv3x3: bias must be (", c, ",), got ", bias.sizes());
  TORCH_CHECK(stride == 1 || stride == 2, "group_conv3x3: stride must be 1 or 2, got ", stride);
  TORCH_CHECK(cpu_has_avx512bf16(), "group_conv3x3: needs a CPU with AVX512-BF16 (lookfast.models.dyn_perceiver."
              "layers.group_conv3x3_available() says whether this one has it)");
  const Geometry g{h, w, c, stride, h > 0 ? (h - 1) / stride + 1 : 0, w > 0 ? (w - 1) / stride + 1 : 0, relu};
  Tensor out = at::empty({b, c, g.ho, g.wo}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (out.numel() == 0) return out;
#if LF_HAVE_GROUP_CONV
  const Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  const Tensor wc = weight.contiguous();
  const Tensor bc = bias.contiguous();
  Tensor packed = at::empty({c / kGroup * kGroupWeights}, weight.options());
  pack_weight(static_cast<const uint16_t*>(wc.const_data_ptr()), static_cast<uint16_t*>(packed.mutable_data_ptr()),
              c / kGroup);
  const uint16_t* xp = static_cast<const uint16_t*>(xc.const_data_ptr());
  const uint16_t* pp = static_cast<const uint16_t*>(packed.const_data_ptr());
  const float* bp = bc.const_data_ptr<float>();
  uint16_t* op = static_cast<uint16_t*>(out.mutable_data_ptr());
  at::parallel_for(0, b * g.ho, 1, [&](int64_t r0, int64_t r1) { conv_rows(xp, pp, bp, op, r0, r1, g); });
#endif
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lookfast, CPU, m) { m.impl("group_conv3x3", &group_conv3x3_cpu); }

}  // namespace group_conv3x3
}  // namespace lookfast
