// realm-jax native prefill gemm, the int8 path (gemm.cc includes it): for the formats whose weights are
// integer codes with one scale and offset per group of 32 (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K; Q6_K
// per 16), x is
// quantized per group of 32 values of a row to int8 (d = max|x| / 127, codes round(x * (1 / d)); like
// llama.cpp's q8_0, which keeps d in f16, and finer than its per-256 q8_K for the k-quants), and the products
// of codes are summed with vpdpbusd: 64 byte products an instruction, where vdpbf16ps takes 32. For one
// group of 32 (w = s * code + o):
//
//   sum_k w_k xhat_k = s * dx * sum_k code_k qx_k + o * (dx * sum_k qx_k),    xhat = dx * qx,
//
// the integer sum exact in int32, the rest in f32: the result is the f32 product of the exactly dequantized
// weight with xhat (realm_jax.native.quantize_x8 computes xhat). Where the offset is an integer multiple of
// the scale (Q4_0, Q5_0: the codes less 8 or 16; Q8_0: its signed codes stored plus 128; Q6_K: less 32), the
// offset's term is subtracted from the integer sum instead: s * dx * (sum_k code_k qx_k - c * sum_k qx_k).
// Q6_K has a scale per 16 weights: its two halves of a group are summed and scaled apart (kI8Halves).
//
// A panel is 64 of W's rows, group by group: the group's codes as unsigned bytes, [8 quads][64 rows][4]
// (quad q: the codes of k = 4q..4q+3; Q8_0's signed codes offset by 128), then s[64] and o[64] as f32
// (Q6_K: the scales of the group's first and second 16).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "dequant.h"

#if defined(REALM_GEMM_BF16) && defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define REALM_GEMM_I8 1
#endif

namespace realm {

// Bytes of one group of 32 of a 64-row int8 panel: codes, then s, then o.
constexpr int64_t kI8Codes = 32 * 64, kI8Group = kI8Codes + 2 * 64 * 4;

// The formats with an int8 path: one scale and one offset per group of 32, codes of at most 8 bits.
template <Fmt F>
constexpr bool kInt8 = F == kQ4_0 || F == kQ4_1 || F == kQ5_0 || F == kQ5_1 || F == kQ8_0 || F == kQ4_K ||
                       F == kQ5_K || F == kQ6_K;

// The integer c of w = s * (code - c) (the stored unsigned code), or 0 where the offset is a float of its own.
template <Fmt F>
constexpr int kI8Offset = F == kQ4_0 ? 8 : F == kQ5_0 ? 16 : F == kQ8_0 ? 128 : F == kQ6_K ? 32 : 0;

// Whether the format's scales are per 16 weights: a group's two halves are scaled apart.
template <Fmt F>
constexpr bool kI8Halves = F == kQ6_K;

#ifdef REALM_GEMM_I8
// x [M, K] bf16, rows [m0, m1): codes q (K bytes a row), per group of 32 dx and xs = dx * sum(codes), and
// xc = -c * sum(codes) ([M, K/16]; c: kI8Offset), per 16 values with halves, else the group's in the first
// of its two and 0 in the second. A group with a NaN or an infinity gets dx =
// NaN, so that the rows it reaches come out NaN, never finite.
inline void quantize_x8(const uint16_t* x, int64_t m0, int64_t m1, int64_t k, int32_t c, bool halves, int8_t* q,
                        float* dx, float* xs, int32_t* xc) {
  const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  for (int64_t m = m0; m < m1; ++m)
    for (int64_t g = 0; g < k / 32; ++g) {
      const uint16_t* p = x + m * k + 32 * g;
      auto widen = [](const uint16_t* h) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(h));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
      };
      const __m512 a = widen(p), b = widen(p + 16);
      const __m512 mag = _mm512_max_ps(_mm512_and_ps(a, sign), _mm512_and_ps(b, sign));
      const float amax = _mm512_reduce_max_ps(mag);
      const bool finite = !(_mm512_cmp_ps_mask(mag, _mm512_set1_ps(3.4028235e38f), _CMP_NLE_UQ) |
                            _mm512_cmp_ps_mask(a, b, _CMP_UNORD_Q));
      // 1 / d overflows for groups below ~3.7e-37: their codes are 0, as for a group of zeros.
      const float d = amax / 127.0f, inv = 1.0f / d, id = finite && inv <= 3.4028235e38f ? inv : 0.0f;
      const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, _mm512_set1_ps(id)));
      const __m512i qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, _mm512_set1_ps(id)));
      int8_t* out = q + m * k + 32 * g;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm512_cvtsepi32_epi8(qa));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16), _mm512_cvtsepi32_epi8(qb));
      const int64_t at = m * (k / 32) + g;
      dx[at] = finite ? d : __builtin_nanf("");
      // Sums per half only where the scales are per 16 (one reduction instead of two).
      const int32_t sa = halves ? _mm512_reduce_add_epi32(qa) : 0;
      const int32_t sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
      xs[at] = dx[at] * static_cast<float>(sum);
      xc[2 * at] = -c * (halves ? sa : sum);
      xc[2 * at + 1] = -c * (halves ? sum - sa : 0);
    }
}

// Group j of block b of row r: its 32 codes as unsigned bytes (element i in byte i).
template <Fmt F>
inline __m256i codes32(const Row& r, int64_t b, int64_t j) {
  const __m256i nib = _mm256_set1_epi8(0x0f), sixteen = _mm256_set1_epi8(16);
  if constexpr (F == kQ8_0) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r.p[1] + 32 * b));
    return _mm256_xor_si256(v, _mm256_set1_epi8(static_cast<char>(0x80)));
  } else if constexpr (F == kQ4_K || F == kQ5_K) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r.p[F == kQ5_K ? 5 : 4] + 128 * b + 32 * (j / 2)));
    __m256i c = _mm256_and_si256(j & 1 ? _mm256_srli_epi16(v, 4) : v, nib);
    if constexpr (F == kQ5_K) {
      const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r.p[4] + 32 * b));
      c = _mm256_mask_add_epi8(c, _mm256_test_epi8_mask(qh, _mm256_set1_epi8(static_cast<char>(1 << j))), c, sixteen);
    }
    return c;
  } else if constexpr (F == kQ6_K) {
    // planes ql, qh, scales, d (group_scalar's): low 4 bits from ql, bits 4-5 from qh.
    const int64_t h = j / 4, q = j % 4;
    const __m256i ql = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r.p[0] + 128 * b + 64 * h + 32 * (q & 1)));
    const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r.p[1] + 64 * b + 32 * h));
    const __m256i low = _mm256_and_si256(_mm256_srl_epi16(ql, _mm_cvtsi32_si128(static_cast<int>(4 * (q >> 1)))), nib);
    const __m256i high = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(static_cast<int>(2 * q))),
                                          _mm256_set1_epi8(3));
    return _mm256_or_si256(low, _mm256_slli_epi16(high, 4));  // high < 4: no carry into the next byte
  } else {
    constexpr bool has_m = F == kQ4_1 || F == kQ5_1, five = F == kQ5_0 || F == kQ5_1;
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r.p[(has_m ? 2 : 1) + (five ? 1 : 0)] + 16 * b));
    const __m128i lo = _mm_and_si128(v, _mm_set1_epi8(0x0f)), hi = _mm_and_si128(_mm_srli_epi16(v, 4), _mm_set1_epi8(0x0f));
    __m256i c = _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
    if constexpr (five) c = _mm256_mask_add_epi8(c, static_cast<__mmask32>(u32(r.p[has_m ? 2 : 1] + 4 * b)), c, sixteen);
    return c;
  }
}
// The int8 panel of W's rows [n0, n0 + 64) (zero past N) from the planes, 16 rows at a time: each row's codes
// of two groups are one vector of 16 quads, and a 16 x 16 transpose makes them quad by quad, 16 rows each.
template <Fmt F>
void fill_i8(const Planes& w, int64_t n0, int64_t n, int64_t k, uint32_t* panel) {
  uint8_t* out = reinterpret_cast<uint8_t*>(panel);
  constexpr int64_t per = groups_per_block<F>();
  const int64_t groups = k / 32;
  for (int64_t r0 = 0; r0 < 64; r0 += 16) {
    const int64_t live = std::clamp<int64_t>(n - n0 - r0, 0, 16);
    Row rows[16];
    for (int64_t i = 0; i < live; ++i) rows[i] = w.row(n0 + r0 + i);
    alignas(64) float s[16][16], o[16][16];  // each row's factors of its current block
    for (int64_t g = 0; g < groups; g += 2) {
      alignas(64) float gs[2][16] = {}, go[2][16] = {};
      __m512i v[16];
      for (int64_t i = 0; i < 16; ++i) {
        __m256i c[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
        for (int64_t h = 0; h < 2 && i < live && g + h < groups; ++h) {
          const int64_t b = (g + h) / per, j = (g + h) % per;
          if (j == 0) {
            prepare<F>(rows[i], b, s[i], o[i]);
            if constexpr (F == kQ8_0) o[i][0] = -128.0f * s[i][0];  // its codes are stored offset by 128
          }
          c[h] = codes32<F>(rows[i], b, j);
          if constexpr (kI8Halves<F>) {  // prepare's s holds the 16 scales of the block's halves
            gs[h][i] = s[i][2 * j];
            go[h][i] = s[i][2 * j + 1];
          } else {
            gs[h][i] = s[i][j];
            go[h][i] = o[i][j];
          }
        }
        v[i] = _mm512_inserti64x4(_mm512_castsi256_si512(c[0]), c[1], 1);
      }
      transpose16(v);
      for (int64_t h = 0; h < 2 && g + h < groups; ++h) {
        uint8_t* dst = out + (g + h) * kI8Group;
        for (int q = 0; q < 8; ++q) _mm512_storeu_si512(dst + q * 256 + 4 * r0, v[8 * h + q]);
        _mm512_storeu_ps(reinterpret_cast<float*>(dst + kI8Codes) + r0, _mm512_load_ps(gs[h]));
        _mm512_storeu_ps(reinterpret_cast<float*>(dst + kI8Codes) + 64 + r0, _mm512_load_ps(go[h]));
      }
    }
  }
}

// Rows [0, R) of quantized x (codes xq [R, K] from row 0; dx, xs [R, K/32]; xc [R, K/16]) against the int8
// panel at w, into acc: per group (with kHalves per 16), R x 64 integer sums in registers (starting from xc
// with kOffset), then scaled and added to the f32 sums (with the offsets' term where not kOffset).
template <int R, bool kOffset, bool kHalves = false>
inline void accumulate_i8(const int8_t* xq, const float* dx, const float* xs, const int32_t* xc, int64_t k,
                          const uint8_t* w, __m512 (&out)[R][4]) {
  static_assert(kOffset || !kHalves, "a format of scales per 16 has an integer offset here");
  __m512 acc[R][4];  // local, copied out once (gemm.cc's accumulate says why)
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_ps();
  const int64_t groups = k / 32;
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* wg = w + g * kI8Group;
    __m512i dot[R][4];
    // dot set to its start: zero, or -c * sum(codes) of x over the group (kHalves: over half `half`; else
    // half is 0, the group's).
    auto start = [&](int half) {
      for (int i = 0; i < R; ++i) {
        const int32_t* c = xc + 2 * (i * groups + g);
        const __m512i v = !kOffset ? _mm512_setzero_si512()
                          : _mm512_set1_epi32(c[half]);
        for (int j = 0; j < 4; ++j) dot[i][j] = v;
      }
    };
    // dot scaled by dx and the 64 rows' scales at sv, into acc.
    auto scale = [&](const float* sv) {
      for (int i = 0; i < R; ++i) {
        const __m512 d = _mm512_set1_ps(dx[i * groups + g]);
        for (int j = 0; j < 4; ++j) {
          acc[i][j] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot[i][j]), d), _mm512_loadu_ps(sv + 16 * j),
                                      acc[i][j]);
        }
      }
    };
    const float* s = reinterpret_cast<const float*>(wg + kI8Codes);
    start(0);
    for (int q = 0; q < 8; ++q) {
      if (kHalves && q == 4) {
        scale(s);
        start(1);
      }
      const uint8_t* wq = wg + q * 256;
      const __m512i w0 = _mm512_loadu_si512(wq), w1 = _mm512_loadu_si512(wq + 64);
      const __m512i w2 = _mm512_loadu_si512(wq + 128), w3 = _mm512_loadu_si512(wq + 192);
      for (int i = 0; i < R; ++i) {
        int32_t quad;
        std::memcpy(&quad, xq + i * k + 32 * g + 4 * q, 4);
        const __m512i a = _mm512_set1_epi32(quad);
        dot[i][0] = _mm512_dpbusd_epi32(dot[i][0], w0, a);
        dot[i][1] = _mm512_dpbusd_epi32(dot[i][1], w1, a);
        dot[i][2] = _mm512_dpbusd_epi32(dot[i][2], w2, a);
        dot[i][3] = _mm512_dpbusd_epi32(dot[i][3], w3, a);
      }
    }
    scale(kHalves ? s + 64 : s);
    if constexpr (!kOffset) {
      for (int i = 0; i < R; ++i) {
        const __m512 t = _mm512_set1_ps(xs[i * groups + g]);
        for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_fmadd_ps(_mm512_loadu_ps(s + 64 + 16 * j), t, acc[i][j]);
      }
    }
  }
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < 4; ++j) out[i][j] = acc[i][j];
}

// fill_i8 for a format with an int8 path, else null.
template <Fmt F>
constexpr void (*i8_fill())(const Planes&, int64_t, int64_t, int64_t, uint32_t*) {
  if constexpr (kInt8<F>) {
    return fill_i8<F>;
  } else {
    return nullptr;
  }
}
#endif

}  // namespace realm
