// ONNX Runtime custom-op library for tapf.fused::TAPFGate (CPU).
//
// Registers one op in domain "tapf.fused" for the CPU execution provider. The ISA-specific
// kernel (AVX-512, AVX2 or generic SSE2) is chosen once at load time from what the CPU supports;
// TAPF_ISA=avx512|avx2|generic in the environment forces one (tests and benchmarks). Work is
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
constexpr const char* kOpName = "TAPFGate";
constexpr size_t kInputs = 8;

struct Isa {
  void (*user_rows)(const TapfArgs*, int64_t, int64_t);
  void (*candidates)(const TapfArgs*, int64_t, int64_t, float*);
  const char* (*name)();
};

Isa pick_isa() {
  const Isa avx512{tapf_avx512::user_rows, tapf_avx512::candidates, tapf_avx512::name};
  const Isa avx2{tapf_avx2::user_rows, tapf_avx2::candidates, tapf_avx2::name};
  const Isa generic{tapf_generic::user_rows, tapf_generic::candidates, tapf_generic::name};
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
  }
  if (has512) return avx512;
  if (has2) return avx2;
  return generic;
}

const Isa& isa() {
  static const Isa chosen = pick_isa();
  return chosen;
}

struct Work {
  TapfArgs args;
  int64_t rows_per_task;
  int64_t cands_per_task;
};

void user_task(void* data, size_t i) {
  const Work* w = static_cast<const Work*>(data);
  const int64_t total = w->args.n_users * w->args.length;
  const int64_t begin = static_cast<int64_t>(i) * w->rows_per_task;
  const int64_t end = begin + w->rows_per_task < total ? begin + w->rows_per_task : total;
  isa().user_rows(&w->args, begin, end);
}

void cand_task(void* data, size_t i) {
  const Work* w = static_cast<const Work*>(data);
  thread_local std::vector<float> scratch;
  scratch.resize(static_cast<size_t>(TAPF_SCRATCH_FLOATS(w->args.d)));
  const int64_t begin = static_cast<int64_t>(i) * w->cands_per_task;
  const int64_t end = begin + w->cands_per_task < w->args.n_cand ? begin + w->cands_per_task : w->args.n_cand;
  isa().candidates(&w->args, begin, end, scratch.data());
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + ")";
}

void expect_shape(const char* name, const std::vector<int64_t>& got, const std::vector<int64_t>& want) {
  if (got != want)
    throw std::invalid_argument(std::string("TAPFGate: ") + name + " has shape " + shape_str(got) + ", expected " +
                                shape_str(want));
}

struct TAPFGateKernel {
  explicit TAPFGateKernel(const OrtApi& api) : api_(api) {}

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

  void Compute(OrtKernelContext* raw) {
    Ort::KernelContext ctx(raw);
    if (ctx.GetInputCount() != kInputs) throw std::invalid_argument("TAPFGate: expected 8 inputs");
    auto shape = [&](size_t i) { return ctx.GetInput(i).GetTensorTypeAndShapeInfo().GetShape(); };
    const auto ts = shape(0);
    if (ts.size() != 3) throw std::invalid_argument("TAPFGate: tokens must be (U, L, d), got " + shape_str(ts));
    const int64_t U = ts[0], L = ts[1], d = ts[2];
    const auto cs = shape(2);
    if (cs.size() != 2) throw std::invalid_argument("TAPFGate: cand must be (N, d), got " + shape_str(cs));
    const int64_t N = cs[0];
    expect_shape("polarity", shape(1), {U, L});
    expect_shape("cand", cs, {N, d});
    expect_shape("cand_user", shape(3), {N});
    expect_shape("w_int", shape(4), {d, d});
    expect_shape("w_tok", shape(5), {d, d});
    expect_shape("w_mix", shape(6), {d, d});
    expect_shape("pol_bias", shape(7), {3, d});

    Work w{};
    TapfArgs& a = w.args;
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
    a.out = ctx.GetOutput(0, {N, L, d}).GetTensorMutableData<float>();
    if (N == 0 || L == 0 || d == 0) return;

    for (int64_t i = 0; i < U * L; ++i) {
      const float p = a.polarity[i];
      if (!(p == -1.f || p == 0.f || p == 1.f))
        throw std::invalid_argument("TAPFGate: polarity must be -1, 0 or +1, got " + std::to_string(p));
    }
    for (int64_t n = 0; n < N; ++n) {
      if (a.cand_user[n] < 0 || a.cand_user[n] >= U)
        throw std::invalid_argument("TAPFGate: cand_user[" + std::to_string(n) + "] = " +
                                    std::to_string(a.cand_user[n]) + " is outside [0, " + std::to_string(U) + ")");
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

struct TAPFGateOp : Ort::CustomOpBase<TAPFGateOp, TAPFGateKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* /*info*/, void** kernel) const {
    *kernel = new TAPFGateKernel(api);
    return nullptr;
  }
  const char* GetName() const { return kOpName; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return kInputs; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return index == 3 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  size_t GetOutputTypeCount() const { return 1; }
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
  static TAPFGateOp op;
  static std::once_flag once;
  static OrtCustomOpDomain* domain = nullptr;
  static OrtStatus* init_error = nullptr;
  std::call_once(once, [&] {
    init_error = api->CreateCustomOpDomain(kDomain, &domain);
    if (init_error == nullptr) init_error = api->CustomOpDomain_Add(domain, &op);
  });
  if (init_error != nullptr) return api->CreateStatus(api->GetErrorCode(init_error), api->GetErrorMessage(init_error));
  return api->AddCustomOpDomain(options, domain);
}

}  // extern "C"
