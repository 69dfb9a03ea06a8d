// Start-up of a multi-process job: every rank reaches rank 0's store (dist/tcp_store.h) at
// MASTER_ADDR:MASTER_PORT, announces itself with a fingerprint (the hash of its resolved recipe),
// and rank 0 rules: all joined within the timeout and all fingerprints equal, or one error that
// names the ranks that never joined or disagree, which every rank then raises. Afterwards rank 0
// can broadcast bytes (the NCCL unique id) the same way.
#pragma once
#include <atomic>
#include <chrono>
#include <memory>
#include <thread>
#include <string>
#include <utility>
#include <vector>

#include "parallel/env.h"
#include "parallel/tcp_store.h"

namespace moeforge::parallel {

class Rendezvous {
 public:
  Rendezvous(const DistEnv& env, const std::string& fingerprint, std::chrono::milliseconds timeout);
  ~Rendezvous();
  const DistEnv& env() const { return env_; }
  // Rank 0's `value` on every rank (others pass anything); returns once every rank has it.
  std::string broadcast(const std::string& key, const std::string& value);
  // This rank's connection to rank 0's store (the communicators set up through it).
  TcpStoreClient& store() { return *client_; }
  // After start-up every rank beats (a counter in rank 0's store, twice a second, from its own
  // thread and connection) until this object goes. Which ranks stopped: every beat read twice,
  // `window` apart; the ranks whose count did not move are named ("rank 1 stopped answering: no
  // heartbeat for 1.5 s"), or rank 0 when its store does not answer (it hosts the store). For a
  // collective's timeout message (Communicator::set_timeout_diagnosis); "" when every rank beats.
  std::string stalled_peers(std::chrono::milliseconds window = std::chrono::milliseconds(1500)) const;

 private:
  // Where this rank reaches rank 0's store (rank 0 itself: its own server, on the loopback).
  std::pair<std::string, int> store_address() const;
  void start_heartbeat();
  void stop_heartbeat();
  // Every rank announces `key`; rank 0 waits for them all (listing absentees in the error).
  void barrier(const std::string& key);
  DistEnv env_;
  std::chrono::milliseconds timeout_;
  std::unique_ptr<TcpStoreServer> server_;
  std::unique_ptr<TcpStoreClient> client_;
  int round_ = 0;
  std::string generation_;
  std::atomic<bool> beating_{false};
  std::thread heartbeat_;
};

// "rank 2" or "ranks 2, 3 and 7", for messages.
std::string ranks_phrase(const std::vector<int>& ranks);

}  // namespace moeforge::parallel
