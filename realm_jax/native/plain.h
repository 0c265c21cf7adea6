// realm-jax native matmul: the plain types I8, I16, I32, I64 and F64 (realm_jax/quant/plain.py): one plane w
// of the values (I64 and F64: each value's 8 bytes), group g being elements 32g..32g+31. Conversions round to
// nearest even, as numpy's astype(float32) and the format's tile function.
#pragma once

#include "planes.h"

namespace realm {

template <Fmt F>
struct PlainDequant {
  static constexpr bool kDefined = true;
  static constexpr int64_t kBlock = 1, kGroups = 1;
  static constexpr int64_t kBytes = F == kI8 ? 1 : F == kI16 ? 2 : F == kI32 ? 4 : 8;
  static float value(const uint8_t* p) {
    if constexpr (F == kI8) return static_cast<float>(static_cast<int8_t>(*p));
    if constexpr (F == kI16) return static_cast<float>(static_cast<int16_t>(u16(p)));
    if constexpr (F == kI32) return static_cast<float>(static_cast<int32_t>(u32(p)));
    if constexpr (F == kI64) return static_cast<float>(static_cast<int64_t>(u64(p)));
    if constexpr (F == kF64) {
      double v;
      std::memcpy(&v, p, 8);
      return static_cast<float>(v);
    }
  }
  static void scalar(const Row& r, int64_t g, float* out) {
    for (int i = 0; i < 32; ++i) out[i] = value(r.p[0] + kBytes * (32 * g + i));
  }
#ifdef REALM_AVX512
  static void prepare(const Row&, int64_t, float*, float*) {}
  static __m512 sixteen(const uint8_t* p) {
    if constexpr (F == kI8) {
      return cvt(lo16s(p));
    } else if constexpr (F == kI16) {
      return cvt(_mm512_cvtepi16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
    } else if constexpr (F == kI32) {
      return _mm512_cvtepi32_ps(_mm512_loadu_si512(p));
    } else if constexpr (F == kF64) {
      const __m256 lo = _mm512_cvtpd_ps(_mm512_loadu_pd(p)), hi = _mm512_cvtpd_ps(_mm512_loadu_pd(p + 64));
      const __m512d wide = _mm512_castps_pd(_mm512_castps256_ps512(lo));
      return _mm512_castpd_ps(_mm512_insertf64x4(wide, _mm256_castps_pd(hi), 1));
    } else {
      alignas(64) float v[16];
      for (int i = 0; i < 16; ++i) v[i] = value(p + 8 * i);
      return _mm512_load_ps(v);
    }
  }
  static void group(const Row& r, int64_t b, int64_t, const float*, const float*, __m512& w0, __m512& w1) {
    const uint8_t* p = r.p[0] + kBytes * 32 * b;
    w0 = sixteen(p);
    w1 = sixteen(p + 16 * kBytes);
  }
#endif
};

template <> struct Dequant<kI8> : PlainDequant<kI8> {};
template <> struct Dequant<kI16> : PlainDequant<kI16> {};
template <> struct Dequant<kI32> : PlainDequant<kI32> {};
template <> struct Dequant<kI64> : PlainDequant<kI64> {};
template <> struct Dequant<kF64> : PlainDequant<kF64> {};

}  // namespace realm
