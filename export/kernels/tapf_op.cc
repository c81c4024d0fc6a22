// ONNX Runtime custom-op library for tapf.fused::TAPFGate, TAPFGateDotPool and TAPFGateMLPPool (CPU).
//
// Registers three ops in domain "tapf.fused" for the CPU execution provider: the gate, and the gate fused
// with the attention that pools its output (the (N, L, d) gated tokens then never leave per-task scratch).
// The ISA-specific kernel (AVX-512, AVX2 or generic SSE2) is chosen once at load time from what the CPU
// supports; TAPF_ISA=avx512|avx2|generic in the environment forces one (tests and benchmarks), and
// TAPF_ISA=wide16 the AVX-512 code compiled for AVX2 (tests of the 16-lane logic without AVX-512). Work is
// split over ONNX Runtime's intra-op thread pool (KernelContext::ParallelFor): first the
// candidate-independent user part (U*L rows), then the candidates.
//
// Build: make -C export/kernels (fetches the ORT C/C++ API headers from Debian's
// libonnxruntime-dev at build time; they are never committed).

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "tapf_kernel.h"

namespace {

constexpr const char* kDomain = "tapf.fused";

struct Isa {
  void (*user_rows)(const TapfArgs*, int64_t, int64_t);
  void (*candidates)(const TapfArgs*, int64_t, int64_t, float*);
  void (*pool_dot)(const TapfPoolArgs*, int64_t, int64_t, float*);
  void (*pool_mlp)(const TapfPoolArgs*, int64_t, int64_t, float*);
  const char* (*name)();
};

#define TAPF_ISA_ENTRY(ns) Isa{ns::user_rows, ns::candidates, ns::pool_dot, ns::pool_mlp, ns::name}

Isa pick_isa() {
  const Isa avx512 = TAPF_ISA_ENTRY(tapf_avx512);
  const Isa avx2 = TAPF_ISA_ENTRY(tapf_avx2);
  const Isa generic = TAPF_ISA_ENTRY(tapf_generic);
  const Isa wide16 = TAPF_ISA_ENTRY(tapf_wide16);  // tests only: never picked unless forced
  __builtin_cpu_init();
  const bool has512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw");
  const bool has2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const char* forced = std::getenv("TAPF_ISA");
  if (forced != nullptr && *forced != '\0') {
    const std::string f(forced);
    if (f == "avx512" && has512) return avx512;
    if (f == "avx2" && has2) return avx2;
    if (f == "generic") return generic;
    if (f == "wide16" && has2) return wide16;
  }
  if (has512) return avx512;
  if (has2) return avx2;
  return generic;
}

const Isa& isa() {
  static const Isa chosen = pick_isa();
  return chosen;
}

// The three ops of the domain; the two pooling ops are the gate fused with the attention that reads it.
enum class Mode { kGate, kDotPool, kMlpPool };

constexpr const char* op_name(Mode m) {
  return m == Mode::kGate ? "TAPFGate" : m == Mode::kDotPool ? "TAPFGateDotPool" : "TAPFGateMLPPool";
}
constexpr size_t n_inputs(Mode m) { return m == Mode::kGate ? 8 : m == Mode::kDotPool ? 10 : 14; }
constexpr size_t n_outputs(Mode m) { return m == Mode::kGate ? 1 : 2; }

struct Work {
  TapfPoolArgs pool;  // pool.gate holds the gate's arguments for every mode
  int64_t rows_per_task;
  int64_t cands_per_task;
  int64_t scratch_floats;
  Mode mode;
};

void user_task(void* data, size_t i) {
  const Work* w = static_cast<const Work*>(data);
  const int64_t total = w->pool.gate.n_users * w->pool.gate.length;
  const int64_t begin = static_cast<int64_t>(i) * w->rows_per_task;
  const int64_t end = begin + w->rows_per_task < total ? begin + w->rows_per_task : total;
  isa().user_rows(&w->pool.gate, begin, end);
}

void cand_task(void* data, size_t i) {
  const Work* w = static_cast<const Work*>(data);
  thread_local std::vector<float> scratch;
  if (scratch.size() < static_cast<size_t>(w->scratch_floats)) scratch.resize(static_cast<size_t>(w->scratch_floats));
  const int64_t begin = static_cast<int64_t>(i) * w->cands_per_task;
  const int64_t end = begin + w->cands_per_task < w->pool.gate.n_cand ? begin + w->cands_per_task : w->pool.gate.n_cand;
  switch (w->mode) {
    case Mode::kGate: isa().candidates(&w->pool.gate, begin, end, scratch.data()); break;
    case Mode::kDotPool: isa().pool_dot(&w->pool, begin, end, scratch.data()); break;
    case Mode::kMlpPool: isa().pool_mlp(&w->pool, begin, end, scratch.data()); break;
  }
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + ")";
}

template <Mode M>
struct TapfKernel {
  explicit TapfKernel(const OrtApi& api) : api_(api) {}

  OrtStatusPtr ComputeV2(OrtKernelContext* raw) {
    try {
      Compute(raw);
      return nullptr;
    } catch (const Ort::Exception& e) {
      return api_.CreateStatus(e.GetOrtErrorCode(), e.what());
    } catch (const std::exception& e) {
      return api_.CreateStatus(ORT_INVALID_ARGUMENT, e.what());
    }
  }

  [[noreturn]] static void fail(const std::string& what) { throw std::invalid_argument(std::string(op_name(M)) + ": " + what); }

  static void expect_shape(const char* name, const std::vector<int64_t>& got, const std::vector<int64_t>& want) {
    if (got != want) fail(std::string(name) + " has shape " + shape_str(got) + ", expected " + shape_str(want));
  }

  void Compute(OrtKernelContext* raw) {
    Ort::KernelContext ctx(raw);
    if (ctx.GetInputCount() != n_inputs(M)) fail("expected " + std::to_string(n_inputs(M)) + " inputs");
    auto shape = [&](size_t i) { return ctx.GetInput(i).GetTensorTypeAndShapeInfo().GetShape(); };
    const auto ts = shape(0);
    if (ts.size() != 3) fail("tokens must be (U, L, d), got " + shape_str(ts));
    const int64_t U = ts[0], L = ts[1], d = ts[2];
    const auto cs = shape(2);
    if (cs.size() != 2) fail("cand must be (N, d), got " + shape_str(cs));
    const int64_t N = cs[0];
    expect_shape("polarity", shape(1), {U, L});
    expect_shape("cand", cs, {N, d});
    expect_shape("cand_user", shape(3), {N});
    expect_shape("w_int", shape(4), {d, d});
    expect_shape("w_tok", shape(5), {d, d});
    expect_shape("w_mix", shape(6), {d, d});
    expect_shape("pol_bias", shape(7), {3, d});

    Work w{};
    w.mode = M;
    TapfPoolArgs& p = w.pool;
    TapfArgs& a = p.gate;
    a.tokens = ctx.GetInput(0).GetTensorData<float>();
    a.polarity = ctx.GetInput(1).GetTensorData<float>();
    a.cand = ctx.GetInput(2).GetTensorData<float>();
    a.cand_user = ctx.GetInput(3).GetTensorData<int64_t>();
    a.w_int = ctx.GetInput(4).GetTensorData<float>();
    a.w_tok = ctx.GetInput(5).GetTensorData<float>();
    a.w_mix = ctx.GetInput(6).GetTensorData<float>();
    a.pol_bias = ctx.GetInput(7).GetTensorData<float>();
    a.n_users = U;
    a.length = L;
    a.d = d;
    a.n_cand = N;
    int64_t T = 0, h = 0;
    if (M == Mode::kGate) {
      a.out = ctx.GetOutput(0, {N, L, d}).GetTensorMutableData<float>();
    } else {
      expect_shape("mask", shape(8), {U, L});
      p.mask = reinterpret_cast<const uint8_t*>(ctx.GetInput(8).GetTensorData<bool>());
    }
    if (M == Mode::kDotPool) {
      const auto qs = shape(9);
      if (qs.size() != 3) fail("query must be (N, T, d), got " + shape_str(qs));
      T = qs[1];
      expect_shape("query", qs, {N, T, d});
      p.query = ctx.GetInput(9).GetTensorData<float>();
      p.n_query = T;
      p.pooled = ctx.GetOutput(0, {N, T, d}).GetTensorMutableData<float>();
      p.weights = ctx.GetOutput(1, {N, T, L}).GetTensorMutableData<float>();
    } else if (M == Mode::kMlpPool) {
      const auto ws = shape(10);
      if (ws.size() != 2) fail("w_token must be (d, h), got " + shape_str(ws));
      h = ws[1];
      expect_shape("att_cand", shape(9), {N, d});
      expect_shape("w_token", ws, {d, h});
      expect_shape("w_product", shape(11), {d, h});
      expect_shape("att_bias", shape(12), {N, h});
      expect_shape("w_score", shape(13), {h});
      p.att_cand = ctx.GetInput(9).GetTensorData<float>();
      p.w_token = ctx.GetInput(10).GetTensorData<float>();
      p.w_product = ctx.GetInput(11).GetTensorData<float>();
      p.att_bias = ctx.GetInput(12).GetTensorData<float>();
      p.w_score = ctx.GetInput(13).GetTensorData<float>();
      p.hidden = h;
      p.pooled = ctx.GetOutput(0, {N, d}).GetTensorMutableData<float>();
      p.weights = ctx.GetOutput(1, {N, L}).GetTensorMutableData<float>();
    }
    if (N == 0) return;
    if (L == 0 || d == 0) {  // nothing to gate or pool: zero outputs of the right shape
      if (M != Mode::kGate) {
        std::memset(p.pooled, 0, sizeof(float) * static_cast<size_t>(N * (M == Mode::kDotPool ? T : 1) * d));
        std::memset(p.weights, 0, sizeof(float) * static_cast<size_t>(N * (M == Mode::kDotPool ? T : 1) * L));
      }
      return;
    }

    for (int64_t i = 0; i < U * L; ++i) {
      const float pol = a.polarity[i];
      if (!(pol == -1.f || pol == 0.f || pol == 1.f))
        fail("polarity must be -1, 0 or +1, got " + std::to_string(pol));
    }
    for (int64_t n = 0; n < N; ++n) {
      if (a.cand_user[n] < 0 || a.cand_user[n] >= U)
        fail("cand_user[" + std::to_string(n) + "] = " + std::to_string(a.cand_user[n]) + " is outside [0, " +
             std::to_string(U) + ")");
    }

    std::vector<float> user_part(static_cast<size_t>(U * L * d));
    a.user_part = user_part.data();
    // Tasks of ~64 user rows / a few candidates: enough tasks for the pool, little overhead.
    w.rows_per_task = 64;
    const int64_t user_tasks = (U * L + w.rows_per_task - 1) / w.rows_per_task;
    if (user_tasks == 1) {
      user_task(&w, 0);
    } else {
      ctx.ParallelFor(user_task, static_cast<size_t>(user_tasks), 0, &w);
    }
    w.scratch_floats = M == Mode::kGate ? TAPF_SCRATCH_FLOATS(d) : TAPF_POOL_SCRATCH_FLOATS(L, d, T, h);
    const int64_t work_per_cand = L * d * d;
    w.cands_per_task = work_per_cand >= (1 << 16) ? 1 : ((1 << 16) + work_per_cand - 1) / work_per_cand;
    const int64_t cand_tasks = (N + w.cands_per_task - 1) / w.cands_per_task;
    if (cand_tasks == 1) {
      cand_task(&w, 0);
    } else {
      ctx.ParallelFor(cand_task, static_cast<size_t>(cand_tasks), 0, &w);
    }
  }

 private:
  const OrtApi& api_;
};

template <Mode M>
struct TapfOp : Ort::CustomOpBase<TapfOp<M>, TapfKernel<M>, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* /*info*/, void** kernel) const {
    *kernel = new TapfKernel<M>(api);
    return nullptr;
  }
  const char* GetName() const { return op_name(M); }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return n_inputs(M); }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    if (index == 3) return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
    if (M != Mode::kGate && index == 8) return ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL;
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  size_t GetOutputTypeCount() const { return n_outputs(M); }
  ONNXTensorElementDataType GetOutputType(size_t /*index*/) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace

extern "C" {

// Which kernel was chosen ("avx512", "avx2" or "generic"): for logs and benchmarks (ctypes).
__attribute__((visibility("default"))) const char* TapfKernelIsa() { return isa().name(); }

__attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                                 const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {  // an ONNX Runtime older than the headers' API version: refuse loudly
    const OrtApi* v1 = api_base->GetApi(1);
    return v1->CreateStatus(ORT_FAIL, "libtapf_ort: this ONNX Runtime does not provide the C API version it was built for");
  }
  Ort::InitApi(api);
  // The op and its domain must outlive every session that uses them: static, created once.
  static TapfOp<Mode::kGate> gate;
  static TapfOp<Mode::kDotPool> dot_pool;
  static TapfOp<Mode::kMlpPool> mlp_pool;
  static std::once_flag once;
  static OrtCustomOpDomain* domain = nullptr;
  static OrtStatus* init_error = nullptr;
  std::call_once(once, [&] {
    init_error = api->CreateCustomOpDomain(kDomain, &domain);
    if (init_error == nullptr) init_error = api->CustomOpDomain_Add(domain, &gate);
    if (init_error == nullptr) init_error = api->CustomOpDomain_Add(domain, &dot_pool);
    if (init_error == nullptr) init_error = api->CustomOpDomain_Add(domain, &mlp_pool);
  });
  if (init_error != nullptr) return api->CreateStatus(api->GetErrorCode(init_error), api->GetErrorMessage(init_error));
  return api->AddCustomOpDomain(options, domain);
}

}  // extern "C"
