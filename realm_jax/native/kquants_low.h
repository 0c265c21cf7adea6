// realm-jax native matmul: Q2_K and Q3_K (realm_jax/quant/kquants_low.py has the bit diagrams).
// Planes: Q2_K scales[16], qs[64], d, dmin; Q3_K hmask[32], qs[64], scales[16] (6-bit, unpacked), d.
// Group j (32 elements) of a super-block: 2-bit codes (qs[32 (j / 4) + l] >> 2 (j % 4)) & 3, l = 0..31,
// sub-blocks 2j (l < 16) and 2j + 1 with their own scales.
#pragma once

#include "planes.h"

namespace realm {

template <>
struct Dequant<kQ2_K> {
  static constexpr bool kDefined = true;
  static constexpr int64_t kBlock = 256, kGroups = 8;
  static void scalar(const Row& r, int64_t g, float* out) {
    const int64_t b = g / 8, j = g % 8;
    const uint8_t* qs = r.p[1] + 64 * b + 32 * (j / 4);
    const float d = f16_at(r.p[2], b), dmin = f16_at(r.p[3], b);
    for (int i = 0; i < 32; ++i) {
      const uint8_t sc = r.p[0][16 * b + 2 * j + i / 16];
      out[i] = d * (sc & 0xf) * ((qs[i] >> (2 * (j % 4))) & 3) - dmin * (sc >> 4);
    }
  }
#ifdef REALM_AVX512
  static void prepare(const Row& r, int64_t b, float* s, float* o) {
    const __m512i sc = lo16(r.p[0] + 16 * b);
    _mm512_storeu_ps(s, _mm512_mul_ps(set1(f16_at(r.p[2], b)), cvt(_mm512_and_si512(sc, _mm512_set1_epi32(0xf)))));
    _mm512_storeu_ps(o, _mm512_mul_ps(set1(-f16_at(r.p[3], b)), cvt(_mm512_srli_epi32(sc, 4))));
  }
  static void group(const Row& r, int64_t b, int64_t j, const float* s, const float* o, __m512& w0, __m512& w1) {
    const uint8_t* qs = r.p[1] + 64 * b + 32 * (j / 4);
    const __m128i sh = _mm_cvtsi32_si128(static_cast<int>(2 * (j % 4)));
    const __m512i three = _mm512_set1_epi32(3);
    w0 = _mm512_fmadd_ps(cvt(_mm512_and_si512(_mm512_srl_epi32(lo16(qs), sh), three)), set1(s[2 * j]), set1(o[2 * j]));
    w1 = _mm512_fmadd_ps(cvt(_mm512_and_si512(_mm512_srl_epi32(lo16(qs + 16), sh), three)), set1(s[2 * j + 1]),
                         set1(o[2 * j + 1]));
  }
#endif
};

template <>
struct Dequant<kQ3_K> {
  static constexpr bool kDefined = true;
  static constexpr int64_t kBlock = 256, kGroups = 8;
  static void scalar(const Row& r, int64_t g, float* out) {
    const int64_t b = g / 8, j = g % 8;
    const uint8_t* hm = r.p[0] + 32 * b;
    const uint8_t* qs = r.p[1] + 64 * b + 32 * (j / 4);
    const float d = f16_at(r.p[3], b);
    for (int i = 0; i < 32; ++i) {
      const int q = ((qs[i] >> (2 * (j % 4))) & 3) - (((hm[i] >> j) & 1) ? 0 : 4);
      out[i] = d * (r.p[2][16 * b + 2 * j + i / 16] - 32) * q;
    }
  }
#ifdef REALM_AVX512
  static void prepare(const Row& r, int64_t b, float* s, float*) {
    const __m512i sc = _mm512_sub_epi32(lo16(r.p[2] + 16 * b), _mm512_set1_epi32(32));
    _mm512_storeu_ps(s, _mm512_mul_ps(set1(f16_at(r.p[3], b)), cvt(sc)));
  }
  static void group(const Row& r, int64_t b, int64_t j, const float* s, const float*, __m512& w0, __m512& w1) {
    const uint8_t* hm = r.p[0] + 32 * b;
    const uint8_t* qs = r.p[1] + 64 * b + 32 * (j / 4);
    const __m128i sh = _mm_cvtsi32_si128(static_cast<int>(2 * (j % 4))), hs = _mm_cvtsi32_si128(static_cast<int>(j));
    const __m512i three = _mm512_set1_epi32(3), one = _mm512_set1_epi32(1), four = _mm512_set1_epi32(4);
    auto code = [&](int off) {  // (2-bit code) - 4 + 4 h
      const __m512i q = _mm512_and_si512(_mm512_srl_epi32(lo16(qs + off), sh), three);
      const __m512i h = _mm512_and_si512(_mm512_srl_epi32(lo16(hm + off), hs), one);
      return cvt(_mm512_add_epi32(_mm512_sub_epi32(q, four), _mm512_slli_epi32(h, 2)));
    };
    w0 = _mm512_mul_ps(code(0), set1(s[2 * j]));
    w1 = _mm512_mul_ps(code(16), set1(s[2 * j + 1]));
  }
#endif
};

}  // namespace realm
