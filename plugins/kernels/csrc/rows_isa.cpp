// The row kernels, one instruction set per object (KD_ISA names it, KD_W is its width).
//
// Per row of V logits, with z = s / T and y = t / T_t (multiplied by the reciprocal and
// rounded, as the pure path does):
//
//   pass 1  block by block (logsumexp_block): the running maxima m of z and y, the sums
//           Z_q = sum exp(z - max z) and Z_p, and the exps e = exp(z - m) themselves, kept
//           in the gradient row (the student's) and a scratch row (the teacher's)
//                                                             (reads s, t from memory)
//   pass 2  q = e * exp(m_block - max z - log Z_q), p likewise (no exp: one factor per
//           block); lq = z - max z - log Z_q, lp likewise; the per-row value and, for every
//           kind but forward_kl, g = d value / d lq and its sum G; writes g and keeps q
//           (forward_kl writes the final gradient (q - p) * scale / T instead)
//                                                             (s, t, e: in L2 by now)
//   pass 3  (not forward_kl) grad = (g - q G) * scale / T    (g and q from L2)
//
// A row of 128k float32 logits is 512 KiB per input, so passes 2-3 run from the core's
// 2 MiB L2: memory sees s and t read once and the gradient written once, and each logit
// costs two exps (one per distribution). Sums are float32 lanes over blocks of BLOCK
// elements, added into doubles between blocks. The last partial vector reads -inf logits
// and 0 probabilities, which add exactly 0 to every sum and gradient below.
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "rows.h"
#include "simd.h"

namespace kd_kernels {
namespace KD_NS {

using namespace kd_simd;
using Full = std::true_type;
using Part = std::false_type;

constexpr int64_t BLOCK = 64 * W;

// Loads of logits pad the last partial vector with -inf, loads of probabilities with 0.
template <class T>
static inline vf ld(const T* p, int64_t i, int64_t, Full, float = 0.0f) {
  return load(p + i);
}

template <class T>
static inline vf ld(const T* p, int64_t i, int64_t n, Part, float pad = -kInf) {
  float tmp[W];
  for (int k = 0; k < W; ++k)
    tmp[k] = i + k < n ? to_float(p[i + k]) : pad;
  return load(tmp);
}

template <class F>
static inline vf ld0(const float* p, int64_t i, int64_t n, F full) {
  return ld(p, i, n, full, 0.0f);
}

static inline void st(float* p, int64_t i, int64_t, vf v, Full) {
  store(p + i, v);
}

static inline void st(float* p, int64_t i, int64_t n, vf v, Part) {
  float tmp[W];
  store(tmp, v);
  std::memcpy(p + i, tmp, sizeof(float) * (n - i));
}

// f(i, Full, b) for every whole vector of block b, f(i, Part, b) for the last partial one;
// done() after each block of BLOCK elements (where lane sums join their double totals).
template <class F, class D>
static inline void sweep(int64_t n, F&& f, D&& done) {
  int64_t i = 0;
  for (int64_t b = 0; i < n; ++b) {
    const int64_t end = std::min(n, i + BLOCK);
    for (; i + W <= end; i += W)
      f(i, Full{}, b);
    if (i < end) {
      f(i, Part{}, b);
      i = end;
    }
    done();
  }
}

static inline vf zero() {
  return splat(0.0f);
}

// One block of the streaming log-sum-exp of x * inv: the block's maximum first (the block
// is then in L1), the running sum rescaled if the maximum grew, then e = exp(x * inv - m)
// summed (and stored when Store), so memory sees each logit once and the exps overlap the
// stream. The terms are the pure path's exp(z - max z) times exp(m - max z).
template <bool Store, class T>
static inline void logsumexp_block(
    const T* x, int64_t i, int64_t end, int64_t n, float inv, float& m, double& sum, float* e) {
  vf bm = splat(-kInf);
  int64_t j = i;
  // The next block is fetched while this one is computed: the hardware prefetchers stop
  // at 4 KiB pages, a float32 block's size at 16 lanes, and the row is streamed from DRAM.
  for (; j + W <= end; j += W) {
    __builtin_prefetch(x + j + BLOCK, 0, 3);
    bm = vmax(load(x + j), bm);
  }
  if (j < end)
    bm = vmax(ld(x, j, n, Part{}), bm);
  const float b = hmax(bm) * inv;  // max(x) * inv == max(x * inv): rounding is monotone
  if (b > m) {
    if (sum != 0.0)
      sum *= std::exp(double(m) - double(b));
    m = b;
  }
  if (m == -kInf) {  // every logit so far is -inf (or NaN): nothing to add, NaN kept
    for (int64_t k = i; k < end; ++k) {
      if (std::isnan(to_float(x[k])))
        sum = std::numeric_limits<double>::quiet_NaN();
      if constexpr (Store)
        e[k] = 0.0f;
    }
    return;
  }
  vf acc = zero();
  for (j = i; j + W <= end; j += W) {
    vf v = exp(load(x + j) * inv - m);
    acc += v;
    if constexpr (Store)
      store(e + j, v);
  }
  if (j < end) {
    vf v = exp(ld(x, j, n, Part{}) * inv - m);
    acc += v;
    if constexpr (Store)
      st(e, j, n, v, Part{});
  }
  sum += hsum(acc);
}

// Pass 1 over one row: fills e (when Store) and, per block, the factor that turns e into
// the probability: exp(m_block - max - log Z). Returns (max, log Z).
template <bool Store, class T>
static inline void softmax_pass(
    const T* x, int64_t n, float inv, float* e, float* factors, float& max, float& lz) {
  max = -kInf;
  double sum = 0.0;
  int64_t blocks = 0;
  for (int64_t i = 0; i < n; i += BLOCK, ++blocks) {
    logsumexp_block<Store>(x, i, std::min(n, i + BLOCK), n, inv, max, sum, e);
    factors[blocks] = max;  // the block's running maximum, for now
  }
  lz = float(std::log(sum));
  if constexpr (Store)
    for (int64_t b = 0; b < blocks; ++b)  // NaN when the row is all -inf: so is the pure path
      factors[b] = float(std::exp(double(factors[b]) - double(max) - double(lz)));
}

// Per-element value v and g = d v / d lq of each divergence (kdcore row_terms, same guards:
// a term whose weight q or p is 0 is 0). m is clamped to FLT_MIN, which changes only
// elements whose p and q are both below it (their terms are below 1e-36).
template <int K>
static inline void terms(vf lq, vf lp, vf q, vf p, float c, float c1, vf& v, vf& g) {
  if constexpr (K == kReverseKL) {
    v = select(q > 0.0f, q * (lq - lp), zero());
    g = v;
  } else if constexpr (K == kGJSD) {
    vf lm = log(vmax(c * p + c1 * q, splat(kMinNormal)));
    vf tq = select(q > 0.0f, q * (lq - lm), zero());
    vf tp = select(p > 0.0f, p * (lp - lm), zero());
    v = c * tp + c1 * tq;
    g = c1 * tq;
  } else if constexpr (K == kSkewKL) {
    vf m = vmax(c * p + c1 * q, splat(kMinNormal));
    vf lm = log(m);
    vi has = p > 0.0f;
    v = select(has, p * (lp - lm), zero());
    g = select(has, -c1 * (p * (q / m)), zero());
  } else if constexpr (K == kSkewReverseKL) {
    vf m = vmax(c * q + c1 * p, splat(kMinNormal));
    vf lm = log(m);
    vi has = q > 0.0f;
    v = select(has, q * (lq - lm), zero());
    g = v + c1 * select(has, q * (p / m), zero());
  } else {  // kTVD
    vf d = q - p;
    v = 0.5f * vabs(d);
    g = 0.5f * vsign(d) * q;
  }
}


// The kinds whose value and gradient need p = exp(lp) (reverse_kl needs only lp).
template <int K>
constexpr bool kNeedsP = K != kReverseKL;

// Per thread, reused row after row (so it stays in L2): the teacher's exps, then q; the
// blocks' factors.
struct Scratch {
  explicit Scratch(int64_t n) : e(n), fs(n / BLOCK + 1), ft(n / BLOCK + 1) {}
  std::vector<float> e, fs, ft;
};

template <int K, class TS, class TT>
static void dense_row(
    const DenseArgs& a,
    const TS* s,
    const TT* t,
    float scale,
    float* value,
    float* out,
    Scratch& w) {
  const int64_t n = a.vocab;
  const float inv_t = a.inv_t, inv_tt = a.inv_tt;
  float* e = w.e.data();
  const float* fs = w.fs.data();
  const float* ft = w.ft.data();
  float max_s, max_t, lz_s, lz_t;
  softmax_pass<true>(s, n, inv_t, out, w.fs.data(), max_s, lz_s);
  softmax_pass<kNeedsP<K>>(t, n, inv_tt, e, w.ft.data(), max_t, lz_t);
  const float factor = scale * inv_t;

  vf acc_v = zero(), acc_g = zero();
  double total_v = 0.0, total_g = 0.0;
  auto flush = [&] {
    total_v += hsum(acc_v);
    total_g += hsum(acc_g);
    acc_v = acc_g = zero();
  };
  if constexpr (K == kForwardKL) {
    sweep(
        n,
        [&](int64_t i, auto full, int64_t b) {
          vf lq = (ld(s, i, n, full) * inv_t - max_s) - lz_s;
          vf lp = (ld(t, i, n, full) * inv_tt - max_t) - lz_t;
          vf q = ld0(out, i, n, full) * fs[b], p = ld0(e, i, n, full) * ft[b];
          acc_v += select(p > 0.0f, p * (lp - lq), zero());
          st(out, i, n, (q - p) * factor, full);
        },
        flush);
    *value = float(total_v);
    return;
  } else {
    sweep(
        n,
        [&](int64_t i, auto full, int64_t b) {
          vf lq = (ld(s, i, n, full) * inv_t - max_s) - lz_s;
          vf lp = (ld(t, i, n, full) * inv_tt - max_t) - lz_t;
          vf q = ld0(out, i, n, full) * fs[b];
          vf p = kNeedsP<K> ? ld0(e, i, n, full) * ft[b] : zero();
          vf v, g;
          terms<K>(lq, lp, q, p, a.coef, a.one_minus, v, g);
          acc_v += v;
          acc_g += g;
          st(out, i, n, g, full);
          st(e, i, n, q, full);
        },
        flush);
    const float total = float(total_g);
    sweep(
        n,
        [&](int64_t i, auto full, int64_t) {
          vf g = ld0(out, i, n, full), q = ld0(e, i, n, full);
          st(out, i, n, (g - q * total) * factor, full);
        },
        [] {});
    *value = float(total_v);
  }
}

template <int K, class TS, class TT>
static void dense_rows_of(const DenseArgs& a, int64_t r0, int64_t r1) {
  const TS* s = static_cast<const TS*>(a.s);
  const TT* t = static_cast<const TT*>(a.t);
  const int64_t n = a.vocab;
  Scratch w(n);
  for (int64_t r = r0; r < r1; ++r)
    dense_row<K>(a, s + r * a.s_stride, t + r * a.t_stride, a.scale[r], a.values + r, a.grad + r * n, w);
}

template <int K>
static void dense_kind(const DenseArgs& a, int64_t r0, int64_t r1) {
  if (a.s_bf16 && a.t_bf16)
    dense_rows_of<K, uint16_t, uint16_t>(a, r0, r1);
  else if (a.s_bf16)
    dense_rows_of<K, uint16_t, float>(a, r0, r1);
  else if (a.t_bf16)
    dense_rows_of<K, float, uint16_t>(a, r0, r1);
  else
    dense_rows_of<K, float, float>(a, r0, r1);
}

void dense_rows(const DenseArgs& a, int64_t r0, int64_t r1) {
  switch (a.kind) {
    case kForwardKL:
      return dense_kind<kForwardKL>(a, r0, r1);
    case kReverseKL:
      return dense_kind<kReverseKL>(a, r0, r1);
    case kGJSD:
      return dense_kind<kGJSD>(a, r0, r1);
    case kSkewKL:
      return dense_kind<kSkewKL>(a, r0, r1);
    case kSkewReverseKL:
      return dense_kind<kSkewReverseKL>(a, r0, r1);
    default:
      return dense_kind<kTVD>(a, r0, r1);
  }
}

// Cross-entropy with labels (kdcore.kernels.fused.cross_entropy_rows): value
// (1 - e) nll - e mean_v(lq) (nll 0 at the ignore index), gradient
// ((1 - e) (q - onehot) keep + e (q - 1 / V)) * scale. One exp per logit (pass 1 keeps
// them in the gradient row), then one multiply.
template <class TS>
static void cross_entropy_row(
    const CrossEntropyArgs& a,
    const TS* s,
    int32_t label,
    float scale,
    float* value,
    float* out,
    std::vector<float>& factors) {
  const int64_t n = a.vocab;
  const bool keep = label != a.ignore_index;
  if (keep && (label < 0 || label >= n)) {
    // Out of range: never index outside the row; NaN makes the bad label visible.
    const float nan = std::numeric_limits<float>::quiet_NaN();
    *value = nan;
    std::fill(out, out + n, nan);
    return;
  }
  float max_s, lz;
  softmax_pass<true>(s, n, 1.0f, out, factors.data(), max_s, lz);
  const float* fs = factors.data();
  const int32_t at = keep ? label : 0;
  const float lq_label = (to_float(s[at]) - max_s) - lz;
  const float keep_f = keep ? 1.0f : 0.0f;
  const float nll = keep ? -lq_label : 0.0f;
  const float q_label = out[at] * fs[at / BLOCK];  // what the sweep computes there
  if (a.smoothing == 0.0f) {
    const float f = scale * keep_f;
    sweep(
        n,
        [&](int64_t i, auto full, int64_t b) {
          st(out, i, n, (ld0(out, i, n, full) * fs[b]) * f, full);
        },
        [] {});
    out[at] = (q_label - 1.0f) * f;
    *value = nll;
    return;
  }
  const float e = a.smoothing, e1 = a.one_minus, inv_n = float(1.0 / double(n));
  vf xs = zero();
  double shifted = 0.0;  // sum of (x - max): the mean of log q is shifted / n - lz
  sweep(
      n,
      [&](int64_t i, auto full, int64_t b) {
        vf q = ld0(out, i, n, full) * fs[b];
        st(out, i, n, (e1 * (q * keep_f) + e * (q - inv_n)) * scale, full);
        vf x = ld(s, i, n, full) - max_s;
        if constexpr (std::is_same_v<decltype(full), Full>)
          xs += x;
        else  // not the padding's -inf
          for (int k = 0; i + k < n; ++k)
            shifted += x[k];
      },
      [&] {
        shifted += hsum(xs);
        xs = zero();
      });
  const float mean_lq = float(shifted / double(n)) - lz;
  *value = e1 * nll - e * mean_lq;
  out[at] = (e1 * ((q_label - 1.0f) * keep_f) + e * (q_label - inv_n)) * scale;
}

template <class TS>
static void cross_entropy_rows_of(const CrossEntropyArgs& a, int64_t r0, int64_t r1) {
  const TS* s = static_cast<const TS*>(a.s);
  const int64_t n = a.vocab;
  std::vector<float> factors(n / BLOCK + 1);
  for (int64_t r = r0; r < r1; ++r)
    cross_entropy_row(
        a, s + r * a.s_stride, a.labels[r], a.scale[r], a.values + r, a.grad + r * n, factors);
}

void cross_entropy_rows(const CrossEntropyArgs& a, int64_t r0, int64_t r1) {
  if (a.s_bf16)
    cross_entropy_rows_of<uint16_t>(a, r0, r1);
  else
    cross_entropy_rows_of<float>(a, r0, r1);
}

// ---------------------------------------------------------------- top-k teachers

// kdcore row_terms over a few classes (the support), in double: value and g = d / d lq.
static double support_terms(
    int kind, double c, const double* lq, const double* lp, int64_t m, double* g) {
  double value = 0.0;
  auto xlogy = [](double a, double b) { return a > 0.0 ? a * b : 0.0; };
  auto logaddexp = [](double x, double y) {
    const double hi = std::max(x, y), lo = std::min(x, y);
    return hi == -HUGE_VAL ? hi : hi + std::log1p(std::exp(lo - hi));
  };
  for (int64_t j = 0; j < m; ++j) {
    const double q = std::exp(lq[j]), p = std::exp(lp[j]);
    switch (kind) {
      case kForwardKL:
        value += xlogy(p, lp[j] - lq[j]);
        g[j] = -p;
        break;
      case kReverseKL: {
        const double term = xlogy(q, lq[j] - lp[j]);
        value += term;
        g[j] = term + q;
        break;
      }
      case kGJSD: {
        const double lm = logaddexp(lp[j] + std::log(c), lq[j] + std::log1p(-c));
        const double tq = xlogy(q, lq[j] - lm);
        value += c * xlogy(p, lp[j] - lm) + (1.0 - c) * tq;
        g[j] = (1.0 - c) * tq;
        break;
      }
      case kSkewKL: {
        const double lm = logaddexp(lp[j] + std::log(c), lq[j] + std::log(1.0 - c));
        value += xlogy(p, lp[j] - lm);
        g[j] = -(1.0 - c) * xlogy(p, std::exp(lq[j] - lm));
        break;
      }
      case kSkewReverseKL: {
        const double lm = logaddexp(lq[j] + std::log(c), lp[j] + std::log(1.0 - c));
        const double term = xlogy(q, lq[j] - lm);
        value += term;
        g[j] = term + (1.0 - c) * xlogy(q, std::exp(lp[j] - lm));
        break;
      }
      default: {
        const double d = q - p;
        value += 0.5 * std::fabs(d);
        g[j] = 0.5 * (d > 0.0 ? 1.0 : (d < 0.0 ? -1.0 : 0.0)) * q;
      }
    }
  }
  return value;
}

struct SparseScratch {
  SparseScratch(int64_t n, int64_t k)
      : outside(n, 1.0f), factors(n / BLOCK + 1), lq(k + 1), lp(k + 1), g(k + 1) {}
  std::vector<float> outside;  // 1 off the support, 0 on it (reset after each row)
  std::vector<float> factors;
  std::vector<double> lq, lp, g;
};

// Renormalize: both distributions over the k support ids only; the gradient is 0 elsewhere.
// Tail-bucket: k + 1 classes, the student's tail mass summed over the complement (as the
// pure path does, so a small tail keeps its precision), floored at 1e-30, the teacher's
// tail log-probability at log(1e-30).
template <class TS>
static void sparse_row(
    const SparseArgs& a,
    const TS* s,
    const int32_t* ids,
    const float* lp,
    float scale,
    float* value,
    float* out,
    SparseScratch& w) {
  const int64_t n = a.vocab, k = a.k;
  const float inv_t = a.inv_t, factor = scale * inv_t;
  for (int64_t j = 0; j < k; ++j) {
    if (ids[j] < 0 || ids[j] >= n) {  // never index outside the row; NaN shows it
      const float nan = std::numeric_limits<float>::quiet_NaN();
      *value = nan;
      std::fill(out, out + n, nan);
      return;
    }
  }
  double* lq = w.lq.data();
  double* lpd = w.lp.data();
  double* g = w.g.data();
  if (a.tail == kRenormalize) {
    std::fill(out, out + n, 0.0f);
    double m = -HUGE_VAL;
    for (int64_t j = 0; j < k; ++j) {
      lq[j] = double(to_float(s[ids[j]]) * inv_t);
      m = std::max(m, lq[j]);
    }
    double sum = 0.0;
    for (int64_t j = 0; j < k; ++j)
      sum += std::exp(lq[j] - m);
    const double lse = std::log(sum);
    for (int64_t j = 0; j < k; ++j) {
      lq[j] = (lq[j] - m) - lse;
      lpd[j] = lp[j];
    }
    *value = float(support_terms(a.kind, a.coef, lq, lpd, k, g));
    double total = 0.0;
    for (int64_t j = 0; j < k; ++j)
      total += g[j];
    for (int64_t j = 0; j < k; ++j)
      out[ids[j]] = float((g[j] - std::exp(lq[j]) * total) * double(factor));
    return;
  }

  float max_s, lz;
  softmax_pass<true>(s, n, inv_t, out, w.factors.data(), max_s, lz);
  const float* fs = w.factors.data();
  float* outside = w.outside.data();
  for (int64_t j = 0; j < k; ++j)
    outside[ids[j]] = 0.0f;
  vf acc = zero();
  double rest = 0.0;
  sweep(
      n,
      [&](int64_t i, auto full, int64_t b) {
        vf q = ld0(out, i, n, full) * fs[b];
        acc += q * ld0(outside, i, n, full);
        st(out, i, n, q, full);
      },
      [&] {
        rest += hsum(acc);
        acc = zero();
      });
  const double mass = std::max(rest, 1e-30);
  for (int64_t j = 0; j < k; ++j) {
    lq[j] = double((to_float(s[ids[j]]) * inv_t - max_s) - lz);
    lpd[j] = lp[j];
  }
  lq[k] = std::log(mass);
  lpd[k] = std::max(double(lp[k]), std::log(1e-30));
  *value = float(support_terms(a.kind, a.coef, lq, lpd, k + 1, g));
  double total_d = 0.0;
  for (int64_t j = 0; j <= k; ++j)
    total_d += g[j];
  const float total = float(total_d), per_tail = float(g[k] / mass);
  sweep(
      n,
      [&](int64_t i, auto full, int64_t) {
        vf q = ld0(out, i, n, full);
        st(out, i, n, ((q * ld0(outside, i, n, full)) * per_tail - q * total) * factor, full);
      },
      [] {});
  for (int64_t j = 0; j < k; ++j) {
    out[ids[j]] = float((g[j] - std::exp(lq[j]) * total_d) * double(factor));
    outside[ids[j]] = 1.0f;
  }
}

template <class TS>
static void sparse_rows_of(const SparseArgs& a, int64_t r0, int64_t r1) {
  const TS* s = static_cast<const TS*>(a.s);
  const int64_t n = a.vocab, k = a.k, width = a.tail == kTailBucket ? k + 1 : k;
  SparseScratch w(a.tail == kTailBucket ? n : 0, k);
  for (int64_t r = r0; r < r1; ++r)
    sparse_row(
        a,
        s + r * a.s_stride,
        a.ids + r * k,
        a.lp + r * width,
        a.scale[r],
        a.values + r,
        a.grad + r * n,
        w);
}

void sparse_rows(const SparseArgs& a, int64_t r0, int64_t r1) {
  if (a.s_bf16)
    sparse_rows_of<uint16_t>(a, r0, r1);
  else
    sparse_rows_of<float>(a, r0, r1);
}

int lanes() {
  return W;
}

}  // namespace KD_NS
}  // namespace kd_kernels
