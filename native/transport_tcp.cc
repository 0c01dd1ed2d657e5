#include "transport_tcp.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <climits>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <list>
#include <mutex>
#include <thread>
#include <unordered_map>

#include "link.h"
#include "util/sha256.h"

namespace epd {
namespace {

// ---------------------------------------------------------------------------------
// Wire constants (docs/WIRE.md, "Data connections"). All integers little-endian.

constexpr uint16_t kWireVersion = EPD_TRANSFER_WIRE_VERSION;
constexpr char kHelloMagic[4] = {'E', 'P', 'D', 'D'};
constexpr char kFrameMagic[4] = {'E', 'P', 'D', 'F'};
constexpr char kReplyMagic[4] = {'E', 'P', 'D', 'R'};
constexpr size_t kHelloHeader = 12;
constexpr size_t kFrameHeader = 32;
constexpr size_t kSegmentBytes = 16;
constexpr size_t kNonce = 32;
constexpr size_t kGrant = 16;
constexpr size_t kProof = 32;

enum HelloType : uint16_t { kServerHello = 1, kClientHello = 2, kAccept = 3, kReject = 4 };
enum FrameOp : uint8_t { kOpWrite = 1, kOpRead = 2 };
enum ReplyKind : uint8_t { kReplyAck = 1, kReplyData = 2, kReplyError = 3 };

// A frame carries at most this many segments (2 more iovecs for header and table
// stay within IOV_MAX = 1024) and, from an honest sender, about kFrameBytes.
constexpr size_t kMaxSegments = 1000;
constexpr size_t kFrameBytes = 1 << 20;
// What a receiver accepts at most in one frame; more is a malformed frame.
constexpr uint64_t kMaxPayload = 64ull << 20;
constexpr size_t kMaxErrorText = 4096;
constexpr int64_t kServerHandshakeNs = 5'000'000'000;
// A target thread waits at most this long for a client that stopped in the middle
// of a frame (or stopped reading a reply); an idle connection between frames may
// wait forever (its control connection's close ends it).
constexpr int kServerStallSeconds = 30;

const char kClientProofLabel[] = "epd-transfer data client v2";
const char kServerProofLabel[] = "epd-transfer data server v2";

void Put16(uint8_t* p, uint16_t v) { std::memcpy(p, &v, 2); }
void Put32(uint8_t* p, uint32_t v) { std::memcpy(p, &v, 4); }
void Put64(uint8_t* p, uint64_t v) { std::memcpy(p, &v, 8); }
uint16_t Get16(const uint8_t* p) { uint16_t v; std::memcpy(&v, p, 2); return v; }
uint32_t Get32(const uint8_t* p) { uint32_t v; std::memcpy(&v, p, 4); return v; }
uint64_t Get64(const uint8_t* p) { uint64_t v; std::memcpy(&v, p, 8); return v; }
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the data wire format is little-endian");

std::string Random(size_t n) {
  std::string out(n, '\0');
  size_t got = 0;
  while (got < n) {
    ssize_t r = getrandom(&out[got], n - got, 0);
    if (r > 0) got += static_cast<size_t>(r);
    else if (errno != EINTR) std::abort();  // no entropy source: nothing safe to do
  }
  return out;
}

std::string ClientProof(const std::string& key, const std::string& server_nonce, const std::string& client_nonce,
                        const std::string& grant) {
  return HmacSha256(key, std::string(kClientProofLabel) + server_nonce + client_nonce + grant);
}

std::string ServerProof(const std::string& key, const std::string& server_nonce, const std::string& client_nonce,
                        const std::string& grant) {
  return HmacSha256(key, std::string(kServerProofLabel) + client_nonce + server_nonce + grant);
}

// ---------------------------------------------------------------------------------
// Socket helpers

int64_t NowNs() { return MonotonicNs(); }

// Waits for `events` on fd until the deadline.
Status WaitFd(int fd, short events, int64_t deadline, const char* what) {
  for (;;) {
    int64_t left = deadline - NowNs();
    if (left <= 0) return Status(Code::kTimeout, std::string(what) + " timed out");
    struct pollfd p = {fd, events, 0};
    int r = poll(&p, 1, static_cast<int>(std::min<int64_t>(left / 1'000'000 + 1, 1000)));
    if (r > 0) return Status::Ok();
    if (r < 0 && errno != EINTR) return Status::FromErrno(what);
  }
}

// Handshake I/O: bounded by a deadline, on a blocking socket (MSG_DONTWAIT per call).
Status ReadWithin(int fd, void* buf, size_t n, int64_t deadline, const char* what) {
  uint8_t* p = static_cast<uint8_t*>(buf);
  while (n > 0) {
    EPD_RETURN_IF_ERROR(WaitFd(fd, POLLIN, deadline, what));
    ssize_t r = recv(fd, p, n, MSG_DONTWAIT);
    if (r == 0) return Status(Code::kPeerLost, std::string(what) + ": connection closed by the peer");
    if (r < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      return Status(Code::kPeerLost, std::string(what) + ": " + std::strerror(errno), errno);
    }
    p += r;
    n -= static_cast<size_t>(r);
  }
  return Status::Ok();
}

Status WriteWithin(int fd, const void* buf, size_t n, int64_t deadline, const char* what) {
  const uint8_t* p = static_cast<const uint8_t*>(buf);
  while (n > 0) {
    EPD_RETURN_IF_ERROR(WaitFd(fd, POLLOUT, deadline, what));
    ssize_t r = send(fd, p, n, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (r < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      return Status(Code::kPeerLost, std::string(what) + ": " + std::strerror(errno), errno);
    }
    p += r;
    n -= static_cast<size_t>(r);
  }
  return Status::Ok();
}

// Data phase: blocking; a stalled peer is cut off by shutdown() from another thread.
// Moves the whole iovec list, advancing through partial transfers.
bool MoveAll(int fd, struct iovec* iov, size_t count, bool send_side) {
  while (count > 0) {
    struct msghdr msg = {};
    msg.msg_iov = iov;
    msg.msg_iovlen = std::min<size_t>(count, IOV_MAX);
    ssize_t r = send_side ? sendmsg(fd, &msg, MSG_NOSIGNAL) : recvmsg(fd, &msg, MSG_WAITALL);
    if (r < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    if (r == 0 && !send_side) return false;  // orderly close
    size_t done = static_cast<size_t>(r);
    while (count > 0 && done >= iov->iov_len) {
      done -= iov->iov_len;
      ++iov;
      --count;
    }
    if (count > 0) {
      iov->iov_base = static_cast<uint8_t*>(iov->iov_base) + done;
      iov->iov_len -= done;
    }
  }
  return true;
}

bool RecvAll(int fd, void* buf, size_t n) {
  struct iovec v = {buf, n};
  return n == 0 || MoveAll(fd, &v, 1, false);
}

// Like RecvAll, for the first bytes of a frame on a socket with a receive timeout:
// a timeout before any byte arrived is an idle peer and is waited through.
bool RecvFrameStart(int fd, void* buf, size_t n) {
  for (;;) {
    ssize_t r = recv(fd, buf, n, MSG_WAITALL);
    if (r == static_cast<ssize_t>(n)) return true;
    if (r > 0) return RecvAll(fd, static_cast<uint8_t*>(buf) + r, n - static_cast<size_t>(r));
    if (r == 0) return false;
    if (errno != EINTR && errno != EAGAIN && errno != EWOULDBLOCK) return false;
  }
}

bool SendAll(int fd, const void* buf, size_t n) {
  struct iovec v = {const_cast<void*>(buf), n};
  return MoveAll(fd, &v, 1, true);
}

void TuneSocket(int fd) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  // A peer host that vanishes without a FIN is noticed within ~25 s even by a
  // connection nobody is sending on (batches have their own, shorter deadlines).
  setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one));
  int idle = 10, interval = 5, count = 3;
  setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof(idle));
  setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &interval, sizeof(interval));
  setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &count, sizeof(count));
}

bool SplitHostPort(const std::string& address, std::string* host, std::string* port) {
  size_t colon = address.rfind(':');
  if (colon == std::string::npos || colon + 1 == address.size()) return false;
  *host = address.substr(0, colon);
  *port = address.substr(colon + 1);
  if (host->size() >= 2 && host->front() == '[' && host->back() == ']') *host = host->substr(1, host->size() - 2);
  return !host->empty();
}

void PutHello(uint8_t* h, uint16_t type, uint32_t body) {
  std::memcpy(h, kHelloMagic, 4);
  Put16(h + 4, kWireVersion);
  Put16(h + 6, type);
  Put32(h + 8, body);
}

Code CodeFromText(const std::string& text) {
  for (int c = static_cast<int>(Code::kBadArgument); c <= static_cast<int>(Code::kLastCode); ++c) {
    const char* name = CodeName(static_cast<Code>(c));
    if (text.compare(0, std::strlen(name), name) == 0) return static_cast<Code>(c);
  }
  return Code::kProtocol;
}

// Client side of the handshake on a connected socket.
Status ClientHandshake(int fd, const TcpPeerSpec& spec, const std::string& address, int64_t deadline) {
  uint8_t h[kHelloHeader];
  EPD_RETURN_IF_ERROR(ReadWithin(fd, h, sizeof(h), deadline, "data handshake"));
  if (std::memcmp(h, kHelloMagic, 4) != 0) {
    return Status(Code::kProtocol, "data address " + address + " is not an epd-transfer data port");
  }
  if (Get16(h + 4) != kWireVersion) {
    return Status(Code::kProtocolVersion, "data port " + address + " speaks wire version " +
                                              std::to_string(Get16(h + 4)) + "; this engine speaks " +
                                              std::to_string(kWireVersion));
  }
  if (Get16(h + 6) != kServerHello || Get32(h + 8) != kNonce) {
    return Status(Code::kProtocol, "data port " + address + " sent a malformed greeting");
  }
  std::string server_nonce(kNonce, '\0');
  EPD_RETURN_IF_ERROR(ReadWithin(fd, &server_nonce[0], kNonce, deadline, "data handshake"));
  const std::string client_nonce = Random(kNonce);
  uint8_t out[kHelloHeader + kGrant + kNonce + kProof];
  PutHello(out, kClientHello, kGrant + kNonce + kProof);
  std::memcpy(out + kHelloHeader, spec.grant.data(), kGrant);
  std::memcpy(out + kHelloHeader + kGrant, client_nonce.data(), kNonce);
  std::string proof = ClientProof(spec.key, server_nonce, client_nonce, spec.grant);
  std::memcpy(out + kHelloHeader + kGrant + kNonce, proof.data(), kProof);
  EPD_RETURN_IF_ERROR(WriteWithin(fd, out, sizeof(out), deadline, "data handshake"));

  EPD_RETURN_IF_ERROR(ReadWithin(fd, h, sizeof(h), deadline, "data handshake"));
  const uint32_t body = Get32(h + 8);
  if (std::memcmp(h, kHelloMagic, 4) != 0 || body > 1024) {
    return Status(Code::kProtocol, "data port " + address + " sent a malformed handshake reply");
  }
  std::string text(body, '\0');
  EPD_RETURN_IF_ERROR(ReadWithin(fd, &text[0], body, deadline, "data handshake"));
  if (Get16(h + 6) == kReject) return Status(CodeFromText(text), "data port " + address + " refused: " + text);
  if (Get16(h + 6) != kAccept || body != kProof) {
    return Status(Code::kProtocol, "data port " + address + " sent a malformed handshake reply");
  }
  // Mutual: the listener must know the key too, or it is not the engine we handshook with.
  if (!ConstantTimeEqual(text, ServerProof(spec.key, server_nonce, client_nonce, spec.grant))) {
    return Status(Code::kAuth, "data port " + address + " failed to prove the shared secret");
  }
  return Status::Ok();
}

Status DialOne(const std::string& address, const TcpPeerSpec& spec, int64_t deadline, int* out) {
  std::string host, port;
  if (!SplitHostPort(address, &host, &port)) return Status(Code::kBadArgument, "bad data address '" + address + "'");
  struct addrinfo hints = {};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  struct addrinfo* res = nullptr;
  int gai = getaddrinfo(host.c_str(), port.c_str(), &hints, &res);
  if (gai != 0) return Status(Code::kConnect, "cannot resolve data address " + address + ": " + gai_strerror(gai));
  Status last(Code::kConnect, "no usable address for " + address);
  for (struct addrinfo* ai = res; ai != nullptr; ai = ai->ai_next) {
    int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, ai->ai_protocol);
    if (fd < 0) {
      last = Status::FromErrno("socket");
      continue;
    }
    Status st = Status::Ok();
    if (connect(fd, ai->ai_addr, ai->ai_addrlen) != 0 && errno != EINPROGRESS) {
      st = Status(Code::kConnect, "cannot connect to data address " + address + ": " + std::strerror(errno), errno);
    } else {
      st = WaitFd(fd, POLLOUT, deadline, "connecting a data connection");
      int err = 0;
      socklen_t len = sizeof(err);
      if (st.ok() && (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0 || err != 0)) {
        st = Status(Code::kConnect, "cannot connect to data address " + address + ": " + std::strerror(err), err);
      }
    }
    if (st.ok()) {
      fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
      TuneSocket(fd);
      st = ClientHandshake(fd, spec, address, deadline);
    }
    if (st.ok()) {
      freeaddrinfo(res);
      *out = fd;
      return st;
    }
    close(fd);
    last = st;
    if (st.code() != Code::kConnect) break;  // reached it and it said no: do not retry
  }
  freeaddrinfo(res);
  return last;
}

// ---------------------------------------------------------------------------------
// Initiator side

struct Frame {
  std::shared_ptr<Batch> batch;
  FrameOp op = kOpWrite;
  uint64_t seq = 0;
  uint64_t bytes = 0;
  std::vector<Piece> pieces;
  // Set by the threads that use the frame once it is on the wire: the sender (until
  // sendmsg returned) and the receiver (until the reply was handled). The last to let
  // go settles it, so a batch never completes while a thread still touches its memory.
  std::atomic<int> holds{0};
  bool ok = false;     // the reply confirmed the frame
  Status error;        // the peer refused it (ERROR reply)
};

class TcpClient;

struct ClientConn {
  TcpClient* owner = nullptr;
  int fd = -1;
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::shared_ptr<Frame>> queue;     // not yet on the wire
  std::deque<std::shared_ptr<Frame>> awaiting;  // on the wire, replies come in this order
  std::atomic<uint64_t> outstanding{0};         // bytes queued or awaiting, to balance connections
  bool broken = false;
  std::thread sender;
  std::thread receiver;
};

class TcpClient {
 public:
  TcpClient(std::shared_ptr<Peer> peer, BatchDone done) : peer_(std::move(peer)), done_(std::move(done)) {}

  // JS thread: takes over the dialed connections and starts their threads.
  void Start(const std::vector<int>& fds) {
    std::lock_guard<std::mutex> lock(mu_);
    for (int fd : fds) {
      auto c = std::make_unique<ClientConn>();
      c->owner = this;
      c->fd = fd;
      ClientConn* raw = c.get();
      c->sender = std::thread([this, raw] { SendLoop(raw); });
      c->receiver = std::thread([this, raw] { ReceiveLoop(raw); });
      conns_.push_back(std::move(c));
    }
  }

  size_t connections() {
    std::lock_guard<std::mutex> lock(mu_);
    return conns_.size();
  }

  void Run(const std::shared_ptr<Batch>& batch) {
    std::vector<std::shared_ptr<Frame>> frames = Cut(batch);
    std::vector<std::pair<ClientConn*, std::shared_ptr<Frame>>> refused;
    std::vector<ClientConn*> wake;
    std::string loss;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (severed_ || conns_.empty()) {
        loss = LossLocked();
      } else {
        // Set before the first frame is queued: a sender may settle it at once.
        batch->tasks_left.store(static_cast<int>(frames.size()));
        for (auto& f : frames) {
          f->seq = next_seq_++;
          ClientConn* best = conns_[0].get();
          for (auto& c : conns_) {
            if (c->outstanding.load(std::memory_order_relaxed) < best->outstanding.load(std::memory_order_relaxed)) {
              best = c.get();
            }
          }
          best->outstanding.fetch_add(f->bytes, std::memory_order_relaxed);
          std::lock_guard<std::mutex> cl(best->mu);
          if (best->broken) {
            refused.emplace_back(best, f);
          } else {
            best->queue.push_back(f);
            if (std::find(wake.begin(), wake.end(), best) == wake.end()) wake.push_back(best);
          }
        }
      }
    }
    if (!loss.empty()) {
      batch->Fail(Status(Code::kPeerLost, "peer '" + peer_->name + "' has no data connection: " + loss));
      done_(batch);
      return;
    }
    for (ClientConn* c : wake) c->cv.notify_one();
    for (auto& [c, f] : refused) Settle(c, f, false);
  }

  // A batch was asked to stop: frames not yet sent are dropped now. If some are on
  // the wire and the reason is a deadline or loss, the peer is not answering: its
  // connections are cut so nothing waits on them any longer.
  void Stop(const std::shared_ptr<Batch>& batch, Code code) {
    std::vector<std::pair<ClientConn*, std::shared_ptr<Frame>>> dropped;
    bool on_wire = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto& c : conns_) {
        std::lock_guard<std::mutex> cl(c->mu);
        for (auto it = c->queue.begin(); it != c->queue.end();) {
          if ((*it)->batch == batch) {
            dropped.emplace_back(c.get(), *it);
            it = c->queue.erase(it);
          } else {
            ++it;
          }
        }
        for (auto& f : c->awaiting) on_wire = on_wire || f->batch == batch;
      }
    }
    for (auto& [c, f] : dropped) Settle(c, f, false);
    if (on_wire && (code == Code::kTimeout || code == Code::kClosed || code == Code::kPeerLost)) {
      Sever(Status(Code::kPeerLost, std::string("a batch stopped (") + CodeName(code) + ") while its bytes were on the wire"));
    }
  }

  // Any thread: the connections close now; every frame fails once its threads let go.
  void Sever(const Status& why) {
    std::vector<std::pair<ClientConn*, std::shared_ptr<Frame>>> dropped;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!severed_) {
        severed_ = true;
        loss_ = why.message();
        // A peer that breaks the protocol is reported as such; anything else is loss.
        loss_code_ = why.code() == Code::kProtocol ? Code::kProtocol : Code::kPeerLost;
      }
      for (auto& c : conns_) {
        std::lock_guard<std::mutex> cl(c->mu);
        c->broken = true;
        if (c->fd >= 0) shutdown(c->fd, SHUT_RDWR);
        for (auto& f : c->queue) dropped.emplace_back(c.get(), f);
        c->queue.clear();
        c->cv.notify_all();
      }
    }
    int expected = 0;
    peer_->lost.compare_exchange_strong(expected, static_cast<int>(Code::kPeerLost));
    for (auto& [c, f] : dropped) Settle(c, f, false);
  }

  // JS thread: severs, joins the threads and closes the sockets.
  void Close() {
    Sever(Status(Code::kPeerLost, "peer removed"));
    std::vector<std::unique_ptr<ClientConn>> conns;
    {
      std::lock_guard<std::mutex> lock(mu_);
      conns.swap(conns_);
    }
    for (auto& c : conns) {
      if (c->sender.joinable()) c->sender.join();
      if (c->receiver.joinable()) c->receiver.join();
      std::lock_guard<std::mutex> cl(c->mu);
      if (c->fd >= 0) close(c->fd);
      c->fd = -1;
    }
  }

 private:
  std::string LossLocked() const { return severed_ ? loss_ : "not connected"; }

  // Large descriptors are split across frames (so across connections); small
  // ones are coalesced into one frame.
  std::vector<std::shared_ptr<Frame>> Cut(const std::shared_ptr<Batch>& batch) {
    std::vector<std::shared_ptr<Frame>> frames;
    std::shared_ptr<Frame> cur;
    const FrameOp op = batch->op == Op::kWrite ? kOpWrite : kOpRead;
    auto flush = [&] {
      if (cur) frames.push_back(std::move(cur));
      cur.reset();
    };
    for (const Piece& p : batch->pieces) {
      for (size_t off = 0; off < p.length;) {
        const size_t n = std::min(kFrameBytes, p.length - off);
        if (cur && (cur->bytes + n > kFrameBytes || cur->pieces.size() == kMaxSegments)) flush();
        if (!cur) {
          cur = std::make_shared<Frame>();
          cur->batch = batch;
          cur->op = op;
        }
        Piece s = p;
        s.local += off;
        s.remote_offset += off;
        s.length = n;
        cur->pieces.push_back(s);
        cur->bytes += n;
        off += n;
      }
    }
    flush();
    return frames;
  }

  void Settle(ClientConn* c, const std::shared_ptr<Frame>& f, bool moved) {
    c->outstanding.fetch_sub(f->bytes, std::memory_order_relaxed);
    Batch& b = *f->batch;
    if (moved) {
      b.bytes_done.fetch_add(f->bytes, std::memory_order_relaxed);
    } else if (b.StopCode() == Code::kOk) {
      if (!f->error.ok()) {
        b.Fail(f->error);
      } else {
        std::lock_guard<std::mutex> lock(mu_);
        b.Fail(Status(loss_code_, "data connection to peer '" + peer_->name + "' lost: " + LossLocked()));
      }
    }
    if (b.tasks_left.fetch_sub(1) == 1) done_(f->batch);
  }

  void Release(ClientConn* c, const std::shared_ptr<Frame>& f) {
    if (f->holds.fetch_sub(1, std::memory_order_acq_rel) == 1) Settle(c, f, f->ok);
  }

  static bool SendFrame(int fd, Frame& f) {
    uint8_t header[kFrameHeader] = {0};
    std::memcpy(header, kFrameMagic, 4);
    header[4] = f.op;
    Put16(header + 6, static_cast<uint16_t>(f.pieces.size()));
    Put64(header + 8, f.seq);
    Put64(header + 16, f.bytes);
    std::vector<uint8_t> table(f.pieces.size() * kSegmentBytes);
    std::vector<struct iovec> iov;
    iov.reserve(2 + (f.op == kOpWrite ? f.pieces.size() : 0));
    iov.push_back({header, sizeof(header)});
    iov.push_back({table.data(), table.size()});
    for (size_t i = 0; i < f.pieces.size(); ++i) {
      const Piece& p = f.pieces[i];
      uint8_t* s = table.data() + i * kSegmentBytes;
      Put32(s, p.remote_region);
      Put32(s + 4, static_cast<uint32_t>(p.length));
      Put64(s + 8, p.remote_offset);
      // Writes go straight from the source region: no staging copy.
      if (f.op == kOpWrite) iov.push_back({p.local, p.length});
    }
    return MoveAll(fd, iov.data(), iov.size(), true);
  }

  void SendLoop(ClientConn* c) {
    for (;;) {
      std::shared_ptr<Frame> f;
      {
        std::unique_lock<std::mutex> lock(c->mu);
        c->cv.wait(lock, [c] { return c->broken || !c->queue.empty(); });
        if (c->broken) return;
        f = std::move(c->queue.front());
        c->queue.pop_front();
        if (f->batch->StopCode() == Code::kOk) {
          f->holds.store(2, std::memory_order_relaxed);
          c->awaiting.push_back(f);
        }
      }
      if (f->holds.load(std::memory_order_relaxed) == 0) {  // its batch stopped: skip it
        Settle(c, f, false);
        continue;
      }
      const bool sent = SendFrame(c->fd, *f);
      Release(c, f);
      if (!sent) {
        Sever(Status(Code::kPeerLost, std::string("send failed: ") + std::strerror(errno)));
        return;
      }
    }
  }

  void ReceiveLoop(ClientConn* c) {
    Status why = ReceiveReplies(c);
    Sever(why);
    std::deque<std::shared_ptr<Frame>> left;
    {
      std::lock_guard<std::mutex> lock(c->mu);
      left.swap(c->awaiting);
    }
    for (auto& f : left) Release(c, f);
  }

  Status ReceiveReplies(ClientConn* c) {
    for (;;) {
      uint8_t h[kFrameHeader];
      if (!RecvAll(c->fd, h, sizeof(h))) {
        return Status(Code::kPeerLost, "connection closed or reset by the peer");
      }
      const uint8_t kind = h[4];
      const uint64_t seq = Get64(h + 8);
      const uint64_t payload = Get64(h + 16);
      std::shared_ptr<Frame> f;
      {
        std::lock_guard<std::mutex> lock(c->mu);
        if (!c->awaiting.empty()) f = c->awaiting.front();
      }
      if (std::memcmp(h, kReplyMagic, 4) != 0 || !f || seq != f->seq) {
        return Status(Code::kProtocol, "malformed reply from the peer (bad magic or sequence)");
      }
      if (kind == kReplyAck && f->op == kOpWrite && payload == 0) {
        f->ok = true;
      } else if (kind == kReplyData && f->op == kOpRead && payload == f->bytes) {
        // Reads land straight in the target regions: no intermediate buffer.
        std::vector<struct iovec> iov;
        iov.reserve(f->pieces.size());
        for (const Piece& p : f->pieces) iov.push_back({p.local, p.length});
        if (!MoveAll(c->fd, iov.data(), iov.size(), false)) return Status(Code::kPeerLost, "connection lost mid-reply");
        f->ok = true;
      } else if (kind == kReplyError && payload <= kMaxErrorText) {
        std::string text(payload, '\0');
        if (!RecvAll(c->fd, &text[0], text.size())) return Status(Code::kPeerLost, "connection lost mid-reply");
        f->error = Status(CodeFromText(text), "peer '" + peer_->name + "' refused a frame: " + text);
      } else {
        return Status(Code::kProtocol, "malformed reply from the peer (kind or length)");
      }
      {
        std::lock_guard<std::mutex> lock(c->mu);
        c->awaiting.pop_front();
      }
      Release(c, f);
    }
  }

  std::shared_ptr<Peer> peer_;
  BatchDone done_;
  std::mutex mu_;
  std::vector<std::unique_ptr<ClientConn>> conns_;
  uint64_t next_seq_ = 1;
  bool severed_ = false;
  std::string loss_;
  Code loss_code_ = Code::kPeerLost;
};

// ---------------------------------------------------------------------------------
// Target side

struct GrantState {
  std::string key;
  std::unordered_map<uint32_t, std::shared_ptr<ExposedRegion>> regions;
};

class TcpTransportImpl;

struct ServerConn {
  int fd = -1;
  std::mutex mu;  // guards fd against close/shutdown races
  std::atomic<bool> done{false};
  std::string grant;
  std::thread thread;

  void Cut() {
    std::lock_guard<std::mutex> lock(mu);
    if (fd >= 0) shutdown(fd, SHUT_RDWR);
  }
};

class TcpTransportImpl final : public TcpTransport {
 public:
  explicit TcpTransportImpl(BatchDone done) : done_(std::move(done)) {}
  ~TcpTransportImpl() override { Shutdown(); }

  const char* name() const override { return "tcp"; }

  Status Attach(const RemoteRegionSpec& spec, RemoteRegion* out) override {
    // Nothing to map: frames name the region by id, and the peer checks bounds again.
    out->id = spec.id;
    out->length = spec.length;
    out->ptr = nullptr;
    return Status::Ok();
  }
  void Detach(RemoteRegion* region) override {}

  Status AddPeer(const std::shared_ptr<Peer>& peer) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) return Status(Code::kClosed, "engine is closed");
    clients_[peer->id] = std::make_shared<TcpClient>(peer, done_);
    return Status::Ok();
  }

  Status Install(const std::shared_ptr<Peer>& peer, std::vector<int> fds) override {
    std::shared_ptr<TcpClient> client = Client(peer->id);
    if (!client || peer->lost.load() != 0) {
      for (int fd : fds) close(fd);
      return Status(Code::kPeerLost, "peer '" + peer->name + "' went away while its data connections opened");
    }
    client->Start(fds);
    return Status::Ok();
  }

  void RemovePeer(Peer* peer) override {
    std::shared_ptr<TcpClient> client;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = clients_.find(peer->id);
      if (it == clients_.end()) return;
      client = it->second;
      clients_.erase(it);
    }
    client->Close();
  }

  void Sever(Peer* peer) override {
    if (auto c = Client(peer->id)) c->Sever(Status(Code::kPeerLost, "connection dropped"));
  }

  void Run(std::shared_ptr<Batch> batch) override {
    std::shared_ptr<TcpClient> client = Client(batch->peer->id);
    if (!client) {
      batch->Fail(Status(Code::kPeerLost, "peer '" + batch->peer->name + "' is not connected"));
      done_(batch);
      return;
    }
    client->Run(batch);
  }

  void Stop(const std::shared_ptr<Batch>& batch, Code code) override {
    if (auto c = Client(batch->peer->id)) c->Stop(batch, code);
  }

  Status Listen(const std::string& host, int port, std::string* address) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (listen_fd_ >= 0) return Status(Code::kBadArgument, "the tcp data listener is already open");
    struct addrinfo hints = {};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    struct addrinfo* res = nullptr;
    std::string p = std::to_string(port);
    int gai = getaddrinfo(host.empty() ? nullptr : host.c_str(), p.c_str(), &hints, &res);
    if (gai != 0) return Status(Code::kBadArgument, "cannot resolve data host '" + host + "': " + gai_strerror(gai));
    int fd = socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
      freeaddrinfo(res);
      return Status::FromErrno("socket");
    }
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(fd, res->ai_addr, res->ai_addrlen) != 0 || listen(fd, 128) != 0) {
      Status st = Status::FromErrno("cannot listen for data connections on " + host + ":" + p);
      freeaddrinfo(res);
      close(fd);
      return st;
    }
    freeaddrinfo(res);
    struct sockaddr_storage ss;
    socklen_t len = sizeof(ss);
    getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len);
    char ip[INET6_ADDRSTRLEN] = {0};
    int bound_port = 0;
    if (ss.ss_family == AF_INET6) {
      auto* a = reinterpret_cast<sockaddr_in6*>(&ss);
      inet_ntop(AF_INET6, &a->sin6_addr, ip, sizeof(ip));
      bound_port = ntohs(a->sin6_port);
      *address = "[" + std::string(ip) + "]:" + std::to_string(bound_port);
    } else {
      auto* a = reinterpret_cast<sockaddr_in*>(&ss);
      inet_ntop(AF_INET, &a->sin_addr, ip, sizeof(ip));
      bound_port = ntohs(a->sin_port);
      *address = std::string(ip) + ":" + std::to_string(bound_port);
    }
    wake_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    listen_fd_ = fd;
    acceptor_ = std::thread([this] { AcceptLoop(); });
    return Status::Ok();
  }

  void Grant(const std::string& grant, const std::string& key, std::vector<ExposedRegion> regions) override {
    auto g = std::make_shared<GrantState>();
    g->key = key;
    for (auto& r : regions) g->regions[r.id] = std::make_shared<ExposedRegion>(std::move(r));
    std::lock_guard<std::mutex> lock(grants_mu_);
    grants_[grant] = std::move(g);  // connections look the grant up per frame
  }

  void Revoke(const std::string& grant) override {
    {
      std::lock_guard<std::mutex> lock(grants_mu_);
      grants_.erase(grant);
    }
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& c : server_conns_) {
      if (c->grant == grant) c->Cut();
    }
  }

  void Unexpose(uint32_t id) override {
    std::lock_guard<std::mutex> lock(grants_mu_);
    for (auto& [name, g] : grants_) {
      if (g->regions.count(id) == 0) continue;
      // Grants are immutable once published: replace, so a frame in progress keeps
      // the set (and the mapping) it resolved against.
      auto next = std::make_shared<GrantState>(*g);
      next->regions.erase(id);
      g = std::move(next);
    }
  }

  std::vector<uint64_t> Stats() override {
    std::lock_guard<std::mutex> lock(mu_);
    uint64_t server = 0, client = 0;
    for (auto& c : server_conns_) server += c->done.load() ? 0 : 1;
    for (auto& [id, c] : clients_) client += c->connections();
    return {listen_fd_ >= 0 ? 1u : 0u, server, client};
  }

  void Shutdown() override {
    std::vector<std::shared_ptr<TcpClient>> clients;
    std::list<std::unique_ptr<ServerConn>> conns;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stopping_) return;
      stopping_ = true;
      if (wake_fd_ >= 0) {
        uint64_t one = 1;
        (void)!write(wake_fd_, &one, sizeof(one));
      }
      for (auto& [id, c] : clients_) clients.push_back(c);
      clients_.clear();
    }
    if (acceptor_.joinable()) acceptor_.join();
    {
      std::lock_guard<std::mutex> lock(mu_);
      conns.swap(server_conns_);
      if (listen_fd_ >= 0) close(listen_fd_);
      if (wake_fd_ >= 0) close(wake_fd_);
      listen_fd_ = wake_fd_ = -1;
    }
    for (auto& c : conns) c->Cut();
    for (auto& c : conns) {
      if (c->thread.joinable()) c->thread.join();
    }
    for (auto& c : clients) c->Close();
  }

 private:
  std::shared_ptr<TcpClient> Client(uint32_t id) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = clients_.find(id);
    return it == clients_.end() ? nullptr : it->second;
  }

  std::shared_ptr<GrantState> FindGrant(const std::string& grant) {
    std::lock_guard<std::mutex> lock(grants_mu_);
    auto it = grants_.find(grant);
    return it == grants_.end() ? nullptr : it->second;
  }

  void AcceptLoop() {
    for (;;) {
      struct pollfd p[2] = {{listen_fd_, POLLIN, 0}, {wake_fd_, POLLIN, 0}};
      int r = poll(p, 2, 1000);
      if (p[1].revents != 0) return;
      Reap();
      if (r <= 0 || (p[0].revents & POLLIN) == 0) continue;
      int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (fd < 0) continue;
      TuneSocket(fd);
      struct timeval stall = {kServerStallSeconds, 0};
      setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &stall, sizeof(stall));
      setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &stall, sizeof(stall));
      auto c = std::make_unique<ServerConn>();
      c->fd = fd;
      ServerConn* raw = c.get();
      std::lock_guard<std::mutex> lock(mu_);
      if (stopping_) {
        close(fd);
        return;
      }
      server_conns_.push_back(std::move(c));
      raw->thread = std::thread([this, raw] { Serve(raw); });
    }
  }

  // Joins the threads of connections that ended, so a long-lived engine does not
  // accumulate them.
  void Reap() {
    std::list<std::unique_ptr<ServerConn>> finished;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto it = server_conns_.begin(); it != server_conns_.end();) {
        if ((*it)->done.load()) {
          finished.push_back(std::move(*it));
          it = server_conns_.erase(it);
        } else {
          ++it;
        }
      }
    }
    for (auto& c : finished) {
      if (c->thread.joinable()) c->thread.join();
    }
  }

  void Serve(ServerConn* c) {
    if (Handshake(c)) ServeFrames(c);
    std::lock_guard<std::mutex> lock(c->mu);
    close(c->fd);
    c->fd = -1;
    c->done.store(true);
  }

  void Reject(int fd, Code code, const std::string& message, int64_t deadline) {
    std::string text = std::string(CodeName(code)) + " " + message;
    uint8_t h[kHelloHeader];
    PutHello(h, kReject, static_cast<uint32_t>(text.size()));
    if (WriteWithin(fd, h, sizeof(h), deadline, "reject").ok()) WriteWithin(fd, text.data(), text.size(), deadline, "reject");
  }

  bool Handshake(ServerConn* c) {
    const int64_t deadline = NowNs() + kServerHandshakeNs;
    const std::string server_nonce = Random(kNonce);
    uint8_t hello[kHelloHeader + kNonce];
    PutHello(hello, kServerHello, kNonce);
    std::memcpy(hello + kHelloHeader, server_nonce.data(), kNonce);
    if (!WriteWithin(c->fd, hello, sizeof(hello), deadline, "hello").ok()) return false;
    uint8_t h[kHelloHeader];
    if (!ReadWithin(c->fd, h, sizeof(h), deadline, "hello").ok()) return false;
    if (std::memcmp(h, kHelloMagic, 4) != 0) {
      Reject(c->fd, Code::kProtocol, "not an epd-transfer data connection", deadline);
      return false;
    }
    if (Get16(h + 4) != kWireVersion) {
      Reject(c->fd, Code::kProtocolVersion,
             "this engine speaks wire version " + std::to_string(kWireVersion) + ", the peer " +
                 std::to_string(Get16(h + 4)),
             deadline);
      return false;
    }
    if (Get16(h + 6) != kClientHello || Get32(h + 8) != kGrant + kNonce + kProof) {
      Reject(c->fd, Code::kProtocol, "malformed client hello", deadline);
      return false;
    }
    std::string body(kGrant + kNonce + kProof, '\0');
    if (!ReadWithin(c->fd, &body[0], body.size(), deadline, "hello").ok()) return false;
    const std::string grant = body.substr(0, kGrant);
    const std::string client_nonce = body.substr(kGrant, kNonce);
    const std::string proof = body.substr(kGrant + kNonce, kProof);
    std::shared_ptr<GrantState> g = FindGrant(grant);
    // One answer for "no such grant" and "wrong key": a prober learns nothing.
    if (!g || !ConstantTimeEqual(proof, ClientProof(g->key, server_nonce, client_nonce, grant))) {
      Reject(c->fd, Code::kAuth, "the peer did not prove a grant of this engine", deadline);
      return false;
    }
    uint8_t accept[kHelloHeader + kProof];
    PutHello(accept, kAccept, kProof);
    std::string mine = ServerProof(g->key, server_nonce, client_nonce, grant);
    std::memcpy(accept + kHelloHeader, mine.data(), kProof);
    {
      std::lock_guard<std::mutex> lock(mu_);
      c->grant = grant;
    }
    // Revoked while we checked: Revoke() may have missed this connection.
    if (!FindGrant(grant)) return false;
    return WriteWithin(c->fd, accept, sizeof(accept), deadline, "accept").ok();
  }

  bool Reply(int fd, ReplyKind kind, uint64_t seq, uint64_t payload) {
    uint8_t h[kFrameHeader] = {0};
    std::memcpy(h, kReplyMagic, 4);
    h[4] = kind;
    Put64(h + 8, seq);
    Put64(h + 16, payload);
    return SendAll(fd, h, sizeof(h));
  }

  bool ReplyError(int fd, uint64_t seq, Code code, const std::string& message) {
    std::string text = std::string(CodeName(code)) + " " + message;
    if (text.size() > kMaxErrorText) text.resize(kMaxErrorText);
    return Reply(fd, kReplyError, seq, text.size()) && SendAll(fd, text.data(), text.size());
  }

  // Serves frames until the peer closes or misbehaves. Every segment is checked
  // against the grant before a byte of its payload is read.
  void ServeFrames(ServerConn* c) {
    const int fd = c->fd;
    std::vector<uint8_t> table;
    std::vector<struct iovec> iov;
    std::vector<std::shared_ptr<ExposedRegion>> hold;
    for (;;) {
      uint8_t h[kFrameHeader];
      if (!RecvFrameStart(fd, h, sizeof(h))) return;
      const uint8_t op = h[4];
      const uint16_t segments = Get16(h + 6);
      const uint64_t seq = Get64(h + 8);
      const uint64_t payload = Get64(h + 16);
      if (std::memcmp(h, kFrameMagic, 4) != 0 || (op != kOpWrite && op != kOpRead) || segments == 0 ||
          segments > kMaxSegments || payload > kMaxPayload) {
        ReplyError(fd, seq, Code::kProtocol, "malformed frame header");
        return;
      }
      table.resize(segments * kSegmentBytes);
      if (!RecvAll(fd, table.data(), table.size())) return;
      std::shared_ptr<GrantState> g = FindGrant(c->grant);
      if (!g) return;  // revoked
      iov.clear();
      hold.clear();
      uint64_t sum = 0;
      Code refusal = Code::kOk;
      std::string why;
      for (uint16_t i = 0; i < segments; ++i) {
        const uint8_t* s = table.data() + i * kSegmentBytes;
        const uint32_t region = Get32(s);
        const uint64_t length = Get32(s + 4);
        const uint64_t offset = Get64(s + 8);
        sum += length;
        if (length == 0) {
          refusal = Code::kProtocol;
          why = "segment " + std::to_string(i) + " has length 0";
          break;
        }
        auto it = g->regions.find(region);
        if (it == g->regions.end()) {
          if (refusal == Code::kOk) {
            refusal = Code::kUnknownRegion;
            why = "region " + std::to_string(region) + " is not granted to this peer over tcp";
          }
          continue;
        }
        const ExposedRegion& r = *it->second;
        if (offset > r.length || length > r.length - offset) {
          refusal = Code::kOutOfRange;
          why = "segment [" + std::to_string(offset) + ", +" + std::to_string(length) + ") exceeds region " +
                std::to_string(region) + " of " + std::to_string(r.length) + " bytes";
          break;
        }
        hold.push_back(it->second);
        iov.push_back({r.ptr + offset, static_cast<size_t>(length)});
      }
      if (refusal == Code::kOk && sum != payload) {
        refusal = Code::kProtocol;
        why = "segment lengths do not add up to the payload";
      }
      if (refusal == Code::kUnknownRegion) {
        // A region freed after the peer looked: refuse this frame, keep the connection.
        if (op == kOpWrite && !Drain(fd, payload)) return;
        if (!ReplyError(fd, seq, refusal, why)) return;
        continue;
      }
      if (refusal != Code::kOk) {
        // An honest peer checks bounds before sending: this one is broken or hostile.
        ReplyError(fd, seq, refusal, why);
        return;
      }
      if (op == kOpWrite) {
        // Straight into the granted region: no intermediate buffer.
        if (!MoveAll(fd, iov.data(), iov.size(), false)) return;
        if (!Reply(fd, kReplyAck, seq, 0)) return;
      } else {
        uint8_t r[kFrameHeader] = {0};
        std::memcpy(r, kReplyMagic, 4);
        r[4] = kReplyData;
        Put64(r + 8, seq);
        Put64(r + 16, payload);
        iov.insert(iov.begin(), {r, sizeof(r)});
        if (!MoveAll(fd, iov.data(), iov.size(), true)) return;
      }
    }
  }

  static bool Drain(int fd, uint64_t bytes) {
    uint8_t scratch[64 * 1024];
    while (bytes > 0) {
      size_t n = static_cast<size_t>(std::min<uint64_t>(bytes, sizeof(scratch)));
      if (!RecvAll(fd, scratch, n)) return false;
      bytes -= n;
    }
    return true;
  }

  BatchDone done_;
  std::mutex mu_;
  bool stopping_ = false;
  std::unordered_map<uint32_t, std::shared_ptr<TcpClient>> clients_;
  int listen_fd_ = -1;
  int wake_fd_ = -1;
  std::thread acceptor_;
  std::list<std::unique_ptr<ServerConn>> server_conns_;
  std::mutex grants_mu_;
  std::unordered_map<std::string, std::shared_ptr<GrantState>> grants_;
};

}  // namespace

Status DialTcpPeer(const TcpPeerSpec& spec, std::vector<int>* fds) {
  if (spec.addresses.empty()) return Status(Code::kBackendUnavailable, "the peer advertises no tcp data address");
  if (spec.grant.size() != kGrant || spec.key.size() != Sha256::kDigest) {
    return Status(Code::kBadArgument, "tcp grant must be 16 bytes and key 32 bytes");
  }
  const int64_t deadline = NowNs() + static_cast<int64_t>(spec.connect_timeout * 1e9);
  for (int i = 0; i < spec.connections; ++i) {
    int fd = -1;
    Status st = DialOne(spec.addresses[i % spec.addresses.size()], spec, deadline, &fd);
    if (!st.ok()) {
      for (int f : *fds) close(f);
      fds->clear();
      return st;
    }
    fds->push_back(fd);
  }
  return Status::Ok();
}

std::unique_ptr<TcpTransport> CreateTcpTransport(BatchDone done) {
  return std::unique_ptr<TcpTransport>(new TcpTransportImpl(std::move(done)));
}

std::string TcpHmac(const std::string& key, const std::string& message) { return HmacSha256(key, message); }

}  // namespace epd
