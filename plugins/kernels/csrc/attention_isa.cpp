// Flash-style attention (rows.h's AttentionArgs), one instruction set per object, built beside
// layers_isa.cpp with the same flags.
//
// Forward, per (batch, query head, tile of 64 queries): for each tile of 64 visible keys,
// the scores S = (scale q) k^T of the tile, an online softmax (running row maximum m and sum
// l, the output rescaled when m grows) and O += P v; the log-sum-exp m + log(l) of each row
// is kept for the backward. Backward, per (batch, KV head): for each key tile and each query
// tile of the group's query heads that sees it, P is recomputed from the saved log-sum-exp,
// dV += P^T dO, dP = dO v^T, dS = P (dP - rowsum(dO * O)), dK += dS^T (scale q),
// dQ += dS k; one task owns a KV head's dk, dv and its query heads' dq, so no two threads
// write the same row. Neither direction holds more than a few tiles: the [L, S] scores
// and probabilities are never materialised.
//
// The tile products are register-blocked micro-kernels: R rows x CV vectors of
// accumulators, one broadcast of the left operand and CV loads of the right per step.
#include <algorithm>
#include <cmath>
#include <vector>

#include "rows.h"
#include "simd.h"

namespace kd_kernels {
namespace KD_NS {

using namespace kd_simd;

namespace {

constexpr int64_t T = kAttentionTile;
// Accumulator block: kR rows x kCV vectors (24 of AVX-512's 32 registers; 8 of AVX2's and
// the baseline's 16).
constexpr int kCV = W == 16 ? 4 : 2;
constexpr int kR = W == 16 ? 6 : 4;
static_assert(T % (kCV * W) == 0, "a tile's keys must be whole column blocks");

int64_t padded(int64_t d) {
  return (d + W - 1) / W * W;
}

// C[r][0 .. T) = sum_d A[r * lda + d] * BT[d * ldb + c] for r < R: a tile of scores (A:
// query rows, BT: the key tile transposed, [D, T] in rows of ldb).
template <int R>
void abt_rows(const float* A, int64_t lda, const float* BT, int64_t ldb, int64_t D, float* C) {
  for (int64_t cb = 0; cb < T; cb += kCV * W) {
    vf acc[R][kCV];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < kCV; ++c)
        acc[r][c] = splat(0.0f);
    for (int64_t d = 0; d < D; ++d) {
      vf b[kCV];
      for (int c = 0; c < kCV; ++c)
        b[c] = load(BT + d * ldb + cb + c * W);
      for (int r = 0; r < R; ++r) {
        const vf x = splat(A[r * lda + d]);
        for (int c = 0; c < kCV; ++c)
          acc[r][c] = fma(x, b[c], acc[r][c]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < kCV; ++c)
        store(C + r * T + cb + c * W, acc[r][c]);
  }
}

// C [M, T] = A [M, D] (row stride lda) times BT [D, T] (row stride ldb).
void abt(const float* A, int64_t lda, int64_t M, const float* BT, int64_t ldb, int64_t D,
         float* C) {
  int64_t m = 0;
  for (; m + kR <= M; m += kR)
    abt_rows<kR>(A + m * lda, lda, BT, ldb, D, C + m * T);
  const float* a = A + m * lda;
  float* c = C + m * T;
  switch (M - m) {
    case 0:
      break;
    case 1:
      abt_rows<1>(a, lda, BT, ldb, D, c);
      break;
    case 2:
      abt_rows<2>(a, lda, BT, ldb, D, c);
      break;
    case 3:
      abt_rows<3>(a, lda, BT, ldb, D, c);
      break;
    case 4:
      if constexpr (kR > 4)
        abt_rows<4>(a, lda, BT, ldb, D, c);
      break;
    default:
      if constexpr (kR > 5)
        abt_rows<5>(a, lda, BT, ldb, D, c);
      break;
  }
}

// C[r][0 .. CV W) += sum_k A[r * am + k * ak] * B[k * ldb + 0 .. CV W) for r < R.
template <int R, int CV>
void ab_block(
    const float* A, int64_t am, int64_t ak, int64_t K, const float* B, int64_t ldb, float* C,
    int64_t ldc) {
  vf acc[R][CV];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < CV; ++c)
      acc[r][c] = load(C + r * ldc + c * W);
  for (int64_t k = 0; k < K; ++k) {
    vf b[CV];
    for (int c = 0; c < CV; ++c)
      b[c] = load(B + k * ldb + c * W);
    for (int r = 0; r < R; ++r) {
      const vf x = splat(A[r * am + k * ak]);
      for (int c = 0; c < CV; ++c)
        acc[r][c] = fma(x, b[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < CV; ++c)
      store(C + r * ldc + c * W, acc[r][c]);
}

template <int R>
void ab_rows(
    const float* A, int64_t am, int64_t ak, int64_t K, const float* B, int64_t ldb, float* C,
    int64_t ldc, int64_t cols) {
  int64_t c = 0;
  for (; c + kCV * W <= cols; c += kCV * W)
    ab_block<R, kCV>(A, am, ak, K, B + c, ldb, C + c, ldc);
  const int64_t rest = (cols - c) / W;
  if (rest == 1)
    ab_block<R, 1>(A, am, ak, K, B + c, ldb, C + c, ldc);
  if constexpr (kCV > 2)
    if (rest == 2)
      ab_block<R, 2>(A, am, ak, K, B + c, ldb, C + c, ldc);
  if constexpr (kCV > 3)
    if (rest == 3)
      ab_block<R, 3>(A, am, ak, K, B + c, ldb, C + c, ldc);
}

// C [M, cols] += A [M, K] B [K, cols], A read as A[m * am + k * ak] (a transpose is a
// stride), cols a multiple of W.
void ab(
    const float* A, int64_t am, int64_t ak, int64_t M, int64_t K, const float* B, int64_t ldb,
    float* C, int64_t ldc, int64_t cols) {
  int64_t m = 0;
  for (; m + kR <= M; m += kR)
    ab_rows<kR>(A + m * am, am, ak, K, B, ldb, C + m * ldc, ldc, cols);
  const float* a = A + m * am;
  float* c = C + m * ldc;
  switch (M - m) {
    case 0:
      break;
    case 1:
      ab_rows<1>(a, am, ak, K, B, ldb, c, ldc, cols);
      break;
    case 2:
      ab_rows<2>(a, am, ak, K, B, ldb, c, ldc, cols);
      break;
    case 3:
      ab_rows<3>(a, am, ak, K, B, ldb, c, ldc, cols);
      break;
    case 4:
      if constexpr (kR > 4)
        ab_rows<4>(a, am, ak, K, B, ldb, c, ldc, cols);
      break;
    default:
      if constexpr (kR > 5)
        ab_rows<5>(a, am, ak, K, B, ldb, c, ldc, cols);
      break;
  }
}

// Rows [r0, r0 + n) of one head of x (row stride `stride`) into `to` [n, Dp], times `mul`,
// the padding zero.
void copy_rows(const float* x, int64_t stride, int64_t n, int64_t D, int64_t Dp, float mul,
               float* to) {
  for (int64_t r = 0; r < n; ++r) {
    const float* from = x + r * stride;
    float* row = to + r * Dp;
    for (int64_t d = 0; d < D; ++d)
      row[d] = from[d] * mul;
    for (int64_t d = D; d < Dp; ++d)
      row[d] = 0.0f;
  }
}

// Rows [0, n) of one head of x transposed into `to` [D, cols], the columns past n zero.
void copy_transposed(const float* x, int64_t stride, int64_t n, int64_t D, int64_t cols,
                     float* to) {
  for (int64_t d = 0; d < D; ++d)
    for (int64_t j = n; j < cols; ++j)
      to[d * cols + j] = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    const float* from = x + j * stride;
    for (int64_t d = 0; d < D; ++d)
      to[d * cols + j] = from[d];
  }
}



// Keys of the tile at j0 (n of them) that query i sees: all n, or with `causal` those up to
// i + offset.
inline int64_t seen(const AttentionArgs& a, int64_t i, int64_t j0, int64_t n) {
  if (!a.causal)
    return n;
  const int64_t last = i + (a.keys - a.queries) - j0;  // the last visible key in the tile
  return last < 0 ? 0 : (last + 1 < n ? last + 1 : n);
}

// Scores past each row's visible keys set to -inf (exp gives exactly 0).
void mask_tile(const AttentionArgs& a, float* s, int64_t i0, int64_t rows, int64_t j0,
               int64_t n) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t m = seen(a, i0 + r, j0, n);
    for (int64_t j = m; j < T; ++j)
      s[r * T + j] = -kInf;
  }
}

const float* head(const float* x, const int64_t* strides, int64_t b, int64_t h) {
  return x + b * strides[0] + h * strides[1];
}

}  // namespace

void attention_pack(const AttentionArgs& a, int64_t task) {
  const int64_t D = a.dim, Dp = padded(D), S = a.keys;
  const int64_t b = task / a.kv_heads, kvh = task % a.kv_heads;
  float* kp = a.work + task * 2 * S * Dp;
  copy_rows(head(a.k, a.k_strides, b, kvh), a.k_strides[2], S, D, Dp, 1.0f, kp);
  copy_rows(head(a.v, a.v_strides, b, kvh), a.v_strides[2], S, D, Dp, 1.0f, kp + S * Dp);
}

// The forward works on transposed score tiles, [keys, queries]: the online softmax's row
// maxima and sums over keys are then vertical, W queries per vector, with no horizontal
// reduction per query row. Each score is the same sum of the same products in the same
// order as the backward's [queries, keys] tiles, so P recomputed there matches.
void attention(const AttentionArgs& a, int64_t task) {
  const int64_t D = a.dim, Dp = padded(D), L = a.queries, S = a.keys, offset = S - L;
  const int64_t tiles = (L + T - 1) / T, bh_count = a.batch * a.heads;
  const int64_t qt = tiles - 1 - task / bh_count, bh = task % bh_count;
  const int64_t b = bh / a.heads, h = bh % a.heads, kvh = h / (a.heads / a.kv_heads);
  const int64_t i0 = qt * T, rows = L - i0 < T ? L - i0 : T;
  const int64_t end = a.causal ? std::min(S, i0 + rows + offset) : S;

  std::vector<float> buf(D * T + T * Dp + T * T + 3 * T);
  float* qt_s = buf.data();  // [D, T] scale * q transposed, the columns past `rows` zero
  float* acc = qt_s + D * T;  // [T, Dp] the unnormalised output
  float* st = acc + T * Dp;  // [T keys, T queries] scores, then probabilities
  float* mrow = st + T * T;  // [T] running maximum
  float* lrow = mrow + T;  // [T] running sum
  float* alpha = lrow + T;  // [T] this tile's rescale of the running output

  // this KV head's keys and values [S, Dp] (attention_pack)
  const float* kp = a.work + (b * a.kv_heads + kvh) * 2 * S * Dp;
  const float* vp = kp + S * Dp;
  const float* q = head(a.q, a.q_strides, b, h) + i0 * a.q_strides[2];
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t d = 0; d < D; ++d)
      qt_s[d * T + r] = q[r * a.q_strides[2] + d] * a.scale;
  for (int64_t i = 0; i < T; ++i)
    mrow[i] = -kInf;

  for (int64_t j0 = 0; j0 < end; j0 += T) {
    const int64_t n = end - j0 < T ? end - j0 : T;
    abt(kp + j0 * Dp, Dp, n, qt_s, T, D, st);
    if (a.causal && j0 + n - 1 > i0 + offset) {
      // key j0 + j is seen by queries i0 + i with i >= j0 + j - offset - i0
      for (int64_t j = 0; j < n; ++j) {
        const int64_t first = std::min<int64_t>(T, std::max<int64_t>(0, j0 + j - offset - i0));
        for (int64_t i = 0; i < first; ++i)
          st[j * T + i] = -kInf;
      }
    }
    for (int64_t c = 0; c < T; c += W) {
      vf top = load(mrow + c);
      for (int64_t j = 0; j < n; ++j)
        top = vmax(load(st + j * T + c), top);
      // a query that sees nothing yet keeps a maximum of -inf; shifting by 0 gives it
      // probabilities exp(-inf) = 0 and a rescale of 0 for its (zero) output
      const vf shift = select(top == -kInf, splat(0.0f), top);
      const vf scale_old = exp(load(mrow + c) - shift);
      vf sum = splat(0.0f);
      for (int64_t j = 0; j < n; ++j) {
        const vf e = exp(load(st + j * T + c) - shift);
        store(st + j * T + c, e);
        sum += e;
      }
      store(lrow + c, load(lrow + c) * scale_old + sum);
      store(mrow + c, top);
      store(alpha + c, scale_old);
    }
    for (int64_t i = 0; i < rows; ++i) {
      const vf va = splat(alpha[i]);
      for (int64_t d = 0; d < Dp; d += W)
        store(acc + i * Dp + d, load(acc + i * Dp + d) * va);
    }
    ab(st, 1, T, rows, n, vp + j0 * Dp, Dp, acc, Dp, Dp);
  }

  float* o = a.o + (bh * L + i0) * D;
  float* lse = a.lse + bh * L + i0;
  for (int64_t r = 0; r < rows; ++r) {
    const float inv = lrow[r] > 0.0f ? 1.0f / lrow[r] : 0.0f;
    for (int64_t d = 0; d < D; ++d)
      o[r * D + d] = acc[r * Dp + d] * inv;
    lse[r] = lrow[r] > 0.0f ? mrow[r] + std::log(lrow[r]) : -kInf;
  }
}

void attention_grad(const AttentionArgs& a, int64_t task, int64_t splits, float* dq) {
  const int64_t D = a.dim, Dp = padded(D), L = a.queries, S = a.keys;
  const int64_t groups = a.heads / a.kv_heads;
  const int64_t bkv = task / splits, split = task % splits;
  const int64_t b = bkv / a.kv_heads, kvh = bkv % a.kv_heads;
  const int64_t q_tiles = (L + T - 1) / T, k_tiles = (S + T - 1) / T;
  const int64_t offset = S - L;

  std::vector<float> buf(groups * L * (3 * Dp + 1) + 3 * T * Dp + 2 * D * T + 2 * T * T);
  float* dq_acc = buf.data();  // [G, L, Dp] sum_j dS k
  float* qs_all = dq_acc + groups * L * Dp;  // [G, L, Dp] scale * q of the group's heads
  float* do_all = qs_all + groups * L * Dp;  // [G, L, Dp] their dO
  float* delta_all = do_all + groups * L * Dp;  // [G, L] rowsum(dO * O)
  float* kp = delta_all + groups * L;  // [T, Dp] the key tile
  float* dk_acc = kp + T * Dp;  // [T, Dp]
  float* dv_acc = dk_acc + T * Dp;  // [T, Dp]
  float* kt = dv_acc + T * Dp;  // [D, T] the key tile transposed
  float* vt = kt + D * T;  // [D, T] the value tile transposed
  float* p = vt + D * T;  // [T, T] probabilities
  float* ds = p + T * T;  // [T, T] dP, then dS

  const int64_t h0 = kvh * groups, bh0 = b * a.heads + h0;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t bh = bh0 + g;
    copy_rows(head(a.q, a.q_strides, b, h0 + g), a.q_strides[2], L, D, Dp, a.scale,
              qs_all + g * L * Dp);
    copy_rows(a.d_o + bh * L * D, D, L, D, Dp, 1.0f, do_all + g * L * Dp);
    for (int64_t i = 0; i < L; ++i) {
      const float* o = a.o_in + (bh * L + i) * D;
      const float* go = a.d_o + (bh * L + i) * D;
      double dot = 0.0;
      for (int64_t d = 0; d < D; ++d)
        dot += double(o[d]) * go[d];
      delta_all[g * L + i] = float(dot);
    }
  }
  const float* k = head(a.k, a.k_strides, b, kvh);
  const float* v = head(a.v, a.v_strides, b, kvh);
  for (int64_t kt_index = split; kt_index < k_tiles; kt_index += splits) {
    const int64_t j0 = kt_index * T, n = S - j0 < T ? S - j0 : T;
    copy_transposed(k + j0 * a.k_strides[2], a.k_strides[2], n, D, T, kt);
    copy_transposed(v + j0 * a.v_strides[2], a.v_strides[2], n, D, T, vt);
    copy_rows(k + j0 * a.k_strides[2], a.k_strides[2], n, D, Dp, 1.0f, kp);
    for (int64_t x = 0; x < 2 * T * Dp; ++x)
      dk_acc[x] = 0.0f;  // dk_acc and dv_acc
    // the first query that sees key j0
    const int64_t first = a.causal ? std::max<int64_t>(0, j0 - offset) : 0;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t bh = bh0 + g;
      for (int64_t qt = first / T; qt < q_tiles; ++qt) {
        const int64_t i0 = qt * T, rows = L - i0 < T ? L - i0 : T;
        const float* qs = qs_all + (g * L + i0) * Dp;
        const float* dop = do_all + (g * L + i0) * Dp;
        const float* dl = delta_all + g * L + i0;
        const float* lse = a.lse_in + bh * L + i0;
        abt(qs, Dp, rows, kt, T, D, p);
        mask_tile(a, p, i0, rows, j0, n);
        for (int64_t r = 0; r < rows; ++r) {
          // a row that sees nothing (lse -inf) has probabilities 0, not exp(-inf + inf)
          const vf shift = splat(lse[r] == -kInf ? kInf : lse[r]);
          for (int64_t j = 0; j < T; j += W)
            store(p + r * T + j, exp(load(p + r * T + j) - shift));
        }
        // dV += P^T dO
        ab(p, 1, T, n, rows, dop, Dp, dv_acc, Dp, Dp);
        // dS = P (dO v^T - delta)
        abt(dop, Dp, rows, vt, T, D, ds);
        for (int64_t r = 0; r < rows; ++r) {
          const vf dr = splat(dl[r]);
          for (int64_t j = 0; j < T; j += W)
            store(ds + r * T + j, load(p + r * T + j) * (load(ds + r * T + j) - dr));
        }
        // dK += dS^T (scale q); dQ += dS k (times scale below)
        ab(ds, 1, T, n, rows, qs, Dp, dk_acc, Dp, Dp);
        ab(ds, T, 1, rows, n, kp, Dp, dq_acc + (g * L + i0) * Dp, Dp, Dp);
      }
    }
    float* dk = a.dk + (bkv * S + j0) * D;
    float* dv = a.dv + (bkv * S + j0) * D;
    for (int64_t j = 0; j < n; ++j)
      for (int64_t d = 0; d < D; ++d) {
        dk[j * D + d] = dk_acc[j * Dp + d];
        dv[j * D + d] = dv_acc[j * Dp + d];
      }
  }
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t i = 0; i < L; ++i)
      for (int64_t d = 0; d < D; ++d)
        dq[(g * L + i) * D + d] = dq_acc[(g * L + i) * Dp + d] * a.scale;
}

}  // namespace KD_NS
}  // namespace kd_kernels
