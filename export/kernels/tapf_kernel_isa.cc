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
#if TAPF_VEC_BYTES == 64
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

// Z[r, col : col + C*VW] = X[r, :] @ W[:, col : col + C*VW] for R rows (row stride d).
template <int R, int C>
inline void tile(const float* __restrict X, const float* __restrict W, float* __restrict Z, int64_t d,
                 int64_t col) {
  vf acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = vf{};
  for (int64_t i = 0; i < d; ++i) {
    const float* wrow = W + i * d + col;
    vf w[C];
    for (int c = 0; c < C; ++c) w[c] = loadu(wrow + c * VW);
    for (int r = 0; r < R; ++r) {
      const float x = X[r * d + i];
      for (int c = 0; c < C; ++c) acc[r][c] += x * w[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) storeu(Z + r * d + col + c * VW, acc[r][c]);
}

// Z = X @ W for R rows, all d columns.
template <int R>
inline void matmul_rows(const float* X, const float* W, float* Z, int64_t d) {
  int64_t col = 0;
  for (; col + COLS * VW <= d; col += COLS * VW) tile<R, COLS>(X, W, Z, d, col);
  for (; col + VW <= d; col += VW) tile<R, 1>(X, W, Z, d, col);
  for (; col < d; ++col) {  // d not a multiple of the vector width
    for (int r = 0; r < R; ++r) {
      float s = 0.f;
      for (int64_t i = 0; i < d; ++i) s += X[r * d + i] * W[i * d + col];
      Z[r * d + col] = s;
    }
  }
}

inline void matmul(int rows, const float* X, const float* W, float* Z, int64_t d) {
  switch (rows) {
    case 4: matmul_rows<4>(X, W, Z, d); break;
    case 3: matmul_rows<3>(X, W, Z, d); break;
    case 2: matmul_rows<2>(X, W, Z, d); break;
    default: matmul_rows<1>(X, W, Z, d); break;
  }
}

static_assert(TAPF_ROWS == 4, "matmul() dispatches on up to 4 rows");

// One block of up to TAPF_ROWS real tokens of candidate n (user u).
inline void gate_block(const TapfArgs* a, int rows, const int64_t* ks, int64_t n, int64_t u, float* scratch) {
  const int64_t d = a->d, L = a->length;
  float* X = scratch;                    // (rows, d) interaction h * cand, then reused for the output
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
    float* o = a->out + (n * L + k) * d;
    int64_t j = 0;
    for (; j + VW <= d; j += VW) {
      const vf t = vtanh(loadu(au + j) + loadu(s + j));
      storeu(o + j, loadu(h + j) + p * t * loadu(e + j));
    }
    for (; j < d; ++j) o[j] = h[j] + p * stanh(au[j] + s[j]) * e[j];
  }
}

}  // namespace

const char* name() {
#if TAPF_VEC_BYTES == 64
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
    int rows = 0;
    for (int64_t k = 0; k < L; ++k) {
      if (a->polarity[u * L + k] == 0.f) {  // padding: h' = h
        __builtin_memcpy(a->out + (n * L + k) * d, a->tokens + (u * L + k) * d, sizeof(float) * d);
        continue;
      }
      ks[rows++] = k;
      if (rows == TAPF_ROWS) {
        gate_block(a, rows, ks, n, u, scratch);
        rows = 0;
      }
    }
    if (rows) gate_block(a, rows, ks, n, u, scratch);
  }
}

}  // namespace TAPF_NS
