// realm-jax's native attention for decode steps on CPU: a few queries per sequence against layer `layer` of
// the stacked KV cache [L, B, S, K, H], read where it lies.
//
// Why it exists: inside the scan over stacked layers, XLA attends over a layer's cache only after copying
// it out of the stack (and the decode step used to copy it back after writing the new keys and values:
// ~0.8 ms of SmolLM2's 5.4 ms token). Here the step writes its keys and values into the stack in place
// (one dynamic-update-slice per sequence) and this kernel reads the stack.
//
// The math is ops.attention's: scores = (q . k) * scale in f32 over the keys at positions <= the query's
// (and, for a local layer with a window, > position - window), softmax in f32 (exp(s - max) / sum), the
// probabilities rounded to the cache's dtype (as XLA's path casts them to v's dtype), then summed against
// v with f32 accumulation. Each (sequence, query head) is independent: a row's result does not depend on the
// batch. q arrives in f32, already rounded to the compute dtype by the caller.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#if defined(__AVX512F__) && !defined(REALM_PORTABLE)
#include <immintrin.h>
#define REALM_ATTN_AVX512 1
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

// q . k over h elements (k from element ko of the cache), f32 accumulation.
inline float dot(const float* q, const uint8_t* k, int64_t ko, int64_t h, bool bf16) {
  int64_t e = 0;
  float acc = 0.0f;
#ifdef REALM_ATTN_AVX512
  __m512 a = _mm512_setzero_ps();
  for (; e + 16 <= h; e += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(q + e), load16(k, ko + e, bf16), a);
  acc = _mm512_reduce_add_ps(a);
#endif
  for (; e < h; ++e) acc += q[e] * load(k, ko + e, bf16);
  return acc;
}

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

// out[0, hv) = sum over keys j in [lo, hi] of p[j - lo] * v_j, v_j from element vo + j * stride of the cache.
void weighted_sum_any(const float* p, const uint8_t* v, int64_t vo, int64_t stride, int64_t lo, int64_t hi,
                      int64_t hv, bool bf16, float* out) {
  std::fill(out, out + hv, 0.0f);
#ifdef REALM_ATTN_AVX512
  // Head sizes up to 256 (gemma3's), a multiple of 16: 16 accumulators at most of the 32 registers.
  if (weighted_sum_of(hv, std::make_integer_sequence<int, 16>{}, p, v, vo, stride, lo, hi, bf16, out)) return;
#endif
  for (int64_t j = lo; j <= hi; ++j) axpy(p[j - lo], v, vo + j * stride, hv, bf16, out);
}

// Sequence bi, query head qh: its T queries.
void head(const Attn& a, int64_t bi, int64_t qh, std::vector<float>& scores) {
  const int64_t kh = qh / (a.n / a.kv);
  const int64_t vo = (bi * a.s * a.kv + kh) * a.hv, vstride = a.kv * a.hv;
  for (int64_t ti = 0; ti < a.t; ++ti) {
    const int64_t p = a.pos[bi * a.t + ti];
    int64_t lo = 0, hi = std::min<int64_t>(p, a.kv_len - 1);  // keys [lo, hi]
    if (a.local && a.window > 0) lo = std::max<int64_t>(0, p - a.window + 1);
    const float* q = a.q + ((bi * a.t + ti) * a.n + qh) * a.h;
    float* out = a.out + ((bi * a.t + ti) * a.n + qh) * a.hv;
    if (hi < lo) {
      // No key is visible: XLA's path gives every key of [0, kv_len) the same (minimal) score.
      const float u = a.bf16 ? realm::round_bf16(1.0f / a.kv_len) : 1.0f / a.kv_len;
      std::fill(scores.begin(), scores.begin() + a.kv_len, u);
      weighted_sum_any(scores.data(), a.v, vo, vstride, 0, a.kv_len - 1, a.hv, a.bf16, out);
      continue;
    }
    float m = -INFINITY;
    const int64_t size = a.bf16 ? 2 : 4;
    for (int64_t j = lo; j <= hi; ++j) {
      if (j + kKeysAhead <= hi) prefetch_row(a.k + ((bi * a.s + j + kKeysAhead) * a.kv + kh) * a.h * size, a.h * size);
      const float sj = dot(q, a.k, ((bi * a.s + j) * a.kv + kh) * a.h, a.h, a.bf16) * a.scale;
      scores[j - lo] = sj;
      m = std::max(m, sj);
    }
    float sum = 0.0f;
    for (int64_t j = lo; j <= hi; ++j) {
      scores[j - lo] = std::exp(scores[j - lo] - m);
      sum += scores[j - lo];
    }
    for (int64_t j = lo; j <= hi; ++j) {
      const float pj = scores[j - lo] / sum;
      scores[j - lo] = a.bf16 ? realm::round_bf16(pj) : pj;
    }
    weighted_sum_any(scores.data(), a.v, vo, vstride, lo, hi, a.hv, a.bf16, out);
  }
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
  // A chunk a query head: gemma3's one kv head (four query heads) and SmolLM2's three (nine) give both threads
  // work, which chunks of a kv head did not (one chunk, or three for two threads).
  realm::parallel_chunks(pool, a.b * a.n, [&a](int64_t c) {
    thread_local std::vector<float> scores;  // grows to the longest row once per thread
    if (static_cast<int64_t>(scores.size()) < a.kv_len) scores.resize(a.kv_len);
    head(a, c / a.n, c % a.n, scores);
  });
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
