// The row kernels' plain C++ interface: no MLX types, so that the per-ISA objects compile
// without MLX's headers and with their own -m flags.
#pragma once

#include <cstdint>

namespace kd_kernels {

// Dense divergences, in the order of kdcore.kernels.divergence.KINDS.
enum Kind : int {
  kForwardKL = 0,
  kReverseKL = 1,
  kGJSD = 2,
  kSkewKL = 3,
  kSkewReverseKL = 4,
  kTVD = 5,
};

// One call over rows [r0, r1) of row-major [rows, vocab] inputs.
struct DenseArgs {
  int kind;
  float coef;  // beta of gjsd, alpha of the skew KLs
  float one_minus;  // 1 - coef, rounded from double as the pure path does
  float inv_t;  // 1 / T of the student
  float inv_tt;  // 1 / T of the teacher
  int64_t vocab;
  const void* s;  // float32 or bfloat16 (raw uint16) student logits
  const void* t;  // same for the teacher
  int64_t s_stride;  // elements from one row of s to the next
  int64_t t_stride;
  bool s_bf16;
  bool t_bf16;
  const float* scale;  // [rows]: each row's weight in the mean
  float* values;  // [rows]: the divergence per row
  float* grad;  // [rows, vocab]: scale * d value / d s
};

struct CrossEntropyArgs {
  float smoothing;  // label smoothing e (0: plain cross-entropy)
  float one_minus;  // 1 - e
  int32_t ignore_index;
  int64_t vocab;
  const void* s;
  int64_t s_stride;
  bool s_bf16;
  const int32_t* labels;  // [rows]
  const float* scale;
  float* values;
  float* grad;
};

// Top-k teachers (kdcore.kernels.divergence.sparse_rows): the teacher's log-probabilities
// lp on the support ids [rows, k] (renormalize: k of them; tail-bucket: k + 1, the tail
// class last), already at the temperature.
enum Tail : int {
  kRenormalize = 0,
  kTailBucket = 1,
};

struct SparseArgs {
  int kind;
  int tail;
  double coef;
  float inv_t;
  int64_t vocab;
  int64_t k;
  const void* s;
  int64_t s_stride;
  bool s_bf16;
  const int32_t* ids;  // [rows, k]
  const float* lp;  // [rows, k] or [rows, k + 1]
  const float* scale;
  float* values;
  float* grad;
};

// One Adam(W) step over elements [i0, i1) of float32 arrays, with mlx.optimizers.Adam's
// roundings in its order: p = p * decay (AdamW's 1 - lr * weight_decay; 1 for Adam);
// m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2; p -= (lr m) / (sqrt(v) + eps), or with
// bias correction p -= (c1 m) / (sqrt(v) c2 + eps). Outputs may be the inputs' buffers.
// g_cols > 0: the parameter is [g_rows, g_cols] and g the transpose of a dense
// [g_cols, g_rows] array (a Linear weight's gradient), g(r, c) = g[c * g_rows + r].
struct AdamArgs {
  float decay, b1, one_minus_b1, b2, one_minus_b2, eps;
  float lr;  // c1 = lr / (1 - b1^step) with bias correction
  float c2;  // rsqrt(1 - b2^step) with bias correction
  bool bias_correction;
  const float* g;
  int64_t g_rows, g_cols;
  const float* p_in;
  const float* m_in;
  const float* v_in;
  float* p;
  float* m;
  float* v;
};

// Rows of a transposed gradient (AdamArgs::g_cols > 0) the Adam step reads per tile: runs of
// 32 floats of each column, two cache lines. Threads take whole tiles.
constexpr int64_t kAdamRows = 32;

// The softmax of attention scores [rows, n], float32: y = softmax(scale * x) per row; with
// `causal`, row r is query position r % queries and sees keys 0 .. that + n - queries.
struct SoftmaxArgs {
  float scale;
  int64_t n;
  int64_t queries;
  bool causal;
  const float* x;
  float* y;
};

// Its backward: dx = scale * y * (g - sum(g * y)).
struct SoftmaxGradArgs {
  float scale;
  int64_t n;
  int64_t queries;
  bool causal;
  const float* y;
  const float* g;
  float* dx;
};

// SwiGLU over elements: y = silu(gate) * up; its backward from dy into d_gate and d_up.
struct SwigluArgs {
  const float* gate;
  const float* up;
  const float* dy;
  float* y;
  float* d_gate;
  float* d_up;
};

// Causal (or full) attention of float32 q [B, Hq, L, D] with k, v [B, Hkv, S, D] (query head
// h reads KV head h / (Hq / Hkv)), flash style: tiles of kAttentionTile queries x keys, an
// online softmax, the [L, S] scores never held. With `causal`, query i sees keys
// 0 .. i + S - L (the queries are the last L positions). q, k and v are read through their
// strides (batch, head, row; elements of a row adjacent); everything else is contiguous.
constexpr int64_t kAttentionTile = 64;

struct AttentionArgs {
  int64_t batch, heads, kv_heads, queries, keys, dim;
  float scale;
  bool causal;
  const float* q;
  const float* k;
  const float* v;
  int64_t q_strides[3], k_strides[3], v_strides[3];
  float* o;  // forward: [B, Hq, L, D]
  float* lse;  // forward: [B, Hq, L], log-sum-exp of each query's scaled scores
  const float* o_in;  // backward: the forward's o and lse, and the cotangent of o
  const float* lse_in;
  const float* d_o;
  float* dk;  // backward: [B, Hkv, S, D]
  float* dv;
  // The forward's keys and values of each KV head [S, Dp] (Dp: D rounded up to the lanes),
  // packed once per call by attention_pack before the tasks (attention_work floats).
  float* work;
};

// Floats of AttentionArgs::work for an instruction set of `lanes` float lanes (the most
// lanes give enough for any).
inline int64_t attention_work(const AttentionArgs& a, int64_t lanes) {
  const int64_t dp = (a.dim + lanes - 1) / lanes * lanes;
  return a.batch * a.kv_heads * 2 * a.keys * dp;
}

// Forward task t of B * Hq * ceil(L / tile) (the longest query tiles first), after pack
// task t of B * Hkv.
using AttentionFn = void (*)(const AttentionArgs&, int64_t task);
// Backward task t of B * Hkv * splits: KV head t / splits, its key tiles t % splits,
// t % splits + splits, ...; writes those rows of dk and dv, and this task's share of dq for
// the group's Hq / Hkv query heads into dq [Hq / Hkv, L, D] (the caller sums the splits).
using AttentionGradFn = void (*)(const AttentionArgs&, int64_t task, int64_t splits, float* dq);
using AttentionPackFn = void (*)(const AttentionArgs&, int64_t task);

using DenseFn = void (*)(const DenseArgs&, int64_t r0, int64_t r1);
using SoftmaxFn = void (*)(const SoftmaxArgs&, int64_t r0, int64_t r1);
using SoftmaxGradFn = void (*)(const SoftmaxGradArgs&, int64_t r0, int64_t r1);
using SwigluFn = void (*)(const SwigluArgs&, int64_t i0, int64_t i1);
using SparseFn = void (*)(const SparseArgs&, int64_t r0, int64_t r1);
using CrossEntropyFn = void (*)(const CrossEntropyArgs&, int64_t r0, int64_t r1);
using AdamFn = void (*)(const AdamArgs&, int64_t i0, int64_t i1);

#define KD_DECLARE_ISA(name)                                                   \
  namespace isa_##name {                                                       \
  void dense_rows(const DenseArgs& a, int64_t r0, int64_t r1);                 \
  void cross_entropy_rows(const CrossEntropyArgs& a, int64_t r0, int64_t r1);  \
  void sparse_rows(const SparseArgs& a, int64_t r0, int64_t r1);               \
  void adam_step(const AdamArgs& a, int64_t i0, int64_t i1);                   \
  void softmax_rows(const SoftmaxArgs& a, int64_t r0, int64_t r1);             \
  void softmax_grad_rows(const SoftmaxGradArgs& a, int64_t r0, int64_t r1);    \
  void swiglu(const SwigluArgs& a, int64_t i0, int64_t i1);                    \
  void swiglu_grad(const SwigluArgs& a, int64_t i0, int64_t i1);               \
  void attention(const AttentionArgs& a, int64_t task);                        \
  void attention_grad(const AttentionArgs& a, int64_t task, int64_t splits, float* dq); \
  void attention_pack(const AttentionArgs& a, int64_t task);                   \
  int lanes();                                                                 \
  }

KD_DECLARE_ISA(base)
#if defined(KD_HAVE_X86_ISAS)
KD_DECLARE_ISA(avx2)
KD_DECLARE_ISA(avx512)
#endif

}  // namespace kd_kernels
