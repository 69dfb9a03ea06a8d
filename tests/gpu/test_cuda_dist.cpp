// The NCCL Communicator on the GPU machine. One GPU: a one-rank group runs every collective on
// device tensors (NCCL's own self-send and copies), and a group whose second member never comes
// fails within its timeout naming the group, instead of hanging in NCCL's initialisation. Groups
// over several GPUs are exercised by the multi-GPU runs (issue 6), not here.
#include <gtest/gtest.h>

#include <chrono>

#include "dist/communicator.h"
#include "dist/tcp_store.h"
#include "ops/cuda/runtime.h"
#include "test_util.h"

using namespace moeforge;
using namespace std::chrono_literals;

namespace {

#define REQUIRE_NCCL_GPU()                                                          \
  if (!cuda::available()) GTEST_SKIP() << "no CUDA device on this machine";         \
  if (!dist::nccl_available()) GTEST_SKIP() << "built without NCCL"

std::vector<float> host(const Tensor& d) {
  Tensor h = cuda::to_host_f32(d);
  return std::vector<float>(h.f32(), h.f32() + h.numel());
}

TEST(NcclCommunicator, OneRankGroupRunsEveryCollective) {
  REQUIRE_NCCL_GPU();
  dist::TcpStoreServer server(0);
  dist::TcpStoreClient store("127.0.0.1", server.port(), 5s);
  auto c = dist::connect_nccl(store, "solo", 0, 1, 20s);
  EXPECT_STREQ(c->backend(), "nccl");
  const std::vector<float> v{1.f, -2.f, 3.5f, 4.f, 5.f, 6.f};
  Tensor a = cuda::to_device(Tensor::from_vector(v, {3, 2}), DType::F32);
  c->all_reduce_sum(a);
  EXPECT_EQ(host(a), v);
  Tensor out = cuda::empty({3, 2}, DType::F32);
  cuda::poison(out);
  c->all_gather(a, out);
  EXPECT_EQ(host(out), v);
  cuda::poison(out);
  c->reduce_scatter_sum(a, out);
  EXPECT_EQ(host(out), v);
  cuda::poison(out);
  c->all_to_all(a, {3}, out, {3});
  EXPECT_EQ(host(out), v);
  Tensor b = cuda::to_device(Tensor::from_vector(v, {6}), DType::BF16);
  c->broadcast(b, 0);
  EXPECT_EQ(host(b), v);  // every value is exact in BF16
  c->barrier();
  EXPECT_NE(test::error_of([&] { c->all_to_all(a, {2}, out, {3}); }).find("all_to_all on group 'solo'"), std::string::npos);
}

TEST(NcclCommunicator, AMemberThatNeverComesIsATimeoutNamingTheGroup) {
  REQUIRE_NCCL_GPU();
  dist::TcpStoreServer server(0);
  dist::TcpStoreClient store("127.0.0.1", server.port(), 5s);
  const auto t0 = std::chrono::steady_clock::now();
  const std::string err = test::error_of([&] { dist::connect_nccl(store, "pair", 0, 2, 3s); });
  EXPECT_NE(err.find("collective init on group 'pair' did not complete within 3 s"), std::string::npos) << err;
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 20s);
}

}  // namespace
