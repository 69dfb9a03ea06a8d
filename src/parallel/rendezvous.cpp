#include "parallel/rendezvous.h"

#include <algorithm>
#include <chrono>
#include <exception>
#include <map>
#include <mutex>
#include <optional>
#include <sstream>
#include <thread>

#include "core/error.h"

namespace moeforge::parallel {

namespace {

using std::chrono::milliseconds;
using std::chrono::steady_clock;

// Time left until `deadline`, never negative.
milliseconds left_until(steady_clock::time_point deadline) {
  return std::max(std::chrono::duration_cast<milliseconds>(deadline - steady_clock::now()), milliseconds(0));
}

// Rank 0's rulings travel as "ok" or "error\n<message>"; every rank raises the same message.
const std::string kOk = "ok";
std::string error_verdict(const std::string& message) { return "error\n" + message; }
void raise_if_error(const std::string& verdict) {
  if (verdict != kOk) MF_THROW(verdict.substr(verdict.find('\n') + 1));
}

// Which rendezvous this is for this rank and port, counted from 1: every rank makes the same
// sequence of them (a Python script's from_pretrained(ep_size=...) then train(...), say). Keyed by
// rank and port so that tests running ranks as threads of one process count per rank.
int next_generation(int rank, int port) {
  static std::mutex mu;
  static std::map<std::pair<int, int>, int> count;
  std::lock_guard<std::mutex> lock(mu);
  return ++count[{rank, port}];
}

}  // namespace

std::string ranks_phrase(const std::vector<int>& ranks) {
  std::ostringstream os;
  os << (ranks.size() > 1 ? "ranks " : "rank ");
  for (size_t i = 0; i < ranks.size(); ++i) {
    if (i > 0) os << (i + 1 == ranks.size() ? " and " : ", ");
    os << ranks[i];
  }
  return os.str();
}

Rendezvous::Rendezvous(const DistEnv& env, const std::string& fingerprint, milliseconds timeout)
    : env_(env), timeout_(timeout) {
  const std::string where = env.master_addr + ":" + std::to_string(env.master_port);
  // A rank done with one rendezvous can reach rank 0's store of that one before rank 0 has closed it
  // (rank 0 keeps it until every rank has left): each store says which rendezvous it serves, and a
  // client of a later one lets go and comes back until rank 0's new store answers.
  const std::string generation = std::to_string(next_generation(env.rank, env.master_port));
  generation_ = generation;
  if (env.rank == 0) {
    server_ = std::make_unique<TcpStoreServer>(env.master_port);
    client_ = std::make_unique<TcpStoreClient>("127.0.0.1", server_->port(), timeout);
    client_->set("generation", generation);
  } else {
    const auto deadline = steady_clock::now() + timeout;
    for (;;) {
      std::optional<std::string> served;
      try {
        client_ = std::make_unique<TcpStoreClient>(env.master_addr, env.master_port, std::max(left_until(deadline), milliseconds(1)));
        served = client_->get("generation", std::min(left_until(deadline), milliseconds(2000)));
      } catch (const std::exception&) {
        // Rank 0 closed its earlier store under this probe (a connection its kernel had queued but
        // the store never served is reset): not an error, its new store comes on the same port. A
        // store that never answers at all still ends in the deadline's error below.
        if (steady_clock::now() >= deadline) throw;
      }
      if (served == generation) break;
      client_.reset();
      MF_CHECK(steady_clock::now() < deadline, "rendezvous at ", where, ": rank 0's store still serves an earlier "
               "rendezvous (", served.value_or("none"), "; this is number ", generation, ") after ",
               timeout.count() / 1000.0, " s");
      std::this_thread::sleep_for(milliseconds(20));
    }
  }
  client_->set("join/" + std::to_string(env.rank), fingerprint);
  if (env.rank != 0) {
    // Rank 0 answers within its own timeout after it started; allow as long again.
    auto v = client_->get("verdict", 2 * timeout);
    MF_CHECK(v, "rendezvous at ", where, ": rank ", env.rank, " got no verdict from rank 0 within ",
             2 * timeout.count() / 1000.0, " s");
    client_->set("seen/" + std::to_string(env.rank), "1");
    raise_if_error(*v);
    barrier("joined");
    start_heartbeat();
    return;
  }
  // Rank 0 rules on who joined and whether they agree, and tells everyone.
  const auto deadline = steady_clock::now() + timeout;
  std::vector<std::optional<std::string>> joined(static_cast<size_t>(env.world_size));
  std::vector<int> missing, differ;
  for (int r = 0; r < env.world_size; ++r) {
    joined[r] = client_->get("join/" + std::to_string(r), left_until(deadline));
    if (!joined[r]) missing.push_back(r);
    else if (*joined[r] != fingerprint) differ.push_back(r);
  }
  std::string verdict = kOk;
  if (!missing.empty()) {
    std::ostringstream os;
    os << "rendezvous at " << where << ": " << ranks_phrase(missing) << " of " << env.world_size
       << " never joined within " << timeout.count() / 1000.0 << " s";
    verdict = error_verdict(os.str());
  } else if (!differ.empty()) {
    verdict = error_verdict("rendezvous: " + ranks_phrase(differ) +
                            " started with a different recipe than rank 0 (resolved-recipe hashes differ); every rank "
                            "must run the same recipe");
  }
  client_->set("verdict", verdict);
  if (verdict != kOk) {
    // Keep the store up until the ranks that joined have read the verdict (briefly: they may be gone).
    const auto until = steady_clock::now() + std::min(timeout, milliseconds(5000));
    for (int r = 1; r < env.world_size; ++r)
      if (joined[r]) client_->get("seen/" + std::to_string(r), left_until(until));
    raise_if_error(verdict);
  }
  barrier("joined");
  start_heartbeat();
}

Rendezvous::~Rendezvous() {
  stop_heartbeat();
  client_.reset();
  // A normal end keeps the store up until the other ranks have left. Unwinding from an error (a peer
  // that died or froze, whose connection would never close) must not wait out a second timeout:
  // the error is reported now (measured: a frozen peer's error came after twice the timeout).
  if (server_) server_->wait_until_idle(std::uncaught_exceptions() > 0 ? std::chrono::milliseconds(0) : timeout_);
}

void Rendezvous::barrier(const std::string& key) {
  const std::string k = key + "/" + std::to_string(round_++) + "/";
  client_->set(k + std::to_string(env_.rank), "1");
  if (env_.rank == 0) {
    // Rank 0 keeps the store alive until every rank has read what it needs.
    std::vector<int> missing;
    const auto deadline = steady_clock::now() + timeout_;
    for (int r = 0; r < env_.world_size; ++r)
      if (!client_->get(k + std::to_string(r), left_until(deadline))) missing.push_back(r);
    const std::string verdict =
        missing.empty() ? kOk : error_verdict("rendezvous: " + ranks_phrase(missing) + " stopped answering (" + key + ")");
    client_->set(k + "done", verdict);
    raise_if_error(verdict);
  } else {
    auto v = client_->get(k + "done", 2 * timeout_);
    MF_CHECK(v, "rendezvous: rank ", env_.rank, " heard nothing from rank 0 within ", 2 * timeout_.count() / 1000.0,
             " s (", key, ")");
    raise_if_error(*v);
  }
}

namespace {

const milliseconds kBeatEvery(500);
std::string beat_key(int rank) { return "beat/" + std::to_string(rank); }

}  // namespace

std::pair<std::string, int> Rendezvous::store_address() const {
  return server_ ? std::pair<std::string, int>{"127.0.0.1", server_->port()}
                 : std::pair<std::string, int>{env_.master_addr, env_.master_port};
}

void Rendezvous::start_heartbeat() {
  // Its own connection: the main one is busy in the rank's own waits, and a heartbeat must go on
  // while the rank computes or waits in a collective.
  const auto [addr, port] = store_address();
  beating_ = true;
  heartbeat_ = std::thread([this, addr, port] {
    try {
      TcpStoreClient beat(addr, port, milliseconds(2000));
      beat.set_io_timeout(milliseconds(2000));
      for (uint64_t n = 1; beating_; ++n) {
        beat.set(beat_key(env_.rank), std::to_string(n));
        for (auto slept = milliseconds(0); beating_ && slept < kBeatEvery; slept += milliseconds(50))
          std::this_thread::sleep_for(milliseconds(50));
      }
    } catch (const std::exception&) {
      // The store went away (rank 0 ended or died): nothing to beat into; the collectives report it.
    }
  });
}

void Rendezvous::stop_heartbeat() {
  beating_ = false;
  if (heartbeat_.joinable()) heartbeat_.join();
}

std::string Rendezvous::stalled_peers(milliseconds window) const {
  const std::string where = env_.master_addr + ":" + std::to_string(env_.master_port);
  const auto [addr, port] = store_address();
  const std::string no_store = "rank 0, which hosts the job's store at " + where + ", does not answer";
  try {
    TcpStoreClient c(addr, port, milliseconds(1000));
    c.set_io_timeout(milliseconds(1000));
    const auto read = [&] {
      std::vector<std::string> beats(static_cast<size_t>(env_.world_size));
      for (int r = 0; r < env_.world_size; ++r) beats[r] = c.get(beat_key(r), milliseconds(0)).value_or("");
      return beats;
    };
    const std::vector<std::string> first = read();
    std::this_thread::sleep_for(window);
    const std::vector<std::string> second = read();
    std::vector<int> stalled;
    for (int r = 0; r < env_.world_size; ++r)
      if (r != env_.rank && first[r] == second[r]) stalled.push_back(r);
    if (stalled.empty()) return "";
    std::ostringstream os;
    os << ranks_phrase(stalled) << " stopped answering: no heartbeat for "
       << window.count() / 1000.0 << " s (a stopped, hung or dead process";
    os << (std::find(stalled.begin(), stalled.end(), 0) != stalled.end() ? "; rank 0 hosts the job's store" : "") << ")";
    return os.str();
  } catch (const std::exception&) {
    return no_store;
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

}  // namespace moeforge::parallel
