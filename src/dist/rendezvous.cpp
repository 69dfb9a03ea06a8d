#include "dist/rendezvous.h"

#include <unistd.h>

#include <sstream>

#include "core/error.h"

namespace moeforge::dist {

namespace {

std::string hostname() {
  char buf[256] = {0};
  if (::gethostname(buf, sizeof buf - 1) != 0) return "?";
  return buf;
}

}  // namespace

std::string rank_list(const std::vector<int>& ranks) {
  std::ostringstream os;
  for (size_t i = 0; i < ranks.size(); ++i) {
    if (i > 0) os << (i + 1 == ranks.size() ? " and " : ", ");
    os << ranks[i];
  }
  return os.str();
}

Rendezvous::Rendezvous(const DistEnv& env, const std::string& fingerprint, std::chrono::milliseconds timeout)
    : env_(env), timeout_(timeout) {
  const std::string where = env.master_addr + ":" + std::to_string(env.master_port);
  if (env.rank == 0) server_ = std::make_unique<TcpStoreServer>(env.master_port);
  client_ = std::make_unique<TcpStoreClient>(env.rank == 0 ? "127.0.0.1" : env.master_addr,
                                             env.rank == 0 ? server_->port() : env.master_port, timeout);
  client_->set("join/" + std::to_string(env.rank), hostname() + "\n" + fingerprint);
  if (env.rank == 0) {
    // Rank 0 rules on who joined and whether they agree, and tells everyone.
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    std::vector<std::string> joined(static_cast<size_t>(env.world_size));
    std::vector<int> missing, differ;
    for (int r = 0; r < env.world_size; ++r) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      auto v = client_->get("join/" + std::to_string(r), std::max(left, std::chrono::milliseconds(0)));
      if (!v) missing.push_back(r);
      else joined[r] = *v;
    }
    std::string verdict = "ok";
    if (!missing.empty()) {
      std::ostringstream os;
      os << "rendezvous at " << where << ": rank" << (missing.size() > 1 ? "s " : " ") << rank_list(missing) << " of "
         << env.world_size << " never joined within " << timeout.count() / 1000.0 << " s";
      verdict = "error\n" + os.str();
    } else {
      hosts_.resize(joined.size());
      for (int r = 0; r < env.world_size; ++r) {
        const size_t nl = joined[r].find('\n');
        hosts_[r] = joined[r].substr(0, nl);
        if (joined[r].substr(nl + 1) != fingerprint) differ.push_back(r);
      }
      if (!differ.empty()) {
        std::ostringstream os;
        os << "rendezvous: rank" << (differ.size() > 1 ? "s " : " ") << rank_list(differ)
           << " started with a different recipe than rank 0 (resolved-recipe hashes differ); every rank must run the "
              "same recipe";
        verdict = "error\n" + os.str();
      }
    }
    client_->set("verdict", verdict);
    if (verdict != "ok") {
      // Keep the store up until the ranks that joined have read the verdict (briefly: they may be gone).
      const auto until = std::chrono::steady_clock::now() + std::min(timeout, std::chrono::milliseconds(5000));
      for (int r = 1; r < env.world_size; ++r) {
        if (joined[r].empty()) continue;
        const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(until - std::chrono::steady_clock::now());
        client_->get("seen/" + std::to_string(r), std::max(left, std::chrono::milliseconds(0)));
      }
      MF_THROW(verdict.substr(6));
    }
    barrier("joined");
  } else {
    // Rank 0 answers within its own timeout after it started; allow as long again.
    auto v = client_->get("verdict", 2 * timeout);
    MF_CHECK(v, "rendezvous at ", where, ": rank ", env.rank, " got no verdict from rank 0 within ",
             2 * timeout.count() / 1000.0, " s");
    client_->set("seen/" + std::to_string(env.rank), "1");
    if (*v != "ok") MF_THROW(v->substr(6));
    barrier("joined");
  }
}

Rendezvous::~Rendezvous() {
  client_.reset();
  if (server_) server_->wait_until_idle(timeout_);
}

void Rendezvous::barrier(const std::string& key) {
  const std::string k = key + "/" + std::to_string(round_++) + "/";
  client_->set(k + std::to_string(env_.rank), "1");
  if (env_.rank == 0) {
    // Rank 0 keeps the store alive until every rank has read what it needs.
    std::vector<int> missing;
    const auto deadline = std::chrono::steady_clock::now() + timeout_;
    for (int r = 0; r < env_.world_size; ++r) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      if (!client_->get(k + std::to_string(r), std::max(left, std::chrono::milliseconds(0)))) missing.push_back(r);
    }
    client_->set(k + "done", missing.empty() ? "ok" : "error\nrendezvous: rank" + std::string(missing.size() > 1 ? "s " : " ") +
                                                       rank_list(missing) + " stopped answering (" + key + ")");
    MF_CHECK(missing.empty(), "rendezvous: rank", missing.size() > 1 ? "s " : " ", rank_list(missing),
             " stopped answering (", key, ")");
  } else {
    auto v = client_->get(k + "done", 2 * timeout_);
    MF_CHECK(v, "rendezvous: rank ", env_.rank, " heard nothing from rank 0 within ", 2 * timeout_.count() / 1000.0,
             " s (", key, ")");
    if (*v != "ok") MF_THROW(v->substr(6));
  }
}

std::string Rendezvous::broadcast(const std::string& key, const std::string& value) {
  const std::string k = "bcast/" + key;
  if (env_.rank == 0) client_->set(k, value);
  auto v = client_->get(k, timeout_);
  MF_CHECK(v, "rendezvous: rank ", env_.rank, " did not receive '", key, "' from rank 0 within ",
           timeout_.count() / 1000.0, " s");
  barrier("broadcast " + key);
  return *v;
}

}  // namespace moeforge::dist
