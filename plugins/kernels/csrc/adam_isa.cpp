// The Adam(W) step, one instruction set per object (built beside rows_isa.cpp, same flags).
//
// An optimizer step is seven streams of float32 (read g, p, m, v; write p, m, v): MLX's
// Linux CPU kernels run its ten element-wise ops one after another, scalar and on one core,
// so at 84M parameters the update took longer than a teacher's forward. Here it is one
// vectorised pass, every rounding where MLX has it (-ffp-contract=off: no FMA).
#include <algorithm>
#include <cmath>
#include <memory>

#include "rows.h"
#include "simd.h"

namespace kd_kernels {
namespace KD_NS {

using namespace kd_simd;

// IEEE square root lane by lane (correctly rounded, as std::sqrt); the compiler turns the
// loop into one vector instruction where the ISA has it.
static inline vf vsqrt(vf x) {
  vf r;
  for (int k = 0; k < W; ++k)
    r[k] = std::sqrt(x[k]);
  return r;
}

// Elements [at, at + n) of the parameter, their gradient at g[0, n).
static void update(const AdamArgs& a, const float* g, int64_t at, int64_t n) {
  const vf decay = splat(a.decay), b1 = splat(a.b1), ob1 = splat(a.one_minus_b1);
  const vf b2 = splat(a.b2), ob2 = splat(a.one_minus_b2), eps = splat(a.eps);
  const vf lr = splat(a.lr), c2 = splat(a.c2);
  const float *p_in = a.p_in + at, *m_in = a.m_in + at, *v_in = a.v_in + at;
  float *p_out = a.p + at, *m_out = a.m + at, *v_out = a.v + at;
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const vf gi = load(g + i);
    const vf p = load(p_in + i) * decay;
    const vf m = b1 * load(m_in + i) + ob1 * gi;
    const vf v = b2 * load(v_in + i) + ob2 * (gi * gi);
    const vf root = vsqrt(v);
    const vf denominator = a.bias_correction ? root * c2 + eps : root + eps;
    store(p_out + i, p - (lr * m) / denominator);
    store(m_out + i, m);
    store(v_out + i, v);
  }
  for (; i < n; ++i) {
    const float gi = g[i];
    const float p = p_in[i] * a.decay;
    const float m = a.b1 * m_in[i] + a.one_minus_b1 * gi;
    const float v = a.b2 * v_in[i] + a.one_minus_b2 * (gi * gi);
    const float root = std::sqrt(v);
    const float denominator = a.bias_correction ? root * a.c2 + a.eps : root + a.eps;
    p_out[i] = p - (a.lr * m) / denominator;
    m_out[i] = m;
    v_out[i] = v;
  }
}

#if defined(__AVX2__)
// An 8 x 8 block: 8 runs of 8 floats `from` apart (8 columns of g, 8 rows each) to 8 runs
// of 8 floats `to` apart (8 rows of the tile).
static inline void transpose8(const float* src, int64_t from, float* dst, int64_t to) {
  __m256 r[8], t[8], s[8];
  for (int k = 0; k < 8; ++k)
    r[k] = _mm256_loadu_ps(src + k * from);
  for (int k = 0; k < 8; k += 2) {
    t[k] = _mm256_unpacklo_ps(r[k], r[k + 1]);
    t[k + 1] = _mm256_unpackhi_ps(r[k], r[k + 1]);
  }
  for (int k = 0; k < 8; k += 4) {
    s[k] = _mm256_shuffle_ps(t[k], t[k + 2], 0x44);
    s[k + 1] = _mm256_shuffle_ps(t[k], t[k + 2], 0xEE);
    s[k + 2] = _mm256_shuffle_ps(t[k + 1], t[k + 3], 0x44);
    s[k + 3] = _mm256_shuffle_ps(t[k + 1], t[k + 3], 0xEE);
  }
  for (int k = 0; k < 4; ++k) {
    _mm256_storeu_ps(dst + k * to, _mm256_permute2f128_ps(s[k], s[k + 4], 0x20));
    _mm256_storeu_ps(dst + (k + 4) * to, _mm256_permute2f128_ps(s[k], s[k + 4], 0x31));
  }
}
#endif

// Rows [r0, r0 + nr) and columns [c0, c0 + nc) of the transposed gradient, row-major into
// `tile` (nc floats a row).
static void gather_tile(
    const AdamArgs& a, int64_t r0, int64_t nr, int64_t c0, int64_t nc, float* tile) {
  const float* g = a.g + c0 * a.g_rows + r0;  // column c0's row r0
  const int64_t rows = a.g_rows;
  int64_t c = 0;
#if defined(__AVX2__)
  for (; c + 8 <= nc; c += 8) {
    int64_t r = 0;
    for (; r + 8 <= nr; r += 8)
      transpose8(g + c * rows + r, rows, tile + r * nc + c, nc);
    for (; r < nr; ++r)
      for (int64_t k = c; k < c + 8; ++k)
        tile[r * nc + k] = g[k * rows + r];
  }
#endif
  for (; c < nc; ++c)
    for (int64_t r = 0; r < nr; ++r)
      tile[r * nc + c] = g[c * rows + r];
}

// The gradient transposed (a.g_cols > 0): kAdamRows rows of it at a time are copied into a
// row-major buffer in the core's cache, reading runs of kAdamRows floats (two cache lines)
// of each column, and the rows then updated as above in one run of memory for p, m and v
// (short runs of either leave the hardware prefetcher idle: twice the time).
static void update_transposed(const AdamArgs& a, int64_t i0, int64_t i1) {
  const int64_t rows = a.g_rows, cols = a.g_cols;
  const int64_t span = std::min<int64_t>(cols, 2048);  // columns per tile: <= 256 KiB
  std::unique_ptr<float[]> buffer(new float[kAdamRows * span]);
  float* tile = buffer.get();
  for (int64_t rb = i0 / cols; rb * cols < i1; rb += kAdamRows) {
    const int64_t nr = std::min(kAdamRows, rows - rb);
    for (int64_t c0 = 0; c0 < cols; c0 += span) {
      const int64_t nc = std::min(span, cols - c0);
      gather_tile(a, rb, nr, c0, nc, tile);
      for (int64_t r = 0; r < nr; r += (nc == cols ? nr : 1)) {  // whole rows: one run
        const int64_t at = (rb + r) * cols + c0, n = nc == cols ? nr * cols : nc;
        const int64_t from = std::max(at, i0), to = std::min(at + n, i1);
        if (from < to)
          update(a, tile + r * nc + (from - at), from, to - from);
      }
    }
  }
}

void adam_step(const AdamArgs& a, int64_t i0, int64_t i1) {
  if (a.g_cols > 0)
    update_transposed(a, i0, i1);
  else
    update(a, a.g + i0, i0, i1 - i0);
}

}  // namespace KD_NS
}  // namespace kd_kernels
