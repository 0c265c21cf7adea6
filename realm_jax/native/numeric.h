// realm-jax native kernels: float bit patterns and the rounding to bf16 both kernels share.
#pragma once

#include <cstdint>
#include <cstring>

namespace realm {

inline float bits_to_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float bf16_to_f32(uint16_t h) { return bits_to_f32(static_cast<uint32_t>(h) << 16); }

// f32 rounded to the nearest bf16, ties to even, as XLA's convert (NaN stays NaN, returned as is).
inline float round_bf16(float f) {
  uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return f;
  u += 0x7fffu + ((u >> 16) & 1u);
  return bits_to_f32(u & 0xffff0000u);
}

}  // namespace realm
