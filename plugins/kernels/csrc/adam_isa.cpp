// The Adam(W) step, one instruction set per object (built beside rows_isa.cpp, same flags).
//
// An optimizer step is seven streams of float32 (read g, p, m, v; write p, m, v): MLX's
// Linux CPU kernels run its ten element-wise ops one after another, scalar and on one core,
// so at 84M parameters the update took longer than a teacher's forward. Here it is one
// vectorised pass, every rounding where MLX has it (-ffp-contract=off: no FMA).
#include <cmath>

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

void adam_step(const AdamArgs& a, int64_t i0, int64_t i1) {
  const vf decay = splat(a.decay), b1 = splat(a.b1), ob1 = splat(a.one_minus_b1);
  const vf b2 = splat(a.b2), ob2 = splat(a.one_minus_b2), eps = splat(a.eps);
  const vf lr = splat(a.lr), c2 = splat(a.c2);
  int64_t i = i0;
  for (; i + W <= i1; i += W) {
    const vf g = load(a.g + i);
    const vf p = load(a.p_in + i) * decay;
    const vf m = b1 * load(a.m_in + i) + ob1 * g;
    const vf v = b2 * load(a.v_in + i) + ob2 * (g * g);
    const vf root = vsqrt(v);
    const vf denominator = a.bias_correction ? root * c2 + eps : root + eps;
    store(a.p + i, p - (lr * m) / denominator);
    store(a.m + i, m);
    store(a.v + i, v);
  }
  for (; i < i1; ++i) {
    const float g = a.g[i];
    const float p = a.p_in[i] * a.decay;
    const float m = a.b1 * a.m_in[i] + a.one_minus_b1 * g;
    const float v = a.b2 * a.v_in[i] + a.one_minus_b2 * (g * g);
    const float root = std::sqrt(v);
    const float denominator = a.bias_correction ? root * a.c2 + a.eps : root + a.eps;
    a.p[i] = p - (a.lr * m) / denominator;
    a.m[i] = m;
    a.v[i] = v;
  }
}

}  // namespace KD_NS
}  // namespace kd_kernels
