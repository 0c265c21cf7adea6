// realm-jax's native CPU matmul: y[M, N] = x[M, K] . W[N, K]^T with f32 accumulation, for the few rows of
// x a decode step multiplies (any M works; XLA's dot on a dense copy is faster past ~8 rows: native.MAX_ROWS).
//
// Why it exists: XLA:CPU multiplies one or two rows by a 16-bit or 8-bit weight far below memory
// bandwidth (it converts or packs the whole weight on every call), and it cannot read 4-bit planes at
// all without materializing them. This kernel streams W once per call straight from the planes the
// params hold (realm_jax.quant's struct-of-arrays layout: one buffer per plane, [N, per-row count]),
// dequantizes 32 elements at a time in registers with the same formulas as the format's tile function,
// and splits W's rows over XLA's intra-op thread pool. x arrives in f32, already rounded to the compute
// dtype by the caller. Where that dtype is 16-bit, Q2_K and Q3_K take an integer path on x quantized to
// int16 (kquants_low.h says why and how close). Where the weights are rounded to bf16 (the bf16 policy's
// params) and x holds bf16 values, every format takes vdpbf16ps (dot_bf16) on a CPU with AVX512_BF16; where
// the weights are exact and x holds bf16 values, the formats of small unsigned codes multiply the codes
// themselves with vdpbf16ps and scale each group's sum (dot_codes: the bf16 policy's decode of them).
//
// Built at first use by realm_jax/native/__init__.py (-O3 -march=native) and registered as the XLA FFI
// target "realm_qmatmul" on CPU. With AVX-512 (F, BW) the vector path runs; otherwise a portable scalar
// path computes the same sums (the tests build and check both).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "dequant.h"
#include "pool.h"
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

#ifdef REALM_AVX512

template <int R>
inline __m512 round_vec(__m512 w) {
  if constexpr (R == kToBF16) {
#ifdef __AVX512BF16__
    return _mm512_cvtpbh_ps(_mm512_cvtneps_pbh(w));  // round to nearest even (NaN stays NaN) and back
#else
    return realm::round_bf16(w);
#endif
  } else if constexpr (R == kToF16) {
    return _mm512_cvtph_ps(_mm512_cvtps_ph(w, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {
    return w;
  }
}

#endif

struct Problem {
  const float* x;
  float* y;
  int64_t m, n, k;
  int64_t round;
  Planes w;
#ifdef REALM_AVX512
  const XInt16* xi = nullptr;  // x as int16 codes, for the formats with an integer path (kquants_low.h)
  const uint16_t* xb = nullptr;  // x as bf16 where every element is one, for weights rounded to bf16
  const float* xs16 = nullptr;  // and for dot_codes: x's sums per 16 and per 32 elements
  const float* xs32 = nullptr;
#endif
};

#if defined(REALM_AVX512) && defined(__AVX512BF16__)
// Weights rounded to bf16 against an x of bf16 values: the rounding is the conversion vdpbf16ps takes
// (vcvtne2ps2bf16, round to nearest even, 32 weights an instruction) and each product is exact in f32, so
// the sums are those of the f32 path (rounded weights, f32 FMA) but for their order, and cost one 512-bit
// instruction per 32 products where the f32 path takes two, plus one to round 32 weights. vdpbf16ps
// flushes subnormal inputs and outputs to zero, as in gemm.cc (a quantized format's weights are never
// subnormal: the smallest nonzero is an f16 factor, >= 2^-24, times an integer code; a dense weight or an
// element of x below 2^-126 is). Even and odd groups go to two accumulators (one chain per group would wait
// on vdpbf16ps's latency at one row); a row's sums do not depend on how many rows share the pass.
template <Fmt F, int MB>
inline void dot_bf16(const Problem& p, const Row& r, int64_t m0, int64_t n) {
  constexpr int64_t per = groups_per_block<F>();
  const int64_t blocks = p.k / 32 / per;
  __m512 acc0[MB], acc1[MB];
  for (int i = 0; i < MB; ++i) acc0[i] = acc1[i] = _mm512_setzero_ps();
  alignas(64) float s[16], o[16];
  // Group g's dequantized weights (w0: elements 0..15, w1: 16..31) against the MB rows of x, into acc.
  auto accumulate = [&](__m512* acc, __m512 w0, __m512 w1, int64_t g) {
    const __m512bh w = _mm512_cvtne2ps_pbh(w1, w0);  // elements 0..15 from w0, 16..31 from w1
    const uint16_t* xg = p.xb + m0 * p.k + 32 * g;
    for (int i = 0; i < MB; ++i) {
      const __m512bh xv = reinterpret_cast<__m512bh>(_mm512_loadu_si512(xg + i * p.k));
      acc[i] = _mm512_dpbf16_ps(acc[i], xv, w);
    }
  };
  // Group j of block b (factors at sb, ob) into acc (acc0 or acc1).
  auto step = [&](int64_t b, int64_t j, __m512* acc, const float* sb, const float* ob) {
    __m512 w0, w1;
    group_avx512<F>(r, b, j, sb, ob, w0, w1);
    accumulate(acc, w0, w1, b * per + j);
  };
  if constexpr (per % 2 == 0) {
    for (int64_t b = 0; b < blocks; ++b) {
      prefetch_ahead<F>(r, b);
      prepare<F>(r, b, s, o);
      for (int64_t j = 0; j < per; j += 2) {
        step(b, j, acc0, s, o);
        step(b, j + 1, acc1, s, o);
      }
    }
  } else if constexpr (kPrepare16<F>) {  // blocks of 32 alternate, their factors converted 16 at a time
    auto block = [&](int64_t b, __m512* acc, __m512 sv, __m512 ov, int64_t e) {
      const __m512i lane = _mm512_set1_epi32(static_cast<int>(e));
      __m512 w0, w1;
      legacy_group<F>(r, b, _mm512_permutexvar_ps(lane, sv), _mm512_permutexvar_ps(lane, ov), w0, w1);
      accumulate(acc, w0, w1, b);
    };
    for (int64_t b0 = 0; b0 < blocks; b0 += 16) {
      const int64_t nb = std::min<int64_t>(16, blocks - b0);
      __m512 sv, ov;
      prepare16<F>(r, b0, nb, sv, ov);
      int64_t e = 0;
      for (; e + 1 < nb; e += 2) {
        prefetch_ahead<F>(r, b0 + e);
        block(b0 + e, acc0, sv, ov, e);
        block(b0 + e + 1, acc1, sv, ov, e + 1);
      }
      if (e < nb) block(b0 + e, acc0, sv, ov, e);
    }
  } else {
    static_assert(per == 1, "a block of an odd number of groups other than one");
    int64_t b = 0;
    for (; b + 1 < blocks; b += 2) {  // blocks of 32 alternate
      prepare<F>(r, b, s, o);
      step(b, 0, acc0, s, o);
      prepare<F>(r, b + 1, s, o);
      step(b + 1, 0, acc1, s, o);
    }
    if (b < blocks) {
      prepare<F>(r, b, s, o);
      step(b, 0, acc0, s, o);
    }
  }
  for (int i = 0; i < MB; ++i) p.y[(m0 + i) * p.n + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[i], acc1[i]));
}

// Exact weights against an x of bf16 values (the bf16 policy's decode of the formats of small unsigned codes:
// w = s * q + o per group of 32, Q6_K's s per 16). A code q of b bits becomes the bf16 value
// c = 1 + q / 2^b (q shifted into the top of bf16's 7 mantissa bits, ORed into 1.0's bits: exact), vdpbf16ps
// sums c * x exactly per product, and each group's sum is scaled once:
//   sum w x = (2^b s) * sum c x + (o - 2^b s) * sum x,
// the second term for 16 groups (Q4_K, Q5_K: 8) an instruction from x's group sums (xs32, Q6_K's xs16), made
// once per call. Against rounding each dequantized weight to bf16 (dot_bf16) that is 2-3x fewer instructions
// per group at one row (no conversions to f32 and back, no per-weight FMA) and about as many at eight, and
// the weights are exact: the f32 path's sums but for their order and the f32 rounding of terms c * x of up
// to twice |x| (c in [1, 2): the offset's cancellation costs ~2 bits of f32's 24). x of Inf, NaN or beyond
// 2^64 takes the f32 path.
template <Fmt F>
constexpr bool kCodes = F == kQ4_0 || F == kQ4_1 || F == kQ5_0 || F == kQ5_1 || F == kQ4_K || F == kQ5_K ||
                        F == kQ6_K;

// Bits of a code, and the shift that puts a code's bit 0 at the top of the mantissa's 7 - bits ... 6.
template <Fmt F>
constexpr int kCodeBits = F == kQ6_K ? 6 : (F == kQ5_0 || F == kQ5_1 || F == kQ5_K) ? 5 : 4;
template <Fmt F>
constexpr int kCodeShift = 7 - kCodeBits<F>;

inline __m512i e16(int v) { return _mm512_set1_epi16(static_cast<short>(v)); }
// (v & mask) | 1.0's bf16 bits, in one instruction.
inline __m512i bf16_code(__m512i v, int mask) { return _mm512_ternarylogic_epi32(v, e16(mask), e16(0x3f80), 0xea); }
// 32 bytes as 16-bit lanes.
inline __m512i bytes32(const uint8_t* p) {
  return _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
// v shifted left by s (right by -s), 16-bit lanes.
template <int S>
inline __m512i shift16(__m512i v) {
  if constexpr (S >= 0) return _mm512_slli_epi16(v, S);
  else return _mm512_srli_epi16(v, -S);
}

// One group's codes c (as bf16) against MB rows of x at xg, scaled by s (per lane: vdpbf16ps's lane i sums
// elements 2i and 2i + 1) into acc.
template <int MB>
__attribute__((always_inline)) inline void scaled_dot(__m512* acc, __m512i c, __m512 s, const uint16_t* xg, int64_t k) {
  for (int i = 0; i < MB; ++i) {
    const __m512bh xv = reinterpret_cast<__m512bh>(_mm512_loadu_si512(xg + i * k));
    acc[i] = _mm512_fmadd_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), reinterpret_cast<__m512bh>(c), xv), s, acc[i]);
  }
}

// Blocks b and b + 1 of a legacy format (32 elements each: byte i of qs holds element i low, i + 16 high) as
// bf16 codes, from one 32-byte load: lo holds elements 0..15 of block b, then of block b + 1; hi elements
// 16..31 of each. x is permuted to match once per call (pair_blocks), so no shuffle is needed here.
template <Fmt F>
inline void legacy_codes2(const Row& r, int64_t b, __m512i& lo, __m512i& hi) {
  constexpr bool has_m = F == kQ4_1 || F == kQ5_1, five = F == kQ5_0 || F == kQ5_1;
  constexpr int sh = kCodeShift<F>;
  const __m512i v = bytes32(r.p[(has_m ? 2 : 1) + (five ? 1 : 0)] + 16 * b);
  lo = bf16_code(_mm512_slli_epi16(v, sh), 0xf << sh);
  hi = bf16_code(_mm512_srli_epi16(v, 4 - sh), 0xf << sh);
  if constexpr (five) {  // bit i of a block's qh: its element i's bit 4
    const uint8_t* qh = r.p[has_m ? 2 : 1] + 4 * b;
    const uint32_t h0 = u32(qh), h1 = u32(qh + 4);
    lo = _mm512_mask_add_epi16(lo, (h0 & 0xffffu) | (h1 << 16), lo, e16(16 << sh));
    hi = _mm512_mask_add_epi16(hi, (h0 >> 16) | (h1 & 0xffff0000u), hi, e16(16 << sh));
  }
}

// Block b alone (the last of an odd count; x in its own order).
template <Fmt F>
inline __m512i legacy_codes(const Row& r, int64_t b) {
  constexpr bool has_m = F == kQ4_1 || F == kQ5_1, five = F == kQ5_0 || F == kQ5_1;
  constexpr int sh = kCodeShift<F>;
  const uint8_t* qs = r.p[(has_m ? 2 : 1) + (five ? 1 : 0)] + 16 * b;
  const __m512i v = _mm512_cvtepu8_epi16(_mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs))));
  // elements 0..15: the low nibbles, shifted up by sh; 16..31: the high ones, down by 4 - sh
  __m512i c = bf16_code(_mm512_mask_srli_epi16(_mm512_slli_epi16(v, sh), 0xffff0000u, v, 4 - sh), 0xf << sh);
  if constexpr (five) c = _mm512_mask_add_epi16(c, u32(r.p[has_m ? 2 : 1] + 4 * b), c, e16(16 << sh));
  return c;
}

// x (rows of k bf16 values) in the order legacy_codes2 reads: in each pair of blocks of 32 (64 values), values
// 16..31 and 32..47 swap places; an odd count's last block keeps its order.
inline void pair_blocks(uint16_t* x, int64_t m, int64_t k) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t t = 0; t + 64 <= k; t += 64) {
      uint16_t* q = x + i * k + t;
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 16));
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 16), b);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 32), a);
    }
  }
}

// Q6_K group 4h + Q of a super-block: its ql bytes (low nibble for Q < 2, high for Q >= 2) and its half's qh
// bytes (bits 2Q, 2Q + 1) as bf16 codes.
template <int Q>
inline __m512i q6_codes(__m512i ql, __m512i qh) {
  constexpr int sh = kCodeShift<kQ6_K>;
  const __m512i top = bf16_code(shift16<4 + sh - 2 * Q>(qh), 0x30 << sh);
  return _mm512_ternarylogic_epi32(shift16<Q < 2 ? sh : sh - 4>(ql), e16(0xf << sh), top, 0xea);
}

template <Fmt F, int MB>
__attribute__((always_inline)) inline void dot_codes(const Problem& p, const Row& r, int64_t m0, int64_t n) {
  static_assert(kCodes<F>);
  __m512 acc0[MB], acc1[MB], off[MB];  // off: the offset terms
  for (int i = 0; i < MB; ++i) acc0[i] = acc1[i] = off[i] = _mm512_setzero_ps();
  const uint16_t* xb = p.xb + m0 * p.k;
  const int64_t g32 = p.k / 32;
  const float* xs32 = p.xs32 + m0 * g32;
  const __m512 fac = set1(static_cast<float>(1 << kCodeBits<F>));
  constexpr int sh = kCodeShift<F>;
  // 0 in lanes 0..7, 1 in 8..15: a pair of factors for the two halves of a dot's sums
  const __m512i halves = _mm512_srli_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), 3);
  if constexpr (kPrepare16<F>) {
    for (int64_t b0 = 0; b0 < g32; b0 += 16) {
      const int64_t nb = std::min<int64_t>(16, g32 - b0);
      __m512 sv, ov;
      prepare16<F>(r, b0, nb, sv, ov);
      sv = _mm512_mul_ps(sv, fac);  // exact: a power of two
      const __m512 ob = _mm512_sub_ps(ov, sv);  // zero past nb
      const __mmask16 lanes = static_cast<__mmask16>((1u << nb) - 1);
      for (int i = 0; i < MB; ++i) off[i] = _mm512_fmadd_ps(ob, _mm512_maskz_loadu_ps(lanes, xs32 + i * g32 + b0), off[i]);
      int64_t e = 0;
      for (; e + 1 < nb; e += 2) {  // blocks b0 + e, b0 + e + 1: lanes 0..7 of the sums block e's, 8..15 the next's
        prefetch_ahead<F>(r, b0 + e);
        __m512i lo, hi;
        legacy_codes2<F>(r, b0 + e, lo, hi);
        const __m512 s2 = _mm512_permutexvar_ps(_mm512_add_epi32(halves, _mm512_set1_epi32(static_cast<int>(e))), sv);
        scaled_dot<MB>(acc0, lo, s2, xb + 32 * (b0 + e), p.k);
        scaled_dot<MB>(acc1, hi, s2, xb + 32 * (b0 + e) + 32, p.k);
      }
      if (e < nb) {
        const __m512 s1 = _mm512_permutexvar_ps(_mm512_set1_epi32(static_cast<int>(e)), sv);
        scaled_dot<MB>(acc0, legacy_codes<F>(r, b0 + e), s1, xb + 32 * (b0 + e), p.k);
      }
    }
  } else {
    alignas(64) float s[16], o[16];
    for (int64_t b = 0; b < g32 / 8; ++b) {
      prefetch_ahead<F>(r, b);
      prepare<F>(r, b, s, o);
      const uint16_t* xg = xb + 256 * b;
      if constexpr (F == kQ4_K || F == kQ5_K) {
        const __m512 s8 = _mm512_mul_ps(_mm512_zextps256_ps512(_mm256_load_ps(s)), fac);
        const __m512 ob = _mm512_sub_ps(_mm512_zextps256_ps512(_mm256_load_ps(o)), s8);
        for (int i = 0; i < MB; ++i) off[i] = _mm512_fmadd_ps(ob, _mm512_maskz_loadu_ps(0xff, xs32 + i * g32 + 8 * b), off[i]);
        _mm512_store_ps(s, s8);
        const uint8_t* qs = r.p[F == kQ5_K ? 5 : 4] + 128 * b;
        __m256i qh{};
        if constexpr (F == kQ5_K) qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r.p[4] + 32 * b));
        for (int t = 0; t < 4; ++t) {  // groups 2t (low nibbles) and 2t + 1 (high) share 32 bytes
          const __m512i v = bytes32(qs + 32 * t);
          __m512i c0 = bf16_code(shift16<sh>(v), 0xf << sh), c1 = bf16_code(shift16<sh - 4>(v), 0xf << sh);
          if constexpr (F == kQ5_K) {  // bit j of qh byte i: element i of group j's bit 4
            const __m512i bit4 = e16(16 << sh);
            c0 = _mm512_mask_add_epi16(c0, _mm256_test_epi8_mask(qh, _mm256_set1_epi8(static_cast<char>(1 << (2 * t)))), c0, bit4);
            c1 = _mm512_mask_add_epi16(c1, _mm256_test_epi8_mask(qh, _mm256_set1_epi8(static_cast<char>(2 << (2 * t)))), c1, bit4);
          }
          scaled_dot<MB>(acc0, c0, set1(s[2 * t]), xg + 64 * t, p.k);
          scaled_dot<MB>(acc1, c1, set1(s[2 * t + 1]), xg + 64 * t + 32, p.k);
        }
      } else {  // Q6_K: s, o per 16 elements; group j = 4h + q: ql half h, nibble q / 2; qh bits 2q, 2q + 1
        const __m512 sv = _mm512_mul_ps(_mm512_load_ps(s), fac);
        const __m512 ob = _mm512_sub_ps(_mm512_load_ps(o), sv);
        const float* xs16 = p.xs16 + m0 * 2 * g32;
        for (int i = 0; i < MB; ++i) off[i] = _mm512_fmadd_ps(ob, _mm512_loadu_ps(xs16 + i * 2 * g32 + 16 * b), off[i]);
        // lanes 0..7 of a group's sums hold its elements 0..15 (scale `half`), lanes 8..15 the rest (half + 1)
        auto group = [&](int h, int q, __m512i c, __m512* acc) {
          const __m512 sc = _mm512_permutexvar_ps(_mm512_add_epi32(halves, _mm512_set1_epi32(8 * h + 2 * q)), sv);
          scaled_dot<MB>(acc, c, sc, xg + 128 * h + 32 * q, p.k);
        };
        for (int h = 0; h < 2; ++h) {
          const __m512i qh = bytes32(r.p[1] + 64 * b + 32 * h);
          const __m512i lo = bytes32(r.p[0] + 128 * b + 64 * h), hi = bytes32(r.p[0] + 128 * b + 64 * h + 32);
          group(h, 0, q6_codes<0>(lo, qh), acc0);
          group(h, 1, q6_codes<1>(hi, qh), acc1);
          group(h, 2, q6_codes<2>(lo, qh), acc0);
          group(h, 3, q6_codes<3>(hi, qh), acc1);
        }
      }
    }
  }
  for (int i = 0; i < MB; ++i) {
    p.y[(m0 + i) * p.n + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[i], acc1[i])) + _mm512_reduce_add_ps(off[i]);
  }
}

// x's sums per 16 elements (xs16) and per 32 (xs32), for dot_codes' offset terms (XLA runs the call with
// denormals flushed, so a subnormal x counts as zero here as in vdpbf16ps); false where x holds an Inf, a NaN
// or a value beyond 2^64 (whose c * x sums could overflow f32 where the exact products do not).
inline bool x_group_sums(const float* x, int64_t count, std::vector<float>& xs16, std::vector<float>& xs32) {
  xs16.resize(count / 16);
  xs32.resize(count / 32);
  __mmask16 wild = 0;
  const __m512 limit = set1(18446744073709551616.0f);  // 2^64
  for (int64_t i = 0; i < count; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    wild |= _mm512_cmp_ps_mask(_mm512_abs_ps(v), limit, _CMP_NLT_UQ);  // |v| >= 2^64, or NaN
    xs16[i / 16] = _mm512_reduce_add_ps(v);
  }
  for (int64_t g = 0; g < count / 32; ++g) xs32[g] = xs16[2 * g] + xs16[2 * g + 1];
  return wild == 0;
}

// x as bf16 into out, where every element is a bf16 value (x of a bf16 compute dtype): false otherwise.
// count is a multiple of 16 (K of a multiple of 32, bind_planes checks).
inline bool x_as_bf16(const float* x, int64_t count, std::vector<uint16_t>& out) {
  out.resize(count);
  __mmask16 inexact = 0;
  for (int64_t i = 0; i < count; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    const __m256bh h = _mm512_cvtneps_pbh(v);
    inexact |= _mm512_cmp_ps_mask(_mm512_cvtpbh_ps(h), v, _CMP_NEQ_UQ);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.data() + i), reinterpret_cast<__m256i>(h));
  }
  return inexact == 0;
}
#endif

// Whether format F has an integer path for x of a 16-bit dtype (Dequant<F>::kXInt16, dot_x16).
template <class D, class = void>
struct HasXInt16 : std::false_type {};
template <class D>
struct HasXInt16<D, std::void_t<decltype(D::kXInt16)>> : std::bool_constant<D::kXInt16> {};

// W's rows [n0, n1) against MB rows of x starting at row m0, the weights rounded as R says.
template <Fmt F, int MB, int R>
void rows(const Problem& p, int64_t m0, int64_t n0, int64_t n1) {
  const int64_t groups = p.k / 32;
  for (int64_t n = n0; n < n1; ++n) {
    const Row r = p.w.row(n);
#if defined(REALM_AVX512) && defined(__AVX512BF16__)
    if constexpr (R == kToBF16) {
      if (p.xb != nullptr) {
        dot_bf16<F, MB>(p, r, m0, n);
        continue;
      }
    } else if constexpr (R == kNone && kCodes<F>) {
      if (p.xb != nullptr) {
        dot_codes<F, MB>(p, r, m0, n);
        continue;
      }
    }
#endif
#ifdef REALM_AVX512
    if constexpr (R == kNone && HasXInt16<Dequant<F>>::value) {
      if (p.xi != nullptr) {
        float y[MB];
        Dequant<F>::template dot_x16<MB>(r, *p.xi, m0, y);
        for (int i = 0; i < MB; ++i) p.y[(m0 + i) * p.n + n] = y[i];
        continue;
      }
    }
    __m512 acc0[MB], acc1[MB];
    for (int i = 0; i < MB; ++i) acc0[i] = acc1[i] = _mm512_setzero_ps();
    constexpr int64_t per = groups_per_block<F>();
    alignas(64) float s[16], o[16];
    for (int64_t b = 0; b < groups / per; ++b) {
      prefetch_ahead<F>(r, b);
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
      if (g % groups_per_block<F>() == 0) prefetch_ahead<F>(r, g / groups_per_block<F>());
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

// Rows of x per pass over a row of W: each weight is dequantized once for all of them (2 x 8 accumulators
// and the weights fit AVX-512's 32 registers). A row's sums do not depend on how many rows share the pass.
constexpr int kRowBlock = 8;

template <Fmt F, int R>
void run_rounded(const Problem& p, int64_t n0, int64_t n1) {
  for (int64_t m0 = 0; m0 < p.m; m0 += kRowBlock) {
    switch (std::min<int64_t>(kRowBlock, p.m - m0)) {
      case 1: rows<F, 1, R>(p, m0, n0, n1); break;
      case 2: rows<F, 2, R>(p, m0, n0, n1); break;
      case 3: rows<F, 3, R>(p, m0, n0, n1); break;
      case 4: rows<F, 4, R>(p, m0, n0, n1); break;
      case 5: rows<F, 5, R>(p, m0, n0, n1); break;
      case 6: rows<F, 6, R>(p, m0, n0, n1); break;
      case 7: rows<F, 7, R>(p, m0, n0, n1); break;
      default: rows<F, 8, R>(p, m0, n0, n1); break;
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

template <Fmt F>
constexpr bool codes_path() {
#if defined(REALM_AVX512) && defined(__AVX512BF16__)
  return kCodes<F>;
#else
  return false;
#endif
}

struct Spec {
  const Layout* layout;
  Runner runner;
  bool x_int16;  // has the integer path for x of a 16-bit dtype
  bool codes;    // has dot_codes (exact weights against bf16 x)
};

const Spec* spec_of(int64_t fmt) {
#define REALM_SPEC(f, ...) {layout_of(f), run<f>, HasXInt16<Dequant<f>>::value, codes_path<f>()},
  static const Spec kSpecs[] = {REALM_FORMATS(REALM_SPEC)};
#undef REALM_SPEC
  for (const Spec& s : kSpecs)
    if (s.layout->fmt == fmt) return &s;
  return nullptr;
}

using LayerIndex = ffi::Buffer<ffi::S32, 0>;

// planes: each [N, per-row bytes], or [L, N, ...] for a stack of L layers' weights of which `layer` is read
// where it lies (a scan over stacked layers would otherwise copy each layer's planes out every step).
// x16: x holds values of a 16-bit dtype (bf16, f16), whose tolerance admits x as int16 codes (XInt16).
ffi::Error QMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, LayerIndex layer,
                   ffi::RemainingArgs planes, ffi::ResultBuffer<ffi::F32> y, int64_t fmt, int64_t round, int64_t x16) {
  const Spec* spec = spec_of(fmt);
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
  const char* bad = bind_planes(fmt, planes, p.n, p.k, static_cast<int64_t>(*layer.typed_data()), p.w);
  if (bad != nullptr) return ffi::Error::InvalidArgument(std::string("realm_qmatmul: ") + bad);
  if (p.m == 0) return ffi::Error::Success();
#ifdef REALM_AVX512
  // Reused across calls: x of a decode step is a few rows, quantized here once for every row of W.
  thread_local XInt16 xi;
  if (x16 != 0 && round == kNone && spec->x_int16 && xi.quantize(p.x, p.m, p.k)) p.xi = &xi;
#endif
#if defined(REALM_AVX512) && defined(__AVX512BF16__)
  thread_local std::vector<uint16_t> xb;
  thread_local std::vector<float> xs16, xs32;
  if (x16 != 0 && round == kToBF16 && x_as_bf16(p.x, p.m * p.k, xb)) p.xb = xb.data();
  if (x16 != 0 && round == kNone && spec->codes && x_as_bf16(p.x, p.m * p.k, xb) &&
      x_group_sums(p.x, p.m * p.k, xs16, xs32)) {
    if (spec->layout->block == 32) pair_blocks(xb.data(), p.m, p.k);  // the legacy formats' order
    p.xb = xb.data();
    p.xs16 = xs16.data();
    p.xs32 = xs32.data();
  }
#endif
  // W's rows in guided ranges of 16 rows or more.
  const Runner runner = spec->runner;
  realm::parallel_ranges(pool, p.n, 16, [&p, runner](int64_t n0, int64_t n1) { runner(p, n0, n1); });
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
                                  .Attr<int64_t>("round")
                                  .Attr<int64_t>("x16"));

// Whether realm_qmatmul multiplies exact weights of format id fmt by bf16 x on their codes (dot_codes) in this
// build.
extern "C" int realm_qmatmul_exact_codes(int64_t fmt) {
  const Spec* spec = spec_of(fmt);
  return spec != nullptr && spec->codes ? 1 : 0;
}

extern "C" int realm_native_vector_path() {
#ifdef REALM_AVX512
  return 1;
#else
  return 0;
#endif
}
