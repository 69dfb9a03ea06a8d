// SDPA forward and backward through the cuDNN frontend graph API. One graph per (direction,
// shape, dtype, scale, window) is built on first use (heuristics mode A; building takes tens of
// milliseconds) and cached; execution takes the caller's device pointers and a workspace from the
// caching allocator. Causality is a top-left aligned diagonal band with right bound 0, the sliding
// window its left bound (keys with q - k < window), so the mask is exactly the native kernels'.
#define CUDNN_FRONTEND_SKIP_JSON_LIB
#include <cudnn_frontend.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>

#include "ops/cuda/check.h"
#include "ops/cuda/cudnn/attention_cudnn.h"
#include "ops/cuda/runtime.h"

#define MF_CUDNN_CHECK(call)                                                                     \
  do {                                                                                           \
    cudnnStatus_t mf_st_ = (call);                                                               \
    if (mf_st_ != CUDNN_STATUS_SUCCESS) MF_THROW("cuDNN error in ", #call, ": ", cudnnGetErrorString(mf_st_)); \
  } while (0)

namespace moeforge::cuda::cudnn_attention {

namespace fe = cudnn_frontend;

namespace {

enum Uid : int64_t { kQ = 1, kK, kV, kO, kStats, kDO, kDQ, kDK, kDV };

struct Key {
  bool backward;
  int64_t b, s, hq, hkv, d;
  DType dtype;
  float scale;
  int64_t window;
  bool operator<(const Key& o) const {
    return std::tie(backward, b, s, hq, hkv, d, dtype, scale, window) <
           std::tie(o.backward, o.b, o.s, o.hq, o.hkv, o.d, o.dtype, o.scale, o.window);
  }
};

struct State {
  std::mutex mu;
  cudnnHandle_t handle = nullptr;
  bool tried = false, loaded = false;
  std::map<Key, std::shared_ptr<fe::graph::Graph>> graphs;
};

State& state() {
  static State* s = new State();
  return *s;
}

// Creates the handle once; false (never an error) when the cuDNN library cannot be loaded here.
bool ensure_handle(State& st) {
  if (!st.tried) {
    st.tried = true;
    st.loaded = cudnnCreate(&st.handle) == CUDNN_STATUS_SUCCESS;
    if (st.loaded) MF_CUDNN_CHECK(cudnnSetStream(st.handle, current_stream()));
  }
  return st.loaded;
}

void check_fe(fe::error_t e, const char* what) {
  if (!e.is_good()) MF_THROW("cuDNN attention: ", what, " failed: ", e.get_message());
}

// [B,S,H,D] row-major as cuDNN's (b, h, s, d) dimensions.
std::shared_ptr<fe::graph::Tensor_attributes> bshd(fe::graph::Graph& g, const char* name, Uid uid, int64_t b, int64_t s,
                                                   int64_t h, int64_t d) {
  return g.tensor(fe::graph::Tensor_attributes()
                      .set_name(name)
                      .set_uid(uid)
                      .set_dim({b, h, s, d})
                      .set_stride({s * h * d, d, h * d, 1}));
}

fe::DataType_t fe_type(DType t) { return t == DType::BF16 ? fe::DataType_t::BFLOAT16 : fe::DataType_t::HALF; }

template <class Attr>
void set_mask(Attr& a, int64_t window) {
  a.set_diagonal_alignment(fe::DiagonalAlignment_t::TOP_LEFT).set_diagonal_band_right_bound(0);
  if (window > 0) a.set_diagonal_band_left_bound(static_cast<int>(window));
}

std::shared_ptr<fe::graph::Graph> build(State& st, const Key& k) {
  auto g = std::make_shared<fe::graph::Graph>();
  g->set_io_data_type(fe_type(k.dtype))
      .set_intermediate_data_type(fe::DataType_t::FLOAT)
      .set_compute_data_type(fe::DataType_t::FLOAT);
  auto q = bshd(*g, "q", kQ, k.b, k.s, k.hq, k.d);
  auto kk = bshd(*g, "k", kK, k.b, k.s, k.hkv, k.d);
  auto v = bshd(*g, "v", kV, k.b, k.s, k.hkv, k.d);
  const std::vector<int64_t> stats_dim = {k.b, k.hq, k.s, 1}, stats_stride = {k.hq * k.s, k.s, 1, 1};
  if (!k.backward) {
    auto attr = fe::graph::SDPA_attributes().set_name("sdpa").set_generate_stats(true).set_attn_scale(k.scale);
    set_mask(attr, k.window);
    auto [o, stats] = g->sdpa(q, kk, v, attr);
    o->set_output(true).set_uid(kO).set_dim({k.b, k.hq, k.s, k.d}).set_stride({k.s * k.hq * k.d, k.d, k.hq * k.d, 1});
    stats->set_output(true).set_uid(kStats).set_data_type(fe::DataType_t::FLOAT).set_dim(stats_dim).set_stride(stats_stride);
  } else {
    auto o = bshd(*g, "o", kO, k.b, k.s, k.hq, k.d);
    auto dout = bshd(*g, "dout", kDO, k.b, k.s, k.hq, k.d);
    auto stats = g->tensor(fe::graph::Tensor_attributes()
                               .set_name("stats")
                               .set_uid(kStats)
                               .set_dim(stats_dim)
                               .set_stride(stats_stride)
                               .set_data_type(fe::DataType_t::FLOAT));
    auto attr = fe::graph::SDPA_backward_attributes().set_name("sdpa_backward").set_attn_scale(k.scale);
    set_mask(attr, k.window);
    auto [dq, dk, dv] = g->sdpa_backward(q, kk, v, o, dout, stats, attr);
    dq->set_output(true).set_uid(kDQ).set_dim({k.b, k.hq, k.s, k.d}).set_stride({k.s * k.hq * k.d, k.d, k.hq * k.d, 1});
    dk->set_output(true).set_uid(kDK).set_dim({k.b, k.hkv, k.s, k.d}).set_stride({k.s * k.hkv * k.d, k.d, k.hkv * k.d, 1});
    dv->set_output(true).set_uid(kDV).set_dim({k.b, k.hkv, k.s, k.d}).set_stride({k.s * k.hkv * k.d, k.d, k.hkv * k.d, 1});
  }
  check_fe(g->build(st.handle, {fe::HeurMode_t::A}), k.backward ? "building the backward graph" : "building the forward graph");
  return g;
}

void run(const Key& k, std::unordered_map<int64_t, void*>& ptrs) {
  State& st = state();
  std::shared_ptr<fe::graph::Graph> g;
  {
    std::lock_guard<std::mutex> lock(st.mu);
    MF_CHECK(ensure_handle(st), "cuDNN attention: the cuDNN library could not be loaded");
    auto it = st.graphs.find(k);
    if (it == st.graphs.end()) it = st.graphs.emplace(k, build(st, k)).first;
    g = it->second;
  }
  int64_t ws_bytes = 0;
  check_fe(g->get_workspace_size(ws_bytes), "querying the workspace size");
  Tensor ws = empty({std::max<int64_t>(ws_bytes, 1)}, DType::U8, "the cuDNN attention workspace");
  check_fe(g->execute(st.handle, ptrs, ws.raw()), k.backward ? "the backward" : "the forward");
}

Key key_of(bool backward, const Tensor& q, const Tensor& k, float scale, int64_t window) {
  return {backward, q.size(0), q.size(1), q.size(2), k.size(2), q.size(3), q.dtype(), scale, window};
}

}  // namespace

bool usable(const Tensor& q, int64_t window, const Tensor* doc_ids) {
  const char* env = std::getenv("MOEFORGE_ATTENTION");
  if (env && std::strcmp(env, "native") == 0) return false;
  if (doc_ids) return false;  // packed documents: the native kernels (ragged layouts are not wired yet)
  if (q.dtype() != DType::BF16 && q.dtype() != DType::F16) return false;
  const int64_t d = q.size(3);
  if (d % 8 != 0 || d > 256 || q.numel() == 0) return false;
  (void)window;
  State& st = state();
  std::lock_guard<std::mutex> lock(st.mu);
  return ensure_handle(st);
}

void forward(const Tensor& q, const Tensor& k, const Tensor& v, float scale, int64_t window, Tensor& out, Tensor& lse) {
  std::unordered_map<int64_t, void*> ptrs = {{kQ, q.raw()}, {kK, k.raw()},
                                             {kV, v.raw()}, {kO, out.raw()},
                                             {kStats, lse.raw()}};
  run(key_of(false, q, k, scale, window), ptrs);
}

void backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
              const Tensor& dout, float scale, int64_t window, Tensor& dq, Tensor& dk, Tensor& dv) {
  std::unordered_map<int64_t, void*> ptrs = {
      {kQ, q.raw()},     {kK, k.raw()},      {kV, v.raw()},
      {kO, out.raw()},   {kStats, lse.raw()}, {kDO, dout.raw()},
      {kDQ, dq.raw()},                      {kDK, dk.raw()},                        {kDV, dv.raw()}};
  run(key_of(true, q, k, scale, window), ptrs);
}

}  // namespace moeforge::cuda::cudnn_attention
