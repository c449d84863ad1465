// The MLX side of the native kernels (loss rows, the Adam step): ops, primitives, ISA choice
// and the threads.
#include "kd_rows.h"

#include <functional>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <thread>

#if defined(__linux__)
#include <sched.h>
#include <sys/mman.h>
#endif

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "rows.h"

namespace kd_kernels {

namespace {

struct Isa {
  const char* name;
  DenseFn dense;
  CrossEntropyFn cross_entropy;
  SparseFn sparse;
  AdamFn adam;
  SoftmaxFn softmax;
  SoftmaxGradFn softmax_grad;
  SwigluFn swiglu;
  SwigluFn swiglu_grad;
  AttentionFn attention;
  AttentionGradFn attention_grad;
  AttentionPackFn attention_pack;
  bool (*supported)();
};

bool always() {
  return true;
}

#if defined(KD_HAVE_X86_ISAS)
bool has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
bool has_avx512() {
  __builtin_cpu_init();
  return has_avx2() && __builtin_cpu_supports("avx512f");
}
#endif

// Best first.
const Isa kIsas[] = {
#if defined(KD_HAVE_X86_ISAS)
    {"avx512",
     isa_avx512::dense_rows,
     isa_avx512::cross_entropy_rows,
     isa_avx512::sparse_rows,
     isa_avx512::adam_step,
     isa_avx512::softmax_rows,
     isa_avx512::softmax_grad_rows,
     isa_avx512::swiglu,
     isa_avx512::swiglu_grad,
     isa_avx512::attention,
     isa_avx512::attention_grad,
     isa_avx512::attention_pack,
     has_avx512},
    {"avx2",
     isa_avx2::dense_rows,
     isa_avx2::cross_entropy_rows,
     isa_avx2::sparse_rows,
     isa_avx2::adam_step,
     isa_avx2::softmax_rows,
     isa_avx2::softmax_grad_rows,
     isa_avx2::swiglu,
     isa_avx2::swiglu_grad,
     isa_avx2::attention,
     isa_avx2::attention_grad,
     isa_avx2::attention_pack,
     has_avx2},
#endif
    {"base",
     isa_base::dense_rows,
     isa_base::cross_entropy_rows,
     isa_base::sparse_rows,
     isa_base::adam_step,
     isa_base::softmax_rows,
     isa_base::softmax_grad_rows,
     isa_base::swiglu,
     isa_base::swiglu_grad,
     isa_base::attention,
     isa_base::attention_grad,
     isa_base::attention_pack,
     always},
};

const Isa* find_isa(const std::string& name) {
  for (const auto& isa : kIsas)
    if (name == isa.name)
      return &isa;
  return nullptr;
}

std::atomic<const Isa*> g_isa{nullptr};
std::atomic<int> g_threads{0};

// KD_KERNELS_ISA picks a lower instruction set than the best one (say, to compare them).
const Isa* current_isa() {
  const Isa* isa = g_isa.load();
  if (isa != nullptr)
    return isa;
  const char* wanted = std::getenv("KD_KERNELS_ISA");
  for (const auto& candidate : kIsas) {
    if (!candidate.supported())
      continue;
    if (wanted == nullptr || *wanted == '\0' || std::string(wanted) == candidate.name) {
      isa = &candidate;
      break;
    }
  }
  if (isa == nullptr)
    isa = &kIsas[sizeof(kIsas) / sizeof(kIsas[0]) - 1];
  g_isa.store(isa);
  return isa;
}

int cpus_available() {
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0)
    return std::max(1, CPU_COUNT(&set));
#endif
  return std::max(1u, std::thread::hardware_concurrency());
}

int thread_count() {
  int n = g_threads.load();
  if (n > 0)
    return n;
  const char* env = std::getenv("KD_KERNELS_THREADS");
  n = env ? std::atoi(env) : 0;
  if (n <= 0)
    n = cpus_available();
  g_threads.store(n);
  return n;
}

// Rows split into contiguous ranges, one per thread; small calls stay on one thread (a
// thread start costs ~20 us, a 128k row ~100 us of work).
template <class F>
void parallel_rows(int64_t rows, int64_t vocab, F&& f) {
  constexpr int64_t kMinElementsPerThread = 1 << 16;
  int64_t n = std::min<int64_t>(thread_count(), rows);
  n = std::min<int64_t>(n, std::max<int64_t>(1, rows * vocab / kMinElementsPerThread));
  if (n <= 1) {
    f(0, rows);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(n - 1);
  const int64_t per = (rows + n - 1) / n;
  for (int64_t k = 1; k < n; ++k) {
    const int64_t r0 = k * per, r1 = std::min(rows, r0 + per);
    if (r0 < r1)
      pool.emplace_back([&f, r0, r1] { f(r0, r1); });
  }
  f(0, std::min(rows, per));
  for (auto& th : pool)
    th.join();
}

mx::array as_rows(const mx::array& x, const char* what) {
  if (x.ndim() != 2)
    throw std::invalid_argument(
        std::string("kd_kernels: ") + what + " must be [rows, vocab], got " +
        std::to_string(x.ndim()) + " dimensions");
  // Not mx::contiguous: it copies a view whose buffer is much larger than the view (a
  // chunk of rows sliced from a batch's logits), which would double the kernels' traffic.
  // RowView reads any view whose rows have adjacent elements in place.
  return (x.dtype() == mx::float32 || x.dtype() == mx::bfloat16) ? x
                                                                  : mx::astype(x, mx::float32);
}

// A [rows, vocab] input as the kernels read it: its first element and the distance between
// its rows (0 for a broadcast row). A view whose elements within a row are not adjacent (a
// transpose) is gathered into `owned` when the task runs, after its producers.
struct RowView {
  const void* data;
  int64_t stride;
  std::shared_ptr<std::vector<char>> owned;  // set when the rows must be gathered
  const char* source;
  int64_t source_strides[2];
  int64_t rows, vocab;
  size_t item;

  void gather() const {
    if (!owned)
      return;
    char* to = owned->data();
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < vocab; ++c)
        std::memcpy(
            to + (r * vocab + c) * item,
            source + (r * source_strides[0] + c * source_strides[1]) * item,
            item);
  }
};

RowView row_view(const mx::array& x) {
  RowView v{};
  v.rows = x.shape(0);
  v.vocab = x.shape(1);
  v.item = x.itemsize();
  if (x.strides()[1] == 1 || v.vocab == 1) {
    v.data = x.data<void>();
    v.stride = v.rows == 1 ? v.vocab : x.strides()[0];
    return v;
  }
  v.owned = std::make_shared<std::vector<char>>(v.rows * v.vocab * v.item);
  v.source = static_cast<const char*>(x.data<void>());
  v.source_strides[0] = x.strides()[0];
  v.source_strides[1] = x.strides()[1];
  v.data = v.owned->data();
  v.stride = v.vocab;
  return v;
}

// A gradient output of a whole batch (hundreds of MiB) is a fresh allocation each step
// (MLX's allocator does not cache buffers that large), and faulting it in 4 KiB pages cost
// as much as the kernel itself (measured 55 ms of 110 at 512 x 128,000 floats). Asking for
// transparent huge pages (where the kernel offers them on request) makes that ~512x fewer
// faults.
void prefer_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (bytes < 4 * kHuge)
    return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > begin)
    madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // advice only
#else
  (void)data;
  (void)bytes;
#endif
}

mx::array as_scale(const mx::array& scale, int rows) {
  mx::array s = mx::astype(scale, mx::float32);
  if (static_cast<int>(s.size()) == rows)
    s = mx::reshape(s, {rows});
  else if (s.size() == 1)
    s = mx::broadcast_to(mx::reshape(s, {1}), {rows});
  else
    throw std::invalid_argument(
        "kd_kernels: scale has " + std::to_string(s.size()) + " elements for " +
        std::to_string(rows) + " rows");
  return mx::contiguous(s);
}

void no_gpu(const char* name) {
  throw std::runtime_error(
      std::string("kd_kernels: ") + name +
      " runs on the CPU only; on a GPU kdcore uses its pure-MLX row functions");
}

}  // namespace

namespace detail {

void parallel(int64_t items, int64_t work_per_item, const std::function<void(int64_t, int64_t)>& f) {
  parallel_rows(items, work_per_item, f);
}

LayerFns layer_fns() {
  const Isa* isa = current_isa();
  return {
      isa->softmax,
      isa->softmax_grad,
      isa->swiglu,
      isa->swiglu_grad,
      isa->attention,
      isa->attention_grad,
      isa->attention_pack};
}

}  // namespace detail

std::string isa() {
  return current_isa()->name;
}

std::vector<std::string> isas() {
  std::vector<std::string> out;
  for (const auto& candidate : kIsas)
    if (candidate.supported())
      out.emplace_back(candidate.name);
  return out;
}

std::string set_isa(const std::string& name) {
  std::string before = isa();
  const Isa* wanted = find_isa(name);
  if (wanted == nullptr || !wanted->supported())
    throw std::invalid_argument("kd_kernels: instruction set '" + name + "' is not available here");
  g_isa.store(wanted);
  return before;
}

int threads() {
  return thread_count();
}

int set_threads(int n) {
  int before = thread_count();
  g_threads.store(n > 0 ? n : cpus_available());
  return before;
}

// ---------------------------------------------------------------- dense divergences

std::tuple<mx::array, mx::array> dense_rows(
    const mx::array& scale,
    const mx::array& s,
    const mx::array& t,
    int kind,
    double coef,
    double inv_t,
    double inv_tt) {
  if (kind < kForwardKL || kind > kTVD)
    throw std::invalid_argument("kd_kernels: unknown divergence kind " + std::to_string(kind));
  mx::array s_rows = as_rows(s, "student logits");
  mx::array t_rows = as_rows(t, "teacher logits");
  if (s_rows.shape() != t_rows.shape())
    throw std::invalid_argument("kd_kernels: student and teacher rows differ in shape");
  const int rows = s_rows.shape(0), vocab = s_rows.shape(1);
  mx::array w = as_scale(scale, rows);
  auto outputs = mx::array::make_arrays(
      {{rows}, {rows, vocab}},
      {mx::float32, mx::float32},
      std::make_shared<DenseRows>(mx::to_stream({}), kind, coef, inv_t, inv_tt),
      {w, s_rows, t_rows});
  return {outputs[0], outputs[1]};
}

void DenseRows::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  const auto& scale = inputs[0];
  const auto& s = inputs[1];
  const auto& t = inputs[2];
  auto& values = outputs[0];
  auto& grad = outputs[1];
  values.set_data(mx::allocator::malloc(values.nbytes()));
  grad.set_data(mx::allocator::malloc(grad.nbytes()));
  prefer_huge_pages(grad.data<void>(), grad.nbytes());
  auto& encoder = mx::cpu::get_command_encoder(stream());
  encoder.set_input_array(scale);
  encoder.set_input_array(s);
  encoder.set_input_array(t);
  encoder.set_output_array(values);
  encoder.set_output_array(grad);

  DenseArgs args;
  args.kind = kind_;
  args.coef = float(coef_);
  args.one_minus = float(1.0 - coef_);
  args.inv_t = float(inv_t_);
  args.inv_tt = float(inv_tt_);
  args.vocab = s.shape(1);
  const RowView sv = row_view(s), tv = row_view(t);
  args.s = sv.data;
  args.t = tv.data;
  args.s_stride = sv.stride;
  args.t_stride = tv.stride;
  args.s_bf16 = s.dtype() == mx::bfloat16;
  args.t_bf16 = t.dtype() == mx::bfloat16;
  args.scale = scale.data<float>();
  args.values = values.data<float>();
  args.grad = grad.data<float>();
  const int64_t rows = s.shape(0);
  encoder.dispatch([args, rows, sv, tv, fn = current_isa()->dense]() {
    sv.gather();
    tv.gather();
    parallel_rows(rows, args.vocab, [&](int64_t r0, int64_t r1) { fn(args, r0, r1); });
  });
}

void DenseRows::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  no_gpu(name());
}

// d values / d s with cotangent c [C] is this same kernel with scale := c (exact; the stored
// gradient is already multiplied by the forward's scale). The row functions' contract makes
// the gradient output a constant: a cotangent on it (a second-order use) is not followed.
// The teacher has no gradient here: asking for one raises.
std::vector<mx::array> DenseRows::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>&) {
  std::vector<mx::array> out;
  for (int arg : argnums) {
    if (arg == 1) {
      auto again = dense_rows(cotangents[0], primals[1], primals[2], kind_, coef_, inv_t_, inv_tt_);
      out.push_back(mx::astype(std::get<1>(again), primals[1].dtype()));
    } else if (arg == 0) {
      out.push_back(mx::zeros_like(primals[0]));
    } else {
      throw std::invalid_argument(
          "kd_kernels: the native divergence rows have no gradient with respect to the "
          "teacher; KD_KERNELS=pure uses the pure-MLX rows, which do");
    }
  }
  return out;
}

std::vector<mx::Shape> DenseRows::output_shapes(const std::vector<mx::array>& inputs) {
  return {{inputs[1].shape(0)}, inputs[1].shape()};
}

bool DenseRows::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const DenseRows&>(other);
  return kind_ == o.kind_ && coef_ == o.coef_ && inv_t_ == o.inv_t_ && inv_tt_ == o.inv_tt_;
}

// ---------------------------------------------------------------- top-k teachers

std::tuple<mx::array, mx::array> sparse_rows(
    const mx::array& scale,
    const mx::array& s,
    const mx::array& ids,
    const mx::array& lp,
    int kind,
    double coef,
    double inv_t,
    int tail) {
  if (kind < kForwardKL || kind > kTVD)
    throw std::invalid_argument("kd_kernels: unknown divergence kind " + std::to_string(kind));
  if (tail != kRenormalize && tail != kTailBucket)
    throw std::invalid_argument("kd_kernels: unknown tail policy " + std::to_string(tail));
  mx::array s_rows = as_rows(s, "student logits");
  const int rows = s_rows.shape(0), vocab = s_rows.shape(1);
  if (ids.ndim() != 2 || ids.shape(0) != rows)
    throw std::invalid_argument("kd_kernels: ids must be [rows, k]");
  const int k = ids.shape(1);
  if (lp.ndim() != 2 || lp.shape(0) != rows || lp.shape(1) != k + (tail == kTailBucket ? 1 : 0))
    throw std::invalid_argument(
        "kd_kernels: teacher log-probs must be [rows, k] (renormalize) or [rows, k + 1] "
        "(tail-bucket)");
  mx::array i = mx::contiguous(mx::astype(ids, mx::int32));
  mx::array l = mx::contiguous(mx::astype(lp, mx::float32));
  mx::array w = as_scale(scale, rows);
  auto outputs = mx::array::make_arrays(
      {{rows}, {rows, vocab}},
      {mx::float32, mx::float32},
      std::make_shared<SparseRows>(mx::to_stream({}), kind, coef, inv_t, tail),
      {w, s_rows, i, l});
  return {outputs[0], outputs[1]};
}

void SparseRows::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  const auto& scale = inputs[0];
  const auto& s = inputs[1];
  const auto& ids = inputs[2];
  const auto& lp = inputs[3];
  auto& values = outputs[0];
  auto& grad = outputs[1];
  values.set_data(mx::allocator::malloc(values.nbytes()));
  grad.set_data(mx::allocator::malloc(grad.nbytes()));
  prefer_huge_pages(grad.data<void>(), grad.nbytes());
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (const auto& x : inputs)
    encoder.set_input_array(x);
  encoder.set_output_array(values);
  encoder.set_output_array(grad);

  SparseArgs args;
  args.kind = kind_;
  args.tail = tail_;
  args.coef = coef_;
  args.inv_t = float(inv_t_);
  args.vocab = s.shape(1);
  args.k = ids.shape(1);
  const RowView sv = row_view(s);
  args.s = sv.data;
  args.s_stride = sv.stride;
  args.s_bf16 = s.dtype() == mx::bfloat16;
  args.ids = ids.data<int32_t>();
  args.lp = lp.data<float>();
  args.scale = scale.data<float>();
  args.values = values.data<float>();
  args.grad = grad.data<float>();
  const int64_t rows = s.shape(0);
  encoder.dispatch([args, rows, sv, fn = current_isa()->sparse]() {
    sv.gather();
    parallel_rows(rows, args.vocab, [&](int64_t r0, int64_t r1) { fn(args, r0, r1); });
  });
}

void SparseRows::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  no_gpu(name());
}

std::vector<mx::array> SparseRows::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>&) {
  std::vector<mx::array> out;
  for (int arg : argnums) {
    if (arg == 1) {
      auto again = sparse_rows(
          cotangents[0], primals[1], primals[2], primals[3], kind_, coef_, inv_t_, tail_);
      out.push_back(mx::astype(std::get<1>(again), primals[1].dtype()));
    } else if (arg == 3) {
      throw std::invalid_argument(
          "kd_kernels: the native top-k rows have no gradient with respect to the teacher; "
          "KD_KERNELS=pure uses the pure-MLX rows, which do");
    } else {
      out.push_back(mx::zeros_like(primals[arg]));
    }
  }
  return out;
}

std::vector<mx::Shape> SparseRows::output_shapes(const std::vector<mx::array>& inputs) {
  return {{inputs[1].shape(0)}, inputs[1].shape()};
}

bool SparseRows::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const SparseRows&>(other);
  return kind_ == o.kind_ && coef_ == o.coef_ && inv_t_ == o.inv_t_ && tail_ == o.tail_;
}

// ---------------------------------------------------------------- cross-entropy

std::tuple<mx::array, mx::array> cross_entropy_rows(
    const mx::array& scale,
    const mx::array& s,
    const mx::array& labels,
    double smoothing,
    int ignore_index) {
  mx::array s_rows = as_rows(s, "student logits");
  const int rows = s_rows.shape(0), vocab = s_rows.shape(1);
  if (static_cast<int>(labels.size()) != rows)
    throw std::invalid_argument(
        "kd_kernels: " + std::to_string(labels.size()) + " labels for " + std::to_string(rows) +
        " rows");
  mx::array l = mx::contiguous(mx::reshape(mx::astype(labels, mx::int32), {rows}));
  mx::array w = as_scale(scale, rows);
  auto outputs = mx::array::make_arrays(
      {{rows}, {rows, vocab}},
      {mx::float32, mx::float32},
      std::make_shared<CrossEntropyRows>(mx::to_stream({}), smoothing, ignore_index),
      {w, s_rows, l});
  return {outputs[0], outputs[1]};
}

void CrossEntropyRows::eval_cpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  const auto& scale = inputs[0];
  const auto& s = inputs[1];
  const auto& labels = inputs[2];
  auto& values = outputs[0];
  auto& grad = outputs[1];
  values.set_data(mx::allocator::malloc(values.nbytes()));
  grad.set_data(mx::allocator::malloc(grad.nbytes()));
  prefer_huge_pages(grad.data<void>(), grad.nbytes());
  auto& encoder = mx::cpu::get_command_encoder(stream());
  encoder.set_input_array(scale);
  encoder.set_input_array(s);
  encoder.set_input_array(labels);
  encoder.set_output_array(values);
  encoder.set_output_array(grad);

  CrossEntropyArgs args;
  args.smoothing = float(smoothing_);
  args.one_minus = float(1.0 - smoothing_);
  args.ignore_index = ignore_index_;
  args.vocab = s.shape(1);
  const RowView sv = row_view(s);
  args.s = sv.data;
  args.s_stride = sv.stride;
  args.s_bf16 = s.dtype() == mx::bfloat16;
  args.labels = labels.data<int32_t>();
  args.scale = scale.data<float>();
  args.values = values.data<float>();
  args.grad = grad.data<float>();
  const int64_t rows = s.shape(0);
  encoder.dispatch([args, rows, sv, fn = current_isa()->cross_entropy]() {
    sv.gather();
    parallel_rows(rows, args.vocab, [&](int64_t r0, int64_t r1) { fn(args, r0, r1); });
  });
}

void CrossEntropyRows::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  no_gpu(name());
}

std::vector<mx::array> CrossEntropyRows::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>&) {
  std::vector<mx::array> out;
  for (int arg : argnums) {
    if (arg == 1) {
      auto again =
          cross_entropy_rows(cotangents[0], primals[1], primals[2], smoothing_, ignore_index_);
      out.push_back(mx::astype(std::get<1>(again), primals[1].dtype()));
    } else {
      out.push_back(mx::zeros_like(primals[arg]));
    }
  }
  return out;
}

std::vector<mx::Shape> CrossEntropyRows::output_shapes(const std::vector<mx::array>& inputs) {
  return {{inputs[1].shape(0)}, inputs[1].shape()};
}

bool CrossEntropyRows::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const CrossEntropyRows&>(other);
  return smoothing_ == o.smoothing_ && ignore_index_ == o.ignore_index_;
}

// ---------------------------------------------------------------- the Adam step

namespace {

// A float32 input as the step reads it: its own buffer when it is dense and row-major,
// else gathered element by element when the task runs (a strided or broadcast view: rare).
struct DenseInput {
  const float* data;
  std::shared_ptr<std::vector<float>> owned;
  const float* source;
  mx::Shape shape;
  mx::Strides strides;

  void gather() const {
    if (!owned)
      return;
    const int64_t n = static_cast<int64_t>(owned->size());
    for (int64_t i = 0; i < n; ++i) {
      int64_t rest = i, at = 0;
      for (int d = static_cast<int>(shape.size()) - 1; d >= 0; --d) {
        at += (rest % shape[d]) * strides[d];
        rest /= shape[d];
      }
      (*owned)[i] = source[at];
    }
  }
};

bool is_dense(const mx::array& x) {
  return x.flags().row_contiguous && x.data_size() == x.size();
}

DenseInput dense_input(const mx::array& x) {
  DenseInput in{};
  if (is_dense(x)) {
    in.data = x.data<float>();
    return in;
  }
  in.owned = std::make_shared<std::vector<float>>(x.size());
  in.source = x.data<float>();
  in.shape = x.shape();
  in.strides = x.strides();
  in.data = in.owned->data();
  return in;
}

// The output takes over the input's buffer when nothing else holds it (MLX's own
// element-wise ops do the same): the step then runs in place.
void set_output(mx::array& out, const mx::array& in) {
  if (in.is_donatable() && is_dense(in))
    out.copy_shared_buffer(in);
  else
    out.set_data(mx::allocator::malloc(out.nbytes()));
}

}  // namespace

std::tuple<mx::array, mx::array, mx::array> adam_step(
    const mx::array& gradient,
    const mx::array& parameter,
    const mx::array& m,
    const mx::array& v,
    const mx::array& scalars,
    bool bias_correction) {
  for (const auto* x : {&gradient, &parameter, &m, &v}) {
    if (x->dtype() != mx::float32)
      throw std::invalid_argument("kd_kernels: the Adam step takes float32 arrays only");
    if (x->shape() != parameter.shape())
      throw std::invalid_argument("kd_kernels: gradient, parameter, m and v differ in shape");
  }
  if (scalars.size() != kAdamScalars)
    throw std::invalid_argument(
        "kd_kernels: the Adam step takes " + std::to_string(kAdamScalars) + " scalars");
  mx::array k = mx::reshape(mx::astype(scalars, mx::float32), {kAdamScalars});
  auto outputs = mx::array::make_arrays(
      {parameter.shape(), parameter.shape(), parameter.shape()},
      {mx::float32, mx::float32, mx::float32},
      std::make_shared<AdamStep>(mx::to_stream({}), bias_correction),
      {gradient, parameter, m, v, k});
  return {outputs[0], outputs[1], outputs[2]};
}

namespace {

// A 2-D array that is the transpose of a dense one: what value_and_grad gives for a Linear
// weight (the gradient of w.T, transposed back). The kernel reads it in tiles.
bool is_transposed(const mx::array& x) {
  return x.ndim() == 2 && x.strides(0) == 1 && x.strides(1) == x.shape(0) &&
      x.data_size() == x.size();
}

}  // namespace

void AdamStep::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (const auto& x : inputs)
    encoder.set_input_array(x);
  const bool transposed = !is_dense(inputs[0]) && is_transposed(inputs[0]);
  const DenseInput g = transposed ? DenseInput{inputs[0].data<float>()} : dense_input(inputs[0]);
  const DenseInput p = dense_input(inputs[1]);
  const DenseInput m = dense_input(inputs[2]), v = dense_input(inputs[3]);
  // Each of a primitive's outputs holds its own copy of the inputs (array::make_arrays), so
  // here every input is held at least three times and is_donatable() never holds: the
  // step would write three fresh arrays (a GB at 81M parameters) and leave the old ones to
  // be freed. The siblings' copies go now, as array::detach drops them right after this
  // eval; a tracer keeps its graph.
  if (!outputs[0].is_tracer())
    for (auto& out : outputs)
      if (&out.inputs() != &inputs)
        out.inputs().clear();
  for (int i = 0; i < 3; ++i) {
    set_output(outputs[i], inputs[i + 1]);
    encoder.set_output_array(outputs[i]);
  }
  AdamArgs args{};
  args.bias_correction = bias_correction_;
  if (transposed) {
    args.g_rows = inputs[0].shape(0);
    args.g_cols = inputs[0].shape(1);
  }
  args.p = outputs[0].data<float>();
  args.m = outputs[1].data<float>();
  args.v = outputs[2].data<float>();
  const float* k = inputs[4].data<float>();
  const int64_t n = inputs[1].size();
  encoder.dispatch([args, n, g, p, m, v, k, fn = current_isa()->adam]() mutable {
    // the scalars (a learning-rate schedule's value) are read when the task runs
    args.decay = k[0];
    args.b1 = k[1];
    args.one_minus_b1 = k[2];
    args.b2 = k[3];
    args.one_minus_b2 = k[4];
    args.eps = k[5];
    args.lr = k[6];
    args.c2 = k[7];
    for (const auto* x : {&g, &p, &m, &v})
      x->gather();
    args.g = g.data;
    args.p_in = p.data;
    args.m_in = m.data;
    args.v_in = v.data;
    if (args.g_cols == 0) {
      parallel_rows(n, 1, [&](int64_t i0, int64_t i1) { fn(args, i0, i1); });
      return;
    }
    // whole tiles per thread: each reads its own runs of g's columns
    const int64_t rows = args.g_rows, cols = args.g_cols;
    const int64_t tiles = (rows + kAdamRows - 1) / kAdamRows;
    parallel_rows(tiles, kAdamRows * cols, [&](int64_t t0, int64_t t1) {
      fn(args, t0 * kAdamRows * cols, std::min(rows, t1 * kAdamRows) * cols);
    });
  });
}

void AdamStep::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  no_gpu(name());
}

std::vector<mx::array> AdamStep::vjp(
    const std::vector<mx::array>&,
    const std::vector<mx::array>&,
    const std::vector<int>&,
    const std::vector<mx::array>&) {
  throw std::invalid_argument("kd_kernels: the Adam step has no gradient");
}

std::vector<mx::Shape> AdamStep::output_shapes(const std::vector<mx::array>& inputs) {
  return {inputs[1].shape(), inputs[1].shape(), inputs[1].shape()};
}

bool AdamStep::is_equivalent(const mx::Primitive& other) const {
  return bias_correction_ == static_cast<const AdamStep&>(other).bias_correction_;
}

}  // namespace kd_kernels
