// Start-up of a multi-process job: every rank reaches rank 0's store (dist/tcp_store.h) at
// MASTER_ADDR:MASTER_PORT, announces itself with a fingerprint (the hash of its resolved recipe),
// and rank 0 rules: all joined within the timeout and all fingerprints equal, or one error that
// names the ranks that never joined or disagree, which every rank then raises. Afterwards rank 0
// can broadcast bytes (the NCCL unique id) the same way.
#pragma once
#include <chrono>
#include <memory>
#include <string>
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

 private:
  // Every rank announces `key`; rank 0 waits for them all (listing absentees in the error).
  void barrier(const std::string& key);
  DistEnv env_;
  std::chrono::milliseconds timeout_;
  std::unique_ptr<TcpStoreServer> server_;
  std::unique_ptr<TcpStoreClient> client_;
  int round_ = 0;
};

// "rank 2" or "ranks 2, 3 and 7", for messages.
std::string ranks_phrase(const std::vector<int>& ranks);

}  // namespace moeforge::parallel
