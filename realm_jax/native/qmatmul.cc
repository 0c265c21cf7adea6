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
// params) and x holds bf16 values, every format takes vdpbf16ps (dot_bf16) on a CPU with AVX512_BF16.
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
#endif
};

#if defined(REALM_AVX512) && defined(__AVX512BF16__)
// Software prefetch of the code planes `ahead` bytes past block b of row r (a plane of at least 16 bytes a
// block; the factors' small planes ride along): at several rows of x the loop reads a plane slowly enough
// that the hardware prefetcher falls behind (Q8_0's 262k x 640 at 8 rows: 18 -> 14 ms; no change at one
// row). A line holds up to four blocks of a legacy format: those prefetch once per two blocks.
inline void prefetch_ahead(const Row& r, const Layout* layout, int64_t b, int64_t ahead) {
  for (int64_t i = 0; i < layout->n_planes; ++i) {
    const int64_t bytes = layout->bytes[i];
    if (bytes < 16) continue;
    for (int64_t off = 0; off < bytes; off += 64)
      _mm_prefetch(reinterpret_cast<const char*>(r.p[i] + bytes * b + ahead + off), _MM_HINT_T0);
  }
}

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
  static const Layout* const layout = layout_of(F);  // a block of the layout is one of `per` groups here
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
      prefetch_ahead(r, layout, b, 1024);
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
        prefetch_ahead(r, layout, b0 + e, 1024);
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

struct Spec {
  const Layout* layout;
  Runner runner;
  bool x_int16;  // has the integer path for x of a 16-bit dtype
};

const Spec* spec_of(int64_t fmt) {
#define REALM_SPEC(f, ...) {layout_of(f), run<f>, HasXInt16<Dequant<f>>::value},
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
  if (x16 != 0 && round == kToBF16 && x_as_bf16(p.x, p.m * p.k, xb)) p.xb = xb.data();
#endif
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
                                  .Attr<int64_t>("round")
                                  .Attr<int64_t>("x16"));

extern "C" int realm_native_vector_path() {
#ifdef REALM_AVX512
  return 1;
#else
  return 0;
#endif
}
