// realm-jax native matmul: the lattice i-quants IQ1_S, IQ1_M (realm_jax/quant/iq1.py), IQ2_XXS, IQ2_XS, IQ2_S
// (iq2.py), IQ3_XXS, IQ3_S (iq3.py). Their codebooks and sign table come from those modules through the
// generated realm_tables.h. A 32-element group is 4 points of 8 (IQ1, IQ2) or 8 points of 4 (IQ3); the kernel
// copies the points' magnitudes out of the codebook into 32 bytes, widens them to floats and applies the signs
// (IQ1: the shift delta) and the group's scale.
// Planes: IQ1_S d, qs[32], qh[8 x u16]; IQ1_M qs[32], qh[16], scales[4 x u16]; IQ2_XXS d, qs[16 x u32];
// IQ2_XS d, qs[32 x u16], scales[8]; IQ2_S d, qs[32], signs[32], qh[8], scales[8]; IQ3_XXS d, qs[64],
// scales_signs[8 x u32]; IQ3_S d, qs[64], qh[8], signs[32], scales[4].
#pragma once

#include "planes.h"
#include "realm_tables.h"

namespace realm {

// One group's elements as small integers (codebook magnitudes, or IQ1's -1/0/1), their sign mask (bit i set:
// element i negative), and the scale of elements 0..15 and 16..31 (IQ1: also the shift delta per 8 elements).
struct LatticeGroup {
  alignas(32) uint8_t mag[32];
  uint32_t negative = 0;
  float s0 = 0, s1 = 0;
  float delta[4] = {0, 0, 0, 0};
};

inline void points8(LatticeGroup& g, int k, const uint8_t (*grid)[8], int index) {
  std::memcpy(g.mag + 8 * k, grid[index], 8);
}
inline void points4(LatticeGroup& g, int k, const uint8_t (*grid)[4], int index) {
  std::memcpy(g.mag + 4 * k, grid[index], 4);
}
inline float half_scale(float d, uint32_t s, float factor) { return d * (0.5f + static_cast<float>(s)) * factor; }

// Group j of super-block b, per format.
template <Fmt F>
inline void lattice(const Row& r, int64_t b, int64_t j, LatticeGroup& g) {
  if constexpr (F == kIQ2_XXS) {
    const uint32_t a = u32(r.p[1] + 64 * b + 8 * j), w = u32(r.p[1] + 64 * b + 8 * j + 4);
    for (int k = 0; k < 4; ++k) {
      points8(g, k, tables::kIq2xxsGrid, (a >> (8 * k)) & 0xff);
      g.negative |= static_cast<uint32_t>(tables::kKsigns[(w >> (7 * k)) & 0x7f]) << (8 * k);
    }
    g.s0 = g.s1 = half_scale(f16_at(r.p[0], b), w >> 28, 0.25f);
  } else if constexpr (F == kIQ2_XS) {
    for (int k = 0; k < 4; ++k) {
      const uint16_t q = u16(r.p[1] + 64 * b + 8 * j + 2 * k);
      points8(g, k, tables::kIq2xsGrid, q & 511);
      g.negative |= static_cast<uint32_t>(tables::kKsigns[q >> 9]) << (8 * k);
    }
    const uint8_t sc = r.p[2][8 * b + j];
    const float d = f16_at(r.p[0], b);
    g.s0 = half_scale(d, sc & 0xf, 0.25f);
    g.s1 = half_scale(d, sc >> 4, 0.25f);
  } else if constexpr (F == kIQ2_S) {
    const uint8_t qh = r.p[3][8 * b + j];
    for (int k = 0; k < 4; ++k) {
      points8(g, k, tables::kIq2sGrid, r.p[1][32 * b + 4 * j + k] | (((qh >> (2 * k)) & 3) << 8));
    }
    g.negative = u32(r.p[2] + 32 * b + 4 * j);
    const uint8_t sc = r.p[4][8 * b + j];
    const float d = f16_at(r.p[0], b);
    g.s0 = half_scale(d, sc & 0xf, 0.25f);
    g.s1 = half_scale(d, sc >> 4, 0.25f);
  } else if constexpr (F == kIQ3_XXS) {
    const uint32_t w = u32(r.p[2] + 32 * b + 4 * j);
    for (int k = 0; k < 8; ++k) points4(g, k, tables::kIq3xxsGrid, r.p[1][64 * b + 8 * j + k]);
    for (int k = 0; k < 4; ++k) g.negative |= static_cast<uint32_t>(tables::kKsigns[(w >> (7 * k)) & 0x7f]) << (8 * k);
    g.s0 = g.s1 = half_scale(f16_at(r.p[0], b), w >> 28, 0.5f);
  } else if constexpr (F == kIQ3_S) {
    const uint8_t qh = r.p[2][8 * b + j];
    for (int k = 0; k < 8; ++k) {
      points4(g, k, tables::kIq3sGrid, r.p[1][64 * b + 8 * j + k] | (((qh >> k) & 1) << 8));
    }
    g.negative = u32(r.p[3] + 32 * b + 4 * j);
    const uint32_t s = (r.p[4][4 * b + j / 2] >> (4 * (j % 2))) & 0xf;
    g.s0 = g.s1 = f16_at(r.p[0], b) * static_cast<float>(1 + 2 * s);
  } else if constexpr (F == kIQ1_S) {
    const uint16_t qh = u16(r.p[2] + 16 * b + 2 * j);
    for (int k = 0; k < 4; ++k) {
      const int index = r.p[1][32 * b + 4 * j + k] | (((qh >> (3 * k)) & 7) << 8);
      std::memcpy(g.mag + 8 * k, tables::kIq1sGrid[index], 8);  // int8 -1/0/1, read back as int8
    }
    g.s0 = g.s1 = f16_at(r.p[0], b) * static_cast<float>(2 * ((qh >> 12) & 7) + 1);
    for (float& d : g.delta) d = (qh & 0x8000) ? -0.125f : 0.125f;
  } else if constexpr (F == kIQ1_M) {
    const uint8_t* sc = r.p[2] + 8 * b;
    const uint16_t s[4] = {u16(sc), u16(sc + 2), u16(sc + 4), u16(sc + 6)};
    const uint16_t dbits = (s[0] >> 12) | ((s[1] >> 8) & 0xf0) | ((s[2] >> 4) & 0xf00) | (s[3] & 0xf000);
    const float d = f16_to_f32(dbits);
    for (int k = 0; k < 4; ++k) {
      const uint8_t nib = (r.p[1][16 * b + 2 * j + k / 2] >> (4 * (k % 2))) & 0xf;
      std::memcpy(g.mag + 8 * k, tables::kIq1sGrid[r.p[0][32 * b + 4 * j + k] | ((nib & 7) << 8)], 8);
      g.delta[k] = (nib & 8) ? -0.125f : 0.125f;
    }
    const int i0 = 2 * static_cast<int>(j), i1 = i0 + 1;  // the 3-bit scales of elements 0..15 and 16..31
    g.s0 = d * static_cast<float>(2 * ((s[i0 / 4] >> (3 * (i0 % 4))) & 7) + 1);
    g.s1 = d * static_cast<float>(2 * ((s[i1 / 4] >> (3 * (i1 % 4))) & 7) + 1);
  }
}

template <Fmt F>
constexpr bool kShifted = F == kIQ1_S || F == kIQ1_M;

template <Fmt F>
struct LatticeDequant {
  static constexpr bool kDefined = true;
  static constexpr int64_t kBlock = 256, kGroups = 8;
  static void scalar(const Row& r, int64_t g, float* out) {
    LatticeGroup lg;
    lattice<F>(r, g / 8, g % 8, lg);
    for (int i = 0; i < 32; ++i) {
      const float s = i < 16 ? lg.s0 : lg.s1;
      if constexpr (kShifted<F>) {
        out[i] = s * (static_cast<int8_t>(lg.mag[i]) + lg.delta[i / 8]);
      } else {
        const float w = s * lg.mag[i];
        out[i] = ((lg.negative >> i) & 1) ? -w : w;
      }
    }
  }
#ifdef REALM_AVX512
  static void prepare(const Row&, int64_t, float*, float*) {}
  static void group(const Row& r, int64_t b, int64_t j, const float*, const float*, __m512& w0, __m512& w1) {
    LatticeGroup lg;
    lattice<F>(r, b, j, lg);
    if constexpr (kShifted<F>) {
      auto halves = [](float lo, float hi) {  // lanes 0..7 lo, 8..15 hi (AVX512F only)
        return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_set1_ps(lo)),
                                                   _mm256_castps_pd(_mm256_set1_ps(hi)), 1));
      };
      const __m512 d0 = halves(lg.delta[0], lg.delta[1]), d1 = halves(lg.delta[2], lg.delta[3]);
      w0 = _mm512_mul_ps(_mm512_add_ps(cvt(lo16s(lg.mag)), d0), set1(lg.s0));
      w1 = _mm512_mul_ps(_mm512_add_ps(cvt(lo16s(lg.mag + 16)), d1), set1(lg.s1));
    } else {
      w0 = negate_where(_mm512_mul_ps(cvt(lo16(lg.mag)), set1(lg.s0)), static_cast<__mmask16>(lg.negative));
      w1 = negate_where(_mm512_mul_ps(cvt(lo16(lg.mag + 16)), set1(lg.s1)), static_cast<__mmask16>(lg.negative >> 16));
    }
  }
#endif
};

template <> struct Dequant<kIQ1_S> : LatticeDequant<kIQ1_S> {};
template <> struct Dequant<kIQ1_M> : LatticeDequant<kIQ1_M> {};
template <> struct Dequant<kIQ2_XXS> : LatticeDequant<kIQ2_XXS> {};
template <> struct Dequant<kIQ2_XS> : LatticeDequant<kIQ2_XS> {};
template <> struct Dequant<kIQ2_S> : LatticeDequant<kIQ2_S> {};
template <> struct Dequant<kIQ3_XXS> : LatticeDequant<kIQ3_XXS> {};
template <> struct Dequant<kIQ3_S> : LatticeDequant<kIQ3_S> {};

}  // namespace realm
