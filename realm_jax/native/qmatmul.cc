// realm-jax's native CPU matmul: y[M, N] = x[M, K] . W[N, K]^T with f32 accumulation, for the few rows of
// x a decode step multiplies (any M works; XLA's dot on a dense copy is faster past ~8 rows: native.MAX_ROWS).
//
// Why it exists: XLA:CPU multiplies one or two rows by a 16-bit or 8-bit weight far below memory
// bandwidth (it converts or packs the whole weight on every call), and it cannot read 4-bit planes at
// all without materializing them. This kernel streams W once per call straight from the planes the
// params hold (realm_jax.quant's struct-of-arrays layout: one buffer per plane, [N, per-row count]),
// dequantizes 32 elements at a time in registers with the same formulas as the format's tile function,
// and splits W's rows over XLA's intra-op thread pool. x arrives in f32, already rounded to the compute
// dtype by the caller.
//
// Built at first use by realm_jax/native/__init__.py (-O3 -march=native) and registered as the XLA FFI
// target "realm_qmatmul" on CPU. With AVX-512 (F, BW) the vector path runs; otherwise a portable scalar
// path computes the same sums (the tests build and check both).

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "iquants.h"
#include "kquants_low.h"
#include "lut4.h"
#include "numeric.h"
#include "planes.h"
#include "plain.h"
#include "pool.h"
#include "ternary.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace realm;  // NOLINT: the format ids, Row, the loads and the per-format Dequant hooks

// The dequantized weight rounded to the params dtype the policy holds weights in (round-to-nearest-even,
// as XLA's convert), so that this kernel and XLA's dot on the dense copy multiply the same values.
enum Round : int64_t { kNone = 0, kToBF16 = 1, kToF16 = 2 };

inline float round_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t sign = u & 0x80000000u, a = u & 0x7fffffffu;
  if (a >= 0x7f800000u) return f;                           // Inf, NaN
  if (a >= 0x477ff000u) return bits_to_f32(sign | 0x7f800000u);  // >= 65520: past f16's max after rounding
  if (a < 0x38800000u) {                                    // below 2^-14: f16 subnormals, steps of 2^-24
    float q = bits_to_f32(a) * 16777216.0f;                 // exact (a power-of-two scale)
    float r = static_cast<float>(static_cast<int32_t>(q));  // q < 2^10: truncation, then round half even
    float frac = q - r;
    if (frac > 0.5f || (frac == 0.5f && (static_cast<int32_t>(r) & 1))) r += 1.0f;
    return (sign ? -r : r) / 16777216.0f;  // exact: r < 2^10
  }
  const uint32_t lsb = (a >> 13) & 1u;                      // keep 10 mantissa bits, round half even
  return bits_to_f32(sign | ((a + 0xfffu + lsb) & ~0x1fffu));
}

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
    for (int i = 0; i < 32; ++i) {
      int q = (i < 16 ? qs[i] : qs[i - 16] >> 4) & 0xf;
      if (five) q |= ((qh >> i) & 1) << 4;
      out[i] = has_m ? d * q + m : d * (q - (five ? 16 : 8));
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
    for (int i = 0; i < 32; ++i) {
      int q = (qs[i] >> (4 * (j & 1))) & 0xf;
      if constexpr (F == kQ5_K) q |= ((r.p[4][32 * b + i] >> j) & 1) << 4;
      out[i] = dl * q - ml;
    }
  } else if constexpr (F == kQ6_K) {
    // planes: ql, qh, scales, d. Group g' = g % 8 of super-block b: half h, quarter q.
    const int64_t b = g / 8, gg = g % 8, h = gg / 4, q = gg % 4;
    const uint8_t* ql = r.p[0] + 128 * b + 64 * h + 32 * (q & 1);
    const uint8_t* qh = r.p[1] + 64 * b + 32 * h;
    const int8_t* sc = reinterpret_cast<const int8_t*>(r.p[2]) + 16 * b + 8 * h + 2 * q;
    float d = f16_at(r.p[3], b);
    for (int i = 0; i < 32; ++i) {
      int v = ((ql[i] >> (4 * (q >> 1))) & 0xf) | (((qh[i] >> (2 * q)) & 3) << 4);
      out[i] = d * sc[i / 16] * (v - 32);
    }
  } else if constexpr (F == kQ8_K) {
    float d;
    std::memcpy(&d, r.p[0] + 4 * (g / 8), 4);
    const int8_t* qs = reinterpret_cast<const int8_t*>(r.p[1]) + 32 * g;
    for (int i = 0; i < 32; ++i) out[i] = d * qs[i];
  }
}

#ifdef REALM_AVX512

template <int R>
inline __m512 round_vec(__m512 w) {
  if constexpr (R == kToBF16) {
#ifdef __AVX512BF16__
    return _mm512_cvtpbh_ps(_mm512_cvtneps_pbh(w));  // round to nearest even (NaN stays NaN) and back
#else
    const __m512i u = _mm512_castps_si512(w);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
    r = _mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xffff0000u)));
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(w, w, _CMP_UNORD_Q), _mm512_castsi512_ps(r), w);
#endif
  } else if constexpr (R == kToF16) {
    return _mm512_cvtph_ps(_mm512_cvtps_ph(w, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {
    return w;
  }
}

// Bit 4 of elements [base, base + 16) of a Q5_0/Q5_1 block, from its 32-bit qh.
inline __m512i q5_high(uint32_t qh, int base) {
  const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  __m512i bits = _mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(qh >> base)), lanes);
  return _mm512_slli_epi32(_mm512_and_si512(bits, _mm512_set1_epi32(1)), 4);
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

template <Fmt F>
constexpr int64_t groups_per_block() {
  if constexpr (Dequant<F>::kDefined) return Dequant<F>::kGroups;
  return F == kQ4_K || F == kQ5_K || F == kQ6_K || F == kQ8_K ? 8 : 1;
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
  } else if constexpr (F == kQ4_0 || F == kQ4_1 || F == kQ5_0 || F == kQ5_1) {
    constexpr bool has_m = F == kQ4_1 || F == kQ5_1, five = F == kQ5_0 || F == kQ5_1;
    const uint8_t* qs = r.p[(has_m ? 2 : 1) + (five ? 1 : 0)] + 16 * g;
    __m512i v = lo16(qs);
    __m512i q0 = _mm512_and_si512(v, nib), q1 = _mm512_srli_epi32(v, 4);
    if constexpr (five) {
      uint32_t qh = u32(r.p[has_m ? 2 : 1] + 4 * g);
      q0 = _mm512_or_si512(q0, q5_high(qh, 0));
      q1 = _mm512_or_si512(q1, q5_high(qh, 16));
    }
    // d * (q - c) as fma(q, d, -c * d): both terms exact, so one rounding, as the reference's product.
    const __m512 dv = set1(s[0]), off = set1(o[0]);
    w0 = _mm512_fmadd_ps(cvt(q0), dv, off);
    w1 = _mm512_fmadd_ps(cvt(q1), dv, off);
  } else if constexpr (F == kQ8_0 || F == kQ8_K) {
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

struct Problem {
  const float* x;
  float* y;
  int64_t m, n, k;
  int64_t round;
  int64_t n_planes;
  const uint8_t* planes[kMaxPlanes];
  int64_t row_bytes[kMaxPlanes];
};

inline Row row_of(const Problem& p, int64_t n) {
  Row r{};
  for (int64_t i = 0; i < p.n_planes; ++i) r.p[i] = p.planes[i] + n * p.row_bytes[i];
  return r;
}

// W's rows [n0, n1) against MB rows of x starting at row m0, the weights rounded as R says.
template <Fmt F, int MB, int R>
void rows(const Problem& p, int64_t m0, int64_t n0, int64_t n1) {
  const int64_t groups = p.k / 32;
  for (int64_t n = n0; n < n1; ++n) {
    const Row r = row_of(p, n);
#ifdef REALM_AVX512
    __m512 acc0[MB], acc1[MB];
    for (int i = 0; i < MB; ++i) acc0[i] = acc1[i] = _mm512_setzero_ps();
    constexpr int64_t per = groups_per_block<F>();
    alignas(64) float s[16], o[16];
    for (int64_t b = 0; b < groups / per; ++b) {
      prepare<F>(r, b, s, o);
      for (int64_t j = 0; j < per; ++j) {
        __m512 w0, w1;
        group_avx512<F>(r, b, j, s, o, w0, w1);
        w0 = round_vec<R>(w0);
        w1 = round_vec<R>(w1);
        const float* xg = p.x + m0 * p.k + 32 * (b * per + j);
        for (int i = 0; i < MB; ++i) {
          acc0[i] = _mm512_fmadd_ps(_mm512_loadu_ps(xg + i * p.k), w0, acc0[i]);
          acc1[i] = _mm512_fmadd_ps(_mm512_loadu_ps(xg + i * p.k + 16), w1, acc1[i]);
        }
      }
    }
    for (int i = 0; i < MB; ++i) p.y[(m0 + i) * p.n + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[i], acc1[i]));
#else
    float acc[MB][32] = {};
    float w[32];
    for (int64_t g = 0; g < groups; ++g) {
      group_scalar<F>(r, g, w);
      if constexpr (R == kToBF16) {
        for (int e = 0; e < 32; ++e) w[e] = round_bf16(w[e]);
      } else if constexpr (R == kToF16) {
        for (int e = 0; e < 32; ++e) w[e] = round_f16(w[e]);
      }
      for (int i = 0; i < MB; ++i) {
        const float* xr = p.x + (m0 + i) * p.k + 32 * g;
        for (int e = 0; e < 32; ++e) acc[i][e] += xr[e] * w[e];
      }
    }
    for (int i = 0; i < MB; ++i) {
      float s = 0.0f;
      for (int e = 0; e < 32; ++e) s += acc[i][e];
      p.y[(m0 + i) * p.n + n] = s;
    }
#endif
  }
}

constexpr int kRowBlock = 4;  // rows of x per pass over a row of W

template <Fmt F, int R>
void run_rounded(const Problem& p, int64_t n0, int64_t n1) {
  for (int64_t m0 = 0; m0 < p.m; m0 += kRowBlock) {
    switch (std::min<int64_t>(kRowBlock, p.m - m0)) {
      case 1: rows<F, 1, R>(p, m0, n0, n1); break;
      case 2: rows<F, 2, R>(p, m0, n0, n1); break;
      case 3: rows<F, 3, R>(p, m0, n0, n1); break;
      default: rows<F, 4, R>(p, m0, n0, n1); break;
    }
  }
}

template <Fmt F>
void run(const Problem& p, int64_t n0, int64_t n1) {
  switch (p.round) {
    case kToBF16: run_rounded<F, kToBF16>(p, n0, n1); break;
    case kToF16: run_rounded<F, kToF16>(p, n0, n1); break;
    default: run_rounded<F, kNone>(p, n0, n1); break;
  }
}

using Runner = void (*)(const Problem&, int64_t, int64_t);

struct Spec {
  Fmt fmt;
  int64_t block;      // elements per block
  int64_t n_planes;
  int64_t bytes[kMaxPlanes];  // bytes per block of each plane, in the order the planes are passed
  Runner runner;
};

const Spec kSpecs[] = {
    {kF32, 1, 1, {4}, run<kF32>},
    {kF16, 1, 1, {2}, run<kF16>},
    {kBF16, 1, 1, {2}, run<kBF16>},
    {kQ4_0, 32, 2, {2, 16}, run<kQ4_0>},
    {kQ4_1, 32, 3, {2, 2, 16}, run<kQ4_1>},
    {kQ5_0, 32, 3, {2, 4, 16}, run<kQ5_0>},
    {kQ5_1, 32, 4, {2, 2, 4, 16}, run<kQ5_1>},
    {kQ8_0, 32, 2, {2, 32}, run<kQ8_0>},
    {kQ4_K, 256, 5, {2, 2, 8, 8, 128}, run<kQ4_K>},
    {kQ5_K, 256, 6, {2, 2, 8, 8, 32, 128}, run<kQ5_K>},
    {kQ6_K, 256, 4, {128, 64, 16, 2}, run<kQ6_K>},
    {kQ8_K, 256, 3, {4, 256, 32}, run<kQ8_K>},
    {kI8, 1, 1, {1}, run<kI8>},
    {kI16, 1, 1, {2}, run<kI16>},
    {kI32, 1, 1, {4}, run<kI32>},
    {kI64, 1, 1, {8}, run<kI64>},
    {kF64, 1, 1, {8}, run<kF64>},
    {kQ2_K, 256, 4, {16, 64, 2, 2}, run<kQ2_K>},
    {kQ3_K, 256, 4, {32, 64, 16, 2}, run<kQ3_K>},
    {kIQ4_NL, 32, 2, {2, 16}, run<kIQ4_NL>},
    {kIQ4_XS, 256, 3, {2, 8, 128}, run<kIQ4_XS>},
    {kMXFP4, 32, 2, {1, 16}, run<kMXFP4>},
    {kNVFP4, 64, 2, {4, 32}, run<kNVFP4>},
    {kTQ1_0, 256, 3, {48, 4, 2}, run<kTQ1_0>},
    {kTQ2_0, 256, 2, {64, 2}, run<kTQ2_0>},
    {kIQ1_S, 256, 3, {2, 32, 16}, run<kIQ1_S>},
    {kIQ1_M, 256, 3, {32, 16, 8}, run<kIQ1_M>},
    {kIQ2_XXS, 256, 2, {2, 64}, run<kIQ2_XXS>},
    {kIQ2_XS, 256, 3, {2, 64, 8}, run<kIQ2_XS>},
    {kIQ2_S, 256, 5, {2, 32, 32, 8, 8}, run<kIQ2_S>},
    {kIQ3_XXS, 256, 3, {2, 64, 32}, run<kIQ3_XXS>},
    {kIQ3_S, 256, 5, {2, 64, 8, 32, 4}, run<kIQ3_S>},
};

using LayerIndex = ffi::Buffer<ffi::S32, 0>;

// planes: each [N, per-row bytes], or [L, N, ...] for a stack of L layers' weights of which `layer` is read
// where it lies (a scan over stacked layers would otherwise copy each layer's planes out every step).
ffi::Error QMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, LayerIndex layer,
                   ffi::RemainingArgs planes, ffi::ResultBuffer<ffi::F32> y, int64_t fmt, int64_t round) {
  const Spec* spec = nullptr;
  for (const Spec& s : kSpecs) spec = s.fmt == fmt ? &s : spec;
  if (spec == nullptr) return ffi::Error::InvalidArgument("realm_qmatmul: unknown format id");
  auto xd = x.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || yd.size() != 2 || yd[0] != xd[0]) {
    return ffi::Error::InvalidArgument("realm_qmatmul: x must be [M, K] and y [M, N]");
  }
  Problem p{};
  p.x = x.typed_data();
  p.y = y->typed_data();
  p.m = xd[0];
  p.k = xd[1];
  p.n = yd[1];
  if (round != kNone && round != kToBF16 && round != kToF16) {
    return ffi::Error::InvalidArgument("realm_qmatmul: unknown weight rounding");
  }
  p.round = round;
  if (p.k % 32 || p.k % spec->block) {
    return ffi::Error::InvalidArgument("realm_qmatmul: K must be a multiple of 32 and of the block size");
  }
  if (static_cast<int64_t>(planes.size()) != spec->n_planes) {
    return ffi::Error::InvalidArgument("realm_qmatmul: wrong number of planes for the format");
  }
  p.n_planes = spec->n_planes;
  const int64_t index = static_cast<int64_t>(*layer.typed_data());
  for (int64_t i = 0; i < p.n_planes; ++i) {
    auto plane = planes.get<ffi::AnyBuffer>(i);
    if (!plane.has_value()) return ffi::Error::InvalidArgument("realm_qmatmul: a plane is not a buffer");
    const int64_t row_bytes = p.k / spec->block * spec->bytes[i], matrix = p.n * row_bytes;
    const int64_t size = static_cast<int64_t>(plane->size_bytes());
    if (matrix == 0 || size % matrix != 0) {
      return ffi::Error::InvalidArgument("realm_qmatmul: a plane's size does not match [N, K]");
    }
    if (index < 0 || index >= size / matrix) {
      return ffi::Error::InvalidArgument("realm_qmatmul: the layer index is outside the stacked planes");
    }
    p.planes[i] = static_cast<const uint8_t*>(plane->untyped_data()) + index * matrix;
    p.row_bytes[i] = row_bytes;
  }
  if (p.m == 0) return ffi::Error::Success();
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // About 8 chunks of W's rows per thread for balance, at least 16 rows each.
  const int64_t chunk = std::max<int64_t>(16, (p.n + threads * 8 - 1) / (threads * 8));
  const Runner runner = spec->runner;
  realm::parallel_chunks(pool, (p.n + chunk - 1) / chunk, [&p, runner, chunk](int64_t c) {
    runner(p, c * chunk, std::min(p.n, (c + 1) * chunk));
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RealmQMatmul, QMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<LayerIndex>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("fmt")
                                  .Attr<int64_t>("round"));

extern "C" int realm_native_vector_path() {
#ifdef REALM_AVX512
  return 1;
#else
  return 0;
#endif
}
