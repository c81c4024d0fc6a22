// The fused TAPF gate for one instruction set. Compiled once per ISA (see Makefile) with
//   -DTAPF_NS=<namespace> -DTAPF_VEC_BYTES=<64|32|16> and that ISA's -m flags.
// No C++ standard-library headers here: inline functions from shared headers, compiled with
// AVX-512 flags, could be picked by the linker for callers on CPUs without AVX-512.
//
// One pass per (candidate, block of TAPF_ROWS real tokens): the interaction, both small GEMMs,
// the tanh gate and the signed residual run on a few KB of scratch that stays in L1; nothing of
// size (N, L, d) is materialised except the output. Padding tokens (polarity 0) are copied through.

#include "tapf_kernel.h"

#if TAPF_VEC_BYTES > 16
#include <immintrin.h>  // compiler intrinsics (always-inline), not the standard library
#endif

#ifndef TAPF_NS
#error "define TAPF_NS"
#endif
#ifndef TAPF_VEC_BYTES
#error "define TAPF_VEC_BYTES"
#endif

namespace TAPF_NS {
namespace {

typedef float vf __attribute__((vector_size(TAPF_VEC_BYTES)));
constexpr int VW = TAPF_VEC_BYTES / 4;          // floats per vector
constexpr int COLS = TAPF_VEC_BYTES == 64 ? 4 : 2;  // vectors of output columns per tile

inline vf loadu(const float* p) {
  vf v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
inline void storeu(float* p, vf v) { __builtin_memcpy(p, &v, sizeof v); }
inline vf splat(float x) { return vf{} + x; }

// 1 / q for q > 0: the hardware reciprocal estimate refined by Newton steps (to ~float precision) instead of
// a division, whose throughput (one zmm every ~16 cycles) would otherwise cost ~15% of the whole gate.
inline vf vrecip(vf q) {
#if TAPF_VEC_BYTES == 64 && !defined(TAPF_NO_AVX512)
  vf r = (vf)_mm512_maskz_rcp14_ps((__mmask16)0xFFFF, (__m512)q);  // 14 bits (maskz: no undefined source)
  return r * (2.0f - q * r);                  // one Newton step: ~28 bits
#elif TAPF_VEC_BYTES == 32
  vf r = (vf)_mm256_rcp_ps((__m256)q);    // 12 bits
  r = r * (2.0f - q * r);
  return r * (2.0f - q * r);                  // two Newton steps
#else
  return 1.0f / q;
#endif
}

// tanh as a [13/6] rational approximation (Eigen's generic_fast_tanh_float); max error a few ulp.
inline vf vtanh(vf x) {
  const vf hi = splat(7.90531110763549805f);
  x = x > hi ? hi : x;
  x = x < -hi ? -hi : x;
  const vf x2 = x * x;
  vf p = splat(-2.76076847742355e-16f);
  p = p * x2 + 2.00018790482477e-13f;
  p = p * x2 - 8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  p = p * x;
  vf q = splat(1.19825839466702e-06f);
  q = q * x2 + 1.18534705686654e-04f;
  q = q * x2 + 2.26843463243900e-03f;
  q = q * x2 + 4.89352518554385e-03f;
  return p * vrecip(q);  // q >= 4.9e-3 > 0
}

inline float stanh(float x) {
  vf v = splat(x);
  return vtanh(v)[0];
}

// Z[r, col : col + C*VW] = X[r, :K] @ W[:K, col : col + C*VW] for R rows (row strides ldx, ldw, ldz).
template <int R, int C>
inline void tile(const float* __restrict X, int64_t ldx, const float* __restrict W, int64_t ldw,
                 float* __restrict Z, int64_t ldz, int64_t K, int64_t col) {
  vf acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = vf{};
  for (int64_t i = 0; i < K; ++i) {
    const float* wrow = W + i * ldw + col;
    vf w[C];
    for (int c = 0; c < C; ++c) w[c] = loadu(wrow + c * VW);
    for (int r = 0; r < R; ++r) {
      const float x = X[r * ldx + i];
      for (int c = 0; c < C; ++c) acc[r][c] += x * w[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) storeu(Z + r * ldz + col + c * VW, acc[r][c]);
}

// Z = X @ W for R rows of K inputs and `cols` outputs (W is (K, cols), row-major).
template <int R>
inline void matmul_rows(const float* X, int64_t ldx, const float* W, float* Z, int64_t ldz, int64_t K,
                        int64_t cols) {
  int64_t col = 0;
  for (; col + COLS * VW <= cols; col += COLS * VW) tile<R, COLS>(X, ldx, W, cols, Z, ldz, K, col);
  for (; col + VW <= cols; col += VW) tile<R, 1>(X, ldx, W, cols, Z, ldz, K, col);
  for (; col < cols; ++col) {  // cols not a multiple of the vector width
    for (int r = 0; r < R; ++r) {
      float s = 0.f;
      for (int64_t i = 0; i < K; ++i) s += X[r * ldx + i] * W[i * cols + col];
      Z[r * ldz + col] = s;
    }
  }
}

inline void matmul(int rows, const float* X, int64_t ldx, const float* W, float* Z, int64_t ldz, int64_t K,
                   int64_t cols) {
  switch (rows) {
    case 4: matmul_rows<4>(X, ldx, W, Z, ldz, K, cols); break;
    case 3: matmul_rows<3>(X, ldx, W, Z, ldz, K, cols); break;
    case 2: matmul_rows<2>(X, ldx, W, Z, ldz, K, cols); break;
    default: matmul_rows<1>(X, ldx, W, Z, ldz, K, cols); break;
  }
}

// Z = X @ W, all (d, d), R rows.
inline void matmul(int rows, const float* X, const float* W, float* Z, int64_t d) {
  matmul(rows, X, d, W, Z, d, d, d);
}

static_assert(TAPF_ROWS == 4, "matmul() dispatches on up to 4 rows");

// One block of up to TAPF_ROWS tokens ks[] of candidate n (user u): gated rows into dst[r] (d floats each).
inline void gate_block(const TapfArgs* a, int rows, const int64_t* ks, int64_t n, int64_t u, float* scratch,
                       float* const* dst) {
  const int64_t d = a->d, L = a->length;
  float* X = scratch;                    // (rows, d) interaction h * cand
  float* E = scratch + TAPF_ROWS * d;    // (rows, d) relu(X @ w_int)
  float* S = scratch + 2 * TAPF_ROWS * d;  // (rows, d) E @ w_mix
  const float* c = a->cand + n * d;
  for (int r = 0; r < rows; ++r) {
    const float* h = a->tokens + (u * L + ks[r]) * d;
    float* x = X + r * d;
    int64_t j = 0;
    for (; j + VW <= d; j += VW) storeu(x + j, loadu(h + j) * loadu(c + j));
    for (; j < d; ++j) x[j] = h[j] * c[j];
  }
  matmul(rows, X, a->w_int, E, d);
  for (int64_t i = 0; i < rows * d; ++i) E[i] = E[i] > 0.f ? E[i] : 0.f;
  matmul(rows, E, a->w_mix, S, d);
  for (int r = 0; r < rows; ++r) {
    const int64_t k = ks[r];
    const float p = a->polarity[u * L + k];
    const float* h = a->tokens + (u * L + k) * d;
    const float* au = a->user_part + (u * L + k) * d;
    const float* e = E + r * d;
    const float* s = S + r * d;
    float* o = dst[r];
    int64_t j = 0;
    for (; j + VW <= d; j += VW) {
      const vf t = vtanh(loadu(au + j) + loadu(s + j));
      storeu(o + j, loadu(h + j) + p * t * loadu(e + j));
    }
    for (; j < d; ++j) o[j] = h[j] + p * stanh(au[j] + s[j]) * e[j];
  }
}

// exp(x), Cephes' expf scheme: x = n ln2 + r, |r| <= ln2 / 2, a degree-7 polynomial for e^r, 2^n from the exponent
// bits. Relative error ~1e-7; arguments are clamped to [-87, 88] (no overflow, no denormals).
typedef int vi __attribute__((vector_size(TAPF_VEC_BYTES)));
inline vf vexp(vf x) {
  const vf hi = splat(88.0f), lo = splat(-87.0f);
  x = x > hi ? hi : x;
  x = x < lo ? lo : x;
  const vf shifter = splat(12582912.0f);  // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer
  const vf n = (x * 1.44269504088896341f + shifter) - shifter;
  vf r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  vi e = __builtin_convertvector(n, vi);
  e = (e + 127) << 23;
  vf scale;
  __builtin_memcpy(&scale, &e, sizeof scale);
  return p * scale;
}

inline float sexp(float x) {
  vf v = splat(x);
  return vexp(v)[0];
}

// Sum of a vector's lanes as a tree of halves (a serial lane-by-lane sum would chain VW dependent adds).
typedef float vf4 __attribute__((vector_size(16)));
inline float hsum4(vf4 v) {
  const vf4 s = v + __builtin_shufflevector(v, v, 2, 3, 0, 1);
  return s[0] + s[1];
}
inline float hsum(vf v) {
#if TAPF_VEC_BYTES == 64
  typedef float vf8 __attribute__((vector_size(32)));
  const vf8 h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  return hsum4(__builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7));
#elif TAPF_VEC_BYTES == 32
  return hsum4(__builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7));
#else
  return hsum4(v);
#endif
}

inline float dot(const float* x, const float* y, int64_t d) {
  vf acc = vf{};
  int64_t j = 0;
  for (; j + VW <= d; j += VW) acc += loadu(x + j) * loadu(y + j);
  float s = hsum(acc);
  for (; j < d; ++j) s += x[j] * y[j];
  return s;
}

// out[t * stride] = q[t] . g for the 4 rows q[t] = q + t * d: four independent accumulators.
inline void dot4(const float* q, const float* g, int64_t d, float* out, int64_t stride) {
  vf a0 = vf{}, a1 = vf{}, a2 = vf{}, a3 = vf{};
  int64_t j = 0;
  for (; j + VW <= d; j += VW) {
    const vf x = loadu(g + j);
    a0 += loadu(q + j) * x;
    a1 += loadu(q + d + j) * x;
    a2 += loadu(q + 2 * d + j) * x;
    a3 += loadu(q + 3 * d + j) * x;
  }
  float s[4] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3)};
  for (; j < d; ++j)
    for (int t = 0; t < 4; ++t) s[t] += q[t * d + j] * g[j];
  for (int t = 0; t < 4; ++t) out[t * stride] = s[t];
}

// w[0:n] <- softmax(s[0:n]) (n >= 1).
inline void softmax(const float* s, float* w, int64_t n) {
  float m = s[0];
  for (int64_t j = 1; j < n; ++j) m = s[j] > m ? s[j] : m;
  float total = 0.f;
  int64_t j = 0;
  vf acc = vf{};
  for (; j + VW <= n; j += VW) {
    const vf e = vexp(loadu(s + j) - m);
    storeu(w + j, e);
    acc += e;
  }
  total = hsum(acc);
  for (; j < n; ++j) {
    w[j] = sexp(s[j] - m);
    total += w[j];
  }
  const float inv = 1.0f / total;
  for (j = 0; j < n; ++j) w[j] *= inv;
}

// out[0:d] = sum_j w[j] * G[j, 0:d] over the n compact rows of G.
inline void pool_rows(const float* G, const float* w, int64_t n, int64_t d, float* out) {
  int64_t c = 0;
  for (; c + VW <= d; c += VW) {
    vf acc = vf{};
    for (int64_t j = 0; j < n; ++j) acc += w[j] * loadu(G + j * d + c);
    storeu(out + c, acc);
  }
  for (; c < d; ++c) {
    float s = 0.f;
    for (int64_t j = 0; j < n; ++j) s += w[j] * G[j * d + c];
    out[c] = s;
  }
}

// Scratch layout of the pooling ops (TAPF_POOL_SCRATCH_FLOATS), and the real tokens of candidate n's user.
struct PoolScratch {
  float* gate;  // TAPF_SCRATCH_FLOATS(d)
  float* G;     // (L, d) gated real tokens, compact
  float* S;     // (max(T, 1), L) scores, then weights, compact
  float* M;     // (d, h) per-candidate attention matrix
  float* H;     // (TAPF_ROWS, h) hidden rows
  int32_t* real;  // (L,) positions of the real tokens
};

inline PoolScratch pool_scratch(const TapfPoolArgs* a, float* scratch) {
  const int64_t d = a->gate.d, L = a->gate.length, T = a->n_query > 1 ? a->n_query : 1;
  PoolScratch p;
  p.gate = scratch;
  p.G = p.gate + TAPF_SCRATCH_FLOATS(d);
  p.S = p.G + L * d;
  p.M = p.S + T * L;
  p.H = p.M + d * a->hidden;
  p.real = reinterpret_cast<int32_t*>(p.H + TAPF_ROWS * a->hidden);  // float-sized slots
  return p;
}

// Gates the real tokens p.real[0:n_real] of candidate n in blocks of TAPF_ROWS into G; after each block,
// score(j0, rows) scores the rows G[j0 : j0 + rows] while they are hot.
template <class Score>
inline void gate_real_tokens(const TapfPoolArgs* a, int64_t n, int64_t u, int64_t n_real, const PoolScratch& p,
                             Score score) {
  const int64_t d = a->gate.d;
  for (int64_t j0 = 0; j0 < n_real; j0 += TAPF_ROWS) {
    const int rows = static_cast<int>(n_real - j0 < TAPF_ROWS ? n_real - j0 : TAPF_ROWS);
    float* dst[TAPF_ROWS];
    int64_t ks[TAPF_ROWS];
    for (int r = 0; r < rows; ++r) {
      dst[r] = p.G + (j0 + r) * d;
      ks[r] = p.real[j0 + r];
    }
    gate_block(&a->gate, rows, ks, n, u, p.gate, dst);
    score(j0, rows);
  }
}

// The T score rows p.S[t * L : t * L + n_real] of one candidate -> its weights w_out (T, L), exactly 0 on the
// tokens that are not real, and pooled (T, d) = weights @ G; all zero when the candidate has no real token.
inline void softmax_pool(const PoolScratch& p, int64_t T, int64_t n_real, int64_t L, int64_t d, float* w_out,
                         float* pooled) {
  for (int64_t i = 0; i < T * L; ++i) w_out[i] = 0.f;
  if (n_real == 0) {
    for (int64_t i = 0; i < T * d; ++i) pooled[i] = 0.f;
    return;
  }
  for (int64_t t = 0; t < T; ++t) {
    float* w = p.S + t * L;
    softmax(w, w, n_real);
    pool_rows(p.G, w, n_real, d, pooled + t * d);
    for (int64_t j = 0; j < n_real; ++j) w_out[t * L + p.real[j]] = w[j];
  }
}

inline int64_t real_tokens(const TapfPoolArgs* a, int64_t u, int32_t* real) {
  const int64_t L = a->gate.length;
  const uint8_t* m = a->mask + u * L;
  int64_t n_real = 0;
  for (int64_t k = 0; k < L; ++k)
    if (m[k]) real[n_real++] = static_cast<int32_t>(k);
  return n_real;
}

}  // namespace

const char* name() {
#if TAPF_VEC_BYTES == 64 && defined(TAPF_NO_AVX512)
  return "wide16";
#elif TAPF_VEC_BYTES == 64
  return "avx512";
#elif TAPF_VEC_BYTES == 32
  return "avx2";
#else
  return "generic";
#endif
}

void user_rows(const TapfArgs* a, int64_t row_begin, int64_t row_end) {
  const int64_t d = a->d;
  for (int64_t row = row_begin; row < row_end; row += TAPF_ROWS) {
    const int rows = static_cast<int>(row_end - row < TAPF_ROWS ? row_end - row : TAPF_ROWS);
    float* A = a->user_part + row * d;
    matmul(rows, a->tokens + row * d, a->w_tok, A, d);
    for (int r = 0; r < rows; ++r) {
      const int64_t pidx = static_cast<int64_t>(a->polarity[row + r]) + 1;  // validated by the caller
      const float* b = a->pol_bias + pidx * d;
      for (int64_t j = 0; j < d; ++j) A[r * d + j] += b[j];
    }
  }
}

void candidates(const TapfArgs* a, int64_t n_begin, int64_t n_end, float* scratch) {
  const int64_t d = a->d, L = a->length;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const int64_t u = a->cand_user[n];
    int64_t ks[TAPF_ROWS];
    float* dst[TAPF_ROWS];
    int rows = 0;
    for (int64_t k = 0; k < L; ++k) {
      if (a->polarity[u * L + k] == 0.f) {  // padding: h' = h
        __builtin_memcpy(a->out + (n * L + k) * d, a->tokens + (u * L + k) * d, sizeof(float) * d);
        continue;
      }
      dst[rows] = a->out + (n * L + k) * d;
      ks[rows++] = k;
      if (rows == TAPF_ROWS) {
        gate_block(a, rows, ks, n, u, scratch, dst);
        rows = 0;
      }
    }
    if (rows) gate_block(a, rows, ks, n, u, scratch, dst);
  }
}

void pool_dot(const TapfPoolArgs* a, int64_t n_begin, int64_t n_end, float* scratch) {
  const int64_t d = a->gate.d, L = a->gate.length, T = a->n_query;
  const PoolScratch p = pool_scratch(a, scratch);
  for (int64_t n = n_begin; n < n_end; ++n) {
    const int64_t u = a->gate.cand_user[n];
    const int64_t n_real = real_tokens(a, u, p.real);
    const float* q = a->query + n * T * d;
    gate_real_tokens(a, n, u, n_real, p, [&](int64_t j0, int rows) {
      for (int r = 0; r < rows; ++r) {
        const float* g = p.G + (j0 + r) * d;
        int64_t t = 0;
        for (; t + 4 <= T; t += 4) dot4(q + t * d, g, d, p.S + t * L + j0 + r, L);
        for (; t < T; ++t) p.S[t * L + j0 + r] = dot(q + t * d, g, d);
      }
    });
    softmax_pool(p, T, n_real, L, d, a->weights + n * T * L, a->pooled + n * T * d);
  }
}

void pool_mlp(const TapfPoolArgs* a, int64_t n_begin, int64_t n_end, float* scratch) {
  const int64_t d = a->gate.d, L = a->gate.length, h = a->hidden;
  const PoolScratch p = pool_scratch(a, scratch);
  for (int64_t n = n_begin; n < n_end; ++n) {
    const int64_t u = a->gate.cand_user[n];
    const int64_t n_real = real_tokens(a, u, p.real);
    // The activation unit's first layer for this candidate: g @ (w_token + v[:, None] * w_product) + bias.
    const float* v = a->att_cand + n * d;
    for (int64_t i = 0; i < d; ++i) {
      const float* wt = a->w_token + i * h;
      const float* wp = a->w_product + i * h;
      float* m = p.M + i * h;
      for (int64_t c = 0; c < h; ++c) m[c] = wt[c] + v[i] * wp[c];
    }
    const float* bias = a->att_bias + n * h;
    gate_real_tokens(a, n, u, n_real, p, [&](int64_t j0, int rows) {
      matmul(rows, p.G + j0 * d, d, p.M, p.H, h, d, h);
      for (int r = 0; r < rows; ++r) {
        const float* x = p.H + r * h;
        vf acc = vf{};
        int64_t c = 0;
        for (; c + VW <= h; c += VW) {
          const vf z = loadu(x + c) + loadu(bias + c);
          acc += z * vrecip(1.0f + vexp(-z)) * loadu(a->w_score + c);  // silu(z) * w_score
        }
        float s = hsum(acc);
        for (; c < h; ++c) {
          const float z = x[c] + bias[c];
          s += z / (1.0f + sexp(-z)) * a->w_score[c];
        }
        p.S[j0 + r] = s;
      }
    });
    softmax_pool(p, 1, n_real, L, d, a->weights + n * L, a->pooled + n * d);
  }
}

}  // namespace TAPF_NS
