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

// Rows processed together by the micro-kernel, and the per-task scratch it needs.
#define TAPF_ROWS 4
#define TAPF_SCRATCH_FLOATS(d) (3 * TAPF_ROWS * (d))

// One implementation per instruction set; each lives in its own translation unit compiled with
// that ISA's flags (tapf_kernel_isa.cc), and tapf_op.cc picks one at load time.
#define TAPF_DECLARE_ISA(ns)                                                                   \
  namespace ns {                                                                               \
  /* user_part rows [row_begin, row_end) of the U*L rows */                                   \
  void user_rows(const TapfArgs* a, int64_t row_begin, int64_t row_end);                       \
  /* output of candidates [n_begin, n_end); scratch holds TAPF_SCRATCH_FLOATS(d) floats */    \
  void candidates(const TapfArgs* a, int64_t n_begin, int64_t n_end, float* scratch);          \
  const char* name();                                                                          \
  }

TAPF_DECLARE_ISA(tapf_avx512)
TAPF_DECLARE_ISA(tapf_avx2)
TAPF_DECLARE_ISA(tapf_generic)
