// realm-jax native prefill gemm, the f32 path (gemm.cc includes it): under the f32 policy, W's planes are
// dequantized exactly (dequant.h's formulas) a panel of 64 rows at a time into f32, [K][64], and multiplied
// by x in f32 with f32 sums, so that prefill needs no dense f32 copy of the weight: 4 bytes a weight, 7x a
// Q4_K file. It needs no AVX512_BF16: AVX-512F register tiles (6 rows x 64, FMAs), or where the build has no
// AVX-512 a loop over the panel's 64 columns that the compiler vectorizes (the avx2 build: -march=x86-64-v3).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "dequant.h"

namespace realm {

#ifdef REALM_AVX512
constexpr int kRowsF32 = 6;  // 6 x 4 = 24 accumulators of the 32 vector registers

// W's rows [n0, n0 + 64) (zero past N) dequantized into an f32 panel, out[k * 64 + r]: 16 rows at a time,
// each group of 32 as two vectors of 16 per row, turned 16 x 16 into 16 rows a k.
template <Fmt F>
void fill_f32(const Planes& w, int64_t n0, int64_t n, int64_t k, uint32_t* panel) {
  float* out = reinterpret_cast<float*>(panel);
  constexpr int64_t per = groups_per_block<F>();
  const int64_t blocks = k / 32 / per;
  for (int64_t r0 = 0; r0 < 64; r0 += 16) {
    const int64_t live = std::clamp<int64_t>(n - n0 - r0, 0, 16);
    Row rows[16];
    for (int64_t i = 0; i < live; ++i) rows[i] = w.row(n0 + r0 + i);
    alignas(64) float s[16][16], o[16][16];
    for (int64_t b = 0; b < blocks; ++b) {
      for (int64_t i = 0; i < live; ++i) prepare<F>(rows[i], b, s[i], o[i]);
      for (int64_t j = 0; j < per; ++j) {
        __m512i lo[16], hi[16];
        for (int64_t i = 0; i < 16; ++i) {
          __m512 w0 = _mm512_setzero_ps(), w1 = _mm512_setzero_ps();
          if (i < live) group_avx512<F>(rows[i], b, j, s[i], o[i], w0, w1);
          lo[i] = _mm512_castps_si512(w0);
          hi[i] = _mm512_castps_si512(w1);
        }
        transpose16(lo);
        transpose16(hi);
        float* dst = out + 32 * (b * per + j) * 64 + r0;
        for (int c = 0; c < 16; ++c) {
          _mm512_storeu_si512(dst + c * 64, lo[c]);
          _mm512_storeu_si512(dst + (16 + c) * 64, hi[c]);
        }
      }
    }
  }
}

// Rows [0, R) of x (f32 [R, K] from row 0) against the panel: y[i][c] for the first `cols` columns.
template <int R>
inline void tile_f32(const float* x, int64_t k, const float* w, float* y, int64_t ldy, int64_t cols) {
  __m512 acc[R][4];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t kk = 0; kk < k; ++kk) {
    const float* wk = w + kk * 64;
    const __m512 w0 = _mm512_loadu_ps(wk), w1 = _mm512_loadu_ps(wk + 16);
    const __m512 w2 = _mm512_loadu_ps(wk + 32), w3 = _mm512_loadu_ps(wk + 48);
    for (int i = 0; i < R; ++i) {
      const __m512 a = _mm512_set1_ps(x[i * k + kk]);
      acc[i][0] = _mm512_fmadd_ps(a, w0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(a, w1, acc[i][1]);
      acc[i][2] = _mm512_fmadd_ps(a, w2, acc[i][2]);
      acc[i][3] = _mm512_fmadd_ps(a, w3, acc[i][3]);
    }
  }
  for (int j = 0; j < 4; ++j) {
    const __mmask16 m = static_cast<__mmask16>((1u << std::clamp<int64_t>(cols - 16 * j, 0, 16)) - 1u);
    for (int i = 0; i < R; ++i) _mm512_mask_storeu_ps(y + i * ldy + 16 * j, m, acc[i][j]);
  }
}
#else
constexpr int kRowsF32 = 6;

template <Fmt F>
void fill_f32(const Planes& w, int64_t n0, int64_t n, int64_t k, uint32_t* panel) {
  float* out = reinterpret_cast<float*>(panel);
  float vals[32];
  for (int64_t r = 0; r < 64; ++r) {
    if (n0 + r >= n) {
      for (int64_t kk = 0; kk < k; ++kk) out[kk * 64 + r] = 0.0f;
      continue;
    }
    const Row row = w.row(n0 + r);
    for (int64_t g = 0; g < k / 32; ++g) {
      group_scalar<F>(row, g, vals);
      for (int c = 0; c < 32; ++c) out[(32 * g + c) * 64 + r] = vals[c];
    }
  }
}

// Without AVX-512: 16 columns of the panel at a time (two vectors of 8, the compiler's AVX2 registers in the
// avx2 build) against R rows of x, 2R sums and two weight vectors of the 16 registers.
typedef float v8f __attribute__((vector_size(32)));

template <int R>
inline void tile_f32(const float* x, int64_t k, const float* w, float* y, int64_t ldy, int64_t cols) {
  for (int64_t c0 = 0; c0 < cols; c0 += 16) {
    v8f acc[R][2] = {};
    for (int64_t kk = 0; kk < k; ++kk) {
      v8f w0, w1;
      std::memcpy(&w0, w + kk * 64 + c0, 32);
      std::memcpy(&w1, w + kk * 64 + c0 + 8, 32);
      for (int i = 0; i < R; ++i) {
        const float a = x[i * k + kk];
        acc[i][0] += a * w0;
        acc[i][1] += a * w1;
      }
    }
    const int64_t take = std::min<int64_t>(16, cols - c0);
    for (int i = 0; i < R; ++i) {
      alignas(32) float out[16];
      std::memcpy(out, acc[i], 64);
      std::memcpy(y + i * ldy + c0, out, 4 * take);
    }
  }
}
#endif

// Rows [m0, m1) of x against a panel, the first `cols` of its columns into y (f32 [M, ldy], the panel's
// columns from y on).
inline void rows_f32(const float* x, int64_t k, int64_t m0, int64_t m1, const float* w, float* y, int64_t ldy,
                     int64_t cols) {
  int64_t m = m0;
  for (; m + kRowsF32 <= m1; m += kRowsF32) tile_f32<kRowsF32>(x + m * k, k, w, y + m * ldy, ldy, cols);
  switch (m1 - m) {
    case 1: tile_f32<1>(x + m * k, k, w, y + m * ldy, ldy, cols); break;
    case 2: tile_f32<2>(x + m * k, k, w, y + m * ldy, ldy, cols); break;
    case 3: tile_f32<3>(x + m * k, k, w, y + m * ldy, ldy, cols); break;
    case 4: tile_f32<4>(x + m * k, k, w, y + m * ldy, ldy, cols); break;
    case 5: tile_f32<5>(x + m * k, k, w, y + m * ldy, ldy, cols); break;
    default: break;
  }
}

}  // namespace realm
