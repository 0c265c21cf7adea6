// realm-jax native matmul: what every format's dequantization shares: the format ids, a row of W's planes,
// the f16 and little-endian loads, and the per-format hooks (`Dequant<F>`) that the family headers
// (kquants_low.h, lut4.h, ternary.h, iquants.h, plain.h) specialize.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) && defined(__AVX512BW__) && !defined(REALM_PORTABLE)
#include <immintrin.h>
#define REALM_AVX512 1
#elif defined(__F16C__) && !defined(REALM_PORTABLE)
#include <immintrin.h>  // F16C's conversion in f16_at
#endif

#include "numeric.h"

namespace realm {

// Format ids, as realm_jax/native/__init__.py passes them (FORMAT_IDS).
enum Fmt : int64_t {
  kF32 = 0, kF16 = 1, kBF16 = 2, kI8 = 3, kI16 = 4, kI32 = 5, kI64 = 6, kF64 = 7,
  kQ4_0 = 10, kQ4_1 = 11, kQ5_0 = 12, kQ5_1 = 13, kQ8_0 = 14,
  kQ4_K = 20, kQ5_K = 21, kQ6_K = 22, kQ8_K = 23, kQ2_K = 24, kQ3_K = 25,
  kIQ4_NL = 30, kIQ4_XS = 31, kMXFP4 = 32, kNVFP4 = 33,
  kTQ1_0 = 40, kTQ2_0 = 41,
  kIQ1_S = 50, kIQ1_M = 51, kIQ2_XXS = 52, kIQ2_XS = 53, kIQ2_S = 54, kIQ3_XXS = 55, kIQ3_S = 56,
};

constexpr int kMaxPlanes = 6;

// One row of W: each plane's bytes for that row.
struct Row {
  const uint8_t* p[kMaxPlanes];
};

inline float f16_to_f32(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0x1f) return bits_to_f32(sign | 0x7f800000u | (man << 13));
  if (exp != 0) return bits_to_f32(sign | ((exp + 112) << 23) | (man << 13));
  if (man == 0) return bits_to_f32(sign);
  int e = 113;  // subnormal: shift the mantissa up to its leading one
  while (!(man & 0x400u)) { man <<= 1; --e; }
  return bits_to_f32(sign | (static_cast<uint32_t>(e) << 23) | ((man & 0x3ffu) << 13));
}

inline uint16_t u16(const uint8_t* p) { uint16_t v; std::memcpy(&v, p, 2); return v; }
inline uint32_t u32(const uint8_t* p) { uint32_t v; std::memcpy(&v, p, 4); return v; }
inline uint64_t u64(const uint8_t* p) { uint64_t v; std::memcpy(&v, p, 8); return v; }

// Software prefetch of a plane kAhead bytes past a block of `Bytes` there, for a loop that streams W's planes.
// The loops spend a few cycles of arithmetic on each block, which leaves the hardware prefetcher behind: at
// one row of x on a 2-core Intel Xeon, Q8_0's 262144 x 640 went from 14 to 23 GB/s (two threads, a plain
// read of the same bytes: 30), Q4_K's and Q2_K's 14336 x 4096 from 7 to 13.5; on the AMD EPYC, Q8_0 at
// 8 rows from 18 to 14 ms. A plane of under 16 bytes a block (the f16 factors) is left to the hardware.
constexpr int64_t kAhead = 2048;
template <int64_t Bytes>
__attribute__((always_inline)) inline void prefetch_block(const uint8_t* block) {
  if constexpr (Bytes >= 16) {
    for (int64_t off = 0; off < Bytes; off += 64) __builtin_prefetch(block + kAhead + off, 0, 3);
  }
}
// prefetch_block for each plane of block b of row r, from the format's layout (dequant.h: defined there, after
// the layouts; declared here for the family headers' loops).
template <Fmt F>
inline void prefetch_ahead(const Row& r, int64_t b);

#if defined(__F16C__) && !defined(REALM_PORTABLE)
// F16C's conversion (exact, as f16_to_f32): the scales of every block are read in the inner loops (the avx2
// build's too, where the branches of f16_to_f32 cost more than the group's arithmetic).
inline float f16_at(const uint8_t* p, int64_t i) { return _cvtsh_ss(u16(p + 2 * i)); }
#else
inline float f16_at(const uint8_t* p, int64_t i) { return f16_to_f32(u16(p + 2 * i)); }
#endif

// A format a family header implements specializes Dequant<F> with:
//   static constexpr int64_t kBlock, kGroups;  elements per block, groups of 32 per block (kBlock / 32, or 1
//                                              for the plain types, whose "block" is one element)
//   static void scalar(const Row&, int64_t g, float* out);  group g (32 elements) into out
// and, on the AVX-512 path,
//   static void prepare(const Row&, int64_t b, float* s, float* o);  block b's per-group factors (16 each)
//   static void group(const Row&, int64_t b, int64_t j, const float* s, const float* o, __m512& w0, __m512& w1);
// The formulas are those of the format's tile function in realm_jax.quant.
template <Fmt F>
struct Dequant {
  static constexpr bool kDefined = false;
};

#ifdef REALM_AVX512
inline __m512 cvt(__m512i v) { return _mm512_cvtepi32_ps(v); }
inline __m512i lo16(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline __m512i lo16s(const uint8_t* p) { return _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline __m512 set1(float v) { return _mm512_set1_ps(v); }
// Lane i of a 16-float table at the low 4 bits of each 32-bit lane of idx.
inline __m512 lut16(__m512i idx, __m512 table) { return _mm512_permutexvar_ps(idx, table); }
// w negated in the lanes whose bit is set in mask (a flip of the sign bit, exact).
inline __m512 negate_where(__m512 w, __mmask16 mask) {
  const __m512i v = _mm512_castps_si512(w);
  return _mm512_castsi512_ps(_mm512_mask_xor_epi32(v, mask, v, _mm512_set1_epi32(static_cast<int>(0x80000000u))));
}
// r[i] = row i of a 16 x 16 matrix of 32-bit elements; on return r[j] = column j.
inline void transpose16(__m512i (&r)[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int h = 0; h < 16; h += 8)
    for (int i = 0; i < 4; ++i) {
      t[h + i] = _mm512_shuffle_i32x4(r[h + i], r[h + i + 4], 0x88);
      t[h + i + 4] = _mm512_shuffle_i32x4(r[h + i], r[h + i + 4], 0xdd);
    }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
  }
}
#endif

}  // namespace realm
