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
// The gated FFN's gate|up projection can end in its activation (act(gate) * up, rounded to bf16: the
// down projection's input), which spares a pass over the [M, N] f32 product.
//
// With AVX512_BF16 the vector path runs (vdpbf16ps flushes subnormal inputs and outputs to zero, as XLA's
// bf16 dot on such CPUs does), on AMX tiles where the CPU has AMX-BF16 (`amx_rows`: the panels' pairs are
// TDPBF16PS's B layout as they lie); otherwise a portable scalar path computes the same sums. Two more products
// share the panels' machinery (launch, rows): gemm_i8.h's opt-in int8 one and gemm_f32.h's f32 one (the
// f32 policy's prefill, realm_gemm_q_f32).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__) && !defined(REALM_PORTABLE)
#include <immintrin.h>
#define REALM_GEMM_BF16 1
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <sys/syscall.h>
#include <unistd.h>
#define REALM_GEMM_AMX 1
#endif
#endif

#include "dequant.h"
#include "gemm_f32.h"
#include "gemm_i8.h"
#include "numeric.h"
#include "pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace realm;  // NOLINT: the format ids, Row, Planes and the per-format dequantization

constexpr int64_t kPanel = 64;  // rows of W per panel: 4 vectors of 16 f32 lanes
constexpr int kRows = 6;        // rows of x per tile: 6 x 4 = 24 accumulators of the 32 vector registers
constexpr int kRowsI8 = 3;      // ...on the int8 path: 3 x 4 f32 sums and 3 x 4 integer ones

// The gated FFN's activations (realm_jax.native.GLU_ACTS): act(gate) * up in the epilogue of gate|up.
enum Act : int64_t { kNoAct = 0, kSilu = 1, kGeluTanh = 2 };

struct Gemm {
  const uint32_t* x;  // [M, K/2] pairs
  const uint32_t* w;  // [P, K/2, 64] pairs
  void* y;            // f32 [M, N], or with an activation bf16 [M, N/2]
  int64_t m, n, kp;   // kp = K / 2
  int64_t act;        // kNoAct, or the GLU's: gate is W's rows [0, N/2), up [N/2, N)
  // The int8 path (gemm_i8.h), else null: x's codes [M, K], and dx, xs [M, K/32]; W's panels are int8 ones.
  const int8_t* xq = nullptr;
  const float *dx = nullptr, *xs = nullptr;
  const int32_t* xc = nullptr;  // with an integer offset c (kI8Offset), -c * sum(codes) [M, K/16]; else null
  bool halves = false;          // kI8Halves: scales per 16
  const float* xf = nullptr;    // the f32 path (gemm_f32.h), else null: x f32 [M, K]; W's panels are f32 ones
};

// act(g) as jax.nn.silu / jax.nn.gelu(approximate=True) define it: g * sigmoid(g), and
// 0.5 g (1 + tanh(u)) = g * sigmoid(2u) with u = sqrt(2/pi) (g + 0.044715 g^3).
constexpr float kGeluC = 0.7978845608028654f, kGeluA = 0.044715f;

#ifdef REALM_GEMM_BF16
// Rows [m0, m0 + R) of x against the panel at w, into acc.
template <int R>
// The sums live in a local array, copied out once: written through `acc` (a reference, and __m512 may alias
// anything) the compiler stores every sum after every step wherever this is not inlined into tile (2x time).
inline void accumulate(const Gemm& g, int64_t m0, const uint32_t* w, __m512 (&out)[R][4]) {
  __m512 acc[R][4];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_ps();
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
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < 4; ++j) out[i][j] = acc[i][j];
}

// accumulate, or on the int8 path accumulate_i8 (w: an int8 panel).
template <int R>
inline void accumulate_any(const Gemm& g, int64_t m0, const uint32_t* w, __m512 (&acc)[R][4]) {
#ifdef REALM_GEMM_I8
  if (g.xq != nullptr) {
    const int64_t k = 2 * g.kp, groups = k / 32;
    const uint8_t* panel = reinterpret_cast<const uint8_t*>(w);
    const int64_t at = m0 * groups;
    if (g.halves) {
      accumulate_i8<R, true, true>(g.xq + m0 * k, g.dx + at, g.xs + at, g.xc + 2 * at, k, panel, acc);
    } else if (g.xc != nullptr) {
      accumulate_i8<R, true>(g.xq + m0 * k, g.dx + at, g.xs + at, g.xc + 2 * at, k, panel, acc);
    } else {
      accumulate_i8<R, false>(g.xq + m0 * k, g.dx + at, g.xs + at, nullptr, k, panel, acc);
    }
    return;
  }
#endif
  accumulate<R>(g, m0, w, acc);
}

inline __mmask16 lanes(int64_t cols, int j) {
  const int64_t left = std::clamp<int64_t>(cols - 16 * j, 0, 16);
  return static_cast<__mmask16>((1u << left) - 1u);
}

inline __m512 act512(int64_t act, __m512 g) {
  __m512 z = g;
  if (act == kGeluTanh) {
    const __m512 g3 = _mm512_mul_ps(_mm512_mul_ps(g, g), g);
    z = _mm512_mul_ps(_mm512_set1_ps(2.0f * kGeluC), _mm512_fmadd_ps(_mm512_set1_ps(kGeluA), g3, g));
  }
  const __m512 e = realm::exp512(_mm512_sub_ps(_mm512_setzero_ps(), z));
  return _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
}

// Row m's 16 outputs of vector j of panel `panel` (those past `cols` not stored): f32 sums, or the GLU's
// act(gate) * up rounded to bf16 (gate already through act512).
inline void store_sums(const Gemm& g, int64_t m, int64_t panel, int j, int64_t cols, __m512 v) {
  _mm512_mask_storeu_ps(static_cast<float*>(g.y) + m * g.n + panel * kPanel + 16 * j, lanes(cols, j), v);
}

inline void store_glu(const Gemm& g, int64_t m, int64_t panel, int j, int64_t cols, __m512 gate, __m512 up) {
  uint16_t* y = static_cast<uint16_t*>(g.y) + m * (g.n / 2) + panel * kPanel + 16 * j;
  _mm256_mask_storeu_epi16(y, lanes(cols, j), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(gate, up)));
}

// R x 64 outputs of panel `panel` (the first `cols` stored): f32 y from the panel at w, or with an
// activation the GLU's bf16 act(gate) * up, gate from the panel at w and up from the one at up.
template <int R>
void tile(const Gemm& g, int64_t m0, int64_t panel, const uint32_t* w, const uint32_t* up, int64_t cols) {
  __m512 acc[R][4];
  accumulate_any<R>(g, m0, w, acc);
  if (g.act == kNoAct) {
    for (int j = 0; j < 4; ++j)
      for (int i = 0; i < R; ++i) store_sums(g, m0 + i, panel, j, cols, acc[i][j]);
    return;
  }
  __m512 gate[R][4];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < 4; ++j) gate[i][j] = act512(g.act, acc[i][j]);
  accumulate_any<R>(g, m0, up, acc);
  for (int j = 0; j < 4; ++j)
    for (int i = 0; i < R; ++i) store_glu(g, m0 + i, panel, j, cols, gate[i][j], acc[i][j]);
}

#ifdef REALM_GEMM_AMX
// AMX (built where the compiler targets a CPU with AMX-BF16, used where the kernel grants the process the
// tile state): a 16 x 64 block of outputs as four 16 x 16 f32 tiles, each step of 32 elements of K one
// tile of x (16 rows of 16 pairs) against four of the panel (16 pairs of 16 of its rows): the panel's
// [K/2, 64] pairs are the layout TDPBF16PS takes for B, read with a stride of a panel row, and x's rows are
// its A. The sums are f32, as vdpbf16ps's, though not bit for bit theirs (both are tested against float64;
// subnormals flushed). REALM_JAX_NATIVE_AMX=0 keeps the AVX-512 tiles (`accumulate`): tests cover both.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

bool amx_usable() {
  // ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA: Linux grants a process the tile state on request only.
  static const bool granted = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  const char* env = std::getenv("REALM_JAX_NATIVE_AMX");
  return granted && (env == nullptr || std::strcmp(env, "0") != 0);
}

// Tiles 0-3: the sums, r rows x 16 f32; 4: x, r rows x 16 pairs; 5-7: the panel, 16 pairs x 16 rows of W.
void amx_config(int64_t r) {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = static_cast<uint8_t>(t < 5 ? r : 16);
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

// Rows [m0, m0 + r) of x (r <= 16, the configured rows) against the panel at w: out[r][64] f32.
void amx_block(const Gemm& g, int64_t m0, const uint32_t* w, float (*out)[kPanel]) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  const uint32_t* x = g.x + m0 * g.kp;
  const int64_t xs = 4 * g.kp, ws = 4 * kPanel;
  for (int64_t k = 0; k < g.kp; k += 16) {
    const uint32_t* wk = w + k * kPanel;
    _tile_loadd(4, x + k, xs);
    _tile_loadd(5, wk, ws);
    _tile_loadd(6, wk + 16, ws);
    _tile_loadd(7, wk + 32, ws);
    _tile_dpbf16ps(0, 4, 5);
    _tile_dpbf16ps(1, 4, 6);
    _tile_loadd(5, wk + 48, ws);
    _tile_dpbf16ps(2, 4, 7);
    _tile_dpbf16ps(3, 4, 5);
  }
  _tile_stored(0, &out[0][0], ws);
  _tile_stored(1, &out[0][16], ws);
  _tile_stored(2, &out[0][32], ws);
  _tile_stored(3, &out[0][48], ws);
}

// rows() on AMX: 16 rows of x at a time, then tile's epilogue on the sums.
void amx_rows(const Gemm& g, int64_t m0, int64_t m1, int64_t panel, const uint32_t* w, const uint32_t* up,
              int64_t cols) {
  alignas(64) float sums[16][kPanel], ups[16][kPanel];
  int64_t configured = 0;
  for (int64_t m = m0; m < m1; m += 16) {
    const int64_t r = std::min<int64_t>(16, m1 - m);
    if (r != configured) amx_config(configured = r);
    amx_block(g, m, w, sums);
    if (g.act != kNoAct) amx_block(g, m, up, ups);
    for (int64_t i = 0; i < r; ++i)
      for (int j = 0; j < 4; ++j) {
        const __m512 v = _mm512_load_ps(&sums[i][16 * j]);
        if (g.act == kNoAct) {
          store_sums(g, m + i, panel, j, cols, v);
        } else {
          store_glu(g, m + i, panel, j, cols, act512(g.act, v), _mm512_load_ps(&ups[i][16 * j]));
        }
      }
  }
  _tile_release();
}
#endif
#else
inline float bf16_lo(uint32_t pair) { return realm::bits_to_f32(pair << 16); }
inline float bf16_hi(uint32_t pair) { return realm::bits_to_f32(pair & 0xffff0000u); }

// f32 -> bf16 bits, round to nearest even (a NaN stays a quiet NaN), as XLA's convert.
inline uint16_t to_bf16(float f) {
  const uint32_t u = realm::f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  return static_cast<uint16_t>(realm::f32_bits(realm::round_bf16(f)) >> 16);
}

inline float act_scalar(int64_t act, float g) {
  const float z = act == kSilu ? g : 2.0f * kGeluC * (g + kGeluA * g * g * g);
  return g / (1.0f + std::exp(-z));
}

inline float dot(const Gemm& g, int64_t m, const uint32_t* w, int64_t c) {
  const uint32_t* x = g.x + m * g.kp;
  float acc = 0.0f;
  for (int64_t k = 0; k < g.kp; ++k) {
    const uint32_t a = x[k], b = w[k * kPanel + c];
    acc += bf16_lo(a) * bf16_lo(b) + bf16_hi(a) * bf16_hi(b);
  }
  return acc;
}

template <int R>
void tile(const Gemm& g, int64_t m0, int64_t panel, const uint32_t* w, const uint32_t* up, int64_t cols) {
  const int64_t half = g.n / 2;
  for (int i = 0; i < R; ++i)
    for (int64_t c = 0; c < cols; ++c) {
      const float v = dot(g, m0 + i, w, c);
      if (g.act == kNoAct) {
        static_cast<float*>(g.y)[(m0 + i) * g.n + panel * kPanel + c] = v;
      } else {
        static_cast<uint16_t*>(g.y)[(m0 + i) * half + panel * kPanel + c] =
            to_bf16(act_scalar(g.act, v) * dot(g, m0 + i, up, c));
      }
    }
}
#endif

// Rows [m0, m1) of x against panel `panel` of the output, its weights at w (and with an activation, the
// up projection's at up).
void rows(const Gemm& g, int64_t m0, int64_t m1, int64_t panel, const uint32_t* w, const uint32_t* up) {
  const int64_t cols = std::min(kPanel, (g.act == kNoAct ? g.n : g.n / 2) - panel * kPanel);
  if (g.xf != nullptr) {
    rows_f32(g.xf, 2 * g.kp, m0, m1, reinterpret_cast<const float*>(w), static_cast<float*>(g.y) + panel * kPanel,
             g.n, cols);
    return;
  }
#ifdef REALM_GEMM_AMX
  if (g.xq == nullptr && g.kp % 16 == 0 && amx_usable()) {  // K in whole steps of 32: else the AVX-512 tiles
    amx_rows(g, m0, m1, panel, w, up, cols);
    return;
  }
#endif
  int64_t m = m0;
  if (g.xq != nullptr) {  // the int8 path: 3 x 4 f32 sums and 3 x 4 integer ones per tile
    for (; m + kRowsI8 <= m1; m += kRowsI8) tile<kRowsI8>(g, m, panel, w, up, cols);
  } else {
    for (; m + kRows <= m1; m += kRows) tile<kRows>(g, m, panel, w, up, cols);
  }
  switch (m1 - m) {
    case 1: tile<1>(g, m, panel, w, up, cols); break;
    case 2: tile<2>(g, m, panel, w, up, cols); break;
    case 3: tile<3>(g, m, panel, w, up, cols); break;
    case 4: tile<4>(g, m, panel, w, up, cols); break;
    case 5: tile<5>(g, m, panel, w, up, cols); break;
    default: break;
  }
}

// The weight of a panel from the quantized planes: W's rows [n0, n0 + 64) (zero past N) dequantized with
// the format's formulas (dequant.h), rounded to bf16 (to nearest even, as the dense bf16 copy of the
// weight that pack_panels lays out) and written as one panel, out[K/2][64] pairs.
using PanelFill = void (*)(const Planes&, int64_t n0, int64_t n, int64_t k, uint32_t* out);

#ifdef REALM_GEMM_BF16
// 16 rows of a panel (`live` of them real, the rest zero; all 16 with kFull, which leaves the compiler no
// row checks to branch on): each row's group of 32 weights is 16 pairs, one vector; a 16 x 16 transpose
// makes them 16 pairs x 16 rows, the panel's order, stored from out on.
template <Fmt F, bool kFull>
void fill16(const Row (&rows)[16], int64_t live, int64_t blocks, uint32_t* out) {
  constexpr int64_t per = groups_per_block<F>();
  alignas(64) float s[16][16], o[16][16];
  for (int64_t b = 0; b < blocks; ++b) {
    for (int64_t i = 0; i < (kFull ? 16 : live); ++i) prepare<F>(rows[i], b, s[i], o[i]);
    for (int64_t j = 0; j < per; ++j) {
      __m512i v[16];
      for (int64_t i = 0; i < 16; ++i) {
        if (kFull || i < live) {
          __m512 w0, w1;
          group_avx512<F>(rows[i], b, j, s[i], o[i], w0, w1);
          v[i] = (__m512i)_mm512_cvtne2ps_pbh(w1, w0);
        } else {
          v[i] = _mm512_setzero_si512();
        }
      }
      transpose16(v);
      uint32_t* dst = out + (b * per + j) * 16 * kPanel;
      for (int c = 0; c < 16; ++c) _mm512_storeu_si512(dst + c * kPanel, v[c]);
    }
  }
}

template <Fmt F>
void fill_panel(const Planes& w, int64_t n0, int64_t n, int64_t k, uint32_t* out) {
  const int64_t blocks = k / 32 / groups_per_block<F>();
  for (int64_t r0 = 0; r0 < kPanel; r0 += 16) {
    const int64_t live = std::clamp<int64_t>(n - n0 - r0, 0, 16);
    if (live == 0) {
      for (int64_t p = 0; p < k / 2; ++p) _mm512_storeu_si512(out + p * kPanel + r0, _mm512_setzero_si512());
      continue;
    }
    Row rows[16];
    for (int64_t i = 0; i < live; ++i) rows[i] = w.row(n0 + r0 + i);
    if (live == 16) {
      fill16<F, true>(rows, live, blocks, out + r0);
    } else {
      fill16<F, false>(rows, live, blocks, out + r0);
    }
  }
}
#else
template <Fmt F>
void fill_panel(const Planes& w, int64_t n0, int64_t n, int64_t k, uint32_t* out) {
  float vals[32];
  for (int64_t r = 0; r < kPanel; ++r) {
    if (n0 + r >= n) {
      for (int64_t p = 0; p < k / 2; ++p) out[p * kPanel + r] = 0;
      continue;
    }
    const Row row = w.row(n0 + r);
    for (int64_t g = 0; g < k / 32; ++g) {
      group_scalar<F>(row, g, vals);
      for (int c = 0; c < 16; ++c) {
        out[(16 * g + c) * kPanel + r] = to_bf16(vals[2 * c]) | (static_cast<uint32_t>(to_bf16(vals[2 * c + 1])) << 16);
      }
    }
  }
}
#endif

struct Fill {
  Fmt fmt;
  PanelFill fill, fill_i8;  // the bf16 panel, the int8 one (null where the format has none, or without VNNI)
  int32_t offset;           // kI8Offset
  bool halves;              // kI8Halves
  PanelFill fill_f32;       // the f32 panel (gemm_f32.h)
};

const Fill* fills(int64_t fmt) {
#ifdef REALM_GEMM_I8
#define REALM_FILL(f, ...) {f, fill_panel<f>, i8_fill<f>(), kI8Offset<f>, kI8Halves<f>, fill_f32<f>},
#else
#define REALM_FILL(f, ...) {f, fill_panel<f>, nullptr, 0, false, fill_f32<f>},
#endif
  static const Fill kFills[] = {REALM_FORMATS(REALM_FILL)};
#undef REALM_FILL
  for (const auto& f : kFills)
    if (f.fmt == fmt) return &f;
  return nullptr;
}

// The format's bf16 panel fill, or with int8 its int8 one; null where there is none.
PanelFill panel_fill(int64_t fmt, bool int8) {
  const Fill* f = fills(fmt);
  return f == nullptr ? nullptr : int8 ? f->fill_i8 : f->fill;
}

// A 64-byte aligned buffer kept (as a thread_local) and grown when a call needs more, so that steady-state
// calls allocate nothing; null where it cannot be had.
struct GrowBuffer {
  uint8_t* p = nullptr;
  int64_t size = 0;
  ~GrowBuffer() { std::free(p); }
  uint8_t* get(int64_t bytes) {
    if (size < bytes) {
      std::free(p);
      const int64_t rounded = (bytes + 63) / 64 * 64;
      p = static_cast<uint8_t*>(std::aligned_alloc(64, rounded));
      size = p == nullptr ? 0 : rounded;
    }
    return p;
  }
};

#ifdef REALM_GEMM_I8
// x quantized for the int8 path into a buffer of the calling thread (not the panel buffer: the calling thread
// multiplies panels too), rows split over the pool. False where it cannot be allocated.
bool quantize_x(ffi::ThreadPool& pool, Gemm& g, const uint16_t* x, int32_t offset, bool halves) {
  thread_local GrowBuffer buffer;
  const int64_t k = 2 * g.kp, codes = (g.m * k + 63) / 64 * 64, factors = (g.m * (k / 32) * 4 + 63) / 64 * 64;
  uint8_t* buf = buffer.get(codes + 4 * factors);  // q, dx, xs, and xc (two a group)
  if (buf == nullptr) return false;
  int8_t* q = reinterpret_cast<int8_t*>(buf);
  float *dx = reinterpret_cast<float*>(buf + codes), *xs = reinterpret_cast<float*>(buf + codes + factors);
  int32_t* xc = reinterpret_cast<int32_t*>(buf + codes + 2 * factors);
  constexpr int64_t kRowsPerChunk = 16;
  const int64_t m = g.m;
  realm::parallel_chunks(pool, (m + kRowsPerChunk - 1) / kRowsPerChunk, [=](int64_t c) {
    quantize_x8(x, c * kRowsPerChunk, std::min(m, (c + 1) * kRowsPerChunk), k, offset, halves, q, dx, xs, xc);
  });
  g.xq = q;
  g.dx = dx;
  g.xs = xs;
  g.xc = offset != 0 ? xc : nullptr;
  g.halves = halves;
  return true;
}
#endif

using LayerIndex = ffi::Buffer<ffi::S32, 0>;

// Where W comes from: stored panels (g.w), or the quantized planes, dequantized one panel at a time into
// a buffer of the thread that multiplies it.
struct Source {
  const uint32_t* panels = nullptr;  // [P, K/2, 64] pairs of one layer, or null
  Planes planes;                     // when panels is null: W's planes
  PanelFill fill = nullptr;          // ...and the format's dequantization into a panel
  int64_t k = 0;
};

// A thread's panel buffer: two panels of K/2 x 64 pairs (gate and up), allocated once per thread and
// grown when a larger K comes, so that no call allocates: 2 x 256 KB at K = 2048, in L2 while a block of
// x's rows streams past it.
uint32_t* thread_buffer(int64_t pairs) {
  thread_local GrowBuffer buffer;
  return reinterpret_cast<uint32_t*>(buffer.get(4 * pairs));
}

// Splits the product over XLA's pool (threads) and runs it: each chunk is one output panel (with an
// activation: a gate panel, and its up panel) against a block of x's rows: all of them when there are
// panels enough for ~8 chunks per thread (each core then reads, or dequantizes, a panel of W once), else
// fewer rows per chunk. With planes, chunks = panels x blocks: a panel is dequantized once per chunk.
void launch(ffi::ThreadPool& pool, const Gemm& g, const Source& src) {
  const int64_t panels = (g.n + kPanel - 1) / kPanel;
  const int64_t units = g.act == kNoAct ? panels : panels / 2;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t target = src.panels != nullptr ? 8 * threads : 2 * threads;
  const int64_t splits = std::max<int64_t>(1, std::min((target + units - 1) / units, (g.m + kRows - 1) / kRows));
  const int64_t block = ((g.m + splits - 1) / splits + kRows - 1) / kRows * kRows;
  const int64_t blocks = (g.m + block - 1) / block;
  const int64_t panel_pairs = g.kp * kPanel, up_offset = g.n / 2 / kPanel;
  realm::parallel_chunks(pool, units * blocks, [&g, &src, block, blocks, panel_pairs, up_offset](int64_t c) {
    const int64_t m0 = (c % blocks) * block, panel = c / blocks;
    const uint32_t *w, *up = nullptr;
    if (src.panels != nullptr) {
      w = src.panels + panel * panel_pairs;
      if (g.act != kNoAct) up = src.panels + (panel + up_offset) * panel_pairs;
    } else {
      uint32_t* buf = thread_buffer(2 * panel_pairs);
      if (buf == nullptr) return;  // checked by the caller's first allocation
      src.fill(src.planes, panel * kPanel, g.n, src.k, buf);
      w = buf;
      if (g.act != kNoAct) {
        src.fill(src.planes, (panel + up_offset) * kPanel, g.n, src.k, buf + panel_pairs);
        up = buf + panel_pairs;
      }
    }
    rows(g, m0, std::min(g.m, m0 + block), panel, w, up);
  });
}

// The shared checks of x [M, K] and y; fills g but for w.
ffi::Error setup(ffi::Buffer<ffi::BF16>& x, int64_t y_rows, int64_t y_cols, int64_t act, Gemm& g) {
  auto xd = x.dimensions();
  if (xd.size() != 2 || y_rows != xd[0]) {
    return ffi::Error::InvalidArgument("realm_gemm_bf16: x must be [M, K] and y [M, N]");
  }
  g.m = xd[0];
  g.act = act;
  g.n = act == kNoAct ? y_cols : 2 * y_cols;
  if (act != kNoAct && (y_cols % kPanel || (act != kSilu && act != kGeluTanh))) {
    return ffi::Error::InvalidArgument("realm_gemm_bf16: an unknown activation, or N/2 not a multiple of 64");
  }
  if (xd[1] % 2) return ffi::Error::InvalidArgument("realm_gemm_bf16: K must be even");
  g.kp = xd[1] / 2;
  g.x = static_cast<const uint32_t*>(x.untyped_data());
  return ffi::Error::Success();
}

// w: [P, K/2, 64, 2] bf16, or [L, P, K/2, 64, 2] for a stack of L layers' weights of which `layer` is
// read where it lies. y: f32 [M, N] (act kNoAct), or bf16 [M, N/2] (an activation; N/2 a multiple of 64).
ffi::Error Run(ffi::ThreadPool& pool, ffi::Buffer<ffi::BF16>& x, LayerIndex& layer, ffi::Buffer<ffi::BF16>& w,
               void* y, int64_t y_rows, int64_t y_cols, int64_t act) {
  Gemm g{};
  if (ffi::Error e = setup(x, y_rows, y_cols, act, g); e.failure()) return e;
  auto wd = w.dimensions();
  const int64_t panels = (g.n + kPanel - 1) / kPanel, nd = static_cast<int64_t>(wd.size());
  if ((nd != 4 && nd != 5) || wd[nd - 1] != 2 || wd[nd - 2] != kPanel || wd[nd - 3] != g.kp ||
      wd[nd - 4] != panels) {
    return ffi::Error::InvalidArgument("realm_gemm_bf16: w must be [(L,) ceil(N/64), K/2, 64, 2]");
  }
  const int64_t stack = nd == 5 ? wd[0] : 1, index = static_cast<int64_t>(*layer.typed_data());
  if (index < 0 || index >= stack) {
    return ffi::Error::InvalidArgument("realm_gemm_bf16: the layer index is outside the stacked weight");
  }
  Source src;
  src.panels = static_cast<const uint32_t*>(w.untyped_data()) + index * panels * g.kp * kPanel;
  g.y = y;
  if (g.m == 0 || g.n == 0) return ffi::Error::Success();
  launch(pool, g, src);
  return ffi::Error::Success();
}

// W's planes (format fmt; layer `layer` of a stack) into src, whose fill is set, and this thread's panel
// buffer checked; an error names `what`.
ffi::Error bind_source(const char* what, int64_t fmt, ffi::RemainingArgs& planes, LayerIndex& layer, const Gemm& g,
                       Source& src) {
  const char* bad = bind_planes(fmt, planes, g.n, src.k, static_cast<int64_t>(*layer.typed_data()), src.planes);
  if (bad != nullptr) return ffi::Error::InvalidArgument(std::string(what) + ": " + bad);
  if (thread_buffer(2 * g.kp * kPanel) == nullptr) {  // two bf16 or int8 panels (gate, up), or one f32 panel
    return ffi::Error(ffi::ErrorCode::kResourceExhausted, std::string(what) + ": cannot allocate a panel buffer");
  }
  return ffi::Error::Success();
}

// W [N, K] as its quantized planes (each [N, ...], or [L, N, ...] of which `layer` is read), format fmt.
ffi::Error RunPlanes(ffi::ThreadPool& pool, ffi::Buffer<ffi::BF16>& x, LayerIndex& layer, ffi::RemainingArgs& planes,
                     void* y, int64_t y_rows, int64_t y_cols, int64_t act, int64_t fmt, bool int8) {
  Gemm g{};
  if (ffi::Error e = setup(x, y_rows, y_cols, act, g); e.failure()) return e;
  Source src;
  src.k = 2 * g.kp;
  src.fill = panel_fill(fmt, int8);
  if (src.fill == nullptr) {
    return ffi::Error::InvalidArgument(panel_fill(fmt, false) == nullptr ? "realm_gemm_q: unknown format id"
                                                                      : "realm_gemm_q: no int8 path for this format here");
  }
  if (ffi::Error e = bind_source("realm_gemm_q", fmt, planes, layer, g, src); e.failure()) return e;
  g.y = y;
  if (g.m == 0 || g.n == 0) return ffi::Error::Success();
#ifdef REALM_GEMM_I8
  const Fill* f = fills(fmt);
  if (int8 && !quantize_x(pool, g, static_cast<const uint16_t*>(x.untyped_data()), f->offset, f->halves)) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted, "realm_gemm_q: cannot allocate x's int8 buffer");
  }
#endif
  launch(pool, g, src);
  return ffi::Error::Success();
}

// The f32 path: x f32 [M, K], W [N, K] as its planes (format fmt; layer `layer` of a stack), y f32 [M, N].
ffi::Error GemmQF32(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, LayerIndex layer, ffi::RemainingArgs planes,
                    ffi::ResultBuffer<ffi::F32> y, int64_t fmt) {
  auto xd = x.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || yd.size() != 2 || xd[0] != yd[0] || xd[1] % 32) {
    return ffi::Error::InvalidArgument("realm_gemm_q_f32: x must be [M, K] (K a multiple of 32) and y [M, N]");
  }
  Gemm g{};
  g.m = xd[0];
  g.n = yd[1];
  g.kp = xd[1] / 2;
  g.act = kNoAct;
  g.xf = x.typed_data();
  g.y = y->typed_data();
  Source src;
  src.k = xd[1];
  const Fill* f = fills(fmt);
  if (f == nullptr) return ffi::Error::InvalidArgument("realm_gemm_q_f32: unknown format id");
  src.fill = f->fill_f32;
  if (ffi::Error e = bind_source("realm_gemm_q_f32", fmt, planes, layer, g, src); e.failure()) return e;
  if (g.m == 0 || g.n == 0) return ffi::Error::Success();
  launch(pool, g, src);
  return ffi::Error::Success();
}

ffi::Error GemmBF16(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, LayerIndex layer, ffi::Buffer<ffi::BF16> w,
                    ffi::ResultBuffer<ffi::F32> y) {
  auto yd = y->dimensions();
  if (yd.size() != 2) return ffi::Error::InvalidArgument("realm_gemm_bf16: y must be [M, N]");
  return Run(pool, x, layer, w, y->typed_data(), yd[0], yd[1], kNoAct);
}

ffi::Error GemmGluBF16(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, LayerIndex layer, ffi::Buffer<ffi::BF16> w,
                       ffi::ResultBuffer<ffi::BF16> y, int64_t act) {
  auto yd = y->dimensions();
  if (yd.size() != 2) return ffi::Error::InvalidArgument("realm_gemm_bf16: y must be [M, N/2]");
  if (act == kNoAct) return ffi::Error::InvalidArgument("realm_gemm_bf16: an unknown activation");
  return Run(pool, x, layer, w, y->untyped_data(), yd[0], yd[1], act);
}

// The planes' gemm: y f32 [M, N] with act kNoAct, else bf16 [M, N/2].
ffi::Error GemmQ(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, LayerIndex layer, ffi::RemainingArgs planes,
                 ffi::Result<ffi::AnyBuffer> y, int64_t fmt, int64_t act, int64_t int8) {
  auto yd = y->dimensions();
  const bool f32 = y->element_type() == ffi::DataType::F32, bf16 = y->element_type() == ffi::DataType::BF16;
  if (yd.size() != 2 || (act == kNoAct ? !f32 : !bf16)) {
    return ffi::Error::InvalidArgument("realm_gemm_q: y must be f32 [M, N], or with an activation bf16 [M, N/2]");
  }
  if (int8 != 0 && int8 != 1) return ffi::Error::InvalidArgument("realm_gemm_q: int8 must be 0 or 1");
  return RunPlanes(pool, x, layer, planes, y->untyped_data(), yd[0], yd[1], act, fmt, int8 == 1);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RealmGemmBF16, GemmBF16,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<LayerIndex>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(RealmGemmGluBF16, GemmGluBF16,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<LayerIndex>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Attr<int64_t>("act"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(RealmGemmQ, GemmQ,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<LayerIndex>()
                                  .RemainingArgs()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("fmt")
                                  .Attr<int64_t>("act")
                                  .Attr<int64_t>("int8"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(RealmGemmQF32, GemmQF32,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<LayerIndex>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("fmt"));

// Whether realm_gemm_q has the int8 path (int8=1) for format id fmt in this build.
extern "C" int realm_gemm_int8_format(int64_t fmt) { return panel_fill(fmt, true) != nullptr ? 1 : 0; }

extern "C" int realm_gemm_vector_path() {
#ifdef REALM_GEMM_BF16
  return 1;
#else
  return 0;
#endif
}

// Whether the bf16 product runs on AMX tiles here (built for AMX-BF16, the tile state granted, and not
// turned off by REALM_JAX_NATIVE_AMX=0).
extern "C" int realm_gemm_amx() {
#ifdef REALM_GEMM_AMX
  return amx_usable() ? 1 : 0;
#else
  return 0;
#endif
}
