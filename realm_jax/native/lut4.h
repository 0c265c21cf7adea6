// realm-jax native matmul: the formats whose 4-bit codes index a 16-entry table: IQ4_NL, IQ4_XS
// (realm_jax/quant/iq4.py), MXFP4 and NVFP4 (realm_jax/quant/mxfp.py). The tables come from those modules
// through the generated realm_tables.h.
// Planes: IQ4_NL d, qs[16]; IQ4_XS d, scales[8] (6-bit, unpacked), qs[128]; MXFP4 e, qs[16]; NVFP4 d[4], qs[32].
// A 32-element group's codes are 16 bytes: element l in the low nibble of byte l, element l + 16 in the high
// one (NVFP4: per 16-element sub-block of 8 bytes, l and l + 8).
#pragma once

#include "planes.h"
#include "realm_tables.h"

namespace realm {

// MXFP4's scale byte: 2^(e - 128) (subnormal for e < 2), as ggml_e8m0_to_fp32_half.
inline float e8m0_half(uint8_t e) { return bits_to_f32(e < 2 ? 0x00200000u << e : static_cast<uint32_t>(e - 1) << 23); }

// A 32-element group of codes in the IQ4_NL / MXFP4 nibble order times table values, times scale s.
template <typename T>
inline void nibbles_scalar(const uint8_t* qs, const T* table, float s, float* out) {
  for (int i = 0; i < 16; ++i) {
    out[i] = s * table[qs[i] & 0xf];
    out[i + 16] = s * table[qs[i] >> 4];
  }
}

// The code tables as floats, constant: a loop that reads them loads them once.
struct Table16 {
  alignas(64) float v[16];
};
template <typename T>
constexpr Table16 floats16(const T (&t)[16]) {
  Table16 out{};
  for (int i = 0; i < 16; ++i) out.v[i] = static_cast<float>(t[i]);
  return out;
}
inline constexpr Table16 kIq4Floats = floats16(tables::kIq4Values), kE2M1Floats = floats16(tables::kE2M1);

#ifdef REALM_AVX512
inline void nibbles_avx512(const uint8_t* qs, __m512 table, __m512 s0, __m512 s1, __m512& w0, __m512& w1) {
  const __m512i v = lo16(qs);
  w0 = _mm512_mul_ps(lut16(_mm512_and_si512(v, _mm512_set1_epi32(0xf)), table), s0);
  w1 = _mm512_mul_ps(lut16(_mm512_srli_epi32(v, 4), table), s1);
}
#endif

template <>
struct Dequant<kIQ4_NL> {
  static constexpr bool kDefined = true;
  static constexpr int64_t kBlock = 32, kGroups = 1;
  static void scalar(const Row& r, int64_t g, float* out) {
    nibbles_scalar(r.p[1] + 16 * g, tables::kIq4Values, f16_at(r.p[0], g), out);
  }
#ifdef REALM_AVX512
  static void prepare(const Row& r, int64_t b, float* s, float*) { s[0] = f16_at(r.p[0], b); }
  static void group(const Row& r, int64_t b, int64_t, const float* s, const float*, __m512& w0, __m512& w1) {
    const __m512 table = _mm512_load_ps(kIq4Floats.v);
    nibbles_avx512(r.p[1] + 16 * b, table, set1(s[0]), set1(s[0]), w0, w1);
  }
#endif
};

template <>
struct Dequant<kIQ4_XS> {
  static constexpr bool kDefined = true;
  static constexpr int64_t kBlock = 256, kGroups = 8;
  static void scalar(const Row& r, int64_t g, float* out) {
    const float dl = f16_at(r.p[0], g / 8) * (r.p[1][g] - 32);
    nibbles_scalar(r.p[2] + 16 * g, tables::kIq4Values, dl, out);
  }
#ifdef REALM_AVX512
  static void prepare(const Row& r, int64_t b, float* s, float*) {
    const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(r.p[1] + 8 * b));
    const __m256 sc = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(bytes), _mm256_set1_epi32(32)));
    _mm256_storeu_ps(s, _mm256_mul_ps(_mm256_set1_ps(f16_at(r.p[0], b)), sc));
  }
  static void group(const Row& r, int64_t b, int64_t j, const float* s, const float*, __m512& w0, __m512& w1) {
    const __m512 table = _mm512_load_ps(kIq4Floats.v);
    nibbles_avx512(r.p[2] + 128 * b + 16 * j, table, set1(s[j]), set1(s[j]), w0, w1);
  }
#endif
};

template <>
struct Dequant<kMXFP4> {
  static constexpr bool kDefined = true;
  static constexpr int64_t kBlock = 32, kGroups = 1;
  static void scalar(const Row& r, int64_t g, float* out) {
    nibbles_scalar(r.p[1] + 16 * g, tables::kE2M1, e8m0_half(r.p[0][g]), out);
  }
#ifdef REALM_AVX512
  static void prepare(const Row& r, int64_t b, float* s, float*) { s[0] = e8m0_half(r.p[0][b]); }
  static void group(const Row& r, int64_t b, int64_t, const float* s, const float*, __m512& w0, __m512& w1) {
    const __m512 table = _mm512_load_ps(kE2M1Floats.v);
    nibbles_avx512(r.p[1] + 16 * b, table, set1(s[0]), set1(s[0]), w0, w1);
  }
#endif
};

template <>
struct Dequant<kNVFP4> {
  static constexpr bool kDefined = true;
  static constexpr int64_t kBlock = 64, kGroups = 2;
  static void scalar(const Row& r, int64_t g, float* out) {
    const int64_t b = g / 2, j = g % 2;
    for (int h = 0; h < 2; ++h) {  // sub-blocks 2j and 2j + 1
      const int64_t sub = 2 * j + h;
      const float d = tables::kUe4m3[r.p[0][4 * b + sub]];
      const uint8_t* qs = r.p[1] + 32 * b + 8 * sub;
      for (int i = 0; i < 8; ++i) {
        out[16 * h + i] = d * tables::kE2M1[qs[i] & 0xf];
        out[16 * h + i + 8] = d * tables::kE2M1[qs[i] >> 4];
      }
    }
  }
#ifdef REALM_AVX512
  static void prepare(const Row& r, int64_t b, float* s, float*) {
    for (int i = 0; i < 4; ++i) s[i] = tables::kUe4m3[r.p[0][4 * b + i]];
  }
  static void group(const Row& r, int64_t b, int64_t j, const float* s, const float*, __m512& w0, __m512& w1) {
    const __m512 table = _mm512_load_ps(kE2M1Floats.v);
    const __m512i shift = _mm512_set_epi32(4, 4, 4, 4, 4, 4, 4, 4, 0, 0, 0, 0, 0, 0, 0, 0);
    auto sub = [&](int64_t k) {  // the 16 elements of sub-block k: bytes 0..7 low nibbles, then high nibbles
      const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(r.p[1] + 32 * b + 8 * k));
      const __m512i v = _mm512_srlv_epi32(_mm512_cvtepu8_epi32(_mm_unpacklo_epi64(bytes, bytes)), shift);
      return _mm512_mul_ps(lut16(_mm512_and_si512(v, _mm512_set1_epi32(0xf)), table), set1(s[k]));
    };
    w0 = sub(2 * j);
    w1 = sub(2 * j + 1);
  }
#endif
};

}  // namespace realm
