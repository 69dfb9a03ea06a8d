// One table of op cases (op x shapes, ragged and empty experts, odd sizes) run through ops:: on the
// CPU and on CUDA, in the spirit of ggml's test-backend-ops. For every case and every device dtype:
// fresh random inputs (rounded through that dtype), the CPU reference run on them, the same inputs
// on the device, the device outputs compared with the CPU's under the dtype's tolerance. Without a
// device the CUDA side is reported skipped, never passed. Cases whose op is a fused composition
// also carry a direct computation (loops or the op's pieces) that the CPU side must reproduce.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <numeric>
#include <string>
#include <vector>

#include "ops/cuda/runtime.h"
#include "ops/dropout_hash.h"
#include "ops/ops.h"
#include "test_util.h"

using namespace moeforge;

namespace {

using Tensors = std::vector<Tensor>;

struct OpCase {
  std::string name;
  // Inputs on the host (float ones F32, index ones I64) from a seed.
  std::function<Tensors(uint32_t seed)> inputs;
  // The op through ops:: on inputs that all live on one device; `act` is the activations' dtype
  // there (the CPU runs F32). Returns the outputs to compare.
  std::function<Tensors(const Tensors& in, DType act)> run;
  // Optional: the outputs computed directly on the host (loops, or the op's unfused pieces).
  std::function<Tensors(const Tensors& in)> direct;
  std::vector<DType> device_dtypes = {DType::F32, DType::BF16};
  float tol_f32 = 2e-4f, tol_bf16 = 3e-2f;  // of the largest magnitude of each output
};

// A float tensor in `dt` on its own device (an I64 one as it is).
Tensor as(const Tensor& t, DType dt) {
  if (t.dtype() == DType::I64 || t.dtype() == dt) return t;
  return ops::to_device(t, t.device(), dt);
}

Tensor rounded(const Tensor& t, DType dt) {
  if (t.dtype() != DType::F32 || dt == DType::F32) return t;
  return t.to(dt).to(DType::F32);
}

Tensor ids(const std::vector<int64_t>& v, Shape shape) { return Tensor::from_i64(v, std::move(shape)); }

// Experts of a ragged routing: `counts` rows per expert (zeros included).
std::vector<int64_t> offsets_of(const std::vector<int64_t>& counts) {
  std::vector<int64_t> off(counts.size() + 1, 0);
  std::partial_sum(counts.begin(), counts.end(), off.begin() + 1);
  return off;
}

// Expert indices [t, k] for a routing where every row picks k distinct experts (some unused).
Tensor routing(int64_t t, int64_t k, int64_t experts, uint32_t seed) {
  std::vector<int64_t> v(static_cast<size_t>(t * k));
  std::mt19937 gen(seed);
  for (int64_t r = 0; r < t; ++r)
    for (int64_t j = 0; j < k; ++j) {
      int64_t e = 0;
      bool clash = true;
      while (clash) {
        e = static_cast<int64_t>(gen() % static_cast<uint32_t>(experts - 1));  // the last expert gets no rows
        clash = false;
        for (int64_t i = 0; i < j; ++i) clash = clash || v[r * k + i] == e;
      }
      v[r * k + j] = e;
    }
  return ids(v, {t, k});
}

void expect_match(const Tensor& got, const Tensor& want, float tol, const std::string& what) {
  ASSERT_EQ(got.numel(), want.numel()) << what;
  if (want.dtype() == DType::I64 || got.dtype() == DType::I64) {
    const Tensor g = got.dtype() == DType::I64 ? got : got.to(DType::I64);
    for (int64_t i = 0; i < want.numel(); ++i) ASSERT_EQ(g.i64()[i], want.i64()[i]) << what << " element " << i;
    return;
  }
  const auto g = got.to_f32_vector(), w = want.to_f32_vector();
  float scale = 1e-6f, worst = 0.f;
  int64_t at = -1;
  for (size_t i = 0; i < w.size(); ++i) scale = std::max(scale, std::abs(w[i]));
  for (size_t i = 0; i < w.size(); ++i) {
    const float d = std::isnan(g[i]) ? INFINITY : std::abs(g[i] - w[i]);
    if (d > worst) worst = d, at = static_cast<int64_t>(i);
  }
  EXPECT_LE(worst, tol * scale) << what << ": largest difference " << worst << " at element " << at << " (got "
                                << (at >= 0 ? g[at] : 0.f) << ", want " << (at >= 0 ? w[at] : 0.f) << "), scale "
                                << scale;
}

// NaN of `shape` (F32) on `like`'s device: a buffer whose old contents must not leak into a result.
Tensor nans_like_shape(const Tensor& like, Shape shape) {
  const int64_t n = shape_numel(shape);
  return ops::to_device(Tensor::from_vector(std::vector<float>(static_cast<size_t>(n), NAN), std::move(shape)), like.device(),
                        DType::F32);
}

// `value` everywhere, F32 of `shape` on `like`'s device.
Tensor filled_like_shape(const Tensor& like, Shape shape, float value) {
  const int64_t n = shape_numel(shape);
  return ops::to_device(Tensor::from_vector(std::vector<float>(static_cast<size_t>(n), value), std::move(shape)),
                        like.device(), DType::F32);
}

// Zeros of `shape` on `like`'s device.
Tensor zeros_like_shape(const Tensor& like, Shape shape, DType dt = DType::F32) {
  return ops::to_device(Tensor::zeros(std::move(shape), dt), like.device(), dt);
}

std::vector<OpCase> cases() {
  std::vector<OpCase> c;
  auto rnd = [](Shape s, uint32_t seed, float scale = 1.f) { return test::random_tensor(std::move(s), seed, scale); };

  for (bool ta : {false, true})
    for (bool tb : {false, true})
      c.push_back({std::string("gemm/") + (ta ? "T" : "N") + (tb ? "T" : "N") + "_odd",
                   [=](uint32_t s) {
                     return Tensors{rnd(ta ? Shape{13, 7} : Shape{7, 13}, s), rnd(tb ? Shape{5, 13} : Shape{13, 5}, s + 1),
                                    rnd({7, 5}, s + 2)};
                   },
                   [=](const Tensors& in, DType act) {
                     Tensor out = ops::to_device(in[2], in[2].device(), DType::F32);
                     ops::gemm(as(in[0], act), ta, as(in[1], act), tb, out, /*accumulate=*/true);
                     return Tensors{out};
                   },
                   [=](const Tensors& in) {
                     Tensor out = in[2].clone();
                     for (int64_t i = 0; i < 7; ++i)
                       for (int64_t j = 0; j < 5; ++j) {
                         double s = out.f32()[i * 5 + j];
                         for (int64_t p = 0; p < 13; ++p)
                           s += static_cast<double>(in[0].f32()[ta ? p * 7 + i : i * 13 + p]) *
                                in[1].f32()[tb ? j * 13 + p : p * 5 + j];
                         out.f32()[i * 5 + j] = static_cast<float>(s);
                       }
                     return Tensors{out};
                   }});

  c.push_back({"linear_and_grads/odd",
               [=](uint32_t s) { return Tensors{rnd({9, 11}, s), rnd({6, 11}, s + 1), rnd({9, 6}, s + 2)}; },
               [](const Tensors& in, DType act) {
                 Tensor y = ops::linear(as(in[0], act), as(in[1], act));
                 Tensor dw = zeros_like_shape(in[0], {6, 11});
                 ops::linear_weight_grad(as(in[2], act), as(in[0], act), dw);
                 return Tensors{y, dw, ops::linear_input_grad(as(in[2], act), as(in[1], act))};
               }});

  // Weight gradients written rather than added (a step's first contribution, nn::ParamAccess::
  // grad_for_write): what dW held -- NaN here -- must not reach the result; an empty sum writes zeros.
  c.push_back({"linear_weight_grad_overwrite/odd_and_empty",
               [=](uint32_t s) { return Tensors{rnd({9, 6}, s), rnd({9, 11}, s + 1)}; },
               [](const Tensors& in, DType act) {
                 Tensor dw = nans_like_shape(in[0], {6, 11}), empty_dw = nans_like_shape(in[0], {6, 11});
                 ops::linear_weight_grad(as(in[0], act), as(in[1], act), dw, /*accumulate=*/false);
                 ops::linear_weight_grad(as(in[0].slice0(0, 0), act), as(in[1].slice0(0, 0), act), empty_dw, false);
                 return Tensors{dw, empty_dw};
               },
               [](const Tensors& in) {
                 Tensor dw = Tensor::zeros({6, 11}, DType::F32);
                 for (int64_t r = 0; r < 9; ++r)
                   for (int64_t i = 0; i < 6; ++i)
                     for (int64_t j = 0; j < 11; ++j) dw.f32()[i * 11 + j] += in[0].f32()[r * 6 + i] * in[1].f32()[r * 11 + j];
                 return Tensors{dw, Tensor::zeros({6, 11}, DType::F32)};
               }});

  c.push_back({"rms_norm_with_rstd_and_backward/odd",
               [=](uint32_t s) { return Tensors{rnd({7, 19}, s), rnd({19}, s + 1), rnd({7, 19}, s + 2)}; },
               [](const Tensors& in, DType act) {
                 Tensor rstd;
                 Tensor y = ops::rms_norm(as(in[0], act), in[1], 1e-6f, &rstd);
                 Tensor dw = zeros_like_shape(in[0], {19});
                 Tensor dx = ops::rms_norm_backward(as(in[0], act), in[1], 1e-6f, as(in[2], act), dw, &rstd);
                 return Tensors{y, rstd, dx, dw};
               },
               [](const Tensors& in) {
                 Tensor y = Tensor::empty({7, 19}, DType::F32), rstd = Tensor::empty({7}, DType::F32);
                 for (int64_t r = 0; r < 7; ++r) {
                   double ss = 0;
                   for (int64_t i = 0; i < 19; ++i) ss += double(in[0].f32()[r * 19 + i]) * in[0].f32()[r * 19 + i];
                   rstd.f32()[r] = static_cast<float>(1.0 / std::sqrt(ss / 19 + 1e-6));
                   for (int64_t i = 0; i < 19; ++i) y.f32()[r * 19 + i] = in[1].f32()[i] * in[0].f32()[r * 19 + i] * rstd.f32()[r];
                 }
                 // The backward has no short direct form: the CPU's own is compared on the device side.
                 Tensor dw = Tensor::zeros({19}, DType::F32);
                 Tensor dx = ops::rms_norm_backward(in[0], in[1], 1e-6f, in[2], dw);
                 return Tensors{y, rstd, dx, dw};
               }});

  c.push_back({"add_rms_norm/odd",
               [=](uint32_t s) { return Tensors{rnd({5, 23}, s), rnd({5, 23}, s + 1), rnd({23}, s + 2)}; },
               [](const Tensors& in, DType act) {
                 Tensor residual = ops::to_device(in[1], in[1].device(), act), sum;
                 Tensor y = ops::add_rms_norm(as(in[0], act), residual, in[2], 1e-5f, sum);
                 return Tensors{y, sum, residual};  // the residual comes back unchanged
               }});

  // The norm's backward with a residual gradient added (CUDA: in the kernel, rows of 16 and 72
  // take the row-group kernels, 23 the element kernel and a separate add).
  for (const int64_t d : {int64_t{16}, int64_t{72}, int64_t{23}})
    c.push_back({"rms_norm_backward_plus_residual_grad/" + std::to_string(d),
                 [=](uint32_t s) { return Tensors{rnd({9, d}, s), rnd({d}, s + 1), rnd({9, d}, s + 2), rnd({9, d}, s + 3)}; },
                 [d](const Tensors& in, DType act) {
                   Tensor dw = zeros_like_shape(in[0], {d});
                   Tensor plus = as(in[3], act);
                   Tensor dx = ops::rms_norm_backward(as(in[0], act), in[1], 1e-6f, as(in[2], act), dw, nullptr, &plus);
                   return Tensors{dx, dw};
                 },
                 [d](const Tensors& in) {
                   Tensor dw = Tensor::zeros({d}, DType::F32);
                   Tensor dx = ops::rms_norm_backward(in[0], in[1], 1e-6f, in[2], dw);
                   ops::add_inplace(dx, in[3]);
                   return Tensors{dx, dw};
                 }});

  c.push_back({"swiglu_and_backward/odd",
               [=](uint32_t s) { return Tensors{rnd({7, 2 * 9}, s), rnd({7, 9}, s + 1)}; },
               [](const Tensors& in, DType act) {
                 Tensor a;  // the activation as the backward hands it out (the experts' backward reads it)
                 Tensor dgu = ops::swiglu_backward(as(in[0], act), as(in[1], act), &a);
                 return Tensors{ops::swiglu(as(in[0], act)), dgu, a};
               }});

  c.push_back({"clamped_swiglu_and_backward/odd",
               [=](uint32_t s) { return Tensors{rnd({7, 2 * 9}, s, 4.f), rnd({7, 9}, s + 1)}; },
               [](const Tensors& in, DType act) {
                 return Tensors{ops::clamped_swiglu(as(in[0], act), 1.702f, 7.f),
                                ops::clamped_swiglu_backward(as(in[0], act), as(in[1], act), 1.702f, 7.f)};
               }});

  // Widths of whole 16-byte packs (the CUDA kernels' vector paths; the cases above have odd widths).
  c.push_back({"clamped_swiglu_and_backward/packed",
               [=](uint32_t s) { return Tensors{rnd({5, 2 * 24}, s, 4.f), rnd({5, 24}, s + 1)}; },
               [](const Tensors& in, DType act) {
                 return Tensors{ops::clamped_swiglu(as(in[0], act), 1.702f, 7.f),
                                ops::clamped_swiglu_backward(as(in[0], act), as(in[1], act), 1.702f, 7.f)};
               }});
  c.push_back({"bias_rows/packed_f32_and_act_biases",
               [=](uint32_t s) { return Tensors{rnd({9, 64}, s), rnd({4, 64}, s + 1), rnd({64}, s + 2)}; },
               [](const Tensors& in, DType act) {
                 const std::vector<int64_t> off = {0, 3, 3, 8, 9};  // an empty expert, a one-row one
                 Tensor a = ops::to_device(in[0], in[0].device(), act), b = ops::to_device(in[0], in[0].device(), act);
                 ops::grouped_add_bias(a, in[1], off);          // F32 bias rows under `act` rows
                 ops::grouped_add_bias(b, as(in[1], act), off);  // biases in the rows' dtype
                 Tensor c = ops::to_device(in[0], in[0].device(), act);
                 ops::add_bias_rows(c, in[2]);
                 return Tensors{a, b, c};
               }});

  // Bias gradients over more rows than one chunk (the CUDA kernel's 256), experts crossing chunk
  // boundaries, an empty and a one-row expert.
  c.push_back({"bias_grad/over_chunks",
               [=](uint32_t s) { return Tensors{rnd({700, 24}, s)}; },
               [](const Tensors& in, DType act) {
                 const std::vector<int64_t> off = {0, 100, 100, 450, 699, 700};
                 Tensor grouped = zeros_like_shape(in[0], {5, 24}), all = zeros_like_shape(in[0], {24});
                 ops::grouped_bias_grad(as(in[0], act), off, grouped);
                 ops::bias_grad(as(in[0], act), all);
                 return Tensors{grouped, all};
               },
               [](const Tensors& in) {  // column sums in double
                 const std::vector<int64_t> off = {0, 100, 100, 450, 699, 700};
                 Tensor grouped = Tensor::zeros({5, 24}, DType::F32), all = Tensor::zeros({24}, DType::F32);
                 for (int64_t col = 0; col < 24; ++col) {
                   double total = 0;
                   for (int64_t e = 0; e < 5; ++e) {
                     double sum = 0;
                     for (int64_t r = off[e]; r < off[e + 1]; ++r) sum += in[0].f32()[r * 24 + col];
                     grouped.f32()[e * 24 + col] = static_cast<float>(sum);
                     total += sum;
                   }
                   all.f32()[col] = static_cast<float>(total);
                 }
                 return Tensors{grouped, all};
               }});

  c.push_back({"rope_and_inverse/partial_rotary",
               [=](uint32_t s) { return Tensors{rnd({6, 3, 16}, s), rnd({6, 8}, s + 1), rnd({6, 8}, s + 2)}; },
               [](const Tensors& in, DType act) {
                 Tensor x = ops::to_device(in[0], in[0].device(), act);
                 ops::rope_inplace(x, in[1], in[2]);
                 Tensor back = ops::to_device(x, x.device(), act);
                 ops::rope_inplace(back, in[1], in[2], /*inverse=*/true);
                 return Tensors{x, back};
               }});

  // Attention: GQA 4/2 heads, head dim 32, a window, two documents in a packed row, sinks.
  for (int variant = 0; variant < 3; ++variant) {
    const char* names[] = {"attention/causal_gqa", "attention/window_and_documents", "attention/sinks"};
    OpCase a;
    a.name = names[variant];
    a.inputs = [=](uint32_t s) {
      Tensors in{rnd({2, 9, 4, 32}, s), rnd({2, 9, 2, 32}, s + 1), rnd({2, 9, 2, 32}, s + 2), rnd({2, 9, 4, 32}, s + 3),
                 ids({0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 2, 2, 2, 2}, {2, 9}), rnd({4}, s + 4)};
      return in;
    };
    a.run = [=](const Tensors& in, DType act) {
      const std::optional<int64_t> window = variant == 1 ? std::optional<int64_t>(3) : std::nullopt;
      const Tensor* docs = variant == 1 ? &in[4] : nullptr;
      const Tensor* sinks = variant == 2 ? &in[5] : nullptr;
      Tensor lse, dq, dk, dv, dsinks;
      const Tensor q = as(in[0], act), k = as(in[1], act), v = as(in[2], act);
      Tensor out = ops::attention(q, k, v, 0.17f, window, docs, sinks, &lse);
      ops::attention_backward(q, k, v, as(in[3], act), 0.17f, window, docs, dq, dk, dv, sinks,
                              sinks ? &dsinks : nullptr, &out, &lse);
      Tensors r{out, lse, dq, dk, dv};
      if (sinks) r.push_back(dsinks);
      return r;
    };
    c.push_back(a);
  }

  // Generation's attention: 3 queries at the last of 11 key positions (a KV cache), GQA 4/2; with a
  // window of 4, with sinks, and MLA's narrower values (24 / 12). Direct: the full-length attention
  // with the queries put at those positions (the rows before them zero), its last 3 rows.
  for (int variant = 0; variant < 3; ++variant) {
    const char* names[] = {"attention/more_keys_window", "attention/more_keys_sinks", "attention/more_keys_latent"};
    const int64_t d = variant == 2 ? 24 : 32, dv = variant == 2 ? 12 : 32;
    OpCase a;
    a.name = names[variant];
    a.inputs = [=](uint32_t s) {
      return Tensors{rnd({1, 3, 4, d}, s), rnd({1, 11, 2, d}, s + 1), rnd({1, 11, 2, dv}, s + 2), rnd({4}, s + 3)};
    };
    auto window = [=] { return variant == 0 ? std::optional<int64_t>(4) : std::nullopt; };
    a.run = [=](const Tensors& in, DType act) {
      return Tensors{ops::attention(as(in[0], act), as(in[1], act), as(in[2], act), 0.21f, window(), nullptr,
                                    variant == 1 ? &in[3] : nullptr)};
    };
    a.direct = [=](const Tensors& in) {
      Tensor q = Tensor::zeros({1, 11, 4, d}, DType::F32);
      std::copy(in[0].f32(), in[0].f32() + in[0].numel(), q.f32() + 8 * 4 * d);
      const Tensor full = ops::attention(q, in[1], in[2], 0.21f, window(), nullptr, variant == 1 ? &in[3] : nullptr);
      return Tensors{full.view({11, 4 * dv}).slice0(8, 3).clone().view({1, 3, 4, dv})};
    };
    c.push_back(a);
  }

  c.push_back({"embedding_and_backward/padding_row",
               [=](uint32_t s) { return Tensors{ids({3, 0, 7, 3, 1}, {5}), rnd({8, 12}, s), rnd({5, 12}, s + 1)}; },
               [](const Tensors& in, DType act) {
                 Tensor grad = zeros_like_shape(in[1], {8, 12});
                 ops::embedding_backward(in[0], as(in[2], act), grad, /*padding_idx=*/7);
                 return Tensors{ops::embedding(in[0], as(in[1], act)), grad};
               },
               [](const Tensors& in) {
                 Tensor out = Tensor::empty({5, 12}, DType::F32), grad = Tensor::zeros({8, 12}, DType::F32);
                 for (int64_t i = 0; i < 5; ++i)
                   for (int64_t d = 0; d < 12; ++d) {
                     const int64_t id = in[0].i64()[i];
                     out.f32()[i * 12 + d] = in[1].f32()[id * 12 + d];
                     if (id != 7) grad.f32()[id * 12 + d] += in[2].f32()[i * 12 + d];
                   }
                 return Tensors{out, grad};
               }});

  // Into an unzeroed gradient with row flags (nn::ParamAccess::written_rows): only the batch's rows
  // (id 3 twice, the padding row 7 excepted) are zeroed, summed and flagged; the rest keep what was
  // there (5 here) until zero_unwritten_rows.
  c.push_back({"embedding_backward/written_rows",
               [=](uint32_t s) { return Tensors{ids({3, 0, 7, 3, 1}, {5}), rnd({5, 12}, s)}; },
               [](const Tensors& in, DType act) {
                 Tensor grad = filled_like_shape(in[1], {8, 12}, 5.f);
                 Tensor written = ops::empty({8}, DType::U8, in[1].device());
                 ops::embedding_backward(in[0], as(in[1], act), grad, /*padding_idx=*/7, &written);
                 Tensor as_left = ops::copy(grad);
                 ops::zero_unwritten_rows(grad, written);
                 return Tensors{as_left, written, grad};
               },
               [](const Tensors& in) {
                 Tensor left = Tensor::empty({8, 12}, DType::F32), zeroed = Tensor::zeros({8, 12}, DType::F32);
                 std::fill(left.f32(), left.f32() + left.numel(), 5.f);
                 Tensor flags = Tensor::zeros({8}, DType::F32);
                 for (int64_t r : {0, 1, 3}) {
                   flags.f32()[r] = 1.f;
                   std::fill(left.f32() + r * 12, left.f32() + (r + 1) * 12, 0.f);
                 }
                 for (int64_t i = 0; i < 5; ++i) {
                   const int64_t id = in[0].i64()[i];
                   if (id == 7) continue;
                   for (int64_t d = 0; d < 12; ++d) {
                     left.f32()[id * 12 + d] += in[1].f32()[i * 12 + d];
                     zeroed.f32()[id * 12 + d] += in[1].f32()[i * 12 + d];
                   }
                 }
                 return Tensors{left, flags, zeroed};
               }});

  // Routers: softmax top-k (plain, renormalised, forced) and DeepSeek's grouped sigmoid.
  for (int variant = 0; variant < 3; ++variant) {
    const char* names[] = {"router_softmax_topk/plain", "router_softmax_topk/renormalised", "router_softmax_topk/forced"};
    c.push_back({names[variant],
                 [=](uint32_t s) { return Tensors{rnd({11, 10}, s), rnd({11, 3}, s + 1), routing(11, 3, 10, s + 2), rnd({10}, s + 3)}; },
                 [=](const Tensors& in, DType act) {
                   Tensor probs, w, idx;
                   const bool norm = variant != 0;
                   ops::router_softmax_topk(as(in[0], act), 3, norm, probs, w, idx, variant == 2 ? &in[2] : nullptr);
                   Tensor dl = ops::router_backward(probs, idx, w, in[1], norm, &in[3]);
                   return Tensors{probs, w, idx, dl};
                 },
                 [=](const Tensors& in) {
                   // Softmax in double, the k largest (lower index on ties) or the forced ones.
                   Tensor probs = Tensor::empty({11, 10}, DType::F32), w = Tensor::empty({11, 3}, DType::F32);
                   std::vector<int64_t> chosen(33);
                   for (int64_t r = 0; r < 11; ++r) {
                     double m = -INFINITY, sum = 0;
                     for (int64_t e = 0; e < 10; ++e) m = std::max<double>(m, in[0].f32()[r * 10 + e]);
                     for (int64_t e = 0; e < 10; ++e) sum += std::exp(in[0].f32()[r * 10 + e] - m);
                     for (int64_t e = 0; e < 10; ++e)
                       probs.f32()[r * 10 + e] = static_cast<float>(std::exp(in[0].f32()[r * 10 + e] - m) / sum);
                     std::vector<int64_t> order(10);
                     std::iota(order.begin(), order.end(), 0);
                     std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
                       return probs.f32()[r * 10 + a] > probs.f32()[r * 10 + b];
                     });
                     double s = 0;
                     for (int64_t j = 0; j < 3; ++j) {
                       chosen[r * 3 + j] = variant == 2 ? in[2].i64()[r * 3 + j] : order[j];
                       s += probs.f32()[r * 10 + chosen[r * 3 + j]];
                     }
                     for (int64_t j = 0; j < 3; ++j)
                       w.f32()[r * 3 + j] = static_cast<float>(probs.f32()[r * 10 + chosen[r * 3 + j]] / (variant ? s : 1.0));
                   }
                   Tensor idx = ids(chosen, {11, 3});
                   return Tensors{probs, w, idx, ops::router_backward(probs, idx, w, in[1], variant != 0, &in[3])};
                 }});
  }
  c.push_back({"grouped_sigmoid_route/groups",
               [=](uint32_t s) { return Tensors{rnd({9, 16}, s), rnd({16}, s + 1, 0.1f), rnd({9, 4}, s + 2)}; },
               [](const Tensors& in, DType act) {
                 Tensor scores, w, idx;
                 ops::grouped_sigmoid_route(as(in[0], act), in[1], 4, 2, 4, true, 2.5f, scores, w, idx);
                 return Tensors{scores, w, idx, ops::grouped_sigmoid_route_backward(scores, idx, in[2], true, 2.5f)};
               }});

  // Expert token flow: ragged experts, an expert with no rows, odd widths.
  const std::vector<int64_t> counts = {3, 0, 5, 1, 0, 4};
  c.push_back({"grouped_linear_and_grads/ragged_with_empty_experts",
               [=](uint32_t s) { return Tensors{rnd({13, 7}, s), rnd({6, 5, 7}, s + 1), rnd({13, 5}, s + 2), rnd({6, 5}, s + 3)}; },
               [=](const Tensors& in, DType act) {
                 const auto off = offsets_of(counts);
                 const Tensor x = as(in[0], act), w = as(in[1], act), dy = as(in[2], act);
                 Tensor y = ops::empty({13, 5}, act, x.device()), dx = ops::empty({13, 7}, act, x.device());
                 Tensor dw = zeros_like_shape(x, {6, 5, 7});
                 Tensor db = zeros_like_shape(x, {6, 5});
                 ops::grouped_linear(x, w, off, y);
                 ops::grouped_add_bias(y, in[3], off);
                 ops::grouped_linear_input_grad(dy, w, off, dx);
                 ops::grouped_linear_weight_grad(dy, x, off, dw, /*accumulate=*/true);
                 ops::grouped_bias_grad(dy, off, db);
                 // Written rather than added: the empty experts' blocks too (zeros, not the NaN held).
                 Tensor dw_written = nans_like_shape(x, {6, 5, 7});
                 ops::grouped_linear_weight_grad(dy, x, off, dw_written, /*accumulate=*/false);
                 return Tensors{y, dx, dw, db, dw_written};
               },
               [=](const Tensors& in) {  // expert by expert through the plain linear ops
                 const auto off = offsets_of(counts);
                 Tensor y = Tensor::empty({13, 5}, DType::F32), dx = Tensor::empty({13, 7}, DType::F32);
                 Tensor dw = Tensor::zeros({6, 5, 7}, DType::F32), db = Tensor::zeros({6, 5}, DType::F32);
                 for (int64_t e = 0; e < 6; ++e) {
                   const int64_t n = off[e + 1] - off[e];
                   if (n == 0) continue;
                   const Tensor we = in[1].slice0(e, 1).view({5, 7});
                   Tensor ye = ops::linear(in[0].slice0(off[e], n), we);
                   ops::add_bias_rows(ye, in[3].slice0(e, 1).view({5}));
                   std::copy(ye.f32(), ye.f32() + ye.numel(), y.f32() + off[e] * 5);
                   Tensor dxe = ops::linear_input_grad(in[2].slice0(off[e], n), we);
                   std::copy(dxe.f32(), dxe.f32() + dxe.numel(), dx.f32() + off[e] * 7);
                   Tensor dwe = dw.slice0(e, 1).view({5, 7});
                   ops::linear_weight_grad(in[2].slice0(off[e], n), in[0].slice0(off[e], n), dwe);
                   Tensor dbe = db.slice0(e, 1).view({5});
                   ops::bias_grad(in[2].slice0(off[e], n), dbe);
                 }
                 return Tensors{y, dx, dw, db, dw};
               }});

  c.push_back({"permute_unpermute_and_backward/top3_unused_expert",
               [=](uint32_t s) {
                 return Tensors{rnd({7, 6}, s), routing(7, 3, 5, s + 1), rnd({7, 3}, s + 2), rnd({21, 6}, s + 3), rnd({7, 6}, s + 4)};
               },
               [](const Tensors& in, DType act) {
                 const ops::RoutingPlan plan = ops::plan_routing(in[1], 5);
                 Tensor xp = ops::permute_tokens(as(in[0], act), plan);
                 Tensor y = ops::unpermute_tokens(as(in[3], act), in[2], plan);
                 Tensor d_yp, d_w;
                 ops::unpermute_tokens_backward(as(in[4], act), as(in[3], act), in[2], plan, d_yp, d_w);
                 Tensor dx = ops::permute_tokens_backward(as(in[3], act), plan);
                 Tensor offs = ids(plan.offsets, {static_cast<int64_t>(plan.offsets.size())});
                 return Tensors{plan.dest_row, offs, xp, y, d_yp, d_w, dx};
               },
               [](const Tensors& in) {
                 // Rows grouped by expert, token order inside an expert; sums in slot order.
                 std::vector<int64_t> count(6, 0), dest(21);
                 for (int64_t i = 0; i < 21; ++i) ++count[in[1].i64()[i] + 1];
                 for (int64_t e = 0; e < 5; ++e) count[e + 1] += count[e];
                 std::vector<int64_t> next(count.begin(), count.end() - 1);
                 for (int64_t i = 0; i < 21; ++i) dest[i] = next[in[1].i64()[i]]++;
                 Tensor xp = Tensor::empty({21, 6}, DType::F32), y = Tensor::zeros({7, 6}, DType::F32);
                 Tensor d_yp = Tensor::empty({21, 6}, DType::F32), d_w = Tensor::empty({7, 3}, DType::F32);
                 Tensor dx = Tensor::zeros({7, 6}, DType::F32);
                 for (int64_t i = 0; i < 21; ++i) {
                   double dot = 0;
                   for (int64_t d = 0; d < 6; ++d) {
                     xp.f32()[dest[i] * 6 + d] = in[0].f32()[(i / 3) * 6 + d];
                     y.f32()[(i / 3) * 6 + d] += in[2].f32()[i] * in[3].f32()[dest[i] * 6 + d];
                     d_yp.f32()[dest[i] * 6 + d] = in[2].f32()[i] * in[4].f32()[(i / 3) * 6 + d];
                     dot += double(in[4].f32()[(i / 3) * 6 + d]) * in[3].f32()[dest[i] * 6 + d];
                     dx.f32()[(i / 3) * 6 + d] += in[3].f32()[dest[i] * 6 + d];
                   }
                   d_w.f32()[i] = static_cast<float>(dot);
                 }
                 return Tensors{ids(dest, {7, 3}), ids(count, {6}), xp, y, d_yp, d_w, dx};
               }});

  c.push_back({"gather_rows/repeats",
               [=](uint32_t s) { return Tensors{rnd({5, 9}, s), ids({4, 0, 0, 2, 4, 1}, {6})}; },
               [](const Tensors& in, DType act) { return Tensors{ops::gather_rows(as(in[0], act), in[1])}; }});

  c.push_back({"cross_entropy/ignored_rows",
               [=](uint32_t s) { return Tensors{rnd({6, 17}, s, 3.f), ids({3, -100, 16, 0, -100, 9}, {6})}; },
               [](const Tensors& in, DType act) {
                 int64_t n1 = 0, n2 = 0;
                 Tensor rows = ops::cross_entropy_rows(as(in[0], act), in[1], -100, &n1);
                 Tensor d;
                 const double sum = ops::cross_entropy_backward(as(in[0], act), in[1], -100, 0.25f, d, &n2);
                 return Tensors{rows, d, Tensor::from_vector({static_cast<float>(sum), float(n1), float(n2)}, {3})};
               }});

  c.push_back({"fused_linear_cross_entropy/chunks_not_dividing",
               [=](uint32_t s) { return Tensors{rnd({11, 8}, s), rnd({19, 8}, s + 1), ids({3, -100, 18, 0, 5, 5, 1, -100, 2, 7, 11}, {11})}; },
               [](const Tensors& in, DType act) {
                 Tensor dh, dw = zeros_like_shape(in[0], {19, 8});
                 int64_t n = 0;
                 const double sum = ops::fused_linear_cross_entropy(as(in[0], act), as(in[1], act), in[2], -100, 0.5f, dh,
                                                                    &dw, &n, /*chunk_rows=*/4);
                 return Tensors{dh, dw, Tensor::from_vector({static_cast<float>(sum), float(n)}, {2})};
               },
               [](const Tensors& in) {  // the unfused pieces: the whole logits at once
                 Tensor logits = ops::linear(in[0], in[1]), d;
                 int64_t n = 0;
                 const double sum = ops::cross_entropy_backward(logits, in[2], -100, 0.5f, d, &n);
                 Tensor dw = Tensor::zeros({19, 8}, DType::F32);
                 ops::linear_weight_grad(d, in[0], dw);
                 return Tensors{ops::linear_input_grad(d, in[1]), dw,
                                Tensor::from_vector({static_cast<float>(sum), float(n)}, {2})};
               }});

  {
    OpCase a;
    a.name = "adamw_grad_norm_and_scale/two_tensors";
    a.device_dtypes = {DType::F32};
    a.inputs = [=](uint32_t s) {
      Tensor v = rnd({33}, s + 3, 0.1f);  // second moments are squares
      for (int64_t i = 0; i < 33; ++i) v.f32()[i] *= v.f32()[i];
      return Tensors{rnd({33}, s), rnd({33}, s + 1), rnd({33}, s + 2, 0.1f), v, rnd({4, 5}, s + 4), rnd({4, 5}, s + 5)};
    };
    a.run = [](const Tensors& in, DType) {
      auto copy = [](const Tensor& t) { return ops::to_device(t, t.device(), t.dtype()); };
      Tensor w1 = copy(in[0]), m1 = copy(in[2]), v1 = copy(in[3]), w2 = copy(in[4]);
      Tensor m2 = zeros_like_shape(in[4], {4, 5}), v2 = zeros_like_shape(in[4], {4, 5});
      Tensor g1 = copy(in[1]), g2 = copy(in[5]);
      const double norm = ops::global_grad_norm({g1, g2});
      ops::scale_inplace({g1, g2}, 0.5f);
      const ops::AdamWScalars sc{0.1f, 0.999f, 0.001f, std::sqrt(1.f - 0.999f * 0.999f), 1e-8f, 1e-3f / (1.f - 0.81f)};
      ops::adamw_multi_tensor({{w1, g1, m1, v1, 0.99f, Tensor()}, {w2, g2, m2, v2, 1.f, Tensor()}}, sc);
      return Tensors{w1, m1, v1, w2, m2, v2, g1, Tensor::from_vector({static_cast<float>(norm)}, {1})};
    };
    c.push_back(a);
  }

  // Experts written with row flags: the empty ones (1 and 4) keep what dW held (5) and are flagged 0.
  c.push_back({"grouped_linear_weight_grad/written_experts",
               [=](uint32_t s) { return Tensors{rnd({13, 7}, s), rnd({13, 5}, s + 1)}; },
               [=](const Tensors& in, DType act) {
                 const auto off = offsets_of(counts);
                 Tensor dw = filled_like_shape(in[0], {6, 5, 7}, 5.f);
                 Tensor written = ops::empty({6}, DType::U8, in[0].device());
                 ops::grouped_linear_weight_grad(as(in[1], act), as(in[0], act), off, dw, /*accumulate=*/false, &written);
                 return Tensors{dw, written};
               },
               [=](const Tensors& in) {
                 const auto off = offsets_of(counts);
                 Tensor dw = Tensor::empty({6, 5, 7}, DType::F32), flags = Tensor::zeros({6}, DType::F32);
                 std::fill(dw.f32(), dw.f32() + dw.numel(), 5.f);
                 for (int64_t e = 0; e < 6; ++e) {
                   const int64_t n = off[e + 1] - off[e];
                   if (n == 0) continue;
                   flags.f32()[e] = 1.f;
                   Tensor dwe = dw.slice0(e, 1).view({5, 7});
                   ops::linear_weight_grad(in[1].slice0(off[e], n), in[0].slice0(off[e], n), dwe, /*accumulate=*/false);
                 }
                 return Tensors{dw, flags};
               }});

  {
    // A gradient's unwritten rows are read as zeros: here they hold NaN, which must not reach the
    // update. Rows of 8 (whole vectors on a GPU) and of 3 (element by element).
    OpCase a;
    a.name = "adamw_and_norm/unwritten_gradient_rows";
    a.device_dtypes = {DType::F32};
    a.inputs = [=](uint32_t s) {
      Tensors t;
      for (const Shape& sh : {Shape{6, 8}, Shape{5, 3}}) {
        Tensor v = rnd(sh, s + 3, 0.1f);
        for (int64_t i = 0; i < v.numel(); ++i) v.f32()[i] *= v.f32()[i];
        Tensor g = rnd(sh, s + 1);
        for (int64_t r = 1; r < sh[0]; r += 2)
          for (int64_t j = 0; j < sh[1]; ++j) g.f32()[r * sh[1] + j] = NAN;  // odd rows unwritten
        t.insert(t.end(), {rnd(sh, s), g, rnd(sh, s + 2, 0.1f), v});
        s += 10;
      }
      return t;
    };
    const ops::AdamWScalars sc{0.1f, 0.999f, 0.001f, std::sqrt(1.f - 0.999f * 0.999f), 1e-8f, 1e-3f / (1.f - 0.81f)};
    auto even_rows = [](int64_t rows) {
      Tensor f = Tensor::zeros({rows}, DType::U8);
      for (int64_t r = 0; r < rows; r += 2) f.data<uint8_t>()[r] = 1;
      return f;
    };
    a.run = [=](const Tensors& in, DType) {
      auto copy = [](const Tensor& t) { return ops::to_device(t, t.device(), t.dtype()); };
      Tensors out;
      std::vector<ops::AdamWTensors> ts;
      for (size_t p = 0; p < 2; ++p) {
        ops::AdamWTensors t{copy(in[4 * p]), in[4 * p + 1], copy(in[4 * p + 2]), copy(in[4 * p + 3]), 0.99f, Tensor()};
        t.grad_written_rows = ops::to_device(even_rows(in[4 * p].size(0)), in[0].device(), DType::U8);
        ts.push_back(t);
      }
      const double norm = ops::global_grad_norm({ts[0].grad, ts[1].grad}, {ts[0].grad_written_rows, ts[1].grad_written_rows});
      ops::adamw_multi_tensor(ts, sc);
      for (const auto& t : ts) out.insert(out.end(), {t.param, t.exp_avg, t.exp_avg_sq});
      out.push_back(Tensor::from_vector({static_cast<float>(norm)}, {1}));
      return out;
    };
    a.direct = [=](const Tensors& in) {  // the same update with zeros in the unwritten rows
      Tensors out;
      double ss = 0;
      for (size_t p = 0; p < 2; ++p) {
        Tensor g = in[4 * p + 1].clone();
        for (int64_t i = 0; i < g.numel(); ++i) {
          if (std::isnan(g.f32()[i])) g.f32()[i] = 0.f;
          ss += static_cast<double>(g.f32()[i]) * g.f32()[i];
        }
        ops::AdamWTensors t{in[4 * p].clone(), g, in[4 * p + 2].clone(), in[4 * p + 3].clone(), 0.99f, Tensor()};
        ops::adamw_multi_tensor({t}, sc);
        out.insert(out.end(), {t.param, t.exp_avg, t.exp_avg_sq});
      }
      out.push_back(Tensor::from_vector({static_cast<float>(std::sqrt(ss))}, {1}));
      return out;
    };
    c.push_back(a);
  }

  {
    // Clipping applied by AdamW as it reads each gradient (AdamWScalars::grad_scale) is the same
    // update as scaling the gradients in place first, BF16 gradients rounded alike.
    OpCase a;
    a.name = "adamw/clip_scale_as_read";
    a.device_dtypes = {DType::F32};
    a.inputs = [=](uint32_t s) {
      Tensor v = rnd({5, 24}, s + 3, 0.1f);
      for (int64_t i = 0; i < v.numel(); ++i) v.f32()[i] *= v.f32()[i];
      return Tensors{rnd({5, 24}, s), rnd({5, 24}, s + 1), rnd({5, 24}, s + 2, 0.1f), v};
    };
    const ops::AdamWScalars sc{0.1f, 0.999f, 0.001f, std::sqrt(1.f - 0.999f * 0.999f), 1e-8f, 1e-3f / (1.f - 0.81f)};
    auto update = [=](const Tensors& in, bool scale_in_adamw) {
      auto copy = [](const Tensor& t) { return ops::to_device(t, t.device(), t.dtype()); };
      Tensors out;
      for (DType gdt : {DType::F32, DType::BF16}) {
        Tensor w = copy(in[0]), g = ops::to_device(in[1], in[1].device(), gdt), m = copy(in[2]), v = copy(in[3]);
        ops::AdamWScalars s = sc;
        if (scale_in_adamw) s.grad_scale = 0.37f;
        else ops::scale_inplace({g}, 0.37f);
        ops::adamw_multi_tensor({{w, g, m, v, 0.99f, Tensor()}}, s);
        out.insert(out.end(), {w, m, v});
      }
      return out;
    };
    a.run = [=](const Tensors& in, DType) { return update(in, true); };
    a.direct = [=](const Tensors& in) { return update(in, false); };
    c.push_back(a);
  }

  c.push_back({"fused_linear_cross_entropy/dw_overwritten",
               [=](uint32_t s) { return Tensors{rnd({11, 8}, s), rnd({19, 8}, s + 1), ids({3, -100, 18, 0, 5, 5, 1, -100, 2, 7, 11}, {11})}; },
               [](const Tensors& in, DType act) {
                 Tensor dh, dw = nans_like_shape(in[0], {19, 8});
                 ops::fused_linear_cross_entropy(as(in[0], act), as(in[1], act), in[2], -100, 0.5f, dh, &dw, nullptr,
                                                 /*chunk_rows=*/4, /*accumulate_dw=*/false);
                 return Tensors{dw};
               },
               [](const Tensors& in) {
                 Tensor logits = ops::linear(in[0], in[1]), d;
                 ops::cross_entropy_backward(logits, in[2], -100, 0.5f, d, nullptr);
                 Tensor dw = Tensor::zeros({19, 8}, DType::F32);
                 ops::linear_weight_grad(d, in[0], dw);
                 return Tensors{dw};
               }});

  c.push_back({"latent_attention_columns/broadcast_and_sums",
               [=](uint32_t s) { return Tensors{rnd({4, 10}, s), rnd({12, 9}, s + 1), rnd({6, 8}, s + 2)}; },
               [](const Tensors& in, DType act) {
                 Tensor dst = zeros_like_shape(in[1], {12, 9}, act);
                 ops::copy_columns(as(in[0], act), 10, 3, 3, dst, 9, 2, 6);
                 Tensor sums = ops::sum_row_groups(as(in[1], act), 9, 1, 5, 3);
                 Tensor de = ops::deinterleave_pairs(as(in[2], act), 8);
                 return Tensors{dst, sums, de, ops::interleave_pairs(de, 8)};
               }});

  // Mamba2 (Nemotron-H): two rows of 9 tokens, the second packing two documents.
  auto docs = [] { return ids({0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 4, 4, 4, 7, 7, 7, 7, 7}, {18}); };
  c.push_back({"relu2_and_backward/odd",
               [=](uint32_t s) { return Tensors{rnd({7, 9}, s), rnd({7, 9}, s + 1)}; },
               [](const Tensors& in, DType act) {
                 return Tensors{ops::relu2(as(in[0], act)), ops::relu2_backward(as(in[0], act), as(in[1], act))};
               },
               [](const Tensors& in) {
                 Tensor y = in[0].clone(), dx = in[0].clone();
                 for (int64_t i = 0; i < y.numel(); ++i) {
                   const float r = std::max(in[0].f32()[i], 0.f);
                   y.f32()[i] = r * r;
                   dx.f32()[i] = 2.f * r * in[1].f32()[i];
                 }
                 return Tensors{y, dx};
               }});
  c.push_back({"causal_conv1d_silu_and_backward/documents",
               [=](uint32_t s) {
                 return Tensors{rnd({18, 11}, s), rnd({11, 1, 4}, s + 1, 0.5f), rnd({11}, s + 2), rnd({18, 11}, s + 3),
                                docs()};
               },
               [](const Tensors& in, DType act) {
                 const Tensor x = as(in[0], act), dyv = as(in[3], act);
                 Tensor y = ops::causal_conv1d(x, in[1], &in[2], 2, &in[4], true);
                 Tensor dx, dw = zeros_like_shape(in[1], in[1].shape()), db = zeros_like_shape(in[2], {11});
                 ops::causal_conv1d_backward(x, in[1], &in[2], 2, &in[4], true, dyv, dx, dw, &db);
                 return Tensors{y, dx, dw, db};
               }});
  // Rows of 1,200 tokens: the sequence starts are scanned 1,024 tokens at a time (a document begins
  // past the first tile, at 1,030) and the weight gradients sum over several 256-token slices.
  c.push_back({"causal_conv1d_silu_and_backward/long_documents",
               [=](uint32_t s) {
                 std::vector<int64_t> d(2400, 0);
                 for (int64_t k = 0; k < 1200; ++k) d[1200 + k] = k < 300 ? 5 : k < 1030 ? 6 : 9;
                 return Tensors{rnd({2400, 5}, s), rnd({5, 1, 4}, s + 1, 0.5f), rnd({5}, s + 2), rnd({2400, 5}, s + 3),
                                ids(d, {2400})};
               },
               [](const Tensors& in, DType act) {
                 const Tensor x = as(in[0], act), dyv = as(in[3], act);
                 Tensor y = ops::causal_conv1d(x, in[1], &in[2], 2, &in[4], true);
                 Tensor dx, dw = zeros_like_shape(in[1], in[1].shape()), db = zeros_like_shape(in[2], {5});
                 ops::causal_conv1d_backward(x, in[1], &in[2], 2, &in[4], true, dyv, dx, dw, &db);
                 return Tensors{y, dx, dw, db};
               }});
  c.push_back({"gated_rms_norm_and_backward/long",
               [=](uint32_t s) {
                 return Tensors{rnd({700, 12}, s), rnd({700, 12}, s + 1), rnd({12}, s + 2), rnd({700, 12}, s + 3)};
               },
               [](const Tensors& in, DType act) {
                 const Tensor y = as(in[0], act), z = as(in[1], act);
                 Tensor out = ops::gated_rms_norm(y, z, in[2], 3, 1e-5f);
                 Tensor dy, dz, dw = zeros_like_shape(in[2], {12});
                 ops::gated_rms_norm_backward(y, z, in[2], 3, 1e-5f, as(in[3], act), dy, dz, dw);
                 return Tensors{out, dy, dz, dw};
               }});
  c.push_back({"gated_rms_norm_and_backward/groups",
               [=](uint32_t s) { return Tensors{rnd({6, 12}, s), rnd({6, 12}, s + 1), rnd({12}, s + 2), rnd({6, 12}, s + 3)}; },
               [](const Tensors& in, DType act) {
                 const Tensor y = as(in[0], act), z = as(in[1], act);
                 Tensor out = ops::gated_rms_norm(y, z, in[2], 3, 1e-5f);
                 Tensor dy, dz, dw = zeros_like_shape(in[2], {12});
                 ops::gated_rms_norm_backward(y, z, in[2], 3, 1e-5f, as(in[3], act), dy, dz, dw);
                 return Tensors{out, dy, dz, dw};
               }});
  {
    auto scan_inputs = [=](uint32_t s) {
      return Tensors{rnd({18, 4, 3}, s), rnd({18, 4}, s + 1), rnd({4}, s + 2), rnd({4}, s + 3, 0.5f),
                     rnd({18, 2, 5}, s + 4), rnd({18, 2, 5}, s + 5), rnd({4}, s + 6), rnd({18, 4, 3}, s + 7), docs()};
    };
    // The scan against its recurrence written out (state per head, decayed, plus dt x B^T; y =
    // state C + D x); its gradients are held by the finite differences of test_gradcheck's Mamba2Ops.
    OpCase scan{"ssm_scan/groups_documents", scan_inputs,
                [](const Tensors& in, DType act) {
                  return Tensors{ops::ssm_scan(as(in[0], act), in[1], in[2], in[3], as(in[4], act), as(in[5], act), in[6],
                                               1e-3f, 2, &in[8])};
                }};
    scan.direct = [](const Tensors& in) {
      Tensor y = Tensor::zeros({18, 4, 3}, DType::F32);
      for (int64_t hd = 0; hd < 4; ++hd) {
        double st[3][5] = {};
        const double a = -std::exp(in[3].f32()[hd]);
        for (int64_t i = 0; i < 18; ++i) {
          if (i % 9 == 0 || in[8].i64()[i] != in[8].i64()[i - 1])
            for (auto& row : st) std::fill(row, row + 5, 0.0);
          const double u = in[1].f32()[i * 4 + hd] + in[2].f32()[hd];
          const double dt = std::max(u > 20 ? u : std::log1p(std::exp(u)), 1e-3), decay = std::exp(dt * a);
          const int64_t g = hd / 2;
          for (int64_t p = 0; p < 3; ++p) {
            double out = in[6].f32()[hd] * in[0].f32()[(i * 4 + hd) * 3 + p];
            for (int64_t n = 0; n < 5; ++n) {
              st[p][n] = decay * st[p][n] + dt * in[0].f32()[(i * 4 + hd) * 3 + p] * in[4].f32()[(i * 2 + g) * 5 + n];
              out += st[p][n] * in[5].f32()[(i * 2 + g) * 5 + n];
            }
            y.f32()[(i * 4 + hd) * 3 + p] = static_cast<float>(out);
          }
        }
      }
      return Tensors{y};
    };
    scan.tol_bf16 = 5e-2f;
    c.push_back(scan);
    OpCase scan_bwd{"ssm_scan_backward/groups_documents", scan_inputs,
                    [](const Tensors& in, DType act) {
                      ops::SsmScanGrads g;
                      ops::ssm_scan_backward(as(in[0], act), in[1], in[2], in[3], as(in[4], act), as(in[5], act), in[6],
                                             1e-3f, 2, &in[8], as(in[7], act), g);
                      return Tensors{g.dx, g.ddt_raw, g.ddt_bias, g.da_log, g.db, g.dc, g.dd};
                    }};
    scan_bwd.tol_bf16 = 5e-2f;
    c.push_back(scan_bwd);
  }
  {
    // Longer rows (2 x 150 tokens, H 4 x P 8, 2 groups of state 16), so the CUDA scan cuts them into
    // several chunks: the first row one sequence through every chunk edge, the second packing three
    // documents, one starting mid-chunk and one on a chunk edge (token 64 of the row).
    auto long_docs = [] {
      std::vector<int64_t> d(300, 0);
      for (int64_t k = 0; k < 150; ++k) d[150 + k] = k < 37 ? 1 : k < 64 ? 2 : 3;
      return ids(d, {300});
    };
    auto inputs = [=](uint32_t s) {
      return Tensors{rnd({300, 4, 8}, s), rnd({300, 4}, s + 1), rnd({4}, s + 2), rnd({4}, s + 3, 0.5f),
                     rnd({300, 2, 16}, s + 4), rnd({300, 2, 16}, s + 5), rnd({4}, s + 6), rnd({300, 4, 8}, s + 7),
                     long_docs()};
    };
    OpCase fwd{"ssm_scan/chunks_documents", inputs, [](const Tensors& in, DType act) {
                 return Tensors{ops::ssm_scan(as(in[0], act), in[1], in[2], in[3], as(in[4], act), as(in[5], act), in[6],
                                              1e-3f, 2, &in[8])};
               }};
    fwd.tol_bf16 = 5e-2f;
    c.push_back(fwd);
    OpCase bwd{"ssm_scan_backward/chunks_documents", inputs, [](const Tensors& in, DType act) {
                 ops::SsmScanGrads g;
                 ops::ssm_scan_backward(as(in[0], act), in[1], in[2], in[3], as(in[4], act), as(in[5], act), in[6], 1e-3f,
                                        2, &in[8], as(in[7], act), g);
                 return Tensors{g.dx, g.ddt_raw, g.ddt_bias, g.da_log, g.db, g.dc, g.dd};
               }};
    bwd.tol_bf16 = 5e-2f;
    c.push_back(bwd);
  }

  {
    // Generation's scan: 5 prompt tokens, then one, then one, carrying the state; direct: the scan
    // over all 7 at once (H 4 x P 3, 2 groups of state 5).
    OpCase step{"ssm_step/prompt_then_tokens",
                [=](uint32_t s) {
                  return Tensors{rnd({7, 4, 3}, s), rnd({7, 4}, s + 1), rnd({4}, s + 2), rnd({4}, s + 3, 0.5f),
                                 rnd({7, 2, 5}, s + 4), rnd({7, 2, 5}, s + 5), rnd({4}, s + 6)};
                },
                [](const Tensors& in, DType act) {
                  Tensor state = zeros_like_shape(in[0], {4, 3, 5});
                  Tensors out;
                  for (auto [t0, n] : {std::pair<int64_t, int64_t>{0, 5}, {5, 1}, {6, 1}}) {
                    auto rows = [&](const Tensor& x) { return as(x, act).slice0(t0, n); };
                    out.push_back(ops::ssm_step(rows(in[0]), in[1].slice0(t0, n), in[2], in[3], rows(in[4]), rows(in[5]),
                                                in[6], 1e-3f, state));
                  }
                  out.push_back(state);
                  return out;
                }};
    step.direct = [](const Tensors& in) {
      const Tensor y = ops::ssm_scan(in[0], in[1], in[2], in[3], in[4], in[5], in[6], 1e-3f, 1, nullptr).view({7, 12});
      // The state after the 7 tokens, from the recurrence written out.
      Tensor state = Tensor::zeros({4, 3, 5}, DType::F32);
      for (int64_t hd = 0; hd < 4; ++hd)
        for (int64_t i = 0; i < 7; ++i) {
          const double u = in[1].f32()[i * 4 + hd] + in[2].f32()[hd];
          const double dt = std::max(u > 20 ? u : std::log1p(std::exp(u)), 1e-3), decay = std::exp(dt * -std::exp(in[3].f32()[hd]));
          for (int64_t p = 0; p < 3; ++p)
            for (int64_t n = 0; n < 5; ++n) {
              float& st = state.f32()[(hd * 3 + p) * 5 + n];
              st = static_cast<float>(decay * st + dt * in[0].f32()[(i * 4 + hd) * 3 + p] * in[4].f32()[(i * 2 + hd / 2) * 5 + n]);
            }
        }
      return Tensors{y.slice0(0, 5).clone(), y.slice0(5, 1).clone(), y.slice0(6, 1).clone(), state};
    };
    step.tol_bf16 = 5e-2f;
    c.push_back(step);
  }
  {
    // LoRA's fused gate|up B: 3 experts of a 2 x 2 grid of [5, 3] blocks; the off-diagonal ones zeroed.
    OpCase blocks{"zero_off_diagonal_blocks/two_parts", [=](uint32_t s) { return Tensors{rnd({3, 10, 6}, s)}; },
                  [](const Tensors& in, DType act) {
                    Tensor b = ops::to_device(in[0], in[0].device(), act);
                    ops::zero_off_diagonal_blocks(b, 2);
                    return Tensors{b};
                  }};
    blocks.direct = [](const Tensors& in) {
      Tensor b = in[0].clone();
      for (int64_t x = 0; x < 3; ++x)
        for (int64_t i = 0; i < 10; ++i)
          for (int64_t j = 0; j < 6; ++j)
            if ((i < 5) != (j < 3)) b.f32()[(x * 10 + i) * 6 + j] = 0.f;
      return Tensors{b};
    };
    c.push_back(blocks);
  }
  {
    // LoRA's input dropout: the CUDA mask equals the CPU's for a seed; the CPU's drops about p of the
    // elements and scales the rest by 1 / (1 - p).
    OpCase drop{"dropout_scaled/p0.3", [=](uint32_t s) { return Tensors{rnd({64, 33}, s)}; },
                [](const Tensors& in, DType act) {
                  return Tensors{ops::dropout_scaled(as(in[0], act), 0.3f, 77), ops::dropout_scaled(as(in[0], act), 0.3f, 78)};
                }};
    drop.direct = [](const Tensors& in) {
      Tensors out;
      for (uint64_t seed : {77ull, 78ull}) {
        Tensor y = in[0].clone();
        int64_t dropped = 0;
        for (int64_t i = 0; i < y.numel(); ++i) {
          const bool keep = ops::dropout_keeps(seed, i, 0.3f);
          dropped += !keep;
          y.f32()[i] = keep ? in[0].f32()[i] / 0.7f : 0.f;
        }
        EXPECT_NEAR(static_cast<double>(dropped) / y.numel(), 0.3, 0.03);
        out.push_back(y);
      }
      EXPECT_GT(test::max_abs_diff(out[0], out[1]), 0.f);  // another seed, another mask
      return out;
    };
    c.push_back(drop);
  }
  c.push_back({"bias_clamp_gate/odd",
               [=](uint32_t s) { return Tensors{rnd({5, 7}, s, 2.f), rnd({7}, s + 1), rnd({5, 1}, s + 2), rnd({5, 7}, s + 3)}; },
               [](const Tensors& in, DType act) {
                 Tensor y = ops::to_device(in[0], in[0].device(), act);
                 ops::add_bias_rows(y, in[1]);
                 Tensor db = zeros_like_shape(in[0], {7});
                 ops::bias_grad(as(in[3], act), db);
                 Tensor clipped = ops::to_device(y, y.device(), act);
                 ops::clamp_inplace(clipped, 1.5f);
                 Tensor dclip = ops::to_device(in[3], in[3].device(), act);
                 ops::clamp_backward_inplace(y, dclip, 1.5f);
                 Tensor out = ops::to_device(in[3], in[3].device(), act);
                 ops::add_sigmoid_gated(out, as(in[0], act), as(in[2], act));
                 Tensor d_y, d_logit;
                 ops::sigmoid_gated_backward(as(in[3], act), as(in[0], act), as(in[2], act), d_y, d_logit);
                 return Tensors{y, db, clipped, dclip, out, d_y, d_logit};
               }});
  return c;
}

// gtest prints a failing case by its name, not its bytes.
void PrintTo(const OpCase& c, std::ostream* os) { *os << c.name; }

class BackendOps : public ::testing::TestWithParam<OpCase> {};
class BackendOpsDirect : public ::testing::TestWithParam<OpCase> {};

std::vector<OpCase> cases_with_direct() {
  std::vector<OpCase> out;
  for (const OpCase& c : cases())
    if (c.direct) out.push_back(c);
  return out;
}

Tensors on_host(const Tensors& ts) {
  Tensors out;
  for (const Tensor& t : ts) out.push_back(t.device().is_cpu() ? t : ops::to_device(t, Device::cpu(), t.dtype() == DType::I64 ? DType::I64 : DType::F32));
  return out;
}

TEST_P(BackendOpsDirect, CpuMatchesDirectComputation) {
  const OpCase& oc = GetParam();
  const Tensors in = oc.inputs(1234);
  const Tensors got = oc.run(in, DType::F32), want = oc.direct(in);
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) expect_match(got[i], want[i], 1e-5f, oc.name + " output " + std::to_string(i));
}

TEST_P(BackendOps, CudaMatchesCpu) {
  const OpCase& oc = GetParam();
  if (!cuda::available()) GTEST_SKIP() << "no CUDA device: the CUDA side of " << oc.name << " is not run here";
  for (DType dt : oc.device_dtypes) {
    // Fresh inputs for every run, rounded through the device dtype so both sides see the same values.
    Tensors in = oc.inputs(static_cast<uint32_t>(std::hash<std::string>{}(oc.name) + static_cast<int>(dt)));
    for (Tensor& t : in) t = rounded(t, dt);
    const Tensors want = oc.run(in, DType::F32);
    Tensors dev;
    for (const Tensor& t : in) dev.push_back(ops::to_device(t, Device::cuda(0), t.dtype()));
    const Tensors got = on_host(oc.run(dev, dt));
    ASSERT_EQ(got.size(), want.size());
    for (size_t i = 0; i < got.size(); ++i)
      expect_match(got[i], want[i], dt == DType::F32 ? oc.tol_f32 : oc.tol_bf16,
                   oc.name + " output " + std::to_string(i) + " (" + std::string(dtype_name(dt)) + ")");
  }
}

std::string case_name(const ::testing::TestParamInfo<OpCase>& info) {
  std::string n = info.param.name;
  for (char& ch : n)
    if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
  return n;
}

INSTANTIATE_TEST_SUITE_P(Table, BackendOps, ::testing::ValuesIn(cases()), case_name);
INSTANTIATE_TEST_SUITE_P(Table, BackendOpsDirect, ::testing::ValuesIn(cases_with_direct()), case_name);

}  // namespace
