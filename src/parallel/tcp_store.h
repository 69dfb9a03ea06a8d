// A small key-value store over TCP for start-up coordination (the rendezvous, exchanging the NCCL
// unique id): rank 0 runs the server, every rank (rank 0 too) is a client. Keys are written once
// and read by anyone; a read waits for its key until a deadline, so ranks that start at different
// times still meet. Messages are length-prefixed; one connection per client.
#pragma once
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

namespace moeforge::parallel {

class TcpStoreServer {
 public:
  // Listens on all interfaces at `port` (0: any free port; port() says which).
  explicit TcpStoreServer(int port);
  ~TcpStoreServer();
  TcpStoreServer(const TcpStoreServer&) = delete;
  TcpStoreServer& operator=(const TcpStoreServer&) = delete;
  int port() const { return port_; }
  // Waits until every client has disconnected, or `timeout` passes (rank 0 keeps the store up
  // until the other ranks have read what they need and left).
  void wait_until_idle(std::chrono::milliseconds timeout);

 private:
  void accept_loop();
  void serve(int fd);
  int listen_fd_ = -1;
  int port_ = 0;
  std::atomic<bool> stop_{false};
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<std::string, std::string> data_;
  std::vector<int> conns_;
  int open_ = 0;  // connections whose peer has not closed yet
  std::vector<std::thread> threads_;
  std::thread acceptor_;
};

class TcpStoreClient {
 public:
  // Connects to addr:port, retrying until `timeout` passes (the server may not be up yet); throws
  // naming the address when it never answers.
  TcpStoreClient(const std::string& addr, int port, std::chrono::milliseconds timeout);
  ~TcpStoreClient();
  TcpStoreClient(const TcpStoreClient&) = delete;
  TcpStoreClient& operator=(const TcpStoreClient&) = delete;
  void set(const std::string& key, const std::string& value);
  // Every later send or receive on this connection fails (throws) after `timeout` without progress,
  // instead of waiting for a peer that may never answer (a store whose process is stopped).
  void set_io_timeout(std::chrono::milliseconds timeout);
  // The key's value, or nullopt if it was not set within `timeout`.
  std::optional<std::string> get(const std::string& key, std::chrono::milliseconds timeout);

 private:
  int fd_ = -1;
  std::string where_;
};

}  // namespace moeforge::parallel
