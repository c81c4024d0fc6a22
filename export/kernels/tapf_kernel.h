// The fused TAPF gate kernel: shared declarations (plain C types only, see tapf_kernel_isa.cc).
//
// Node contract (tapf.fused::TAPFGate v1, export/tapf_onnx.py):
//   tokens (U, L, d), polarity (U, L) in {-1, 0, +1}, cand (N, d), cand_user (N,) int64 in [0, U),
//   w_int, w_tok, w_mix (d, d) stored (d_in, d_out): x @ W,  pol_bias (3, d)  ->  out (N, L, d)
//   h = tokens[cand_user];  e = relu((h * cand) @ w_int)
//   t = tanh((tokens @ w_tok + pol_bias[polarity + 1])[cand_user] + e @ w_mix)
//   out = h + polarity * t * e           (padding tokens, polarity 0, pass through unchanged)
#pragma once

#include <stddef.h>
#include <stdint.h>

struct TapfArgs {
  const float* tokens;    // (U, L, d)
  const float* polarity;  // (U, L)
  const float* cand;      // (N, d)
  const int64_t* cand_user;  // (N,)
  const float* w_int;     // (d, d) input-major
  const float* w_tok;     // (d, d) input-major
  const float* w_mix;     // (d, d) input-major
  const float* pol_bias;  // (3, d)
  float* out;             // (N, L, d)
  float* user_part;       // (U, L, d) scratch: tokens @ w_tok + pol_bias[polarity + 1]
  int64_t n_users, length, d, n_cand;
};

// The gate fused with what reads its output (tapf.fused::TAPFGateDotPool / TAPFGateMLPPool v1): per
// candidate, the gated tokens g (L, d) live only in per-task scratch and are pooled at once.
//   dot: weights = softmax over real tokens of query (T, d) @ g^T; pooled = weights @ g   (OneTrans)
//   mlp: s_k = silu(g_k @ (w_token + att_cand * w_product) + att_bias) @ w_score;
//        weights = softmax over real tokens of s; pooled = weights @ g              (DIN target attention)
// Masked tokens get weight exactly 0; a candidate with no real token gets zero weights and pooled.
struct TapfPoolArgs {
  TapfArgs gate;             // gate.out unused
  const uint8_t* mask;       // (U, L) bool, true on real tokens
  const float* query;        // dot: (N, T, d), the score scale already folded in
  int64_t n_query;           // dot: T
  const float* att_cand;     // mlp: (N, d)
  const float* w_token;      // mlp: (d, h)
  const float* w_product;    // mlp: (d, h)
  const float* att_bias;     // mlp: (N, h)
  const float* w_score;      // mlp: (h,)
  int64_t hidden;            // mlp: h
  float* pooled;             // dot: (N, T, d); mlp: (N, d)
  float* weights;            // dot: (N, T, L); mlp: (N, L)
};

// Rows processed together by the micro-kernel, and the per-task scratch it needs.
#define TAPF_ROWS 4
#define TAPF_SCRATCH_FLOATS(d) (3 * TAPF_ROWS * (d))
// Pooling ops: the gate's scratch, g (L, d), the scores (max(T, 1), L), the per-candidate matrix (d, h) and the
// hidden rows (TAPF_ROWS, h), the real tokens' positions (L int32); T = 0 for mlp, h = 0 for dot.
#define TAPF_POOL_SCRATCH_FLOATS(L, d, T, h) \
  (TAPF_SCRATCH_FLOATS(d) + (L) * (d) + ((T) > 1 ? (T) : 1) * (L) + (d) * (h) + TAPF_ROWS * (h) + (L))

// One implementation per instruction set; each lives in its own translation unit compiled with
// that ISA's flags (tapf_kernel_isa.cc), and tapf_op.cc picks one at load time.
#define TAPF_DECLARE_ISA(ns)                                                                   \
  namespace ns {                                                                               \
  /* user_part rows [row_begin, row_end) of the U*L rows */                                   \
  void user_rows(const TapfArgs* a, int64_t row_begin, int64_t row_end);                       \
  /* output of candidates [n_begin, n_end); scratch holds TAPF_SCRATCH_FLOATS(d) floats */    \
  void candidates(const TapfArgs* a, int64_t n_begin, int64_t n_end, float* scratch);          \
  /* pooled and weights of candidates [n_begin, n_end); TAPF_POOL_SCRATCH_FLOATS scratch */    \
  void pool_dot(const TapfPoolArgs* a, int64_t n_begin, int64_t n_end, float* scratch);         \
  void pool_mlp(const TapfPoolArgs* a, int64_t n_begin, int64_t n_end, float* scratch);         \
  const char* name();                                                                          \
  }

TAPF_DECLARE_ISA(tapf_avx512)
TAPF_DECLARE_ISA(tapf_avx2)
TAPF_DECLARE_ISA(tapf_generic)
// The AVX-512 build's code (16-lane vectors) compiled for AVX2, with a plain division for the one AVX-512
// intrinsic: lets the tests check the 16-lane logic (reductions, remainders, tiling) on CPUs without
// AVX-512. Only ever chosen by TAPF_ISA=wide16.
TAPF_DECLARE_ISA(tapf_wide16)
