// realm-jax's native attention for decode steps on CPU: a few queries per sequence against layer `layer` of
// the stacked KV cache [L, B, S, K, H], read where it lies.
//
// Why it exists: inside the scan over stacked layers, XLA attends over a layer's cache only after copying
// it out of the stack (and the decode step used to copy it back after writing the new keys and values:
// ~0.8 ms of SmolLM2's 5.4 ms token). Here the step writes its keys and values into the stack in place
// (one dynamic-update-slice per sequence) and this kernel reads the stack.
//
// The math is ops.attention's, up to the order of the sums and where the probabilities are rounded: scores =
// (q . k) * scale in f32 over the keys at positions <= the query's (and, for a local layer with a window,
// > position - window), softmax in f32, the weights rounded to the cache's dtype (as XLA's path casts the
// probabilities to v's dtype), summed against v with f32 accumulation. A long row is cut into key ranges,
// each with its own softmax, e_j = exp(s_j - m) (m the range's largest score) rounded to the cache's dtype,
// and the ranges' sums merged: sum_r w_r sum_j e_j v_j / sum_r w_r sum_j e_j, w_r = exp(m_r - max m) (XLA's
// path rounds exp(s_j - max) / sum instead: the same relative rounding). Against a float64 softmax of the
// same bf16 q, k and v this is as close as XLA's path or closer (BENCHMARKS.md). Each (sequence, query
// head) is independent: a row's result does not depend on the batch. q arrives in f32, already rounded to
// the compute dtype by the caller.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#if defined(__AVX512F__) && !defined(REALM_PORTABLE)
#include <immintrin.h>
#define REALM_ATTN_AVX512 1
#if defined(__AVX512BF16__)
#define REALM_ATTN_BF16DOT 1  // vdpbf16ps: a bf16 cache's products exact, two a lane, no conversion to f32
#endif
#endif

#include "numeric.h"
#include "pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Attn {
  const float* q;        // [B, T, N, H]
  const int32_t* pos;    // [B, T]
  const uint8_t* k;      // layer `layer`'s [Bc, S, K, H] (bf16 or f32)
  const uint8_t* v;      // [Bc, S, K, Hv]
  float* out;            // [B, T, N, Hv]
  int64_t b, t, n, kv, h, hv, s, kv_len, window;
  bool local, bf16;
  float scale;
};

inline float load(const uint8_t* base, int64_t i, bool bf16) {
  if (bf16) {
    uint16_t u;
    std::memcpy(&u, base + 2 * i, 2);
    return realm::bf16_to_f32(u);
  }
  float f;
  std::memcpy(&f, base + 4 * i, 4);
  return f;
}

#ifdef REALM_ATTN_AVX512
// 16 cache values from element i on, as f32.
inline __m512 load16(const uint8_t* base, int64_t i, bool bf16) {
  if (bf16) {
    const __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(base + 2 * i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(u), 16));
  }
  return _mm512_loadu_ps(reinterpret_cast<const float*>(base) + i);
}
#endif

#ifndef REALM_ATTN_AVX512
// q . k over h elements (k from element ko of the cache), f32 accumulation (the AVX-512 build: `Query`).
inline float dot(const float* q, const uint8_t* k, int64_t ko, int64_t h, bool bf16) {
  float acc = 0.0f;
  for (int64_t e = 0; e < h; ++e) acc += q[e] * load(k, ko + e, bf16);
  return acc;
}
#endif

#ifdef REALM_ATTN_AVX512
// Lane i of the result: the sum of a[i]'s 16 lanes (16 keys' dots reduced together: ~3 instructions a key,
// where a reduction of each key's vector alone takes ~9).
inline __m512 sum16(const __m512* a) {
  __m512 b[8], c[4];
  // 128-bit lane L of b[i]: a[2i]'s elements 0+2, a[2i+1]'s 0+2, a[2i]'s 1+3, a[2i+1]'s 1+3 (of lane L)
  for (int i = 0; i < 8; ++i)
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // lane L of c[i]: the sums of lane L of a[4i], ..., a[4i + 3]
    const __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
    c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  constexpr int kEven = _MM_SHUFFLE(2, 0, 2, 0), kOdd = _MM_SHUFFLE(3, 1, 3, 1);
  const __m512 d0 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], kEven), _mm512_shuffle_f32x4(c[0], c[1], kOdd));
  const __m512 d1 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], kEven), _mm512_shuffle_f32x4(c[2], c[3], kOdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(d0, d1, kEven), _mm512_shuffle_f32x4(d0, d1, kOdd));
}

// 16 cache values from element i on, as f32; the lanes past `mask` zero (not read).
inline __m512 load16_masked(const uint8_t* base, int64_t i, bool bf16, __mmask16 mask) {
  if (bf16) {
    const __m256i u = _mm256_maskz_loadu_epi16(mask, base + 2 * i);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(u), 16));
  }
  return _mm512_maskz_loadu_ps(mask, reinterpret_cast<const float*>(base) + i);
}

// The query a head's scores take: f32 (FMAs against the cache converted to f32) or, where q holds bf16
// values (the compute dtype's rounding) and the cache is bf16, bf16 pairs for vdpbf16ps (the same products,
// exactly, summed in another order).
struct Query {
  const float* q;
  int64_t h;
  bool pairs = false;
#ifdef REALM_ATTN_BF16DOT
  __m512bh qb[8];  // h <= 256 in pairs
#endif
  Query(const float* q_, int64_t h_, bool bf16_cache) : q(q_), h(h_) {
#ifdef REALM_ATTN_BF16DOT
    if (!bf16_cache || h > 256) return;
    for (int64_t e = 0; e < h; ++e) {
      if (realm::f32_bits(q[e]) & 0xFFFF) return;  // not a bf16 value: the f32 path keeps it exact
    }
    for (int64_t c = 0; 32 * c < h; ++c) {
      const int64_t rest = std::min<int64_t>(32, h - 32 * c);
      const __mmask16 lo = (1u << std::min<int64_t>(16, rest)) - 1, hi = (1u << std::max<int64_t>(0, rest - 16)) - 1;
      qb[c] = _mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(hi, q + 32 * c + 16), _mm512_maskz_loadu_ps(lo, q + 32 * c));
    }
    pairs = true;
#else
    (void)bf16_cache;
#endif
  }

  // The lanes of q . k (k from element ko of the cache): their sum is the dot.
  __m512 partial(const uint8_t* k, int64_t ko, bool bf16) const {
    __m512 acc = _mm512_setzero_ps();
#ifdef REALM_ATTN_BF16DOT
    if (pairs) {
      const uint16_t* row = reinterpret_cast<const uint16_t*>(k) + ko;
      int64_t c = 0;
      for (; 32 * (c + 1) <= h; ++c)
        acc = _mm512_dpbf16_ps(acc, qb[c], reinterpret_cast<__m512bh>(_mm512_loadu_si512(row + 32 * c)));
      if (32 * c < h) {
        const __mmask32 m = (1u << (h - 32 * c)) - 1;
        acc = _mm512_dpbf16_ps(acc, qb[c], reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi16(m, row + 32 * c)));
      }
      return acc;
    }
#endif
    int64_t e = 0;
    for (; e + 16 <= h; e += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + e), load16(k, ko + e, bf16), acc);
    if (e < h) {
      const __mmask16 m = (1u << (h - e)) - 1;
      acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + e), load16_masked(k, ko + e, bf16, m), acc);
    }
    return acc;
  }
};
#endif

// Keys a loop prefetches ahead: a key's few FMAs leave the hardware prefetcher behind the strided rows of one
// kv head (a long context's cache is read from memory: SmolLM2's 30 layers at 1.7k positions are 39 MB a token).
constexpr int64_t kKeysAhead = 16;

// Prefetch the `bytes` of a cache row at p.
inline void prefetch_row(const uint8_t* p, int64_t bytes) {
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 0, 3);
}

// out[0, hv) += p * v (from element vo of the cache).
inline void axpy(float p, const uint8_t* v, int64_t vo, int64_t hv, bool bf16, float* out) {
  int64_t e = 0;
#ifdef REALM_ATTN_AVX512
  const __m512 pv = _mm512_set1_ps(p);
  for (; e + 16 <= hv; e += 16)
    _mm512_storeu_ps(out + e, _mm512_fmadd_ps(pv, load16(v, vo + e, bf16), _mm512_loadu_ps(out + e)));
#endif
  for (; e < hv; ++e) out[e] += p * load(v, vo + e, bf16);
}

#ifdef REALM_ATTN_AVX512
// out[0, 16 V) = sum over keys j in [lo, hi] of p[j - lo] * v_j, in j order (the same FMAs, in the same order,
// as axpy's; the sums stay in registers instead of a load and a store of out a key).
template <int V>
void weighted_sum(const float* p, const uint8_t* v, int64_t vo, int64_t stride, int64_t lo, int64_t hi, bool bf16,
                  float* out) {
  __m512 acc[V];
  for (int i = 0; i < V; ++i) acc[i] = _mm512_setzero_ps();
  const int64_t size = bf16 ? 2 : 4;
  for (int64_t j = lo; j <= hi; ++j) {
    if (j + kKeysAhead <= hi) prefetch_row(v + (vo + (j + kKeysAhead) * stride) * size, 16 * V * size);
    const __m512 pv = _mm512_set1_ps(p[j - lo]);
    const int64_t o = vo + j * stride;
    for (int i = 0; i < V; ++i) acc[i] = _mm512_fmadd_ps(pv, load16(v, o + 16 * i, bf16), acc[i]);
  }
  for (int i = 0; i < V; ++i) _mm512_storeu_ps(out + 16 * i, acc[i]);
}

template <int... V>
bool weighted_sum_of(int64_t hv, std::integer_sequence<int, V...>, const float* p, const uint8_t* v, int64_t vo,
                     int64_t stride, int64_t lo, int64_t hi, bool bf16, float* out) {
  return ((hv == 16 * (V + 1) ? (weighted_sum<V + 1>(p, v, vo, stride, lo, hi, bf16, out), true) : false) || ...);
}
#endif

#ifdef REALM_ATTN_BF16DOT
// out[0, 32 C) = sum over keys j in [lo, hi] of p[j - lo] * v_j for a bf16 cache, two keys a vdpbf16ps: the
// pair's probabilities (bf16 values: rounded so before) against their value rows interleaved, so that each
// f32 lane adds both keys' exact products. Lane l of 128-bit lane L of `low` holds element 8 L + l of a
// 32-element chunk, of `high` element 8 L + 4 + l: put in order once, at the end.
template <int C>
void weighted_sum_pairs(const float* p, const uint8_t* v, int64_t vo, int64_t stride, int64_t lo, int64_t hi,
                        float* out) {
  __m512 low[C], high[C];
  for (int c = 0; c < C; ++c) low[c] = high[c] = _mm512_setzero_ps();
  const uint16_t* base = reinterpret_cast<const uint16_t*>(v) + vo;
  for (int64_t j = lo; j <= hi; j += 2) {
    const bool two = j < hi;
    for (int64_t ahead = j + kKeysAhead; ahead <= std::min(hi, j + kKeysAhead + 1); ++ahead)
      prefetch_row(reinterpret_cast<const uint8_t*>(base + ahead * stride), 64 * C);
    const uint32_t pair =
        (realm::f32_bits(p[j - lo]) >> 16) | (two ? realm::f32_bits(p[j + 1 - lo]) & 0xFFFF0000u : 0u);
    const __m512bh pv = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(pair)));
    const uint16_t* first = base + j * stride;
    const uint16_t* second = base + (j + 1) * stride;
    for (int c = 0; c < C; ++c) {
      const __m512i x = _mm512_loadu_si512(first + 32 * c);
      const __m512i y = two ? _mm512_loadu_si512(second + 32 * c) : _mm512_setzero_si512();
      low[c] = _mm512_dpbf16_ps(low[c], reinterpret_cast<__m512bh>(_mm512_unpacklo_epi16(x, y)), pv);
      high[c] = _mm512_dpbf16_ps(high[c], reinterpret_cast<__m512bh>(_mm512_unpackhi_epi16(x, y)), pv);
    }
  }
  const __m512i lower = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i upper = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int c = 0; c < C; ++c) {
    _mm512_storeu_ps(out + 32 * c, _mm512_permutex2var_ps(low[c], lower, high[c]));
    _mm512_storeu_ps(out + 32 * c + 16, _mm512_permutex2var_ps(low[c], upper, high[c]));
  }
}

template <int... C>
bool weighted_sum_pairs_of(int64_t hv, std::integer_sequence<int, C...>, const float* p, const uint8_t* v, int64_t vo,
                           int64_t stride, int64_t lo, int64_t hi, float* out) {
  return ((hv == 32 * (C + 1) ? (weighted_sum_pairs<C + 1>(p, v, vo, stride, lo, hi, out), true) : false) || ...);
}
#endif

// out[0, hv) = sum over keys j in [lo, hi] of p[j - lo] * v_j, v_j from element vo + j * stride of the cache.
void weighted_sum_any(const float* p, const uint8_t* v, int64_t vo, int64_t stride, int64_t lo, int64_t hi,
                      int64_t hv, bool bf16, float* out) {
#ifdef REALM_ATTN_BF16DOT
  // A bf16 cache's head sizes up to 256, a multiple of 32 (p is rounded to bf16 for a bf16 cache).
  if (bf16 && weighted_sum_pairs_of(hv, std::make_integer_sequence<int, 8>{}, p, v, vo, stride, lo, hi, out)) return;
#endif
  std::fill(out, out + hv, 0.0f);
#ifdef REALM_ATTN_AVX512
  // Head sizes up to 256 (gemma3's), a multiple of 16: 16 accumulators at most of the 32 registers.
  if (weighted_sum_of(hv, std::make_integer_sequence<int, 16>{}, p, v, vo, stride, lo, hi, bf16, out)) return;
#endif
  for (int64_t j = lo; j <= hi; ++j) axpy(p[j - lo], v, vo + j * stride, hv, bf16, out);
}

// The softmax of one query q against kv head kh of sequence bi over the keys [lo, hi] alone, unnormalized: m
// the largest score, e_j = exp(s_j - m) (rounded to bf16 for a bf16 cache, as XLA's path rounds the
// probabilities), l the sum of the e_j, o = sum e_j v_j. With `uniform` every score is 0 (no key is visible
// to the query: XLA's path weighs the keys of [0, kv_len) equally). `scores` holds hi - lo + 1 floats.
void span(const Attn& a, int64_t bi, int64_t kh, const float* q, int64_t lo, int64_t hi, bool uniform, float* scores,
          float* o, float& m, float& l) {
  const int64_t size = a.bf16 ? 2 : 4;
  if (uniform) {
    std::fill(scores, scores + (hi - lo + 1), 0.0f);
    m = 0.0f;
  } else {
#ifdef REALM_ATTN_AVX512
    // 16 keys at a time: their dots' lanes reduced together (`sum16`).
    const Query query(q, a.h, a.bf16);
    const __m512 scale = _mm512_set1_ps(a.scale);
    __m512 maxes = _mm512_set1_ps(-INFINITY);
    for (int64_t j0 = lo; j0 <= hi; j0 += 16) {
      const int64_t count = std::min<int64_t>(16, hi - j0 + 1);
      __m512 parts[16];
      for (int64_t i = 0; i < 16; ++i) {
        const int64_t j = j0 + i;
        if (i >= count) {
          parts[i] = _mm512_setzero_ps();
          continue;
        }
        if (j + kKeysAhead <= hi)
          prefetch_row(a.k + ((bi * a.s + j + kKeysAhead) * a.kv + kh) * a.h * size, a.h * size);
        parts[i] = query.partial(a.k, ((bi * a.s + j) * a.kv + kh) * a.h, a.bf16);
      }
      const __mmask16 valid = static_cast<__mmask16>((1u << count) - 1);
      const __m512 sv = _mm512_mul_ps(sum16(parts), scale);
      _mm512_mask_storeu_ps(scores + (j0 - lo), valid, sv);
      maxes = _mm512_mask_max_ps(maxes, valid, maxes, sv);
    }
    m = _mm512_reduce_max_ps(maxes);
#else
    m = -INFINITY;
    for (int64_t j = lo; j <= hi; ++j) {
      if (j + kKeysAhead <= hi) prefetch_row(a.k + ((bi * a.s + j + kKeysAhead) * a.kv + kh) * a.h * size, a.h * size);
      scores[j - lo] = dot(q, a.k, ((bi * a.s + j) * a.kv + kh) * a.h, a.h, a.bf16) * a.scale;
      m = std::max(m, scores[j - lo]);
    }
#endif
  }
  float sum = 0.0f;
  int64_t j = 0;
#ifdef REALM_ATTN_AVX512
  __m512 sums = _mm512_setzero_ps();
  const __m512 top = _mm512_set1_ps(m);
  for (; j <= hi - lo; j += 16) {
    const __mmask16 valid = static_cast<__mmask16>((1u << std::min<int64_t>(16, hi - lo + 1 - j)) - 1);
    __m512 e = realm::exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(valid, scores + j), top));
    if (a.bf16) e = realm::round_bf16(e);
    _mm512_mask_storeu_ps(scores + j, valid, e);
    sums = _mm512_mask_add_ps(sums, valid, sums, e);
  }
  sum = _mm512_reduce_add_ps(sums);
#endif
  for (; j <= hi - lo; ++j) {
    const float e = std::exp(scores[j] - m);
    scores[j] = a.bf16 ? realm::round_bf16(e) : e;
    sum += scores[j];
  }
  l = sum;
  weighted_sum_any(scores, a.v, (bi * a.s * a.kv + kh) * a.hv, a.kv * a.hv, lo, hi, a.hv, a.bf16, o);
}

// The keys a query attends to, [lo, hi]; hi < lo where none is visible.
inline std::pair<int64_t, int64_t> visible(const Attn& a, int64_t p) {
  int64_t lo = 0;
  const int64_t hi = std::min<int64_t>(p, a.kv_len - 1);
  if (a.local && a.window > 0) lo = std::max<int64_t>(0, p - a.window + 1);
  return {lo, hi};
}

// How a call's work is cut into chunks: each kv head's keys into `splits` ranges, and its query heads into
// `subs` sets. Long rows are split by keys, so that a range's rows (128 KiB of keys and values, 256 keys at
// least) are read once from memory for all the kv head's query heads and again from the core's cache; short
// rows by query heads, which need no merge. Either way every thread has chunks (four a thread if there are
// that many heads and ranges): gemma3's one kv head and SmolLM2's three on two threads.
struct Cut {
  int64_t splits, subs;
};

Cut cut(const Attn& a, int64_t threads) {
  int64_t keys = 1;  // the longest row of the call
  for (int64_t i = 0; i < a.b * a.t; ++i) {
    const auto [lo, hi] = visible(a, a.pos[i]);
    keys = std::max(keys, hi < lo ? a.kv_len : hi - lo + 1);
  }
  const int64_t row_bytes = (a.h + a.hv) * (a.bf16 ? 2 : 4), want = 4 * std::max<int64_t>(1, threads);
  const int64_t by_cache = (keys * row_bytes + (128 << 10) - 1) / (128 << 10);
  const int64_t by_threads = (want + a.b * a.kv - 1) / (a.b * a.kv);
  const int64_t splits = std::clamp<int64_t>(std::max(by_cache, by_threads), 1, std::max<int64_t>(1, keys / 256));
  const int64_t chunks = a.b * a.kv * splits;
  return {splits, std::clamp<int64_t>((want + chunks - 1) / chunks, 1, a.n / a.kv)};
}

using Scalar = ffi::Buffer<ffi::S32, 0>;

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::S32> pos,
                           Scalar layer, Scalar local, ffi::AnyBuffer k,
                           ffi::AnyBuffer v, ffi::ResultBuffer<ffi::F32> out, float scale, int64_t window,
                           int64_t kv_len) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), od = out->dimensions(), pd = pos.dimensions();
  if (qd.size() != 4 || kd.size() != 5 || vd.size() != 5 || od.size() != 4 || pd.size() != 2) {
    return ffi::Error::InvalidArgument("realm_decode_attention: q [B, T, N, H], caches [L, B, S, K, H], pos [B, T]");
  }
  Attn a{};
  a.b = qd[0], a.t = qd[1], a.n = qd[2], a.h = qd[3];
  a.kv = kd[3], a.s = kd[2], a.hv = vd[4];
  const bool bf16 = k.element_type() == ffi::DataType::BF16;
  if (k.element_type() != v.element_type() || (!bf16 && k.element_type() != ffi::DataType::F32)) {
    return ffi::Error::InvalidArgument("realm_decode_attention: the caches must both be bf16 or both f32");
  }
  if (kd[4] != a.h || vd[0] != kd[0] || vd[1] != kd[1] || vd[2] != a.s || vd[3] != a.kv || kd[1] < a.b ||
      a.kv == 0 || a.n % a.kv || pd[0] != a.b || pd[1] != a.t || od[0] != a.b || od[1] != a.t || od[2] != a.n ||
      od[3] != a.hv || kv_len < 1 || kv_len > a.s) {
    return ffi::Error::InvalidArgument("realm_decode_attention: the shapes of q, the caches, pos and out disagree");
  }
  const int64_t index = *layer.typed_data();
  if (index < 0 || index >= kd[0]) {
    return ffi::Error::InvalidArgument("realm_decode_attention: the layer index is outside the stacked cache");
  }
  a.bf16 = bf16;
  const int64_t size = bf16 ? 2 : 4;
  a.k = static_cast<const uint8_t*>(k.untyped_data()) + index * kd[1] * a.s * a.kv * a.h * size;
  a.v = static_cast<const uint8_t*>(v.untyped_data()) + index * vd[1] * a.s * a.kv * a.hv * size;
  a.q = q.typed_data();
  a.pos = pos.typed_data();
  a.out = out->typed_data();
  a.kv_len = kv_len;
  a.window = window;
  a.local = *local.typed_data() != 0;
  a.scale = scale;
  for (int64_t i = 0; i < a.b * a.t; ++i) {
    if (a.pos[i] < 0 || a.pos[i] >= a.s) {
      return ffi::Error::InvalidArgument("realm_decode_attention: a query position is outside the cache");
    }
  }
  if (a.b * a.t * a.n == 0) return ffi::Error::Success();  // no query: nothing to write
  // A chunk: key range r of kv head kh of sequence bi, for a set of the kv head's query heads (`cut`), every
  // query. Each range's softmax is its own (`span`); the ranges' are merged below (a flash-decoding split).
  const auto [splits, subs] = cut(a, pool.num_threads());
  const int64_t group = a.n / a.kv, slots = splits * a.b * a.t * a.n;
  thread_local std::vector<float> partials;  // [splits, B, T, N] x (hv sums, m, l): the calling thread's
  if (static_cast<int64_t>(partials.size()) < slots * (a.hv + 2)) partials.resize(slots * (a.hv + 2));
  float* const sums = partials.data();
  float* const ml = sums + slots * a.hv;
  const int64_t longest = a.kv_len / splits + 1;  // a range's keys, at most
  realm::parallel_chunks(pool, a.b * a.kv * subs * splits, [&a, splits, subs, group, sums, ml, longest](int64_t c) {
    const int64_t r = c % splits, sub = (c / splits) % subs, kh = (c / (splits * subs)) % a.kv;
    const int64_t bi = c / (splits * subs * a.kv);
    thread_local std::vector<float> scores;  // grows to the longest range once per thread
    if (static_cast<int64_t>(scores.size()) < longest) scores.resize(longest);
    for (int64_t ti = 0; ti < a.t; ++ti) {
      auto [lo, hi] = visible(a, a.pos[bi * a.t + ti]);
      const bool uniform = hi < lo;
      if (uniform) lo = 0, hi = a.kv_len - 1;
      const int64_t keys = hi - lo + 1, first = lo + keys * r / splits, last = lo + keys * (r + 1) / splits - 1;
      for (int64_t g = group * sub / subs; g < group * (sub + 1) / subs; ++g) {
        const int64_t qh = kh * group + g, row = (bi * a.t + ti) * a.n + qh, slot = r * a.b * a.t * a.n + row;
        float* o = sums + slot * a.hv;
        if (first > last) {
          std::fill(o, o + a.hv, 0.0f);
          ml[2 * slot] = -INFINITY, ml[2 * slot + 1] = 0.0f;
          continue;
        }
        span(a, bi, kh, a.q + row * a.h, first, last, uniform, scores.data(), o, ml[2 * slot], ml[2 * slot + 1]);
      }
    }
  });
  // out = sum_r w_r o_r / sum_r w_r l_r, w_r = exp(m_r - max m): each range's sums on the common scale.
  const int64_t rows = a.b * a.t * a.n;
  for (int64_t row = 0; row < rows; ++row) {
    const auto empty = [](const float* x) { return x[0] == -INFINITY && x[1] == 0.0f; };  // a range of no keys
    float top = -INFINITY;
    for (int64_t r = 0; r < splits; ++r) {
      const float* x = ml + 2 * (r * rows + row);
      if (!empty(x)) top = (x[0] != x[0] || top != top) ? NAN : std::max(top, x[0]);  // a NaN score: a NaN row
    }
    float* out = a.out + row * a.hv;
    std::fill(out, out + a.hv, 0.0f);
    float total = 0.0f;
    for (int64_t r = 0; r < splits; ++r) {
      const float* x = ml + 2 * (r * rows + row);
      if (empty(x)) continue;
      const float w = std::exp(x[0] - top);
      total += w * x[1];
      const float* o = sums + (r * rows + row) * a.hv;
      for (int64_t e = 0; e < a.hv; ++e) out[e] += w * o[e];
    }
    const float inv = 1.0f / total;
    for (int64_t e = 0; e < a.hv; ++e) out[e] *= inv;
  }
  return ffi::Error::Success();
}

}  // namespace

using Scalar = ffi::Buffer<ffi::S32, 0>;

XLA_FFI_DEFINE_HANDLER_SYMBOL(RealmDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<Scalar>()
                                  .Arg<Scalar>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("window")
                                  .Attr<int64_t>("kv_len"));
