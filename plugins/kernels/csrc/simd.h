// Portable SIMD helpers on GCC/Clang vector extensions, compiled once per instruction set.
//
// rows_isa.cpp and adam_isa.cpp include this header with KD_W (lanes of float32) and KD_ISA
// set by the build: 16 for the AVX-512 object, 8 for AVX2 + FMA, 4 for the baseline (SSE2
// on x86-64, NEON on arm64).
// Each object is built with its own -m flags and the library picks one at run time
// (kd_rows.cpp), so the wheel runs on any CPU of its architecture.
//
// Numerics: the translation units are compiled with -ffp-contract=off, so a * b + c is two
// roundings exactly as in MLX's scalar kernels (s * (1 / T) is rounded before the row
// maximum is subtracted, as in the pure path); only the polynomials use fused
// multiply-adds, through fma() below.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#ifndef KD_W
#error "KD_W (float lanes) must be defined by the build"
#endif
#ifndef KD_ISA
#error "KD_ISA (base, avx2, avx512) must be defined by the build"
#endif

// The namespace of this object's kernels: isa_base, isa_avx2, isa_avx512 (rows.h).
#define KD_CAT2(a, b) a##b
#define KD_CAT(a, b) KD_CAT2(a, b)
#define KD_NS KD_CAT(isa_, KD_ISA)

namespace kd_simd {

constexpr int W = KD_W;
typedef float vf __attribute__((vector_size(W * 4)));
typedef int32_t vi __attribute__((vector_size(W * 4)));
typedef uint32_t vu __attribute__((vector_size(W * 4)));
typedef uint16_t vh __attribute__((vector_size(W * 2)));

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kMinNormal = std::numeric_limits<float>::min();

static inline vf splat(float x) {
  return vf{} + x;
}

static inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// bfloat16 is the top half of a float32: widen the raw bits and shift them up.
static inline vf load(const uint16_t* p) {
  vh h;
  std::memcpy(&h, p, sizeof h);
  vu u = __builtin_convertvector(h, vu) << 16;
  return (vf)u;
}

static inline void store(float* p, vf v) {
  std::memcpy(p, &v, sizeof v);
}

static inline float to_float(float x) {
  return x;
}

static inline float to_float(uint16_t x) {
  uint32_t u = uint32_t(x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

static inline vf fma(vf a, vf b, vf c) {
#if KD_W == 16 && defined(__AVX512F__)
  return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif KD_W == 8 && defined(__FMA__)
  return (vf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return a * b + c;
#endif
}

static inline vf select(vi mask, vf a, vf b) {
  return mask ? a : b;
}

static inline vf vmax(vf a, vf b) {
  return a > b ? a : b;  // NaN in a is dropped; callers get NaN back through exp()
}

static inline vf vabs(vf x) {
  return (vf)((vu)x & 0x7fffffffu);
}

// sign(x): -1, 0 or 1.
static inline vf vsign(vf x) {
  return select(x > 0.0f, splat(1.0f), select(x < 0.0f, splat(-1.0f), splat(0.0f)));
}

static inline float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < W; ++i)
    m = v[i] > m ? v[i] : m;
  return m;
}

static inline double hsum(vf v) {
  double s = 0.0;
  for (int i = 0; i < W; ++i)
    s += v[i];
  return s;
}

// max(lo, x) with NaN in x kept (x86's max returns its second operand when one is NaN).
static inline vf clamp_below(vf x, float lo) {
#if KD_W == 16 && defined(__AVX512F__)
  return (vf)_mm512_max_ps(_mm512_set1_ps(lo), (__m512)x);
#elif KD_W == 8 && defined(__AVX__)
  return (vf)_mm256_max_ps(_mm256_set1_ps(lo), (__m256)x);
#else
  return select(x < lo, splat(lo), x);
#endif
}

// exp(x) in float32 for x <= 88 (every caller passes shifted logits or log-probabilities,
// at most ~0): within 2.4 ulp (relative 1.8e-7) for x >= ln(FLT_MIN), exactly 0 below it
// (-inf included), NaN stays NaN. x = n ln 2 + r with |r| <= ln(2) / 2 (Cody-Waite, two
// constants), e^r = 1 + r + r^2 (c2 + c3 r + c4 r^2 + c5 r^3), a minimax fit (Lawson's
// iteration) of the relative error on that interval, checked in float32 arithmetic.
static inline vf exp(vf x) {
  const float lo = -87.3365447504f;
  vf xc = clamp_below(x, lo);
  // round(x / ln 2) with the 1.5 * 2^23 trick (exact for |x / ln 2| < 2^22)
  const float magic = 12582912.0f;
  vf t = fma(xc, splat(1.44269504088896341f), splat(magic));
  vf n = t - magic;
  vf r = fma(n, splat(-0.693359375f), xc);
  r = fma(n, splat(2.12194440e-4f), r);
  vf p = fma(splat(0x1.1081acp-7f), r, splat(0x1.573612p-5f));
  p = fma(p, r, splat(0x1.55579p-3f));
  p = fma(p, r, splat(0x1.fffddcp-2f));
  vf y = fma(p, r * r, r) + 1.0f;
  vi e = ((vi)t - (vi)splat(magic) + 127) << 23;
  return select(x < lo, splat(0.0f), y * (vf)e);
}

// log(x) in float32 for normal x > 0 (Cephes' logf, within 2 ulp); NaN stays NaN. Callers
// clamp x to at least FLT_MIN, so zeros and subnormals never reach it.
static inline vf log(vf x) {
  vi bits = (vi)x;
  vi e = ((bits >> 23) & 0xff) - 126;
  vf m = (vf)((bits & 0x007fffff) | 0x3f000000);  // mantissa in [0.5, 1)
  vi small = m < 0.707106781186547524f;
  vf ef = __builtin_convertvector(e, vf) - select(small, splat(1.0f), splat(0.0f));
  m = select(small, m + m, m) - 1.0f;
  vf z = m * m;
  vf y = splat(7.0376836292e-2f);
  y = fma(y, m, splat(-1.1514610310e-1f));
  y = fma(y, m, splat(1.1676998740e-1f));
  y = fma(y, m, splat(-1.2420140846e-1f));
  y = fma(y, m, splat(1.4249322787e-1f));
  y = fma(y, m, splat(-1.6668057665e-1f));
  y = fma(y, m, splat(2.0000714765e-1f));
  y = fma(y, m, splat(-2.4999993993e-1f));
  y = fma(y, m, splat(3.3333331174e-1f));
  y = y * m * z;
  y = fma(ef, splat(-2.12194440e-4f), y);
  y = fma(z, splat(-0.5f), y);
  vf r = m + y;
  r = fma(ef, splat(0.693359375f), r);
  return select(x != x, x, r);
}

}  // namespace kd_simd
