// The tcp transport: one-sided writes and reads into a peer's registered regions
// over TCP. The wire format is in docs/WIRE.md, the design in docs/TCP.md.
//
// Initiator side: every peer has `connections` data connections, each with a
// sender thread (sendmsg straight from the source regions) and a receiver thread
// (acks, and read data straight into the target regions). A batch becomes frames:
// large descriptors are split across connections, small ones coalesced.
//
// Target side: one listener; every accepted connection proves a grant (HMAC
// challenge-response) and is served by its own thread, which receives straight
// into the granted regions after checking every segment against them.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "shm.h"
#include "transport.h"

namespace epd {

// A local region a grant lets a peer touch over tcp.
struct ExposedRegion {
  uint32_t id = 0;
  uint8_t* ptr = nullptr;
  size_t length = 0;
  std::shared_ptr<ShmMapping> keep;  // keeps the bytes mapped while a frame uses them
};

class TcpTransport : public Transport {
 public:
  // Starts the data listener; `address` receives "host:port".
  virtual Status Listen(const std::string& host, int port, std::string* address) = 0;
  // Creates or replaces grant `grant` (16 bytes): connections that prove `key`
  // may touch exactly `regions`.
  virtual void Grant(const std::string& grant, const std::string& key, std::vector<ExposedRegion> regions) = 0;
  // Removes the grant and closes its connections.
  virtual void Revoke(const std::string& grant) = 0;
  // Region `id` is being freed: no grant serves it any more.
  virtual void Unexpose(uint32_t id) = 0;
  // JS thread: hands the peer its dialed, authenticated data connections.
  virtual Status Install(const std::shared_ptr<Peer>& peer, std::vector<int> fds) = 0;
  // Counts for tests and counters: [listening, server connections, client connections].
  virtual std::vector<uint64_t> Stats() = 0;
};

// Any thread, blocking up to spec.connect_timeout: opens and authenticates
// spec.connections data connections. Touches no engine state, so it can run on a
// worker while the engine goes on.
Status DialTcpPeer(const TcpPeerSpec& spec, std::vector<int>* fds);

std::unique_ptr<TcpTransport> CreateTcpTransport(BatchDone done);

// HMAC-SHA256, exported for the test that checks it against node:crypto.
std::string TcpHmac(const std::string& key, const std::string& message);

}  // namespace epd
