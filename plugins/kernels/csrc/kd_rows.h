// MLX primitives of the native kernels (loss rows, the Adam step) and the ops that build them.
#pragma once

#include <functional>
#include <string>
#include <tuple>
#include <vector>

#include "mlx/ops.h"
#include "mlx/primitives.h"
#include "rows.h"

namespace mx = mlx::core;

namespace kd_kernels {

// (values [C], scale * d values / d s [C, V]) of a dense divergence between
// softmax(s * inv_t) and softmax(t * inv_tt); kind in the order of kdcore's KINDS.
std::tuple<mx::array, mx::array> dense_rows(
    const mx::array& scale,
    const mx::array& s,
    const mx::array& t,
    int kind,
    double coef,
    double inv_t,
    double inv_tt);

// (values [C], scale * d values / d s [C, V]) of a divergence against a top-k teacher:
// ids [C, k], its log-probabilities lp [C, k] (tail 0, renormalize) or [C, k + 1] (tail 1,
// tail-bucket, the tail class last) at temperature 1 / inv_t.
std::tuple<mx::array, mx::array> sparse_rows(
    const mx::array& scale,
    const mx::array& s,
    const mx::array& ids,
    const mx::array& lp,
    int kind,
    double coef,
    double inv_t,
    int tail);

// (values [C], scale * d values / d s [C, V]) of the cross-entropy with labels [C].
std::tuple<mx::array, mx::array> cross_entropy_rows(
    const mx::array& scale,
    const mx::array& s,
    const mx::array& labels,
    double smoothing,
    int ignore_index);

// (parameter, m, v) after one Adam(W) step (rows.h's AdamArgs) of float32 arrays of one
// shape; scalars [kAdamScalars]: decay, b1, 1 - b1, b2, 1 - b2, eps, lr (c1 with bias
// correction), c2. Runs in place where the inputs' buffers are free to take.
constexpr int kAdamScalars = 8;
std::tuple<mx::array, mx::array, mx::array> adam_step(
    const mx::array& gradient,
    const mx::array& parameter,
    const mx::array& m,
    const mx::array& v,
    const mx::array& scalars,
    bool bias_correction);

// The instruction set in use ("avx512", "avx2", "base"), those this CPU and build offer, and
// choosing one (for tests and benchmarks; throws for one the CPU cannot run).
std::string isa();
std::vector<std::string> isas();
std::string set_isa(const std::string& name);
int threads();
int set_threads(int n);

// softmax(scale * x) over the last axis of float32 attention scores [..., queries, n]; with
// `causal`, query q sees keys 0 .. q + n - queries (the others get 0). Differentiable.
mx::array softmax(const mx::array& x, double scale, bool causal);

// silu(gate) * up of float32 arrays of one shape. Differentiable.
mx::array swiglu(const mx::array& gate, const mx::array& up);

// softmax(scale q k^T) v of float32 q [B, Hq, L, D] and k, v [B, Hkv, S, D] (Hq a multiple
// of Hkv; query head h reads KV head h / (Hq / Hkv)); with `causal`, query i sees keys
// 0 .. i + S - L. Flash style: the scores are never held. Differentiable in q, k and v.
mx::array flash_attention(
    const mx::array& q, const mx::array& k, const mx::array& v, double scale, bool causal);

namespace detail {
struct LayerFns {
  SoftmaxFn softmax;
  SoftmaxGradFn softmax_grad;
  SwigluFn swiglu;
  SwigluFn swiglu_grad;
  AttentionFn attention;
  AttentionGradFn attention_grad;
  AttentionPackFn attention_pack;
};
// The instruction set's layer kernels, and rows split across the kernels' threads.
LayerFns layer_fns();
void parallel(int64_t items, int64_t work_per_item, const std::function<void(int64_t, int64_t)>& f);
}  // namespace detail

class DenseRows : public mx::Primitive {
 public:
  DenseRows(mx::Stream stream, int kind, double coef, double inv_t, double inv_tt)
      : mx::Primitive(stream), kind_(kind), coef_(coef), inv_t_(inv_t), inv_tt_(inv_tt) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  std::vector<mx::array> vjp(
      const std::vector<mx::array>& primals,
      const std::vector<mx::array>& cotangents,
      const std::vector<int>& argnums,
      const std::vector<mx::array>& outputs) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  const char* name() const override {
    return "KdDenseRows";
  }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  int kind_;
  double coef_, inv_t_, inv_tt_;
};

class SparseRows : public mx::Primitive {
 public:
  SparseRows(mx::Stream stream, int kind, double coef, double inv_t, int tail)
      : mx::Primitive(stream), kind_(kind), coef_(coef), inv_t_(inv_t), tail_(tail) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  std::vector<mx::array> vjp(
      const std::vector<mx::array>& primals,
      const std::vector<mx::array>& cotangents,
      const std::vector<int>& argnums,
      const std::vector<mx::array>& outputs) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  const char* name() const override {
    return "KdSparseRows";
  }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  int kind_;
  double coef_, inv_t_;
  int tail_;
};

class CrossEntropyRows : public mx::Primitive {
 public:
  CrossEntropyRows(mx::Stream stream, double smoothing, int ignore_index)
      : mx::Primitive(stream), smoothing_(smoothing), ignore_index_(ignore_index) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  std::vector<mx::array> vjp(
      const std::vector<mx::array>& primals,
      const std::vector<mx::array>& cotangents,
      const std::vector<int>& argnums,
      const std::vector<mx::array>& outputs) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  const char* name() const override {
    return "KdCrossEntropyRows";
  }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  double smoothing_;
  int ignore_index_;
};

class AdamStep : public mx::Primitive {
 public:
  AdamStep(mx::Stream stream, bool bias_correction)
      : mx::Primitive(stream), bias_correction_(bias_correction) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  std::vector<mx::array> vjp(
      const std::vector<mx::array>& primals,
      const std::vector<mx::array>& cotangents,
      const std::vector<int>& argnums,
      const std::vector<mx::array>& outputs) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  const char* name() const override {
    return "KdAdamStep";
  }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  bool bias_correction_;
};

}  // namespace kd_kernels
