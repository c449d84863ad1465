// Python bindings of the native row kernels (module kd_kernels._ext).
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include "kd_rows.h"
#include "mlx/version.h"

namespace nb = nanobind;
using namespace nb::literals;

#define KD_STR2(x) #x
#define KD_STR(x) KD_STR2(x)

NB_MODULE(_ext, m) {
  m.doc() = "kdcore's loss rows and Adam step as native MLX primitives (CPU)";

  m.def(
      "dense_rows",
      &kd_kernels::dense_rows,
      "scale"_a,
      "s"_a,
      "t"_a,
      "kind"_a,
      "coef"_a,
      "inv_t"_a,
      "inv_tt"_a,
      "(values [C], scale * d values / d s [C, V]) of a dense divergence (kind: index in "
      "kdcore's KINDS) between softmax(s * inv_t) and softmax(t * inv_tt).");
  m.def(
      "sparse_rows",
      &kd_kernels::sparse_rows,
      "scale"_a,
      "s"_a,
      "ids"_a,
      "lp"_a,
      "kind"_a,
      "coef"_a,
      "inv_t"_a,
      "tail"_a,
      "(values [C], scale * d values / d s [C, V]) of a divergence against a top-k teacher "
      "(tail 0: renormalize, 1: tail-bucket).");
  m.def(
      "cross_entropy_rows",
      &kd_kernels::cross_entropy_rows,
      "scale"_a,
      "s"_a,
      "labels"_a,
      "smoothing"_a,
      "ignore_index"_a,
      "(values [C], scale * d values / d s [C, V]) of the cross-entropy with labels [C].");
  m.def(
      "adam_step",
      &kd_kernels::adam_step,
      "gradient"_a,
      "parameter"_a,
      "m"_a,
      "v"_a,
      "scalars"_a,
      "bias_correction"_a,
      "(parameter, m, v) after one Adam(W) step of float32 arrays, in one pass (scalars: "
      "decay, b1, 1 - b1, b2, 1 - b2, eps, lr or c1, c2).");
  m.def(
      "softmax",
      &kd_kernels::softmax,
      "x"_a,
      "scale"_a,
      "causal"_a,
      "softmax(scale * x) over the last axis of float32 attention scores [..., queries, "
      "keys] (causal: query q sees keys up to q + keys - queries), with its gradient.");
  m.def(
      "swiglu",
      &kd_kernels::swiglu,
      "gate"_a,
      "up"_a,
      "silu(gate) * up of float32 arrays, with its gradient.");
  m.def(
      "flash_attention",
      &kd_kernels::flash_attention,
      "q"_a,
      "k"_a,
      "v"_a,
      "scale"_a,
      "causal"_a,
      "softmax(scale q k^T) v of float32 q [B, Hq, L, D] and k, v [B, Hkv, S, D] (causal: "
      "query i sees keys up to i + S - L), flash style (the scores never held), with its "
      "gradient.");
  m.def("isa", &kd_kernels::isa, "The instruction set the kernels use.");
  m.def("isas", &kd_kernels::isas, "The instruction sets this build can use on this CPU.");
  m.def("set_isa", &kd_kernels::set_isa, "name"_a, "Use another instruction set; returns the old.");
  m.def("threads", &kd_kernels::threads, "Threads per call (rows are split among them).");
  m.def("set_threads", &kd_kernels::set_threads, "n"_a, "Set the threads per call (0: all CPUs).");
  m.attr("mlx_version") = KD_STR(MLX_VERSION_MAJOR) "." KD_STR(MLX_VERSION_MINOR) "." KD_STR(
      MLX_VERSION_PATCH);
  m.attr("compiler") = KD_COMPILER;
  m.attr("flags") = KD_FLAGS;
}
