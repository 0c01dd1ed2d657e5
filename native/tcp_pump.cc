// Raw loopback socket pumps: the most a TCP transport can get on this host. No
// protocol: `n` connections, each with a sender thread that sends `block`-sized
// pieces from a source buffer and a receiver thread that receives them into a
// target buffer (callers pass DRAM-sized buffers, so the copies are DRAM-bound like
// real transfers).
//
// - tcpPumpReceiver() + tcpPumpSend(): receiver and sender in two processes, as the
//   tcp transport runs; the reference of `bench transfer --transport tcp`.
// - tcpPump(): both ends in this process; what `probe` reports.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <mutex>
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

// Receiving end of a two-process pump: accepts `n` connections on a loopback port
// and drains each into `dst` on its own thread until the sender closes.
class PumpReceiver {
 public:
  ~PumpReceiver() { Close(); }

  Napi::Reference<Napi::Value> keep;

  Status Open(int n, size_t block, uint8_t* dst, size_t bytes, int* port) {
    listener_ = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (listener_ < 0) return Status::FromErrno("socket");
    sockaddr_in addr = {};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof(addr);
    if (bind(listener_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 || listen(listener_, n) != 0 ||
        getsockname(listener_, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
      return Status::FromErrno("loopback listener");
    }
    *port = ntohs(addr.sin_port);
    const size_t slots = bytes / block;
    acceptor_ = std::thread([this, n, block, dst, slots] {
      for (int i = 0; i < n; ++i) {
        int fd = accept4(listener_, nullptr, nullptr, SOCK_CLOEXEC);
        if (fd < 0) return;
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        {
          std::lock_guard<std::mutex> lock(mu_);
          fds_.push_back(fd);
        }
        receivers_.emplace_back([fd, i, n, block, dst, slots] {
          for (size_t s = static_cast<size_t>(i);; s = (s + n) % slots) {
            if (recv(fd, dst + s * block, block, MSG_WAITALL) <= 0) return;
          }
        });
      }
    });
    return Status::Ok();
  }

  void Close() {
    if (listener_ >= 0) shutdown(listener_, SHUT_RDWR);  // unblocks accept
    if (acceptor_.joinable()) acceptor_.join();
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (int fd : fds_) shutdown(fd, SHUT_RDWR);
    }
    for (auto& t : receivers_) t.join();
    receivers_.clear();
    for (int fd : fds_) close(fd);
    fds_.clear();
    if (listener_ >= 0) close(listener_);
    listener_ = -1;
  }

 private:
  int listener_ = -1;
  std::mutex mu_;
  std::vector<int> fds_;
  std::thread acceptor_;
  std::vector<std::thread> receivers_;
};

// Sending end: connects `n` connections to `port` and sends for `millis` after a
// 100 ms warm-up; the rate is what left the senders, which on loopback is what
// arrived up to the socket buffers (a few MiB against GBs).
Status PumpSend(int port, int n, size_t block, const uint8_t* src, size_t bytes, int millis, double* gbps) {
  sockaddr_in addr = {};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  std::vector<int> fds;
  Status st = Status::Ok();
  for (int i = 0; i < n && st.ok(); ++i) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
      st = Status::FromErrno("connecting the pump");
      if (fd >= 0) close(fd);
      break;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    fds.push_back(fd);
  }
  if (st.ok()) {
    const size_t slots = bytes / block;
    std::atomic<bool> stop{false};
    std::atomic<uint64_t> sent{0};
    std::vector<std::thread> threads;
    for (int i = 0; i < n; ++i) {
      threads.emplace_back([&, i] {
        for (size_t s = static_cast<size_t>(i); !stop.load(std::memory_order_relaxed); s = (s + n) % slots) {
          const uint8_t* p = src + s * block;
          for (size_t off = 0; off < block;) {
            ssize_t r = send(fds[i], p + off, block - off, MSG_NOSIGNAL);
            if (r <= 0) return;
            off += static_cast<size_t>(r);
            sent.fetch_add(static_cast<uint64_t>(r), std::memory_order_relaxed);
          }
        }
      });
    }
    using Clock = std::chrono::steady_clock;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    const uint64_t b0 = sent.load();
    const auto t0 = Clock::now();
    std::this_thread::sleep_for(std::chrono::milliseconds(millis));
    const uint64_t b1 = sent.load();
    *gbps = static_cast<double>(b1 - b0) / std::chrono::duration<double>(Clock::now() - t0).count() / 1e9;
    stop.store(true);
    for (int fd : fds) shutdown(fd, SHUT_RDWR);
    for (auto& t : threads) t.join();
  }
  for (int fd : fds) close(fd);
  return st;
}

}  // namespace

// tcpPumpReceiver(connections, blockBytes, dst) -> { port, handle }: starts the
// receiving end; close it with tcpPumpReceiverClose(handle) (or let GC do it).
Napi::Value TcpPumpReceiver(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint64_t n = ArgIndex(info, 0, "connections");
  uint64_t block = ArgIndex(info, 1, "blockBytes");
  uint8_t* dst = nullptr;
  size_t len = 0;
  if (info.Length() < 3 || !BytesOf(info[2], &dst, &len) || n < 1 || n > 16 || block < 1 || block > len) {
    Throw(env, Code::kBadArgument, "tcpPumpReceiver(1..16 connections, 0 < block <= dst size, dst)");
  }
  auto* r = new PumpReceiver();
  int port = 0;
  Status st = r->Open(static_cast<int>(n), static_cast<size_t>(block), dst, len, &port);
  if (!st.ok()) {
    delete r;
    Throw(env, st);
  }
  auto out = Napi::Object::New(env);
  out.Set("port", Napi::Number::New(env, port));
  r->keep = Napi::Persistent(info[2]);  // `dst` is written until close
  out.Set("handle", Napi::External<PumpReceiver>::New(env, r, [](Napi::Env, PumpReceiver* p) { delete p; }));
  return out;
}

Napi::Value TcpPumpReceiverClose(const Napi::CallbackInfo& info) {
  if (info.Length() < 1 || !info[0].IsExternal()) Throw(info.Env(), Code::kBadArgument, "Expected a pump handle");
  PumpReceiver* r = info[0].As<Napi::External<PumpReceiver>>().Data();
  r->Close();
  r->keep.Reset();
  return info.Env().Undefined();
}

// tcpPumpSend(port, connections, blockBytes, src, millis) -> GB/s (1e9 B/s). Blocks
// the calling thread for about `millis` + 100 ms.
Napi::Value TcpPumpSend(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint64_t port = ArgIndex(info, 0, "port");
  uint64_t n = ArgIndex(info, 1, "connections");
  uint64_t block = ArgIndex(info, 2, "blockBytes");
  uint8_t* src = nullptr;
  size_t len = 0;
  if (info.Length() < 5 || !BytesOf(info[3], &src, &len)) Throw(env, Code::kBadArgument, "tcpPumpSend(port, n, block, src, millis)");
  uint64_t millis = ArgIndex(info, 4, "millis");
  if (port < 1 || port > 65535 || n < 1 || n > 16 || block < 1 || block > len || millis < 10) {
    Throw(env, Code::kBadArgument, "tcpPumpSend: bad port, connections (1..16), block or millis (>= 10)");
  }
  double gbps = 0;
  Check(env, PumpSend(static_cast<int>(port), static_cast<int>(n), static_cast<size_t>(block), src, len,
                      static_cast<int>(millis), &gbps));
  return Napi::Number::New(env, gbps);
}

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
