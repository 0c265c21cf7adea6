// realm-jax native matmul: the ternary formats TQ1_0 and TQ2_0 (realm_jax/quant/ternary.py has the layouts).
// Planes: TQ1_0 qs[48], qh[4], d; TQ2_0 qs[64], d. Every weight is d * t, t in {-1, 0, 1}.
#pragma once

#include "planes.h"

namespace realm {

// Trit i of byte b (TQ1_0's base-3 fixed point), minus 1.
inline int trit(uint8_t b, int i) {
  static constexpr uint8_t kPow3[5] = {1, 3, 9, 27, 81};
  return ((static_cast<uint8_t>(b * kPow3[i]) * 3) >> 8) - 1;
}

// Group j of a TQ1_0 super-block's trits - 1 (j < 5: digit j of qs[0..31]; 5, 6: digits 2(j-5), 2(j-5)+1 of
// qs[32..47]; 7: digit 4 of qs[32..47], then qh's four digits of four bytes).
inline void tq1_group(const uint8_t* qs, const uint8_t* qh, int64_t j, int* t) {
  if (j < 5) {
    for (int i = 0; i < 32; ++i) t[i] = trit(qs[i], static_cast<int>(j));
  } else if (j < 7) {
    for (int i = 0; i < 32; ++i) t[i] = trit(qs[32 + i % 16], static_cast<int>(2 * (j - 5) + i / 16));
  } else {
    for (int i = 0; i < 16; ++i) t[i] = trit(qs[32 + i], 4);
    for (int i = 0; i < 16; ++i) t[16 + i] = trit(qh[i % 4], i / 4);
  }
}

template <>
struct Dequant<kTQ1_0> {
  static constexpr bool kDefined = true;
  static constexpr int64_t kBlock = 256, kGroups = 8;
  static void scalar(const Row& r, int64_t g, float* out) {
    const int64_t b = g / 8;
    int t[32];
    tq1_group(r.p[0] + 48 * b, r.p[1] + 4 * b, g % 8, t);
    const float d = f16_at(r.p[2], b);
    for (int i = 0; i < 32; ++i) out[i] = d * t[i];
  }
#ifdef REALM_AVX512
  static void prepare(const Row& r, int64_t b, float* s, float*) { s[0] = f16_at(r.p[2], b); }
  static void group(const Row& r, int64_t b, int64_t j, const float* s, const float*, __m512& w0, __m512& w1) {
    const uint8_t* qs = r.p[0] + 48 * b;
    const __m512i three = _mm512_set1_epi32(3), one = _mm512_set1_epi32(1), byte = _mm512_set1_epi32(0xff);
    auto digits = [&](__m512i bytes, __m512i pow3) {  // ((uint8)(b * 3^i) * 3 >> 8) - 1, as floats
      const __m512i v = _mm512_and_si512(_mm512_mullo_epi32(bytes, pow3), byte);
      return cvt(_mm512_sub_epi32(_mm512_srli_epi32(_mm512_mullo_epi32(v, three), 8), one));
    };
    static constexpr int kPow3[5] = {1, 3, 9, 27, 81};
    const __m512 d = set1(s[0]);
    if (j < 5) {
      const __m512i p = _mm512_set1_epi32(kPow3[j]);
      w0 = _mm512_mul_ps(digits(lo16(qs), p), d);
      w1 = _mm512_mul_ps(digits(lo16(qs + 16), p), d);
    } else if (j < 7) {
      const __m512i hi = lo16(qs + 32);
      w0 = _mm512_mul_ps(digits(hi, _mm512_set1_epi32(kPow3[2 * (j - 5)])), d);
      w1 = _mm512_mul_ps(digits(hi, _mm512_set1_epi32(kPow3[2 * (j - 5) + 1])), d);
    } else {
      w0 = _mm512_mul_ps(digits(lo16(qs + 32), _mm512_set1_epi32(81)), d);
      const uint8_t* qh = r.p[1] + 4 * b;
      const __m512i bytes = _mm512_set_epi32(qh[3], qh[2], qh[1], qh[0], qh[3], qh[2], qh[1], qh[0], qh[3], qh[2],
                                             qh[1], qh[0], qh[3], qh[2], qh[1], qh[0]);
      const __m512i p = _mm512_set_epi32(27, 27, 27, 27, 9, 9, 9, 9, 3, 3, 3, 3, 1, 1, 1, 1);
      w1 = _mm512_mul_ps(digits(bytes, p), d);
    }
  }
#endif
};

template <>
struct Dequant<kTQ2_0> {
  static constexpr bool kDefined = true;
  static constexpr int64_t kBlock = 256, kGroups = 8;
  static void scalar(const Row& r, int64_t g, float* out) {
    const int64_t b = g / 8, j = g % 8;
    const uint8_t* qs = r.p[0] + 64 * b + 32 * (j / 4);
    const float d = f16_at(r.p[1], b);
    for (int i = 0; i < 32; ++i) out[i] = d * (((qs[i] >> (2 * (j % 4))) & 3) - 1);
  }
#ifdef REALM_AVX512
  static void prepare(const Row& r, int64_t b, float* s, float*) { s[0] = f16_at(r.p[1], b); }
  static void group(const Row& r, int64_t b, int64_t j, const float* s, const float*, __m512& w0, __m512& w1) {
    const uint8_t* qs = r.p[0] + 64 * b + 32 * (j / 4);
    const __m128i sh = _mm_cvtsi32_si128(static_cast<int>(2 * (j % 4)));
    const __m512i three = _mm512_set1_epi32(3), one = _mm512_set1_epi32(1);
    auto code = [&](int off) {
      return cvt(_mm512_sub_epi32(_mm512_and_si512(_mm512_srl_epi32(lo16(qs + off), sh), three), one));
    };
    w0 = _mm512_mul_ps(code(0), set1(s[0]));
    w1 = _mm512_mul_ps(code(16), set1(s[0]));
  }
#endif
};

}  // namespace realm
