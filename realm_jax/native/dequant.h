// realm-jax native kernels: every format's dequantization of a group of 32 weights (scalar, and in
// AVX-512 registers), and the layout of each format's planes, shared by the decode matmul (qmatmul.cc) and
// the prefill gemm (gemm.cc), which dequantizes the weight panel by panel from the same planes.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "iquants.h"
#include "kquants_low.h"
#include "lut4.h"
#include "numeric.h"
#include "planes.h"
#include "plain.h"
#include "ternary.h"
#include "xla/ffi/api/ffi.h"

namespace realm {

// Byte b's eight bits as eight bytes of 0 or 16 (bit i to byte i): Q5_0/Q5_1's fifth bits in group_scalar,
// whose loops then shift by no element's index (which the compiler does not vectorize: the avx2 build's Q5_0
// ran at a sixth of Q4_0's speed).
struct FifthBits {
  uint8_t v[256][8];
  constexpr FifthBits() : v() {
    for (int b = 0; b < 256; ++b)
      for (int i = 0; i < 8; ++i) v[b][i] = static_cast<uint8_t>(((b >> i) & 1) << 4);
  }
};
inline constexpr FifthBits kFifthBits{};

// Scalar dequantization of group g (32 elements; for F32/F16/BF16 the elements 32g..32g+31) into out.
// The formulas are those of realm_jax.quant's tile functions (kquants.py / legacy.py).
template <Fmt F>
inline void group_scalar(const Row& r, int64_t g, float* out) {
  if constexpr (Dequant<F>::kDefined) {
    Dequant<F>::scalar(r, g, out);
  } else if constexpr (F == kF32) {
    std::memcpy(out, r.p[0] + 128 * g, 128);
  } else if constexpr (F == kF16 || F == kBF16) {
    for (int i = 0; i < 32; ++i) {
      uint16_t h = u16(r.p[0] + 64 * g + 2 * i);
      out[i] = F == kF16 ? f16_to_f32(h) : bf16_to_f32(h);
    }
  } else if constexpr (F == kQ4_0 || F == kQ4_1 || F == kQ5_0 || F == kQ5_1) {
    // planes: d, [m], [qh], qs; byte i of a block holds element i (low nibble) and i + 16 (high).
    constexpr bool has_m = F == kQ4_1 || F == kQ5_1, five = F == kQ5_0 || F == kQ5_1;
    float d = f16_at(r.p[0], g), m = has_m ? f16_at(r.p[1], g) : 0.0f;
    uint32_t qh = five ? u32(r.p[has_m ? 2 : 1] + 4 * g) : 0;
    const uint8_t* qs = r.p[(has_m ? 2 : 1) + (five ? 1 : 0)] + 16 * g;
    // Two loops without a branch, which the compiler vectorizes: elements 0..15, then 16..31.
    uint8_t high[32];  // element i's fifth bit, as 0 or 16
    if constexpr (five) {
      for (int j = 0; j < 4; ++j) std::memcpy(high + 8 * j, kFifthBits.v[(qh >> (8 * j)) & 0xffu], 8);
    }
    for (int half = 0; half < 2; ++half) {
      for (int i = 0; i < 16; ++i) {
        int q = (qs[i] >> (4 * half)) & 0xf;
        if constexpr (five) q |= high[i + 16 * half];
        out[i + 16 * half] = has_m ? d * q + m : d * (q - (five ? 16 : 8));
      }
    }
  } else if constexpr (F == kQ8_0) {
    float d = f16_at(r.p[0], g);
    const int8_t* qs = reinterpret_cast<const int8_t*>(r.p[1]) + 32 * g;
    for (int i = 0; i < 32; ++i) out[i] = d * qs[i];
  } else if constexpr (F == kQ4_K || F == kQ5_K) {
    // planes: d, dmin, scales, mins, [qh], qs. Sub-block j of super-block b: 32 bytes of qs chunk j/2,
    // low nibbles for even j; Q5_K's bit 4 is bit j of qh byte i.
    const int64_t b = g / 8, j = g % 8;
    float dl = f16_at(r.p[0], b) * r.p[2][g], ml = f16_at(r.p[1], b) * r.p[3][g];
    const uint8_t* qs = r.p[F == kQ5_K ? 5 : 4] + 128 * b + 32 * (j / 2);
    auto sub_block = [&](auto jc) {  // the shifts constants: a loop the compiler vectorizes
      constexpr int J = decltype(jc)::value;
      for (int i = 0; i < 32; ++i) {
        int q = (qs[i] >> (4 * (J & 1))) & 0xf;
        if constexpr (F == kQ5_K) q |= ((r.p[4][32 * b + i] >> J) & 1) << 4;
        out[i] = dl * q - ml;
      }
    };
    switch (j) {
      case 0: sub_block(std::integral_constant<int, 0>{}); break;
      case 1: sub_block(std::integral_constant<int, 1>{}); break;
      case 2: sub_block(std::integral_constant<int, 2>{}); break;
      case 3: sub_block(std::integral_constant<int, 3>{}); break;
      case 4: sub_block(std::integral_constant<int, 4>{}); break;
      case 5: sub_block(std::integral_constant<int, 5>{}); break;
      case 6: sub_block(std::integral_constant<int, 6>{}); break;
      default: sub_block(std::integral_constant<int, 7>{}); break;
    }
  } else if constexpr (F == kQ6_K) {
    // planes: ql, qh, scales, d. Group g' = g % 8 of super-block b: half h, quarter q.
    const int64_t b = g / 8, gg = g % 8, h = gg / 4, q = gg % 4;
    const uint8_t* ql = r.p[0] + 128 * b + 64 * h + 32 * (q & 1);
    const uint8_t* qh = r.p[1] + 64 * b + 32 * h;
    const int8_t* sc = reinterpret_cast<const int8_t*>(r.p[2]) + 16 * b + 8 * h + 2 * q;
    float d = f16_at(r.p[3], b);
    // Two loops of one scale each, their shifts constants: a loop the compiler vectorizes.
    auto quarter = [&](auto qc) {
      constexpr int Q = decltype(qc)::value;
      for (int half = 0; half < 2; ++half) {
        const float scale = d * sc[half];
        for (int i = 16 * half; i < 16 * half + 16; ++i) {
          const int v = ((ql[i] >> (4 * (Q >> 1))) & 0xf) | (((qh[i] >> (2 * Q)) & 3) << 4);
          out[i] = scale * (v - 32);
        }
      }
    };
    switch (q) {
      case 0: quarter(std::integral_constant<int, 0>{}); break;
      case 1: quarter(std::integral_constant<int, 1>{}); break;
      case 2: quarter(std::integral_constant<int, 2>{}); break;
      default: quarter(std::integral_constant<int, 3>{}); break;
    }
  } else if constexpr (F == kQ8_K) {
    float d;
    std::memcpy(&d, r.p[0] + 4 * (g / 8), 4);
    const int8_t* qs = reinterpret_cast<const int8_t*>(r.p[1]) + 32 * g;
    for (int i = 0; i < 32; ++i) out[i] = d * qs[i];
  }
}

template <Fmt F>
constexpr int64_t groups_per_block() {
  if constexpr (Dequant<F>::kDefined) return Dequant<F>::kGroups;
  return F == kQ4_K || F == kQ5_K || F == kQ6_K || F == kQ8_K ? 8 : 1;
}

#ifdef REALM_AVX512
// Bit 4 (16) set in the lanes of q whose bit of `bits` (element i's high bit at bit i) is set: Q5_0/Q5_1's
// fifth bit, one mask move and one masked OR for 16 elements.
inline __m512i q5_high(__m512i q, uint32_t bits) {
  return _mm512_mask_or_epi32(q, static_cast<__mmask16>(bits & 0xffffu), q, _mm512_set1_epi32(16));
}

// The per-group scale s[j] and offset o[j] (w = s * code + o) of the groups of super-block b: a k-quant's
// 8 groups of 32 (Q6_K: 16 half-groups of 16), one group for the legacy formats. Computed once per
// super-block, with F16C for the f16 factors.
template <Fmt F>
inline void prepare(const Row& r, int64_t b, float* s, float* o) {
  auto h = [](const uint8_t* p, int64_t i) { return _cvtsh_ss(u16(p + 2 * i)); };
  if constexpr (Dequant<F>::kDefined) {
    Dequant<F>::prepare(r, b, s, o);
  } else if constexpr (F == kQ4_0 || F == kQ5_0) {
    s[0] = h(r.p[0], b);
    o[0] = -(F == kQ5_0 ? 16.0f : 8.0f) * s[0];
  } else if constexpr (F == kQ4_1 || F == kQ5_1) {
    s[0] = h(r.p[0], b);
    o[0] = h(r.p[1], b);
  } else if constexpr (F == kQ8_0) {
    s[0] = h(r.p[0], b);
  } else if constexpr (F == kQ8_K) {
    std::memcpy(s, r.p[0] + 4 * b, 4);
  } else if constexpr (F == kQ4_K || F == kQ5_K) {
    const __m256 d = _mm256_set1_ps(h(r.p[0], b)), dmin = _mm256_set1_ps(h(r.p[1], b));
    auto bytes8 = [](const uint8_t* p) {
      return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
    };
    _mm256_storeu_ps(s, _mm256_mul_ps(d, bytes8(r.p[2] + 8 * b)));
    _mm256_storeu_ps(o, _mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(dmin, bytes8(r.p[3] + 8 * b))));
  } else if constexpr (F == kQ6_K) {
    const __m512 d = _mm512_set1_ps(h(r.p[3], b));
    __m512 sc = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r.p[2] + 16 * b))));
    __m512 sv = _mm512_mul_ps(d, sc);
    _mm512_storeu_ps(s, sv);
    _mm512_storeu_ps(o, _mm512_mul_ps(sv, _mm512_set1_ps(-32.0f)));
  }
}

// Whether prepare16 computes format F's factors (the legacy formats, one group of 32 a block).
template <Fmt F>
constexpr bool kPrepare16 = F == kQ4_0 || F == kQ4_1 || F == kQ5_0 || F == kQ5_1 || F == kQ8_0;

// prepare for blocks [b0, b0 + nb) (nb <= 16) of a kPrepare16 format at once: lane e of s and o is block
// b0 + e's s[0], o[0] (the same values: the f16 factors converted exactly, times an exact power of two), 16
// F16C conversions an instruction rather than three instructions a block. Kept in registers (a lane picked
// out with one permute): stored and read back as floats, each first read waited for the wide store.
template <Fmt F>
inline void prepare16(const Row& r, int64_t b0, int64_t nb, __m512& s, __m512& o) {
  static_assert(kPrepare16<F>);
  const __mmask16 lanes = static_cast<__mmask16>((1u << nb) - 1);
  auto halves = [&](const uint8_t* plane) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lanes, plane + 2 * b0));
  };
  s = halves(r.p[0]);
  if constexpr (F == kQ4_1 || F == kQ5_1) {
    o = halves(r.p[1]);
  } else if constexpr (F == kQ4_0 || F == kQ5_0) {
    o = _mm512_mul_ps(s, set1(F == kQ5_0 ? -16.0f : -8.0f));
  } else {
    o = _mm512_setzero_ps();
  }
}

// Block g of a kPrepare16 format dequantized into w0 (elements 0..15) and w1 (16..31), its factors
// broadcast in d and o (w = d * code + o; Q8_0: d * code).
template <Fmt F>
inline void legacy_group(const Row& r, int64_t g, __m512 d, __m512 o, __m512& w0, __m512& w1) {
  if constexpr (F == kQ8_0) {
    const uint8_t* qs = r.p[1] + 32 * g;
    w0 = _mm512_mul_ps(cvt(lo16s(qs)), d);
    w1 = _mm512_mul_ps(cvt(lo16s(qs + 16)), d);
  } else {
    constexpr bool has_m = F == kQ4_1 || F == kQ5_1, five = F == kQ5_0 || F == kQ5_1;
    const uint8_t* qs = r.p[(has_m ? 2 : 1) + (five ? 1 : 0)] + 16 * g;
    const __m512i v = lo16(qs), nib = _mm512_set1_epi32(0xf);
    __m512i q0 = _mm512_and_si512(v, nib), q1 = _mm512_srli_epi32(v, 4);
    if constexpr (five) {
      uint32_t qh = u32(r.p[has_m ? 2 : 1] + 4 * g);
      q0 = q5_high(q0, qh);
      q1 = q5_high(q1, qh >> 16);
    }
    // d * (q - c) as fma(q, d, -c * d): both terms exact, so one rounding, as the reference's product.
    w0 = _mm512_fmadd_ps(cvt(q0), d, o);
    w1 = _mm512_fmadd_ps(cvt(q1), d, o);
  }
}

// Group j of super-block b (group g = b * groups_per_block + j) dequantized into w0 (elements 0..15) and
// w1 (16..31), the vector form of group_scalar; s and o come from prepare.
template <Fmt F>
inline void group_avx512(const Row& r, int64_t b, int64_t j, const float* s, const float* o, __m512& w0,
                         __m512& w1) {
  const __m512i nib = _mm512_set1_epi32(0xf);
  const int64_t g = b * groups_per_block<F>() + j;
  if constexpr (Dequant<F>::kDefined) {
    Dequant<F>::group(r, b, j, s, o, w0, w1);
  } else if constexpr (F == kF32) {
    w0 = _mm512_loadu_ps(r.p[0] + 128 * g);
    w1 = _mm512_loadu_ps(r.p[0] + 128 * g + 64);
  } else if constexpr (F == kF16) {
    w0 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r.p[0] + 64 * g)));
    w1 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r.p[0] + 64 * g + 32)));
  } else if constexpr (F == kBF16) {
    auto widen = [](const uint8_t* p) {
      __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
      return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    };
    w0 = widen(r.p[0] + 64 * g);
    w1 = widen(r.p[0] + 64 * g + 32);
  } else if constexpr (kPrepare16<F>) {
    legacy_group<F>(r, g, set1(s[0]), set1(o[0]), w0, w1);
  } else if constexpr (F == kQ8_K) {
    const uint8_t* qs = r.p[1] + 32 * g;
    const __m512 d = set1(s[0]);
    w0 = _mm512_mul_ps(cvt(lo16s(qs)), d);
    w1 = _mm512_mul_ps(cvt(lo16s(qs + 16)), d);
  } else if constexpr (F == kQ4_K || F == kQ5_K) {
    const uint8_t* qs = r.p[F == kQ5_K ? 5 : 4] + 128 * b + 32 * (j / 2);
    __m512i q0 = lo16(qs), q1 = lo16(qs + 16);
    if (j & 1) {
      q0 = _mm512_srli_epi32(q0, 4);
      q1 = _mm512_srli_epi32(q1, 4);
    } else {
      q0 = _mm512_and_si512(q0, nib);
      q1 = _mm512_and_si512(q1, nib);
    }
    if constexpr (F == kQ5_K) {
      const uint8_t* qh = r.p[4] + 32 * b;
      const __m128i hs = _mm_cvtsi32_si128(static_cast<int>(j));
      const __m512i one = _mm512_set1_epi32(1);
      q0 = _mm512_or_si512(q0, _mm512_slli_epi32(_mm512_and_si512(_mm512_srl_epi32(lo16(qh), hs), one), 4));
      q1 = _mm512_or_si512(q1, _mm512_slli_epi32(_mm512_and_si512(_mm512_srl_epi32(lo16(qh + 16), hs), one), 4));
    }
    const __m512 dv = set1(s[j]), mv = set1(o[j]);
    w0 = _mm512_fmadd_ps(cvt(q0), dv, mv);
    w1 = _mm512_fmadd_ps(cvt(q1), dv, mv);
  } else if constexpr (F == kQ6_K) {
    const int64_t h = j / 4, q = j % 4;
    const uint8_t* ql = r.p[0] + 128 * b + 64 * h + 32 * (q & 1);
    const uint8_t* qh = r.p[1] + 64 * b + 32 * h;
    const __m128i ls = _mm_cvtsi32_si128(static_cast<int>(4 * (q >> 1)));
    const __m128i hs = _mm_cvtsi32_si128(static_cast<int>(2 * q));
    const __m512i three = _mm512_set1_epi32(3);
    auto code = [&](int off) {
      __m512i low = _mm512_and_si512(_mm512_srl_epi32(lo16(ql + off), ls), nib);
      __m512i high = _mm512_and_si512(_mm512_srl_epi32(lo16(qh + off), hs), three);
      return cvt(_mm512_or_si512(low, _mm512_slli_epi32(high, 4)));
    };
    const int64_t half = 8 * h + 2 * q;  // the scale of elements 0..15 of this group; half + 1: 16..31
    w0 = _mm512_fmadd_ps(code(0), set1(s[half]), set1(o[half]));
    w1 = _mm512_fmadd_ps(code(16), set1(s[half + 1]), set1(o[half + 1]));
  }
}
#endif

// Each format's planes in the order they are passed: elements per block, and bytes per block of each plane.
struct Layout {
  Fmt fmt;
  int64_t block;
  int64_t n_planes;
  int64_t bytes[kMaxPlanes];
};

// X(fmt, block, n_planes, {bytes...}) for every format the kernels implement.
#define REALM_FORMATS(X) \
  X(kF32, 1, 1, {4}) \
  X(kF16, 1, 1, {2}) \
  X(kBF16, 1, 1, {2}) \
  X(kQ4_0, 32, 2, {2, 16}) \
  X(kQ4_1, 32, 3, {2, 2, 16}) \
  X(kQ5_0, 32, 3, {2, 4, 16}) \
  X(kQ5_1, 32, 4, {2, 2, 4, 16}) \
  X(kQ8_0, 32, 2, {2, 32}) \
  X(kQ4_K, 256, 5, {2, 2, 8, 8, 128}) \
  X(kQ5_K, 256, 6, {2, 2, 8, 8, 32, 128}) \
  X(kQ6_K, 256, 4, {128, 64, 16, 2}) \
  X(kQ8_K, 256, 3, {4, 256, 32}) \
  X(kI8, 1, 1, {1}) \
  X(kI16, 1, 1, {2}) \
  X(kI32, 1, 1, {4}) \
  X(kI64, 1, 1, {8}) \
  X(kF64, 1, 1, {8}) \
  X(kQ2_K, 256, 4, {16, 64, 2, 2}) \
  X(kQ3_K, 256, 4, {32, 64, 16, 2}) \
  X(kIQ4_NL, 32, 2, {2, 16}) \
  X(kIQ4_XS, 256, 3, {2, 8, 128}) \
  X(kMXFP4, 32, 2, {1, 16}) \
  X(kNVFP4, 64, 2, {4, 32}) \
  X(kTQ1_0, 256, 3, {48, 4, 2}) \
  X(kTQ2_0, 256, 2, {64, 2}) \
  X(kIQ1_S, 256, 3, {2, 32, 16}) \
  X(kIQ1_M, 256, 3, {32, 16, 8}) \
  X(kIQ2_XXS, 256, 2, {2, 64}) \
  X(kIQ2_XS, 256, 3, {2, 64, 8}) \
  X(kIQ2_S, 256, 5, {2, 32, 32, 8, 8}) \
  X(kIQ3_XXS, 256, 3, {2, 64, 32}) \
  X(kIQ3_S, 256, 5, {2, 64, 8, 32, 4})

// Format F's layout as a compile-time constant (for loops over its planes that the compiler unrolls).
template <Fmt F>
struct LayoutOf;
#define REALM_LAYOUT_OF(f, block, n, ...) \
  template <>                             \
  struct LayoutOf<f> {                    \
    static constexpr Layout value{f, block, n, __VA_ARGS__}; \
  };
REALM_FORMATS(REALM_LAYOUT_OF)
#undef REALM_LAYOUT_OF

// prefetch_block for each plane of block b of row r (b: a block of the layout, `per` groups of 32), unrolled
// over the planes at compile time (a loop over them reads the layout from memory at every block).
template <Fmt F, size_t... I>
__attribute__((always_inline)) inline void prefetch_planes(const Row& r, int64_t b, std::index_sequence<I...>) {
  constexpr const Layout& layout = LayoutOf<F>::value;
  (prefetch_block<layout.bytes[I]>(r.p[I] + layout.bytes[I] * b), ...);
}
template <Fmt F>
__attribute__((always_inline)) inline void prefetch_ahead(const Row& r, int64_t b) {  // declared in planes.h
  prefetch_planes<F>(r, b, std::make_index_sequence<LayoutOf<F>::value.n_planes>{});
}

inline const Layout* layout_of(int64_t fmt) {
#define REALM_LAYOUT(f, block, n, ...) {f, block, n, __VA_ARGS__},
  static const Layout kLayouts[] = {REALM_FORMATS(REALM_LAYOUT)};
#undef REALM_LAYOUT
  for (const Layout& l : kLayouts)
    if (l.fmt == fmt) return &l;
  return nullptr;
}

// W [N, K] as its planes: each plane's rows (layer `index` of a stack [L, N, ...] read where it lies).
struct Planes {
  int64_t n_planes = 0;
  const uint8_t* base[kMaxPlanes] = {};
  int64_t row_bytes[kMaxPlanes] = {};

  Row row(int64_t n) const {
    Row r{};
    for (int64_t i = 0; i < n_planes; ++i) r.p[i] = base[i] + n * row_bytes[i];
    return r;
  }
};

// Binds the custom call's plane arguments for W [N, K] of `fmt`, layer `index` of the stack: nullptr, or
// what is wrong.
inline const char* bind_planes(int64_t fmt, xla::ffi::RemainingArgs& args, int64_t n, int64_t k, int64_t index,
                               Planes& out) {
  const Layout* l = layout_of(fmt);
  if (l == nullptr) return "unknown format id";
  if (k % 32 || k % l->block) return "K must be a multiple of 32 and of the block size";
  if (static_cast<int64_t>(args.size()) != l->n_planes) return "wrong number of planes for the format";
  out.n_planes = l->n_planes;
  for (int64_t i = 0; i < l->n_planes; ++i) {
    auto plane = args.get<xla::ffi::AnyBuffer>(i);
    if (!plane.has_value()) return "a plane is not a buffer";
    const int64_t row_bytes = k / l->block * l->bytes[i], matrix = n * row_bytes;
    const int64_t size = static_cast<int64_t>(plane->size_bytes());
    if (matrix == 0 || size % matrix != 0) return "a plane's size does not match [N, K]";
    if (index < 0 || index >= size / matrix) return "the layer index is outside the stacked planes";
    out.base[i] = static_cast<const uint8_t*>(plane->untyped_data()) + index * matrix;
    out.row_bytes[i] = row_bytes;
  }
  return nullptr;
}

}  // namespace realm
