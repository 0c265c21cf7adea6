// realm-jax's native bf16 matmul for prefill on CPU: y[M, N] = x[M, K] . W[N, K]^T, bf16 operands, f32
// accumulation, for the many rows of x a prefill multiplies (qmatmul.cc serves the few rows of a decode).
//
// Why it exists: XLA:CPU's dot reaches 410-850 GFLOP/s on gemma3's prefill shapes on the 2-core AVX-512
// CPU (peak ~1000 with vdpbf16ps), and inside the scan over stacked layers XLA copies each layer's dense
// weight out on every step. This kernel reads layer `layer` of the stacked weight in place and keeps
// 6 x 64 f32 accumulators in registers per pass over K.
//
// W is stored pre-packed (realm_jax.native.pack_panels): panels of 64 of its rows, each [K/2, 64, 2]: the
// pair (W[n, 2k], W[n, 2k+1]) of every row n of the panel for pair k, one 32-bit lane per row, which is
// what vdpbf16ps multiplies against the pair (x[m, 2k], x[m, 2k+1]) broadcast to all lanes. Rows past N
// in the last panel are zero. x arrives in bf16 [M, K] (K even), whose rows are such pairs already.
//
// With AVX512_BF16 the vector path runs (vdpbf16ps flushes subnormal inputs and outputs to zero, as XLA's
// bf16 dot on such CPUs does); otherwise a portable scalar path computes the same sums.

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) && defined(__AVX512BF16__) && !defined(REALM_PORTABLE)
#include <immintrin.h>
#define REALM_GEMM_BF16 1
#endif

#include "pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kPanel = 64;  // rows of W per panel: 4 vectors of 16 f32 lanes
constexpr int kRows = 6;        // rows of x per tile: 6 x 4 = 24 accumulators of the 32 vector registers

struct Gemm {
  const uint32_t* x;  // [M, K/2] pairs
  const uint32_t* w;  // [P, K/2, 64] pairs
  float* y;           // [M, N]
  int64_t m, n, kp;   // kp = K / 2
};

#ifdef REALM_GEMM_BF16
// Rows [m0, m0 + R) of x against panel `panel`: R x 64 outputs, of which the first `cols` are stored.
template <int R>
void tile(const Gemm& g, int64_t m0, int64_t panel, int64_t cols) {
  __m512 acc[R][4];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_ps();
  const uint32_t* w = g.w + panel * g.kp * kPanel;
  const uint32_t* x = g.x + m0 * g.kp;
  for (int64_t k = 0; k < g.kp; ++k) {
    const uint32_t* wk = w + k * kPanel;
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wk), w1 = (__m512bh)_mm512_loadu_si512(wk + 16);
    const __m512bh w2 = (__m512bh)_mm512_loadu_si512(wk + 32), w3 = (__m512bh)_mm512_loadu_si512(wk + 48);
    for (int i = 0; i < R; ++i) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[i * g.kp + k]));
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], a, w0);
      acc[i][1] = _mm512_dpbf16_ps(acc[i][1], a, w1);
      acc[i][2] = _mm512_dpbf16_ps(acc[i][2], a, w2);
      acc[i][3] = _mm512_dpbf16_ps(acc[i][3], a, w3);
    }
  }
  float* y = g.y + m0 * g.n + panel * kPanel;
  for (int j = 0; j < 4; ++j) {
    const int64_t left = std::clamp<int64_t>(cols - 16 * j, 0, 16);
    const __mmask16 mask = static_cast<__mmask16>((1u << left) - 1u);
    for (int i = 0; i < R; ++i) _mm512_mask_storeu_ps(y + i * g.n + 16 * j, mask, acc[i][j]);
  }
}
#else
inline float bf16_lo(uint32_t pair) { float f; uint32_t u = pair << 16; std::memcpy(&f, &u, 4); return f; }
inline float bf16_hi(uint32_t pair) { float f; uint32_t u = pair & 0xffff0000u; std::memcpy(&f, &u, 4); return f; }

template <int R>
void tile(const Gemm& g, int64_t m0, int64_t panel, int64_t cols) {
  const uint32_t* w = g.w + panel * g.kp * kPanel;
  for (int i = 0; i < R; ++i) {
    const uint32_t* x = g.x + (m0 + i) * g.kp;
    float* y = g.y + (m0 + i) * g.n + panel * kPanel;
    for (int64_t c = 0; c < cols; ++c) {
      float acc = 0.0f;
      for (int64_t k = 0; k < g.kp; ++k) {
        const uint32_t a = x[k], b = w[k * kPanel + c];
        acc += bf16_lo(a) * bf16_lo(b) + bf16_hi(a) * bf16_hi(b);
      }
      y[c] = acc;
    }
  }
}
#endif

// Rows [m0, m1) of x against panel `panel`.
void rows(const Gemm& g, int64_t m0, int64_t m1, int64_t panel) {
  const int64_t cols = std::min(kPanel, g.n - panel * kPanel);
  int64_t m = m0;
  for (; m + kRows <= m1; m += kRows) tile<kRows>(g, m, panel, cols);
  switch (m1 - m) {
    case 1: tile<1>(g, m, panel, cols); break;
    case 2: tile<2>(g, m, panel, cols); break;
    case 3: tile<3>(g, m, panel, cols); break;
    case 4: tile<4>(g, m, panel, cols); break;
    case 5: tile<5>(g, m, panel, cols); break;
    default: break;
  }
}

using LayerIndex = ffi::Buffer<ffi::S32, 0>;

// w: [P, K/2, 64, 2] bf16, or [L, P, K/2, 64, 2] for a stack of L layers' weights of which `layer` is
// read where it lies.
ffi::Error GemmBF16(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, LayerIndex layer, ffi::Buffer<ffi::BF16> w,
                    ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), yd = y->dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || yd.size() != 2 || yd[0] != xd[0]) {
    return ffi::Error::InvalidArgument("realm_gemm_bf16: x must be [M, K] and y [M, N]");
  }
  Gemm g{};
  g.m = xd[0];
  g.n = yd[1];
  if (xd[1] % 2) return ffi::Error::InvalidArgument("realm_gemm_bf16: K must be even");
  g.kp = xd[1] / 2;
  const int64_t panels = (g.n + kPanel - 1) / kPanel, nd = static_cast<int64_t>(wd.size());
  if ((nd != 4 && nd != 5) || wd[nd - 1] != 2 || wd[nd - 2] != kPanel || wd[nd - 3] != g.kp ||
      wd[nd - 4] != panels) {
    return ffi::Error::InvalidArgument("realm_gemm_bf16: w must be [(L,) ceil(N/64), K/2, 64, 2]");
  }
  const int64_t stack = nd == 5 ? wd[0] : 1, index = static_cast<int64_t>(*layer.typed_data());
  if (index < 0 || index >= stack) {
    return ffi::Error::InvalidArgument("realm_gemm_bf16: the layer index is outside the stacked weight");
  }
  g.x = static_cast<const uint32_t*>(x.untyped_data());
  g.w = static_cast<const uint32_t*>(w.untyped_data()) + index * panels * g.kp * kPanel;
  g.y = y->typed_data();
  if (g.m == 0 || g.n == 0) return ffi::Error::Success();
  // Each chunk is one panel against a block of x's rows: all of them when there are panels enough for
  // ~8 chunks per thread (each core then reads a panel of W once), else fewer rows per chunk.
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t splits = std::max<int64_t>(1, std::min((8 * threads + panels - 1) / panels, (g.m + kRows - 1) / kRows));
  const int64_t block = ((g.m + splits - 1) / splits + kRows - 1) / kRows * kRows;
  const int64_t blocks = (g.m + block - 1) / block;
  realm::parallel_chunks(pool, panels * blocks, [&g, block, blocks](int64_t c) {
    const int64_t m0 = (c % blocks) * block;
    rows(g, m0, std::min(g.m, m0 + block), c / blocks);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RealmGemmBF16, GemmBF16,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<LayerIndex>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

extern "C" int realm_gemm_vector_path() {
#ifdef REALM_GEMM_BF16
  return 1;
#else
  return 0;
#endif
}
