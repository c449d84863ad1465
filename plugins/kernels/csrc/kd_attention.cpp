// The MLX side of flash attention (attention_isa.cpp): one primitive for the forward (the
// output and each query's log-sum-exp) and one for its backward (dq, dk, dv), so that under a
// gradient MLX holds q, k, v, the output and L floats per query head, never the
// [B, heads, L, S] scores (kdcore.models.ops.attention runs it).
#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <stdexcept>

#include "kd_rows.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"

namespace kd_kernels {

namespace {

// A q, k or v input as the kernels read it: its data and the strides of batch, head and
// row. One whose elements within a row are not adjacent is gathered when the task runs.
struct HeadView {
  const float* data;
  int64_t strides[3];
  std::shared_ptr<std::vector<float>> owned;
  const float* source;
  int64_t source_strides[4];
  int64_t shape[4];

  void gather() const {
    if (!owned)
      return;
    float* to = owned->data();
    for (int64_t b = 0; b < shape[0]; ++b)
      for (int64_t h = 0; h < shape[1]; ++h)
        for (int64_t i = 0; i < shape[2]; ++i)
          for (int64_t d = 0; d < shape[3]; ++d)
            *to++ = source
                [b * source_strides[0] + h * source_strides[1] + i * source_strides[2] +
                 d * source_strides[3]];
  }
};

HeadView head_view(const mx::array& x) {
  HeadView v{};
  for (int i = 0; i < 4; ++i)
    v.shape[i] = x.shape(i);
  if (x.strides()[3] == 1 || x.shape(3) == 1) {
    v.data = x.data<float>();
    for (int i = 0; i < 3; ++i)
      v.strides[i] = x.strides()[i];
    return v;
  }
  v.owned = std::make_shared<std::vector<float>>(x.size());
  v.source = x.data<float>();
  for (int i = 0; i < 4; ++i)
    v.source_strides[i] = x.strides()[i];
  v.data = v.owned->data();
  v.strides[2] = x.shape(3);
  v.strides[1] = x.shape(2) * v.strides[2];
  v.strides[0] = x.shape(1) * v.strides[1];
  return v;
}

void set_views(AttentionArgs& args, const HeadView& q, const HeadView& k, const HeadView& v) {
  args.q = q.data;
  args.k = k.data;
  args.v = v.data;
  for (int i = 0; i < 3; ++i) {
    args.q_strides[i] = q.strides[i];
    args.k_strides[i] = k.strides[i];
    args.v_strides[i] = v.strides[i];
  }
}

AttentionArgs shape_args(const mx::array& q, const mx::array& k, double scale, bool causal) {
  AttentionArgs args{};
  args.batch = q.shape(0);
  args.heads = q.shape(1);
  args.kv_heads = k.shape(1);
  args.queries = q.shape(2);
  args.keys = k.shape(2);
  args.dim = q.shape(3);
  args.scale = float(scale);
  args.causal = causal;
  return args;
}

// `tasks` items pulled one at a time by the kernels' threads (the forward's tiles differ in
// work under a causal mask; a shared counter balances them), one thread when the whole call
// is small.
template <class F>
void run_tasks(int64_t tasks, double work, F&& f) {
  constexpr double kMinWorkPerThread = 1 << 20;  // multiply-adds (~0.1 ms)
  int64_t n = std::min<int64_t>(threads(), tasks);
  n = std::min<int64_t>(n, std::max<int64_t>(1, int64_t(work / kMinWorkPerThread)));
  std::atomic<int64_t> next{0};
  detail::parallel(n, int64_t(1) << 30, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w)
      for (int64_t t = next++; t < tasks; t = next++)
        f(t);
  });
}

// Lanes of the widest instruction set: its padding is enough for any.
constexpr int64_t kMaxLanes = 16;

void only_cpu(const char* name) {
  throw std::runtime_error(
      std::string("kd_kernels: ") + name +
      " runs on the CPU only; on a GPU kdcore uses MLX's own attention");
}

class FlashAttention : public mx::Primitive {
 public:
  FlashAttention(mx::Stream stream, double scale, bool causal)
      : mx::Primitive(stream), scale_(scale), causal_(causal) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (const auto& x : inputs)
      encoder.set_input_array(x);
    for (auto& out : outputs) {
      out.set_data(mx::allocator::malloc(out.nbytes()));
      encoder.set_output_array(out);
    }
    AttentionArgs args = shape_args(inputs[0], inputs[1], scale_, causal_);
    const HeadView q = head_view(inputs[0]), k = head_view(inputs[1]), v = head_view(inputs[2]);
    set_views(args, q, k, v);
    args.o = outputs[0].data<float>();
    args.lse = outputs[1].data<float>();
    const int64_t tiles = (args.queries + kAttentionTile - 1) / kAttentionTile;
    const int64_t tasks = args.batch * args.heads * tiles;
    const double work = double(args.batch) * args.heads * args.queries * args.keys * args.dim;
    encoder.dispatch([args, q, k, v, tasks, work, fns = detail::layer_fns()]() mutable {
      q.gather();
      k.gather();
      v.gather();
      std::vector<float> packed(attention_work(args, kMaxLanes));
      args.work = packed.data();
      const double pack_work = double(args.batch) * args.kv_heads * args.keys * args.dim;
      run_tasks(args.batch * args.kv_heads, pack_work, [&](int64_t t) {
        fns.attention_pack(args, t);
      });
      run_tasks(tasks, work, [&](int64_t t) { fns.attention(args, t); });
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    only_cpu(name());
  }

  std::vector<mx::array> vjp(
      const std::vector<mx::array>& primals,
      const std::vector<mx::array>& cotangents,
      const std::vector<int>& argnums,
      const std::vector<mx::array>& outputs) override;

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    const auto& q = inputs[0];
    return {q.shape(), {q.shape(0), q.shape(1), q.shape(2)}};
  }

  const char* name() const override {
    return "KdFlashAttention";
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const FlashAttention&>(other);
    return scale_ == o.scale_ && causal_ == o.causal_;
  }

 private:
  double scale_;
  bool causal_;
};

class FlashAttentionGrad : public mx::Primitive {
 public:
  FlashAttentionGrad(mx::Stream stream, double scale, bool causal)
      : mx::Primitive(stream), scale_(scale), causal_(causal) {}

  // inputs: q, k, v, o, lse, d_o; outputs: dq, dk, dv (contiguous)
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (const auto& x : inputs)
      encoder.set_input_array(x);
    for (auto& out : outputs) {
      out.set_data(mx::allocator::malloc(out.nbytes()));
      encoder.set_output_array(out);
    }
    AttentionArgs args = shape_args(inputs[0], inputs[1], scale_, causal_);
    const HeadView q = head_view(inputs[0]), k = head_view(inputs[1]), v = head_view(inputs[2]);
    set_views(args, q, k, v);
    args.o_in = inputs[3].data<float>();
    args.lse_in = inputs[4].data<float>();
    args.d_o = inputs[5].data<float>();
    float* dq = outputs[0].data<float>();
    args.dk = outputs[1].data<float>();
    args.dv = outputs[2].data<float>();
    // One task per KV head owns its rows of dk, dv and dq; with fewer KV heads than threads
    // each is split by key tiles, and the splits' dq are summed.
    const int64_t kv_count = args.batch * args.kv_heads;
    const int64_t key_tiles = (args.keys + kAttentionTile - 1) / kAttentionTile;
    const int64_t splits = kv_count >= threads()
        ? 1
        : std::max<int64_t>(1, std::min<int64_t>(key_tiles, (threads() + kv_count - 1) / kv_count));
    const double work = 2.5 * args.batch * args.heads * args.queries * args.keys * args.dim;
    encoder.dispatch([args, q, k, v, dq, splits, kv_count, work,
                      fns = detail::layer_fns()]() mutable {
      q.gather();
      k.gather();
      v.gather();
      const auto fn = fns.attention_grad;
      const int64_t group = (args.heads / args.kv_heads) * args.queries * args.dim;
      if (splits == 1) {
        run_tasks(kv_count, work, [&](int64_t t) { fn(args, t, 1, dq + t * group); });
        return;
      }
      // the splits' dq summed in split order: the same result whichever thread ran which
      std::vector<float> parts(kv_count * splits * group);
      run_tasks(kv_count * splits, work, [&](int64_t t) {
        fn(args, t, splits, parts.data() + t * group);
      });
      run_tasks(kv_count, double(splits) * group, [&](int64_t kv) {
        float* to = dq + kv * group;
        const float* from = parts.data() + kv * splits * group;
        std::memcpy(to, from, sizeof(float) * group);
        for (int64_t part = 1; part < splits; ++part)
          for (int64_t x = 0; x < group; ++x)
            to[x] += from[part * group + x];
      });
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    only_cpu(name());
  }

  std::vector<mx::array> vjp(
      const std::vector<mx::array>&,
      const std::vector<mx::array>&,
      const std::vector<int>&,
      const std::vector<mx::array>&) override {
    throw std::invalid_argument(
        "kd_kernels: flash attention's backward has no gradient of its own");
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape(), inputs[1].shape(), inputs[2].shape()};
  }

  const char* name() const override {
    return "KdFlashAttentionGrad";
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const FlashAttentionGrad&>(other);
    return scale_ == o.scale_ && causal_ == o.causal_;
  }

 private:
  double scale_;
  bool causal_;
};

std::vector<mx::array> FlashAttention::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>& outputs) {
  // The log-sum-exp output is the kernel's own: only the output's cotangent counts.
  auto grads = mx::array::make_arrays(
      {primals[0].shape(), primals[1].shape(), primals[2].shape()},
      {mx::float32, mx::float32, mx::float32},
      std::make_shared<FlashAttentionGrad>(stream(), scale_, causal_),
      {primals[0],
       primals[1],
       primals[2],
       outputs[0],
       outputs[1],
       mx::contiguous(mx::astype(cotangents[0], mx::float32))});
  std::vector<mx::array> out;
  for (int arg : argnums)
    out.push_back(grads[arg]);
  return out;
}

}  // namespace

mx::array flash_attention(
    const mx::array& q, const mx::array& k, const mx::array& v, double scale, bool causal) {
  if (q.ndim() != 4 || k.ndim() != 4 || v.ndim() != 4)
    throw std::invalid_argument("kd_kernels: flash attention takes q, k, v as [B, heads, L, D]");
  if (k.shape() != v.shape())
    throw std::invalid_argument("kd_kernels: flash attention's k and v differ in shape");
  if (q.shape(0) != k.shape(0) || q.shape(3) != k.shape(3))
    throw std::invalid_argument("kd_kernels: flash attention's q and k differ in batch or width");
  if (k.shape(1) == 0 || q.shape(1) % k.shape(1) != 0)
    throw std::invalid_argument(
        "kd_kernels: flash attention needs query heads a multiple of the KV heads");
  if (causal && q.shape(2) > k.shape(2))
    throw std::invalid_argument(
        "kd_kernels: causal attention needs at least as many keys as queries");
  auto f32 = [](const mx::array& x) {
    return x.dtype() == mx::float32 ? x : mx::astype(x, mx::float32);
  };
  auto outputs = mx::array::make_arrays(
      {q.shape(), {q.shape(0), q.shape(1), q.shape(2)}},
      {mx::float32, mx::float32},
      std::make_shared<FlashAttention>(mx::to_stream({}), scale, causal),
      {f32(q), f32(k), f32(v)});
  return outputs[0];
}

}  // namespace kd_kernels
