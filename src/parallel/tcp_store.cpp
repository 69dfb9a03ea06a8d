#include "parallel/tcp_store.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "core/error.h"

namespace moeforge::parallel {

namespace {

// Wire format: request = op (1 byte: 'S' set, 'G' get) + key + (value | timeout in ms as text);
// every string is a 4-byte little-endian length then the bytes. Reply to 'G': '1' + value or '0'.
bool write_all(int fd, const void* p, size_t n) {
  const char* c = static_cast<const char*>(p);
  while (n > 0) {
    const ssize_t w = ::send(fd, c, n, MSG_NOSIGNAL);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return false;
    c += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

bool read_all(int fd, void* p, size_t n) {
  char* c = static_cast<char*>(p);
  while (n > 0) {
    const ssize_t r = ::recv(fd, c, n, 0);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    c += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

bool write_str(int fd, const std::string& s) {
  const uint32_t n = static_cast<uint32_t>(s.size());
  const unsigned char len[4] = {static_cast<unsigned char>(n), static_cast<unsigned char>(n >> 8),
                                static_cast<unsigned char>(n >> 16), static_cast<unsigned char>(n >> 24)};
  return write_all(fd, len, 4) && write_all(fd, s.data(), s.size());
}

constexpr uint32_t kMaxMessage = 64u << 20;

bool read_str(int fd, std::string& s) {
  unsigned char len[4];
  if (!read_all(fd, len, 4)) return false;
  const uint32_t n = len[0] | (len[1] << 8) | (len[2] << 16) | (static_cast<uint32_t>(len[3]) << 24);
  if (n > kMaxMessage) return false;  // not a client of ours
  s.resize(n);
  return n == 0 || read_all(fd, s.data(), n);
}

}  // namespace

TcpStoreServer::TcpStoreServer(int port) {
  listen_fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
  MF_CHECK(listen_fd_ >= 0, "rendezvous store: socket() failed: ", std::strerror(errno));
  const int one = 1;
  ::setsockopt(listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_ANY);
  a.sin_port = htons(static_cast<uint16_t>(port));
  if (::bind(listen_fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 || ::listen(listen_fd_, 512) != 0) {
    const std::string why = std::strerror(errno);
    ::close(listen_fd_);
    MF_THROW("rendezvous store: cannot listen on port ", port, ": ", why, " (MASTER_PORT in use?)");
  }
  socklen_t len = sizeof a;
  ::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&a), &len);
  port_ = ntohs(a.sin_port);
  acceptor_ = std::thread([this] { accept_loop(); });
}

TcpStoreServer::~TcpStoreServer() {
  stop_ = true;
  cv_.notify_all();
  ::shutdown(listen_fd_, SHUT_RDWR);
  if (acceptor_.joinable()) acceptor_.join();
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (int fd : conns_) ::shutdown(fd, SHUT_RDWR);
  }
  for (auto& t : threads_) t.join();
  for (int fd : conns_) ::close(fd);
  ::close(listen_fd_);
}

void TcpStoreServer::wait_until_idle(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait_for(lock, timeout, [&] { return open_ == 0; });
}

void TcpStoreServer::accept_loop() {
  while (!stop_) {
    pollfd p{listen_fd_, POLLIN, 0};
    if (::poll(&p, 1, 100) <= 0) continue;
    const int fd = ::accept(listen_fd_, nullptr, nullptr);
    if (fd < 0) continue;
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_) {
      ::close(fd);
      break;
    }
    conns_.push_back(fd);
    ++open_;
    threads_.emplace_back([this, fd] {
      serve(fd);
      std::lock_guard<std::mutex> l(mu_);
      --open_;
      cv_.notify_all();
    });
  }
}

void TcpStoreServer::serve(int fd) {
  for (;;) {
    char op = 0;
    std::string key, arg;
    if (!read_all(fd, &op, 1) || !read_str(fd, key) || !read_str(fd, arg)) return;
    if (op == 'S') {
      {
        std::lock_guard<std::mutex> lock(mu_);
        data_[key] = arg;
      }
      cv_.notify_all();
    } else if (op == 'G') {
      long long ms = 0;
      try {
        ms = std::stoll(arg);
      } catch (const std::exception&) {
        return;
      }
      std::unique_lock<std::mutex> lock(mu_);
      const bool found = cv_.wait_for(lock, std::chrono::milliseconds(ms), [&] { return stop_ || data_.count(key); }) &&
                         data_.count(key);
      const std::string value = found ? data_[key] : std::string();
      lock.unlock();
      const char tag = found ? '1' : '0';
      if (!write_all(fd, &tag, 1) || !write_str(fd, value)) return;
    } else {
      return;
    }
  }
}

TcpStoreClient::TcpStoreClient(const std::string& addr, int port, std::chrono::milliseconds timeout)
    : where_(addr + ":" + std::to_string(port)) {
  addrinfo hints{}, *res = nullptr;
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  std::string last_error = "no attempt";
  for (;;) {
    if (::getaddrinfo(addr.c_str(), std::to_string(port).c_str(), &hints, &res) == 0 && res) {
      const int fd = ::socket(res->ai_family, res->ai_socktype, res->ai_protocol);
      if (fd >= 0 && ::connect(fd, res->ai_addr, res->ai_addrlen) == 0) {
        ::freeaddrinfo(res);
        const int one = 1;
        ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        fd_ = fd;
        return;
      }
      last_error = std::strerror(errno);
      if (fd >= 0) ::close(fd);
      ::freeaddrinfo(res);
      res = nullptr;
    } else {
      last_error = "cannot resolve " + addr;
    }
    if (std::chrono::steady_clock::now() >= deadline) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  MF_THROW("rendezvous: no answer from ", where_, " within ", timeout.count() / 1000.0, " s (", last_error,
           "); is rank 0 running, and are MASTER_ADDR and MASTER_PORT right?");
}

TcpStoreClient::~TcpStoreClient() {
  if (fd_ >= 0) ::close(fd_);
}

void TcpStoreClient::set(const std::string& key, const std::string& value) {
  const char op = 'S';
  MF_CHECK(write_all(fd_, &op, 1) && write_str(fd_, key) && write_str(fd_, value), "rendezvous: lost the connection to ",
           where_, " while writing '", key, "'");
}

void TcpStoreClient::set_io_timeout(std::chrono::milliseconds timeout) {
  timeval tv{};
  tv.tv_sec = static_cast<time_t>(timeout.count() / 1000);
  tv.tv_usec = static_cast<suseconds_t>((timeout.count() % 1000) * 1000);
  ::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  ::setsockopt(fd_, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

std::optional<std::string> TcpStoreClient::get(const std::string& key, std::chrono::milliseconds timeout) {
  const char op = 'G';
  char tag = 0;
  std::string value;
  MF_CHECK(write_all(fd_, &op, 1) && write_str(fd_, key) && write_str(fd_, std::to_string(timeout.count())) &&
               read_all(fd_, &tag, 1) && read_str(fd_, value),
           "rendezvous: lost the connection to ", where_, " while reading '", key, "'");
  if (tag != '1') return std::nullopt;
  return value;
}

}  // namespace moeforge::parallel
