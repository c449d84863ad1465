// Transformer layer kernels, one instruction set per object (built beside rows_isa.cpp, same
// flags): the softmax of attention scores (causal or not) and SwiGLU, forward and backward.
//
// MLX's Linux CPU backend runs exp, sigmoid and softmax as scalar code on one core; at a
// real model's shape (SmolLM2: [4, 9, 512, 512] scores per layer) the softmax alone took
// most of a layer's attention. Here each row is one vectorised pass (exp from simd.h), rows
// split across the cores by the caller.
#include <cmath>

#include "rows.h"
#include "simd.h"

namespace kd_kernels {
namespace KD_NS {

using namespace kd_simd;

// Row r of [rows, n] scores is query position q = r % queries; with `causal`, keys
// 0 .. q + (n - queries) are visible, the rest get probability 0.
static inline int64_t visible(const SoftmaxArgs& a, int64_t r) {
  if (!a.causal)
    return a.n;
  const int64_t q = r % a.queries;
  const int64_t last = q + (a.n - a.queries);
  return last < 0 ? 0 : (last + 1 < a.n ? last + 1 : a.n);
}

void softmax_rows(const SoftmaxArgs& a, int64_t r0, int64_t r1) {
  const vf scale = splat(a.scale);
  for (int64_t r = r0; r < r1; ++r) {
    const float* x = a.x + r * a.n;
    float* y = a.y + r * a.n;
    const int64_t m = visible(a, r);
    // the row maximum of scale * x over the visible keys
    vf vmx = splat(-kInf);
    int64_t j = 0;
    for (; j + W <= m; j += W)
      vmx = vmax(load(x + j) * scale, vmx);
    float top = hmax(vmx);
    for (; j < m; ++j)
      top = std::fmax(top, x[j] * a.scale);
    const vf shift = splat(top);
    vf acc = splat(0.0f);
    j = 0;
    for (; j + W <= m; j += W) {
      const vf e = exp(load(x + j) * scale - shift);
      store(y + j, e);
      acc += e;
    }
    double sum = hsum(acc);
    for (; j < m; ++j) {
      const float e = kd_simd::exp(splat(x[j] * a.scale - top))[0];
      y[j] = e;
      sum += e;
    }
    const float inv = m > 0 ? float(1.0 / sum) : 0.0f;
    const vf vinv = splat(inv);
    j = 0;
    for (; j + W <= m; j += W)
      store(y + j, load(y + j) * vinv);
    for (; j < m; ++j)
      y[j] *= inv;
    for (j = m; j < a.n; ++j)
      y[j] = 0.0f;
  }
}

// dx = scale * y * (g - sum(g * y)): the softmax's backward through its output.
void softmax_grad_rows(const SoftmaxGradArgs& a, int64_t r0, int64_t r1) {
  const SoftmaxArgs shape{a.scale, a.n, a.queries, a.causal, nullptr, nullptr};
  for (int64_t r = r0; r < r1; ++r) {
    const float* y = a.y + r * a.n;
    const float* g = a.g + r * a.n;
    float* dx = a.dx + r * a.n;
    const int64_t m = visible(shape, r);
    vf acc = splat(0.0f);
    int64_t j = 0;
    for (; j + W <= m; j += W)
      acc += load(g + j) * load(y + j);
    double dot = hsum(acc);
    for (; j < m; ++j)
      dot += double(g[j]) * y[j];
    const vf vdot = splat(float(dot)), scale = splat(a.scale);
    j = 0;
    for (; j + W <= m; j += W)
      store(dx + j, scale * (load(y + j) * (load(g + j) - vdot)));
    for (; j < m; ++j)
      dx[j] = a.scale * (y[j] * (g[j] - float(dot)));
    for (j = m; j < a.n; ++j)
      dx[j] = 0.0f;
  }
}

// sigmoid(x) = 1 / (1 + exp(-x)), exp's argument kept below its overflow.
static inline vf sigmoid(vf x) {
  const vf e = exp(-vmax(x, splat(-80.0f)));
  return splat(1.0f) / (splat(1.0f) + e);
}

static inline float sigmoid1(float x) {
  return 1.0f / (1.0f + kd_simd::exp(splat(-std::fmax(x, -80.0f)))[0]);
}

// y = silu(gate) * up, silu(x) = x * sigmoid(x)
void swiglu(const SwigluArgs& a, int64_t i0, int64_t i1) {
  int64_t i = i0;
  for (; i + W <= i1; i += W) {
    const vf g = load(a.gate + i);
    store(a.y + i, g * sigmoid(g) * load(a.up + i));
  }
  for (; i < i1; ++i) {
    const float g = a.gate[i];
    a.y[i] = g * sigmoid1(g) * a.up[i];
  }
}

// d gate = dy * up * s (1 + gate (1 - s)), d up = dy * silu(gate), s = sigmoid(gate)
void swiglu_grad(const SwigluArgs& a, int64_t i0, int64_t i1) {
  int64_t i = i0;
  const vf one = splat(1.0f);
  for (; i + W <= i1; i += W) {
    const vf g = load(a.gate + i), u = load(a.up + i), dy = load(a.dy + i);
    const vf s = sigmoid(g);
    store(a.d_gate + i, dy * u * s * (one + g * (one - s)));
    store(a.d_up + i, dy * (g * s));
  }
  for (; i < i1; ++i) {
    const float g = a.gate[i], u = a.up[i], dy = a.dy[i];
    const float s = sigmoid1(g);
    a.d_gate[i] = dy * u * s * (1.0f + g * (1.0f - s));
    a.d_up[i] = dy * (g * s);
  }
}

}  // namespace KD_NS
}  // namespace kd_kernels
