// realm-jax native matmul: Q2_K and Q3_K (realm_jax/quant/kquants_low.py has the bit diagrams).
// Planes: Q2_K scales[16], qs[64], d, dmin; Q3_K hmask[32], qs[64], scales[16] (6-bit, unpacked), d.
// Group j (32 elements) of a super-block: 2-bit codes (qs[32 (j / 4) + l] >> 2 (j % 4)) & 3, l = 0..31,
// sub-blocks 2j (l < 16) and 2j + 1 with their own scales.
//
// Besides the f32 dequantization every format has (Dequant<F>::group), these two have an integer decode path
// (dot_x16) for x of a 16-bit compute dtype: dequantized to f32, a 2-bit weight costs as many instructions
// as a 4-bit one, so per weight byte Q2_K ran at half Q4_K's speed. Integer codes times x quantized to int16
// per 256 elements (XInt16) cost about half: one load of each qs byte for its four fields, shift, mask, the
// sub-block scale multiplied in as int16 and 32 products a vpdpwssd, the f16 factors converted 16 super-blocks
// at a time and applied once per super-block, the mins (Q3_K: its -4 offset) through the sub-block sums of x. int16 x is within the 16-bit
// dtypes' tolerance (its error is below 2^-16 of the block's largest |x|, bf16's own rounding 2^-9 of each
// element) but not f32's (1e-5 sqrt(K)), so an f32 compute dtype keeps the f32 path.
#pragma once

#include <algorithm>
#include <cfloat>
#include <vector>

#include "planes.h"

namespace realm {

#ifdef REALM_AVX512
// The rows of x as int16 codes for dot_x16: x[i, 256 b + e] ~ q[i, 256 b + e] * d[i, b], |q| <= 32767 (the
// block's largest |x| maps to 32767); sums[i, s]: the sum of the codes of x's 16 elements 16 s..16 s + 15.
// Each row is quantized on its own, so a row's result does not depend on the other rows of the call.
struct XInt16 {
  std::vector<int16_t> q;
  std::vector<float> d;
  std::vector<int32_t> sums;
  int64_t k = 0;

  // False (nothing usable) where x holds a NaN or an Inf, or a block's largest |x| is so small (below
  // ~1e-34) that 32767 / max overflows: the caller then takes the f32 path, whose results stay exact there.
  bool quantize(const float* x, int64_t m, int64_t cols) {
    k = cols;
    const int64_t blocks = m * (cols / 256);
    q.resize(m * cols);
    d.resize(blocks);
    sums.resize(m * cols / 16);
    for (int64_t b = 0; b < blocks; ++b) {
      const float* xb = x + 256 * b;
      __m512 mx = _mm512_setzero_ps(), poison = _mm512_setzero_ps();
      for (int c = 0; c < 16; ++c) {
        const __m512 v = _mm512_loadu_ps(xb + 16 * c);
        mx = _mm512_max_ps(mx, _mm512_abs_ps(v));
        poison = _mm512_add_ps(poison, _mm512_mul_ps(v, _mm512_setzero_ps()));  // NaN from a NaN or an Inf
      }
      const float amax = _mm512_reduce_max_ps(mx), inv = 32767.0f / amax;
      if (_mm512_reduce_add_ps(poison) != 0.0f) return false;
      if (amax != 0.0f && !(inv <= FLT_MAX)) return false;
      const __m512 scale = _mm512_set1_ps(amax == 0.0f ? 0.0f : inv);
      for (int c = 0; c < 16; ++c) {
        const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xb + 16 * c), scale));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(q.data() + 256 * b + 16 * c), _mm512_cvtepi32_epi16(v));
        sums[16 * b + c] = _mm512_reduce_add_epi32(v);
      }
      d[b] = amax / 32767.0f;
    }
    return true;
  }
};

// acc + the pairwise sums of a * b (16-bit lanes into 32-bit lanes).
inline __m512i dot16(__m512i acc, __m512i a, __m512i b) {
#ifdef __AVX512VNNI__
  return _mm512_dpwssd_epi32(acc, a, b);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b));
#endif
}

// The f32 factors of super-blocks [b0, b0 + nb) (nb <= 16) of x rows m0..m0 + MB - 1: f[i][e] = the f16
// factor of super-block b0 + e times row m0 + i's dx, converted and multiplied 16 at a time rather than one
// scalar per super-block. Returns the f16 factors times 0: NaN in the lanes of an Inf or a NaN factor.
template <int MB>
inline __m512 block_factors(const uint8_t* plane, const XInt16& x, int64_t m0, int64_t b0, int64_t nb, float sign,
                            float (*f)[16]) {
  const __mmask16 lanes = static_cast<__mmask16>((1u << nb) - 1);
  alignas(32) uint16_t h[16] = {};
  std::memcpy(h, plane + 2 * b0, 2 * nb);
  const __m512 v = _mm512_mul_ps(_mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(h))), set1(sign));
  const int64_t blocks = x.k / 256;
  for (int i = 0; i < MB; ++i)
    _mm512_store_ps(f[i], _mm512_mul_ps(v, _mm512_maskz_loadu_ps(lanes, x.d.data() + (m0 + i) * blocks + b0)));
  return _mm512_mul_ps(v, _mm512_setzero_ps());
}

// Sub-block scales for group j = 4 h + k, from the 8 int16 scales of half h broadcast to every 128-bit
// lane: words 0..15 (elements 0..15, sub-block 2j) get scale 2k of the half, words 16..31 scale 2k + 1.
template <int K>
inline __m512i pick_scales(__m512i half) {
  constexpr int a = (4 * K) | (4 * K + 1) << 8 | (4 * K) << 16 | (4 * K + 1) << 24, b = a + 0x02020202;
  return _mm512_shuffle_epi8(half, _mm512_set_epi32(b, b, b, b, b, b, b, b, a, a, a, a, a, a, a, a));
}

// The same from a super-block's 16 scale bytes (unsigned) in every 128-bit lane, zero-extended to int16.
template <int H, int K>
inline __m512i pick_scale_bytes(__m512i bytes) {
  constexpr unsigned lo = 0x80008000u | (8 * H + 2 * K) | (8 * H + 2 * K) << 16, hi = lo + 0x00010001u;
  const int a = static_cast<int>(lo), b = static_cast<int>(hi);
  return _mm512_shuffle_epi8(bytes, _mm512_set_epi32(b, b, b, b, b, b, b, b, a, a, a, a, a, a, a, a));
}

// The int16 scales of half h of a super-block (8 of `scales`' 16 words) in every 128-bit lane.
inline __m512i half_scales(__m256i scales, int h) {
  return _mm512_broadcast_i32x4(h ? _mm256_extracti128_si256(scales, 1) : _mm256_castsi256_si128(scales));
}

// dot[i] += (codes of group J times their sub-block scales) . x row i's 32 codes of that group (the first
// group of a super-block starts the sums).
template <int J, int MB, bool First = false>
inline void dot_group(__m512i scaled, const int16_t* xq, int64_t k, __m512i* dot) {
  for (int i = 0; i < MB; ++i) {
    const __m512i xv = _mm512_loadu_si512(xq + i * k + 32 * J);
    if constexpr (First) {
      dot[i] = _mm512_madd_epi16(scaled, xv);
    } else {
      dot[i] = dot16(dot[i], scaled, xv);
    }
  }
}
#endif

template <>
struct Dequant<kQ2_K> {
  static constexpr bool kDefined = true, kXInt16 = true;
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

  template <int H, int K, int MB>
  static void fields(__m512i v, __m512i scale_bytes, const int16_t* xq, int64_t k, __m512i* dot) {
    const __m512i q = _mm512_and_si512(_mm512_srli_epi16(v, 2 * K), _mm512_set1_epi16(3));
    dot_group<K, MB, H == 0 && K == 0>(_mm512_mullo_epi16(q, pick_scale_bytes<H, K>(scale_bytes)), xq + 128 * H, k, dot);
  }

  // y[i] = row r of W . row m0 + i of x, for x's int16 codes: per super-block
  // d dx (sum_s sc_s sum_l q_l xq_l) - dmin dx sum_s m_s sums_s, with sc_s q_l <= 45, so the int32 sums are exact.
  template <int MB>
  static void dot_x16(const Row& r, const XInt16& x, int64_t m0, float* y) {
    const int64_t blocks = x.k / 256;
    __m512 acc[MB];
    for (int i = 0; i < MB; ++i) acc[i] = _mm512_setzero_ps();
    __m512 nonfinite = _mm512_setzero_ps();  // NaN where a super-block's d or dmin is an Inf or a NaN, as in the reference
    alignas(64) float fd[MB][16], fm[MB][16];
    for (int64_t b0 = 0; b0 < blocks; b0 += 16) {
      const int64_t nb = std::min<int64_t>(16, blocks - b0);
      nonfinite = _mm512_add_ps(nonfinite, block_factors<MB>(r.p[2], x, m0, b0, nb, 1.0f, fd));
      nonfinite = _mm512_add_ps(nonfinite, block_factors<MB>(r.p[3], x, m0, b0, nb, -1.0f, fm));
      for (int64_t e = 0; e < nb; ++e) {
        const int64_t b = b0 + e;
        const __m128i sc = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r.p[0] + 16 * b));
        const __m512i bytes = _mm512_and_si512(_mm512_broadcast_i32x4(sc), _mm512_set1_epi8(0xf));
        const __m512i mins = _mm512_srli_epi32(_mm512_cvtepu8_epi32(sc), 4);
        const int16_t* xq = x.q.data() + m0 * x.k + 256 * b;
        const uint8_t* qs = r.p[1] + 64 * b;
        prefetch_ahead<kQ2_K>(r, b);
        __m512i dot[MB];
        const __m512i v0 = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs)));
        fields<0, 0, MB>(v0, bytes, xq, x.k, dot);
        fields<0, 1, MB>(v0, bytes, xq, x.k, dot);
        fields<0, 2, MB>(v0, bytes, xq, x.k, dot);
        fields<0, 3, MB>(v0, bytes, xq, x.k, dot);
        const __m512i v1 = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32)));
        fields<1, 0, MB>(v1, bytes, xq, x.k, dot);
        fields<1, 1, MB>(v1, bytes, xq, x.k, dot);
        fields<1, 2, MB>(v1, bytes, xq, x.k, dot);
        fields<1, 3, MB>(v1, bytes, xq, x.k, dot);
        for (int i = 0; i < MB; ++i) {
          const __m512i ms = _mm512_mullo_epi32(mins, _mm512_loadu_si512(x.sums.data() + (m0 + i) * (x.k / 16) + 16 * b));
          acc[i] = _mm512_fmadd_ps(cvt(dot[i]), set1(fd[i][e]), acc[i]);
          acc[i] = _mm512_fmadd_ps(cvt(ms), set1(fm[i][e]), acc[i]);
        }
      }
    }
    const float poison = _mm512_reduce_add_ps(nonfinite);
    for (int i = 0; i < MB; ++i) y[i] = _mm512_reduce_add_ps(acc[i]) + poison;
  }
#endif
};

template <>
struct Dequant<kQ3_K> {
  static constexpr bool kDefined = true, kXInt16 = true;
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

  // Group 4 H + K: the unsigned code u = q | 4 h (0..7) times its sub-block scale s - 32 (|s u| <= 224).
  template <int H, int K, int MB>
  static void fields(__m512i v, __m512i hv, __m512i half, const int16_t* xq, int64_t k, __m512i* dot) {
    constexpr int j = 4 * H + K;  // bit j of hmask, moved to bit 2
    const __m512i hb = j >= 2 ? _mm512_srli_epi16(hv, j >= 2 ? j - 2 : 0) : _mm512_slli_epi16(hv, j < 2 ? 2 - j : 0);
    const __m512i q = _mm512_and_si512(_mm512_srli_epi16(v, 2 * K), _mm512_set1_epi16(3));
    const __m512i u = _mm512_ternarylogic_epi32(q, hb, _mm512_set1_epi16(4), 0xf8);  // q | (hb & 4)
    dot_group<K, MB, H == 0 && K == 0>(_mm512_mullo_epi16(u, pick_scales<K>(half)), xq, k, dot);
  }

  // As Q2_K's: d dx (sum_s s_s sum_l u_l xq_l - 4 sum_s s_s sums_s), all of it exact in int32 (|.| < 2^31).
  template <int MB>
  static void dot_x16(const Row& r, const XInt16& x, int64_t m0, float* y) {
    const int64_t blocks = x.k / 256;
    __m512 acc[MB];
    for (int i = 0; i < MB; ++i) acc[i] = _mm512_setzero_ps();
    __m512 nonfinite = _mm512_setzero_ps();
    alignas(64) float fd[MB][16];
    for (int64_t b0 = 0; b0 < blocks; b0 += 16) {
      const int64_t nb = std::min<int64_t>(16, blocks - b0);
      nonfinite = _mm512_add_ps(nonfinite, block_factors<MB>(r.p[3], x, m0, b0, nb, 1.0f, fd));
      for (int64_t e = 0; e < nb; ++e) {
        const int64_t b = b0 + e;
        const __m256i scales = _mm256_sub_epi16(
            _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r.p[2] + 16 * b))), _mm256_set1_epi16(32));
        const __m512i offsets = _mm512_slli_epi32(_mm512_cvtepi16_epi32(scales), 2);  // 4 (s - 32) per sub-block
        const __m512i hv = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r.p[0] + 32 * b)));
        prefetch_ahead<kQ3_K>(r, b);
        __m512i dot[MB];
        const int16_t* xq = x.q.data() + m0 * x.k + 256 * b;
        const __m512i v0 = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r.p[1] + 64 * b)));
        const __m512i half0 = half_scales(scales, 0);
        fields<0, 0, MB>(v0, hv, half0, xq, x.k, dot);
        fields<0, 1, MB>(v0, hv, half0, xq, x.k, dot);
        fields<0, 2, MB>(v0, hv, half0, xq, x.k, dot);
        fields<0, 3, MB>(v0, hv, half0, xq, x.k, dot);
        const __m512i v1 = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r.p[1] + 64 * b + 32)));
        const __m512i half1 = half_scales(scales, 1);
        fields<1, 0, MB>(v1, hv, half1, xq + 128, x.k, dot);
        fields<1, 1, MB>(v1, hv, half1, xq + 128, x.k, dot);
        fields<1, 2, MB>(v1, hv, half1, xq + 128, x.k, dot);
        fields<1, 3, MB>(v1, hv, half1, xq + 128, x.k, dot);
        for (int i = 0; i < MB; ++i) {
          const __m512i sums = _mm512_loadu_si512(x.sums.data() + (m0 + i) * (x.k / 16) + 16 * b);
          const __m512i total = _mm512_sub_epi32(dot[i], _mm512_mullo_epi32(offsets, sums));
          acc[i] = _mm512_fmadd_ps(cvt(total), set1(fd[i][e]), acc[i]);
        }
      }
    }
    const float poison = _mm512_reduce_add_ps(nonfinite);
    for (int i = 0; i < MB; ++i) y[i] = _mm512_reduce_add_ps(acc[i]) + poison;
  }
#endif
};

}  // namespace realm
