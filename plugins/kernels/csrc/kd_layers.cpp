// The MLX side of the layer kernels (layers_isa.cpp): attention's softmax and SwiGLU as
// primitives with their backward, for kdcore.models.ops to run in mlx-lm's layers and the
// built-in transformer on the CPU.
#include <stdexcept>

#include "kd_rows.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"

namespace kd_kernels {

namespace {

void only_cpu(const char* name) {
  throw std::runtime_error(
      std::string("kd_kernels: ") + name +
      " runs on the CPU only; on a GPU kdcore uses MLX's own attention and activations");
}

mx::array dense_float(const mx::array& x) {
  return mx::contiguous(x.dtype() == mx::float32 ? x : mx::astype(x, mx::float32));
}

class Softmax : public mx::Primitive {
 public:
  Softmax(mx::Stream stream, double scale, bool causal)
      : mx::Primitive(stream), scale_(scale), causal_(causal) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    const auto& x = inputs[0];
    auto& y = outputs[0];
    y.set_data(mx::allocator::malloc(y.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    encoder.set_input_array(x);
    encoder.set_output_array(y);
    SoftmaxArgs args{};
    args.scale = float(scale_);
    args.n = x.shape(-1);
    args.queries = x.ndim() >= 2 ? x.shape(-2) : 1;
    args.causal = causal_;
    args.x = x.data<float>();
    args.y = y.data<float>();
    const int64_t rows = args.n ? x.size() / args.n : 0;
    encoder.dispatch([args, rows, fn = detail::layer_fns().softmax]() {
      detail::parallel(rows, args.n, [&](int64_t r0, int64_t r1) { fn(args, r0, r1); });
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    only_cpu(name());
  }

  std::vector<mx::array> vjp(
      const std::vector<mx::array>&,
      const std::vector<mx::array>& cotangents,
      const std::vector<int>&,
      const std::vector<mx::array>& outputs) override;

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }

  const char* name() const override {
    return "KdSoftmax";
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const Softmax&>(other);
    return scale_ == o.scale_ && causal_ == o.causal_;
  }

 private:
  double scale_;
  bool causal_;
};

class SoftmaxGrad : public mx::Primitive {
 public:
  SoftmaxGrad(mx::Stream stream, double scale, bool causal)
      : mx::Primitive(stream), scale_(scale), causal_(causal) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    const auto& y = inputs[0];
    const auto& g = inputs[1];
    auto& dx = outputs[0];
    dx.set_data(mx::allocator::malloc(dx.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    encoder.set_input_array(y);
    encoder.set_input_array(g);
    encoder.set_output_array(dx);
    SoftmaxGradArgs args{};
    args.scale = float(scale_);
    args.n = y.shape(-1);
    args.queries = y.ndim() >= 2 ? y.shape(-2) : 1;
    args.causal = causal_;
    args.y = y.data<float>();
    args.g = g.data<float>();
    args.dx = dx.data<float>();
    const int64_t rows = args.n ? y.size() / args.n : 0;
    encoder.dispatch([args, rows, fn = detail::layer_fns().softmax_grad]() {
      detail::parallel(rows, args.n, [&](int64_t r0, int64_t r1) { fn(args, r0, r1); });
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
    throw std::invalid_argument("kd_kernels: the softmax's backward has no gradient of its own");
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }

  const char* name() const override {
    return "KdSoftmaxGrad";
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const SoftmaxGrad&>(other);
    return scale_ == o.scale_ && causal_ == o.causal_;
  }

 private:
  double scale_;
  bool causal_;
};

std::vector<mx::array> Softmax::vjp(
    const std::vector<mx::array>&,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>&,
    const std::vector<mx::array>& outputs) {
  const mx::array& y = outputs[0];
  return {mx::array(
      y.shape(),
      mx::float32,
      std::make_shared<SoftmaxGrad>(stream(), scale_, causal_),
      {y, dense_float(cotangents[0])})};
}

class Swiglu : public mx::Primitive {
 public:
  explicit Swiglu(mx::Stream stream) : mx::Primitive(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& y = outputs[0];
    y.set_data(mx::allocator::malloc(y.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    encoder.set_input_array(inputs[0]);
    encoder.set_input_array(inputs[1]);
    encoder.set_output_array(y);
    SwigluArgs args{};
    args.gate = inputs[0].data<float>();
    args.up = inputs[1].data<float>();
    args.y = y.data<float>();
    const int64_t n = y.size();
    encoder.dispatch([args, n, fn = detail::layer_fns().swiglu]() {
      detail::parallel(n, 1, [&](int64_t i0, int64_t i1) { fn(args, i0, i1); });
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
    return {inputs[0].shape()};
  }

  const char* name() const override {
    return "KdSwiglu";
  }

  bool is_equivalent(const mx::Primitive&) const override {
    return true;
  }
};

class SwigluGrad : public mx::Primitive {
 public:
  explicit SwigluGrad(mx::Stream stream) : mx::Primitive(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (const auto& x : inputs)
      encoder.set_input_array(x);
    for (auto& out : outputs) {
      out.set_data(mx::allocator::malloc(out.nbytes()));
      encoder.set_output_array(out);
    }
    SwigluArgs args{};
    args.gate = inputs[0].data<float>();
    args.up = inputs[1].data<float>();
    args.dy = inputs[2].data<float>();
    args.d_gate = outputs[0].data<float>();
    args.d_up = outputs[1].data<float>();
    const int64_t n = inputs[0].size();
    encoder.dispatch([args, n, fn = detail::layer_fns().swiglu_grad]() {
      detail::parallel(n, 1, [&](int64_t i0, int64_t i1) { fn(args, i0, i1); });
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
    throw std::invalid_argument("kd_kernels: SwiGLU's backward has no gradient of its own");
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape(), inputs[0].shape()};
  }

  const char* name() const override {
    return "KdSwigluGrad";
  }

  bool is_equivalent(const mx::Primitive&) const override {
    return true;
  }
};

std::vector<mx::array> Swiglu::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>&) {
  auto grads = mx::array::make_arrays(
      {primals[0].shape(), primals[0].shape()},
      {mx::float32, mx::float32},
      std::make_shared<SwigluGrad>(stream()),
      {primals[0], primals[1], dense_float(cotangents[0])});
  std::vector<mx::array> out;
  for (int arg : argnums)
    out.push_back(grads[arg]);
  return out;
}

}  // namespace

mx::array softmax(const mx::array& x, double scale, bool causal) {
  if (x.ndim() < 1)
    throw std::invalid_argument("kd_kernels: softmax needs at least one axis");
  if (causal && x.ndim() >= 2 && x.shape(-2) > x.shape(-1))
    throw std::invalid_argument("kd_kernels: causal scores need at least as many keys as queries");
  mx::array in = dense_float(x);
  return mx::array(
      in.shape(), mx::float32, std::make_shared<Softmax>(mx::to_stream({}), scale, causal), {in});
}

mx::array swiglu(const mx::array& gate, const mx::array& up) {
  if (gate.shape() != up.shape())
    throw std::invalid_argument("kd_kernels: swiglu's gate and up differ in shape");
  return mx::array(
      gate.shape(),
      mx::float32,
      std::make_shared<Swiglu>(mx::to_stream({})),
      {dense_float(gate), dense_float(up)});
}

}  // namespace kd_kernels
