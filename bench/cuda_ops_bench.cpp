// Times the CUDA ops at the Qwen3-30B-A3B training shapes (tokens = seq 4096 x batch 1, hidden 2048,
// expert intermediate 768, vocabulary 151936) and prints each one's time, achieved TFLOP/s or GB/s
// and the fraction of its floor (989 dense BF16 TFLOP/s, 3.35 TB/s HBM3 on H100 SXM). One JSON line
// per op; docs/perf-notes.md records the results.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "ops/cuda/ops_cuda.h"
#include "ops/cuda/runtime.h"

using namespace moeforge;

namespace {

Tensor dev_randn(Shape s, DType dt, float scale = 1.f) {
  std::mt19937 g(7);
  std::normal_distribution<float> d(0.f, scale);
  std::vector<float> v(static_cast<size_t>(shape_numel(s)));
  for (auto& x : v) x = d(g);
  return cuda::to_device(Tensor::from_vector(v, s), dt);
}

double time_ms(const std::function<void()>& fn, int iters = 20) {
  for (int i = 0; i < 3; ++i) fn();
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  cudaEventRecord(a);
  for (int i = 0; i < iters; ++i) fn();
  cudaEventRecord(b);
  cudaEventSynchronize(b);
  float ms = 0;
  cudaEventElapsedTime(&ms, a, b);
  return ms / iters;
}

void report(const std::string& op, const std::string& shape, double ms, double flops, double bytes) {
  const double tflops = flops / ms / 1e9, gbs = bytes / ms / 1e6;
  std::printf("{\"op\": \"%s\", \"shape\": \"%s\", \"ms\": %.4f, \"tflops\": %.1f, \"gb_s\": %.0f, \"of_floor\": %.2f}\n",
              op.c_str(), shape.c_str(), ms, tflops, gbs, flops > 0 ? tflops / 989.0 : gbs / 3350.0);
}

// AdamW under the bf16 policy (w, g, m, v BF16: 14 bytes an element, 8 read and 6 written) over one
// q30 layer's experts (gate_up [128, 1536, 2048] and down [128, 2048, 768]: 604M parameters, two
// tensors) and over the LM head alone ([151936, 2048]: 311M, one tensor), with a device-to-device
// copy of the same bytes as the floor for a mix of reads and writes.
void bench_adamw() {
  // Second moments must be >= 0 (a negative one sends sqrt down its slow path: session 21's first
  // timing of kernel variants had them, and measured the arithmetic's special cases, not the step's).
  // 2^20 random values repeated (drawing billions of normals on the host takes minutes).
  const auto tiled = [](const Shape& s, float scale, bool positive) {
    std::mt19937 gen(11);
    std::normal_distribution<float> d(0.f, scale);
    std::vector<float> block(1 << 20), all(static_cast<size_t>(shape_numel(s)));
    for (auto& x : block) x = positive ? std::abs(d(gen)) : d(gen);
    for (size_t i = 0; i < all.size(); ++i) all[i] = block[i & (block.size() - 1)];
    return cuda::to_device(Tensor::from_vector(all, s), DType::BF16);
  };
  const ops::AdamWScalars sc{0.1f, 0.999f, 0.001f, 0.0447f, 1e-8f, 1e-4f};
  for (const auto& [name, shapes] : std::vector<std::pair<std::string, std::vector<Shape>>>{
           {"experts 604M", {Shape{128, 1536, 2048}, Shape{128, 2048, 768}}}, {"lm_head 311M", {Shape{151936, 2048}}}}) {
    std::vector<cuda::AdamWTensors> ts;
    std::vector<Tensor> grads;
    int64_t n = 0;
    for (const Shape& s : shapes) {
      ts.push_back({tiled(s, 0.02f, false), tiled(s, 1e-3f, false), tiled(s, 1e-3f, false), tiled(s, 1e-6f, true), 0.9999f,
                    Tensor(), Tensor()});
      grads.push_back(ts.back().grad);
      n += shape_numel(s);
    }
    const double bytes = 14.0 * static_cast<double>(n);
    report("adamw_bf16", name, time_ms([&] { cuda::adamw_multi_tensor(ts, sc); }, 10), 0, bytes);
    if (shapes.size() == 2) {
      // The same with every third expert never routed (at the random initialisation's native
      // routing about a third of q30's expert parameters are): its gradient rows flagged unwritten,
      // its moments zero. Bytes: what the full update would move (the time is what to compare;
      // MOEFORGE_ADAMW_ZERO_SKIP=0 in another run of this binary is the full update).
      std::vector<cuda::AdamWTensors> tz = ts;
      for (auto& t : tz) {
        const int64_t experts = t.param.size(0), per = t.param.numel() / experts;
        std::vector<uint8_t> flags(static_cast<size_t>(experts), 1);
        t.exp_avg = cuda::copy(t.exp_avg, "bench exp_avg");
        t.exp_avg_sq = cuda::copy(t.exp_avg_sq, "bench exp_avg_sq");
        for (int64_t e = 0; e < experts; e += 3) {
          flags[static_cast<size_t>(e)] = 0;
          cudaMemset(static_cast<char*>(t.exp_avg.raw()) + e * per * 2, 0, static_cast<size_t>(per) * 2);
          cudaMemset(static_cast<char*>(t.exp_avg_sq.raw()) + e * per * 2, 0, static_cast<size_t>(per) * 2);
        }
        Tensor fh = Tensor::empty({experts}, DType::U8);
        std::copy(flags.begin(), flags.end(), fh.data<uint8_t>());
        t.grad_written_rows = cuda::to_device(fh, DType::U8);
      }
      report("adamw_bf16 a third never routed", name, time_ms([&] { cuda::adamw_multi_tensor(tz, sc); }, 10), 0, bytes);
      // And with the optimizer's zero-moment row flags on them (DeviceAdamW keeps these from its
      // first update on): the never-routed experts read and write nothing (decay 0.9999 keeps
      // every BF16 weight).
      for (auto& t : tz) {
        Tensor zh = cuda::to_host_f32(t.grad_written_rows);
        Tensor z = Tensor::empty(t.grad_written_rows.shape(), DType::U8);
        for (int64_t e = 0; e < z.numel(); ++e) z.data<uint8_t>()[e] = zh.f32()[e] == 0.f ? 1 : 0;
        t.zero_moment_rows = cuda::to_device(z, DType::U8);
      }
      report("adamw_bf16 a third never routed, zero-moment rows", name,
             time_ms([&] { cuda::adamw_multi_tensor(tz, sc); }, 10), 0, bytes);
    }
    // The gradient norm (2 bytes read an element) and clipping's in-place scaling (2 read, 2 written).
    report("grad_norm_bf16", name, time_ms([&] { cuda::global_grad_norm(grads); }, 10), 0, 2.0 * static_cast<double>(n));
    report("scale_inplace_bf16", name, time_ms([&] { cuda::scale_inplace(grads, 1.f); }, 10), 0, 4.0 * static_cast<double>(n));
    // The floor: half the bytes read, half written, by the copy engine's path through the SMs.
    void *src = nullptr, *dst = nullptr;
    const size_t half = static_cast<size_t>(bytes / 2);
    if (cudaMalloc(&src, half) == cudaSuccess && cudaMalloc(&dst, half) == cudaSuccess) {
      report("d2d_copy (floor)", name, time_ms([&] { cudaMemcpyAsync(dst, src, half, cudaMemcpyDeviceToDevice); }, 10), 0,
             bytes);
    }
    cudaFree(src);
    cudaFree(dst);
  }
}

// The fused LM head's cross-entropy on one 2048-row chunk of Qwen3's 151,936-wide BF16 logits, in
// place as the LM head runs it (a block per row: reads the row twice, writes it once).
void bench_cross_entropy() {
  const int64_t rows = 2048, v = 151936;
  Tensor logits = dev_randn({rows, v}, DType::BF16, 2.f);
  std::vector<int64_t> t(rows);
  for (int64_t i = 0; i < rows; ++i) t[i] = (i * 7919) % v;
  Tensor targets = cuda::to_device(Tensor::from_i64(t, {rows}), DType::I64);
  Tensor losses = cuda::empty({rows}, DType::F32);
  // The gradient written over the logits is a valid input again (finite values), so the repeated
  // in-place calls time the same work.
  Tensor dl = logits;
  const double ms = time_ms([&] { cuda::cross_entropy_backward_rows(logits, targets, -100, 1.f / rows, dl, losses); }, 10);
  report("cross_entropy", "2048x151936 bf16 in place", ms, 0, 3.0 * 2.0 * rows * v);
}

// Qwen3's per-head q and k norms with RoPE (q [4096, 32, 128], k [4096, 4, 128], BF16), forward and
// backward: the fused kernels against the norm and rotation kernels apart (MOEFORGE_NORM_ROPE=0 in
// the same binary is the other way to see them). Bytes: what the fused kernels move (forward x in,
// y out; backward x, dy in, dx out).
void bench_norm_rope() {
  const int64_t t = 4096, d = 128;
  Tensor ang = dev_randn({t, d}, DType::F32, 3.f);
  Tensor cos = dev_randn({t, d}, DType::F32, 0.7f), sin = dev_randn({t, d}, DType::F32, 0.7f);
  for (const int64_t heads : {int64_t{32}, int64_t{4}}) {
    Tensor x = dev_randn({t, heads, d}, DType::BF16), w = dev_randn({d}, DType::BF16, 0.5f);
    Tensor dy = dev_randn({t, heads, d}, DType::BF16), dw = cuda::empty({d}, DType::F32), rstd;
    const std::string shape = std::to_string(t) + "x" + std::to_string(heads) + "x128 bf16";
    const double bytes = 2.0 * t * heads * d;
    double ms = time_ms([&] { cuda::rms_norm_rope(x, w, 1e-6f, cos, sin, &rstd); });
    report("norm+rope fused forward", shape, ms, 0, 2 * bytes);
    ms = time_ms([&] {
      Tensor y = cuda::rms_norm(x.view({t * heads, d}), w, 1e-6f, &rstd).view({t, heads, d});
      cuda::rope_inplace(y, cos, sin);
    });
    report("norm, then rope forward", shape, ms, 0, 2 * bytes);
    ms = time_ms([&] { cuda::rms_norm_rope_backward(x, w, rstd, dy, cos, sin, dw); });
    report("norm+rope fused backward", shape, ms, 0, 3 * bytes);
    ms = time_ms([&] {
      cuda::rope_inplace(dy, cos, sin, true);
      cuda::rms_norm_backward(x.view({t * heads, d}), w, rstd, dy.view({t * heads, d}), dw);
    });
    report("rope, then norm backward", shape, ms, 0, 3 * bytes);
  }
}

// The hidden-size RMSNorm's backward (4096 x 2048 BF16, two rows a block): its grid is one wave of
// resident blocks (session 24; a fixed 4 blocks an SM before). Bytes: x, dy in, dx out.
void bench_hidden_norm_backward() {
  const int64_t t = 4096, h = 2048;
  Tensor x = dev_randn({t, h}, DType::BF16), dy = dev_randn({t, h}, DType::BF16), w = dev_randn({h}, DType::BF16);
  Tensor rstd, dw = cuda::empty({h}, DType::F32);
  cuda::rms_norm(x, w, 1e-6f, &rstd);
  const double ms = time_ms([&] { cuda::rms_norm_backward(x, w, rstd, dy, dw); });
  report("rms_norm_backward", "4096x2048 bf16", ms, 0, 3.0 * 2.0 * t * h);
}

// The routing plan of one q30 layer (4096 tokens, top-8 of 128 experts), its host wait included.
void bench_plan() {
  std::vector<int64_t> idx(4096 * 8);
  std::mt19937 g(5);
  for (auto& e : idx) e = static_cast<int64_t>(g() % 128);
  Tensor indices = cuda::to_device(Tensor::from_i64(idx, {4096, 8}), DType::I64);
  const double ms = time_ms([&] { cuda::plan_routing(indices, 128); });
  report("plan_routing", "4096x8 of 128 experts", ms, 0, 0);
}

}  // namespace

int main(int argc, char** argv) {
  if (!cuda::available()) {
    std::printf("{\"skipped\": \"no CUDA device\"}\n");
    return 0;
  }
  std::fprintf(stderr, "device: %s\n", cuda::device_name().c_str());
  if (argc > 1 && std::string(argv[1]) == "adamw") {  // only the optimizer's kernels and their floor
    bench_adamw();
    return 0;
  }
  if (argc > 1 && std::string(argv[1]) == "ce") {  // only the cross-entropy kernels
    bench_cross_entropy();
    return 0;
  }
  if (argc > 1 && std::string(argv[1]) == "small") {  // the fused norm + RoPE, the norm's backward, the routing plan
    bench_norm_rope();
    bench_hidden_norm_backward();
    bench_plan();
    return 0;
  }
  const int64_t T = 4096, H = 2048, I = 768, V = 151936;
  const DType bf = DType::BF16;
  // Dense GEMMs at the model's shapes (x W^T).
  for (auto [m, n, k, name] : std::vector<std::tuple<int64_t, int64_t, int64_t, const char*>>{
           {T, 2 * I, H, "gate_up all tokens"}, {T, H, I, "down all tokens"}, {8192, 8192, 8192, "square"},
           {T, 4096 + 2 * 512, H, "qkv proj"}, {T, H, 4096, "o proj"}}) {
    Tensor a = dev_randn({m, k}, bf), w = dev_randn({n, k}, bf, 0.02f), c = cuda::empty({m, n}, bf);
    const double ms = time_ms([&] { cuda::gemm(a, false, w, true, c); });
    report(std::string("gemm ") + name, std::to_string(m) + "x" + std::to_string(n) + "x" + std::to_string(k), ms,
           2.0 * m * n * k, 2.0 * (m * k + n * k + m * n));
  }
  {
    Tensor x = dev_randn({T, H}, bf), res = dev_randn({T, H}, bf), w = dev_randn({H}, bf);
    double ms = time_ms([&] { cuda::rms_norm(x, w, 1e-6f); });
    report("rms_norm", "4096x2048 bf16", ms, 0, 2.0 * T * H * 2 + 4.0 * T);
    Tensor sum;
    ms = time_ms([&] { cuda::add_rms_norm(x, res, w, 1e-6f, sum); });
    report("add_rms_norm", "4096x2048 bf16", ms, 0, 2.0 * T * H * 4 + 4.0 * T);
    Tensor rstd;
    cuda::rms_norm(x, w, 1e-6f, &rstd);
    Tensor dw = cuda::empty({H}, DType::F32);
    ms = time_ms([&] { cuda::rms_norm_backward(x, w, rstd, res, dw); });
    report("rms_norm_backward", "4096x2048 bf16", ms, 0, 2.0 * T * H * 3);
  }
  {
    // SwiGLU over every routed token copy: 4096 tokens x top-8.
    Tensor gu = dev_randn({T * 8, 2 * I}, bf), d = dev_randn({T * 8, I}, bf);
    double ms = time_ms([&] { cuda::swiglu(gu); });
    report("swiglu", "32768x1536 bf16", ms, 0, 2.0 * T * 8 * 3 * I);
    ms = time_ms([&] { cuda::swiglu_backward(gu, d); });
    report("swiglu_backward", "32768x1536 bf16", ms, 0, 2.0 * T * 8 * 5 * I);
  }
  {
    Tensor logits = dev_randn({T, 128}, bf), p, w, idx;
    const double ms = time_ms([&] { cuda::router_softmax_topk(logits, 8, true, p, w, idx); });
    report("router_softmax_topk", "4096x128 top-8", ms, 0, 2.0 * T * 128 + 4.0 * T * 128 + 12.0 * T * 8);
  }
  {
    Tensor logits = dev_randn({T, V}, bf, 2.f), dl;
    std::vector<int64_t> t(T);
    for (int64_t i = 0; i < T; ++i) t[i] = (i * 7919) % V;
    Tensor targets = cuda::to_device(Tensor::from_i64(t, {T}), DType::I64);
    int64_t n = 0;
    const double ms = time_ms([&] { cuda::cross_entropy_backward(logits, targets, -100, 1.f / T, dl, &n); }, 5);
    report("cross_entropy_backward", "4096x151936 bf16", ms, 0, 2.0 * T * V * 3);
  }
  // Grouped expert GEMMs at the q30 shapes against one dense GEMM of the same FLOPs.
  for (auto [experts, per_expert] : std::vector<std::pair<int64_t, int64_t>>{{128, 256}, {128, 2048}, {16, 2048}}) {
    const int64_t rows = experts * per_expert;
    std::vector<int64_t> off(experts + 1);
    for (int64_t e = 0; e <= experts; ++e) off[e] = e * per_expert;
    for (auto [n, k, name] : std::vector<std::tuple<int64_t, int64_t, const char*>>{{2 * I, H, "gate_up"}, {H, I, "down"}}) {
      Tensor x = dev_randn({rows, k}, bf), w = dev_randn({experts, n, k}, bf, 0.02f), y = cuda::empty({rows, n}, bf);
      const double ms = time_ms([&] { cuda::grouped_linear(x, w, off, y); });
      Tensor wd = dev_randn({n, k}, bf, 0.02f);
      const double dense_ms = time_ms([&] { cuda::gemm(x, false, wd, true, y); });
      const std::string shape = std::to_string(experts) + "x" + std::to_string(per_expert) + " " + name;
      report("grouped_gemm " + std::string(name), shape + " " + cuda::last_grouped_gemm_path(), ms, 2.0 * rows * n * k, 0);
      std::printf("{\"op\": \"grouped vs dense\", \"shape\": \"%s\", \"grouped_ms\": %.4f, \"dense_ms\": %.4f, \"ratio\": %.2f}\n",
                  shape.c_str(), ms, dense_ms, dense_ms / ms);
    }
  }
  {
    // Skewed routing, as the native router at random init gives (most tokens agree on a few
    // experts): 8 experts with 3968 rows and 120 with 8 (32704 rows); forward, input and weight
    // gradients of gate_up. MOEFORGE_GROUPED_GEMM=loop|grouped|cutlass forces a path.
    std::vector<int64_t> off(129, 0);
    for (int64_t e = 0; e < 128; ++e) off[e + 1] = off[e] + (e % 16 == 0 ? 3968 : 8);
    const int64_t rows = off.back(), n = 2 * I, k = H;
    Tensor x = dev_randn({rows, k}, bf), w = dev_randn({128, n, k}, bf, 0.02f), y = cuda::empty({rows, n}, bf);
    Tensor dx = cuda::empty({rows, k}, bf), dw = cuda::empty({128, n, k}, bf);
    const double flops = 2.0 * rows * n * k;
    double ms = time_ms([&] { cuda::grouped_linear(x, w, off, y); });
    report("grouped_gemm skewed forward", std::string("8x3968+120x8 gate_up ") + cuda::last_grouped_gemm_path(), ms, flops, 0);
    ms = time_ms([&] { cuda::grouped_linear_input_grad(y, w, off, dx); });
    report("grouped_gemm skewed input grad", std::string("8x3968+120x8 gate_up ") + cuda::last_grouped_gemm_path(), ms, flops, 0);
    ms = time_ms([&] { cuda::grouped_linear_weight_grad(y, x, off, dw, true); });
    report("grouped_gemm skewed weight grad", std::string("8x3968+120x8 gate_up ") + cuda::last_grouped_gemm_path(), ms, flops, 0);
  }
  {
    // Token permutation for 4096 tokens x top-8 of 128 experts, hidden 2048.
    std::vector<int64_t> idx(T * 8);
    for (int64_t i = 0; i < T * 8; ++i) idx[i] = ((i / 8) * 37 + (i % 8) * 16) % 128;
    Tensor ids = cuda::to_device(Tensor::from_i64(idx, {T, 8}), DType::I64);
    cuda::RoutingPlan plan;
    double ms = time_ms([&] { plan = cuda::plan_routing(ids, 128); });
    report("plan_routing", "4096x8 of 128", ms, 0, 0);
    Tensor x = dev_randn({T, H}, bf), w = dev_randn({T, 8}, DType::F32);
    Tensor xp;
    ms = time_ms([&] { xp = cuda::permute_tokens(x, plan); });
    report("permute_tokens", "4096x2048 -> 32768x2048 bf16", ms, 0, 2.0 * T * H * 9);
    ms = time_ms([&] { cuda::unpermute_tokens(xp, w, plan); });
    report("unpermute_tokens", "32768x2048 -> 4096x2048 bf16", ms, 0, 2.0 * T * H * 9);
  }
  {
    // Attention at seq 4096, 32 query / 4 kv heads, head_dim 128, causal; FLOPs counted as in
    // shared/GPU.md: 2*S*S*D*H forward (the causal half), 2.5x that backward.
    const int64_t S = 4096, HQ = 32, HKV = 4, D = 128;
    Tensor q = dev_randn({1, S, HQ, D}, bf), k = dev_randn({1, S, HKV, D}, bf), v = dev_randn({1, S, HKV, D}, bf);
    Tensor lse, out;
    const float scale = 1.f / std::sqrt(static_cast<float>(D));
    const double fwd_flops = 2.0 * S * S * D * HQ;
    // Both backends: the native CUDA-core kernels, then the default (cuDNN when built with it).
    for (const char* backend : {"native", "default"}) {
      if (std::string(backend) == "native") setenv("MOEFORGE_ATTENTION", "native", 1);
      else unsetenv("MOEFORGE_ATTENTION");
      const std::string name = cuda::attention_backend(q, 0, nullptr);
      double ms = time_ms([&] { out = cuda::attention(q, k, v, scale, 0, nullptr, &lse); }, 3);
      report(("attention forward (" + name + ")").c_str(), "4096 causal 32/4 heads d128", ms, fwd_flops, 0);
      Tensor dq, dk, dv;
      ms = time_ms([&] { cuda::attention_backward(q, k, v, out, lse, out, scale, 0, nullptr, dq, dk, dv); }, 3);
      report(("attention backward (" + name + ")").c_str(), "4096 causal 32/4 heads d128", ms, 2.5 * fwd_flops, 0);
    }
  }
  {
    // Fused linear cross-entropy over 4096 tokens, hidden 2048, vocabulary 151936: 3 GEMMs of
    // 2*4096*2048*151936 FLOPs each; the extra memory is one 1024-row chunk of logits.
    Tensor hid = dev_randn({T, H}, bf), w = dev_randn({V, H}, bf, 0.02f), dh;
    Tensor dw = cuda::empty({V, H}, DType::F32);
    std::vector<int64_t> t(T);
    for (int64_t i = 0; i < T; ++i) t[i] = (i * 7919) % V;
    Tensor targets = cuda::to_device(Tensor::from_i64(t, {T}), DType::I64);
    cuda::synchronize();
    cuda::reset_peak_stats();
    const int64_t before = cuda::allocator_stats().allocated_bytes;
    int64_t n = 0;
    const double ms = time_ms([&] { cuda::fused_linear_cross_entropy(hid, w, targets, -100, 1.f / T, dh, &dw, &n); }, 5);
    const double extra = (cuda::allocator_stats().peak_allocated_bytes - before) / 1073741824.0;
    report("fused_linear_cross_entropy", "4096x2048 -> 151936, chunk 1024", ms, 3 * 2.0 * T * H * V, 0);
    std::printf("{\"op\": \"fused_linear_cross_entropy extra memory\", \"gib\": %.3f, \"unfused_logits_and_grad_gib\": %.3f}\n",
                extra, 2.0 * T * V * 2 / 1073741824.0);
  }
  const auto st = cuda::allocator_stats();
  std::printf("{\"allocator_peak_gib\": %.2f, \"cuda_malloc_calls\": %ld}\n", st.peak_allocated_bytes / 1073741824.0,
              static_cast<long>(st.cuda_malloc_calls));
  return 0;
}
