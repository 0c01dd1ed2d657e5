// tcpPump(): the reference the tcp bench prints beside its figure — the most a
// TCP transport can get on this host. Raw loopback sockets, no protocol: `n`
// connections, each with a sender thread that sends `block`-sized pieces from the
// source buffer and a receiver thread that receives them into the target buffer
// (the bench passes its regions, so the copies are DRAM-bound like the real ones).
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <thread>
#include <vector>

#include "util/napi_util.h"

namespace epd {
namespace {

Status Pair(int listener, const sockaddr_in& addr, int* client, int* server) {
  *client = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (*client < 0) return Status::FromErrno("socket");
  if (connect(*client, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) != 0) {
    Status st = Status::FromErrno("connect");
    close(*client);
    return st;
  }
  *server = accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
  if (*server < 0) {
    Status st = Status::FromErrno("accept");
    close(*client);
    return st;
  }
  int one = 1;
  setsockopt(*client, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  setsockopt(*server, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  return Status::Ok();
}

Status Pump(int n, size_t block, uint8_t* src, uint8_t* dst, size_t working_set, int millis, double* gbps) {
  int listener = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (listener < 0) return Status::FromErrno("socket");
  sockaddr_in addr = {};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(addr);
  if (bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 || listen(listener, n) != 0 ||
      getsockname(listener, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    Status st = Status::FromErrno("loopback listener");
    close(listener);
    return st;
  }
  std::vector<int> clients(n, -1), servers(n, -1);
  Status st = Status::Ok();
  for (int i = 0; i < n && st.ok(); ++i) st = Pair(listener, addr, &clients[i], &servers[i]);
  close(listener);
  const size_t slots = working_set / block;
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> received{0};
  std::vector<std::thread> threads;
  if (st.ok()) {
    for (int i = 0; i < n; ++i) {
      threads.emplace_back([&, i] {
        for (size_t s = static_cast<size_t>(i); !stop.load(std::memory_order_relaxed); s = (s + n) % slots) {
          const uint8_t* p = src + s * block;
          for (size_t off = 0; off < block;) {
            ssize_t r = send(clients[i], p + off, block - off, MSG_NOSIGNAL);
            if (r <= 0) return;
            off += static_cast<size_t>(r);
          }
        }
      });
      threads.emplace_back([&, i] {
        for (size_t s = static_cast<size_t>(i);; s = (s + n) % slots) {
          ssize_t r = recv(servers[i], dst + s * block, block, MSG_WAITALL);
          if (r <= 0) return;
          received.fetch_add(static_cast<uint64_t>(r), std::memory_order_relaxed);
        }
      });
    }
    using Clock = std::chrono::steady_clock;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));  // warm-up: windows open
    const uint64_t b0 = received.load();
    const auto t0 = Clock::now();
    std::this_thread::sleep_for(std::chrono::milliseconds(millis));
    const uint64_t b1 = received.load();
    const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
    *gbps = static_cast<double>(b1 - b0) / seconds / 1e9;
    stop.store(true);
    for (int fd : clients) shutdown(fd, SHUT_RDWR);
    for (int fd : servers) shutdown(fd, SHUT_RDWR);
    for (auto& t : threads) t.join();
  }
  for (int fd : clients) if (fd >= 0) close(fd);
  for (int fd : servers) if (fd >= 0) close(fd);
  return st;
}

}  // namespace

// tcpPump(connections, blockBytes, src, dst, millis) -> GB/s (1e9 B/s). Blocks the
// calling thread for about `millis` + 100 ms, like memcpyBandwidth.
Napi::Value TcpPump(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint64_t n = ArgIndex(info, 0, "connections");
  uint64_t block = ArgIndex(info, 1, "blockBytes");
  uint8_t *src = nullptr, *dst = nullptr;
  size_t src_len = 0, dst_len = 0;
  if (info.Length() < 5 || !BytesOf(info[2], &src, &src_len) || !BytesOf(info[3], &dst, &dst_len)) {
    Throw(env, Code::kBadArgument, "tcpPump(connections, blockBytes, src, dst, millis)");
  }
  uint64_t millis = ArgIndex(info, 4, "millis");
  const size_t working = std::min(src_len, dst_len);
  if (n < 1 || n > 16 || block < 1 || block > working || millis < 10) {
    Throw(env, Code::kBadArgument, "tcpPump: 1..16 connections, 0 < block <= buffer size, millis >= 10");
  }
  double gbps = 0;
  Check(env, Pump(static_cast<int>(n), static_cast<size_t>(block), src, dst, working, static_cast<int>(millis), &gbps));
  return Napi::Number::New(env, gbps);
}

}  // namespace epd
