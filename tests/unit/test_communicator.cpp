// The CPU Communicator (gloo over TCP), with ranks as threads of this process, each with its own
// store connection and its own gloo context, as separate processes would have: every collective
// against its definition computed here, for 2, 3 and 4 ranks and for two groups side by side;
// a dead peer and a member that never connects become errors that name the collective or member.
#include <gtest/gtest.h>

#include <chrono>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>

#include "parallel/communicator.h"
#include "parallel/tcp_store.h"
#include "test_util.h"

using namespace moeforge;
using namespace std::chrono_literals;

namespace {

// Runs fn(rank, comm) on `n` threads joined into group `name`; returns each rank's error ("" if none).
std::vector<std::string> run_ranks(int n, const std::function<void(int, parallel::Communicator&)>& fn,
                                   std::chrono::milliseconds timeout = 10s) {
  parallel::TcpStoreServer server(0);
  std::vector<std::string> errors(n);
  std::vector<std::thread> threads;
  for (int r = 0; r < n; ++r)
    threads.emplace_back([&, r] {
      errors[r] = test::error_of([&] {
        parallel::TcpStoreClient client("127.0.0.1", server.port(), 5s);
        auto comm = parallel::connect_gloo(client, "world", r, n, "127.0.0.1", timeout);
        fn(r, *comm);
      });
    });
  for (auto& t : threads) t.join();
  return errors;
}

// A value that names where it came from: rank, a second index and an element.
float tag(int rank, int other, int64_t i) { return static_cast<float>(rank * 1000 + other * 100 + i); }

class Collectives : public ::testing::TestWithParam<int> {};

TEST_P(Collectives, EveryCollectiveMatchesItsDefinition) {
  if (!parallel::gloo_available()) GTEST_SKIP() << "built without gloo";
  const int n = GetParam();
  const int64_t len = 7;
  const auto errors = run_ranks(n, [&](int r, parallel::Communicator& c) {
    ASSERT_EQ(c.rank(), r);
    ASSERT_EQ(c.size(), n);
    // all_reduce: the sum over ranks of tag(p, 0, i).
    Tensor t = Tensor::empty({len}, DType::F32);
    for (int64_t i = 0; i < len; ++i) t.f32()[i] = tag(r, 0, i);
    c.all_reduce_sum(t);
    for (int64_t i = 0; i < len; ++i) {
      float want = 0;
      for (int p = 0; p < n; ++p) want += tag(p, 0, i);
      EXPECT_EQ(t.f32()[i], want) << "all_reduce rank " << r << " i " << i;
    }
    Tensor ti = Tensor::from_i64({r + 1, 10 * (r + 1)}, {2});
    c.all_reduce_sum(ti);
    EXPECT_EQ(ti.i64()[0], n * (n + 1) / 2);
    EXPECT_EQ(ti.i64()[1], 10 * n * (n + 1) / 2);
    // all_reduce_sum_many: each tensor as all_reduce_sum would leave it (mixed dtypes and sizes).
    Tensor m1 = Tensor::from_vector({static_cast<float>(r), 1.f, 2.f}, {3}), m2 = Tensor::from_i64({r}, {1});
    c.all_reduce_sum_many({&m1, &m2});
    EXPECT_EQ(m1.f32()[0], static_cast<float>(n * (n - 1) / 2));
    EXPECT_EQ(m1.f32()[2], 2.f * n);
    EXPECT_EQ(m2.i64()[0], n * (n - 1) / 2);
    // all_gather_blocks: element e of a 10-element tensor is written by the rank whose block holds
    // it (the others start with garbage there) and ends the same everywhere.
    Tensor gb = Tensor::from_vector(std::vector<float>(10, -1.f), {2, 5});
    const parallel::Block mine = parallel::block_of(10, r, n);
    for (int64_t e = mine.first; e < mine.first + mine.count; ++e) gb.f32()[e] = 100.f * r + e;
    c.all_gather_blocks({gb});
    for (int p = 0; p < n; ++p) {
      const parallel::Block b = parallel::block_of(10, p, n);
      for (int64_t e = b.first; e < b.first + b.count; ++e) EXPECT_EQ(gb.f32()[e], 100.f * p + e) << "rank " << r;
    }
    // reduce_scatter_blocks: every rank's own block of an 11-element tensor ends as the sum of
    // that block over ranks (element e of rank p holds tag(p, 0, e)).
    Tensor rb = Tensor::empty({11}, DType::F32);
    for (int64_t e = 0; e < 11; ++e) rb.f32()[e] = tag(r, 0, e);
    c.reduce_scatter_blocks({rb});
    const parallel::Block own = parallel::block_of(11, r, n);
    for (int64_t e = own.first; e < own.first + own.count; ++e) {
      float want = 0;
      for (int p = 0; p < n; ++p) want += tag(p, 0, e);
      EXPECT_EQ(rb.f32()[e], want) << "reduce_scatter_blocks rank " << r << " e " << e;
    }
    // reduce_scatter: block q of rank p is tag(p, q, i); rank r gets sum_p tag(p, r, i).
    Tensor rs_in = Tensor::empty({n * len}, DType::F32), rs_out = Tensor::empty({len}, DType::F32);
    for (int q = 0; q < n; ++q)
      for (int64_t i = 0; i < len; ++i) rs_in.f32()[q * len + i] = tag(r, q, i);
    c.reduce_scatter_sum(rs_in, rs_out);
    for (int64_t i = 0; i < len; ++i) {
      float want = 0;
      for (int p = 0; p < n; ++p) want += tag(p, r, i);
      EXPECT_EQ(rs_out.f32()[i], want) << "reduce_scatter rank " << r;
    }
    // all_gather: block p is rank p's input.
    Tensor ag_in = Tensor::empty({len}, DType::F32), ag_out = Tensor::empty({n * len}, DType::F32);
    for (int64_t i = 0; i < len; ++i) ag_in.f32()[i] = tag(r, 0, i);
    c.all_gather(ag_in, ag_out);
    for (int p = 0; p < n; ++p)
      for (int64_t i = 0; i < len; ++i) EXPECT_EQ(ag_out.f32()[p * len + i], tag(p, 0, i)) << "all_gather";
    // all_to_all with ragged counts (some zero): rank p sends (p + q) % 3 rows of width 2 to q.
    const auto rows_from_to = [](int p, int q) { return static_cast<int64_t>((p + q) % 3); };
    std::vector<int64_t> send(n), recv(n);
    int64_t total_send = 0;
    for (int q = 0; q < n; ++q) total_send += send[q] = rows_from_to(r, q);
    const std::vector<int64_t> recv_counts = parallel::exchange_counts(c, send);
    int64_t total_recv = 0;
    for (int p = 0; p < n; ++p) {
      recv[p] = rows_from_to(p, r);
      EXPECT_EQ(recv_counts[p], recv[p]) << "exchange_counts";
      total_recv += recv[p];
    }
    Tensor a_in = Tensor::empty({total_send, 2}, DType::F32), a_out = Tensor::empty({total_recv, 2}, DType::F32);
    int64_t row = 0;
    for (int q = 0; q < n; ++q)
      for (int64_t i = 0; i < send[q]; ++i, ++row)
        for (int64_t j = 0; j < 2; ++j) a_in.f32()[row * 2 + j] = tag(r, q, i * 2 + j);
    c.all_to_all(a_in, send, a_out, recv);
    row = 0;
    for (int p = 0; p < n; ++p)
      for (int64_t i = 0; i < recv[p]; ++i, ++row)
        for (int64_t j = 0; j < 2; ++j) EXPECT_EQ(a_out.f32()[row * 2 + j], tag(p, r, i * 2 + j)) << "all_to_all";
    // broadcast from the last rank.
    Tensor b = Tensor::from_vector({tag(r, 1, 0), tag(r, 1, 1)}, {2});
    c.broadcast(b, n - 1);
    EXPECT_EQ(b.f32()[0], tag(n - 1, 1, 0));
    EXPECT_EQ(b.f32()[1], tag(n - 1, 1, 1));
    c.barrier();
  });
  for (int r = 0; r < n; ++r) EXPECT_EQ(errors[r], "") << "rank " << r;
}

INSTANTIATE_TEST_SUITE_P(Ranks, Collectives, ::testing::Values(2, 3, 4));

// Four ranks in two groups of two (as the expert-parallel groups of dp x ep = 2 x 2): each group's
// sums stay inside it.
TEST(Communicator, GroupsAreIndependent) {
  if (!parallel::gloo_available()) GTEST_SKIP() << "built without gloo";
  parallel::TcpStoreServer server(0);
  std::vector<std::string> errors(4);
  std::vector<float> sums(4);
  std::vector<std::thread> threads;
  for (int r = 0; r < 4; ++r)
    threads.emplace_back([&, r] {
      errors[r] = test::error_of([&] {
        parallel::TcpStoreClient client("127.0.0.1", server.port(), 5s);
        const int group = r / 2;
        auto comm = parallel::connect_gloo(client, "ep" + std::to_string(group), r % 2, 2, "127.0.0.1", 10s);
        EXPECT_EQ(comm->name(), "ep" + std::to_string(group));
        Tensor t = Tensor::from_vector({static_cast<float>(r + 1)}, {1});
        comm->all_reduce_sum(t);
        sums[r] = t.f32()[0];
      });
    });
  for (auto& t : threads) t.join();
  for (int r = 0; r < 4; ++r) EXPECT_EQ(errors[r], "") << "rank " << r;
  EXPECT_EQ(sums[0], 3.f);
  EXPECT_EQ(sums[1], 3.f);
  EXPECT_EQ(sums[2], 7.f);
  EXPECT_EQ(sums[3], 7.f);
}

// A rank that goes away mid-job (its connections close) makes the others' next collective fail
// with the collective's and the group's name, not hang.
TEST(Communicator, ADeadPeerIsAnErrorNamingTheCollective) {
  if (!parallel::gloo_available()) GTEST_SKIP() << "built without gloo";
  const auto start = std::chrono::steady_clock::now();
  const auto errors = run_ranks(
      2,
      [](int r, parallel::Communicator& c) {
        Tensor t = Tensor::from_vector({1.f}, {1});
        c.all_reduce_sum(t);  // both alive
        if (r == 1) return;   // rank 1 leaves: its communicator is destroyed
        std::this_thread::sleep_for(200ms);
        c.all_reduce_sum(t);
      },
      3s);
  EXPECT_EQ(errors[1], "");
  EXPECT_NE(errors[0].find("collective all_reduce on group 'world' failed at rank 0 of 2"), std::string::npos) << errors[0];
  EXPECT_LT(std::chrono::steady_clock::now() - start, 8s);
}

// A member that never connects: the others fail at connect, naming the missing member.
TEST(Communicator, AMemberThatNeverConnectsIsNamed) {
  if (!parallel::gloo_available()) GTEST_SKIP() << "built without gloo";
  parallel::TcpStoreServer server(0);
  parallel::TcpStoreClient client("127.0.0.1", server.port(), 5s);
  const std::string err = test::error_of([&] { parallel::connect_gloo(client, "world", 0, 2, "127.0.0.1", 1s); });
  EXPECT_NE(err.find("gloo group 'world'"), std::string::npos) << err;
  EXPECT_NE(err.find("never connected"), std::string::npos) << err;
}

TEST(Communicator, BlocksCoverEveryElementOnce) {
  for (int64_t n : {0, 1, 7, 10, 64}) {
    for (int ranks : {1, 2, 3, 4, 8}) {
      int64_t next = 0;
      for (int r = 0; r < ranks; ++r) {
        const parallel::Block b = parallel::block_of(n, r, ranks);
        EXPECT_EQ(b.first, next) << n << " over " << ranks;
        EXPECT_GE(b.count, 0);
        EXPECT_LE(b.count, (n + ranks - 1) / ranks);
        next = b.first + b.count;
      }
      EXPECT_EQ(next, n) << n << " over " << ranks;
    }
  }
}

TEST(Communicator, TheOneRankGroupCopies) {
  auto c = parallel::self_communicator("solo");
  EXPECT_EQ(c->size(), 1);
  Tensor in = Tensor::from_vector({1.f, 2.f}, {2, 1}), out = Tensor::zeros({2, 1}, DType::F32);
  c->all_to_all(in, {2}, out, {2});
  EXPECT_EQ(out.f32()[1], 2.f);
  EXPECT_EQ(parallel::exchange_counts(*c, {5}), std::vector<int64_t>{5});
  EXPECT_NE(test::error_of([&] { c->all_to_all(in, {1}, out, {2}); }).find("group 'solo'"), std::string::npos);
}

}  // namespace
