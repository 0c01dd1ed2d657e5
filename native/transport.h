// Transport: moves the pieces of a batch between local memory and a peer's regions.
// The engine validates and resolves a batch (every piece is in bounds) before a
// transport sees it; a transport only moves bytes and reports the outcome.
//
// Each peer is served by one transport chosen at connect time (shm, tcp, ...),
// possibly wrapped by the link emulator (link.h). A transport may keep per-peer
// state (connections): AddPeer/RemovePeer bracket it.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "region.h"
#include "util/status.h"

namespace epd {

enum class Op { kWrite, kRead };

// A peer region made addressable by a transport (shm: mapped into this process).
struct RemoteRegion {
  uint32_t id = 0;
  size_t length = 0;
  uint8_t* ptr = nullptr;
  std::shared_ptr<ShmMapping> mapping;
  DevicePtr imported = 0;  // device IPC import to close on detach
  // Set when the transport cannot reach this region (device memory of a kind it cannot
  // copy): the peer stays usable, descriptors naming the region fail with this reason.
  std::string unreachable;
};

class Transport;

// Link emulation and fault injection for one peer (see link.h, docs/TCP.md).
struct LinkSpec {
  double bandwidth = 0;        // bytes per second; 0 = unpaced
  double latency = 0;          // seconds, one way
  double jitter = 0;           // seconds; each message's delay is latency ± U(jitter)
  uint64_t seed = 1;
  uint64_t drop_after = UINT64_MAX;  // bytes after which the connection drops
  uint64_t delay_index = UINT64_MAX;  // descriptor (counted over the link's life) to delay
  double delay = 0;            // seconds that descriptor is held back
  bool enabled() const {
    return bandwidth > 0 || latency > 0 || jitter > 0 || drop_after != UINT64_MAX || delay_index != UINT64_MAX;
  }
};

// How to reach a peer over tcp, from its segment descriptor and our handshake.
struct TcpPeerSpec {
  std::vector<std::string> addresses;  // "host:port" data listeners
  std::string grant;                   // 16 bytes: our grant on the peer
  std::string key;                     // 32 bytes: HMAC key proving the grant
  int connections = 2;
  double connect_timeout = 5;          // seconds
};

// How to reach a peer through a vendor transport (vendor/transports.h).
struct VendorPeerSpec {
  std::string mooncake_segment;  // mooncake: the peer's segment name ("ip:port")
  uint64_t hccl_link = 0;        // hccl: the joined communicator (HcclTransport::Join)
  bool hccl_initiator = false;   // hccl: hold batches until the other side posted its half
};

struct Peer {
  uint32_t id = 0;
  std::string name;
  int pid = 0;
  int pidfd = -1;  // same-host liveness: readable once the peer process exited
  std::atomic<int> lost{0};  // a Code once the peer is lost
  std::unordered_map<uint32_t, RemoteRegion> regions;
  Transport* transport = nullptr;        // moves this peer's batches (maybe a link wrapper)
  std::shared_ptr<Transport> link;       // the link wrapper, when emulated
  TcpPeerSpec tcp;                       // set when the peer is reached over tcp
  VendorPeerSpec vendor;                 // set when the peer is reached over mooncake or hccl
  bool device_memory = false;            // its transport takes device addresses as local pieces
  bool device_memory_only = false;       // ... and only those (hccl)

  ~Peer();
  // False once the peer process is known to be gone (cheap: one poll()).
  bool Alive();
};

struct Piece {
  uint8_t* local;
  uint8_t* remote;          // null when the transport addresses the peer by id (tcp)
  size_t length;
  uint32_t remote_region;
  uint64_t remote_offset;
};

struct Batch;
using BatchDone = std::function<void(std::shared_ptr<Batch>)>;

struct Batch {
  uint64_t id = 0;
  Op op = Op::kWrite;
  std::shared_ptr<Peer> peer;
  std::vector<Piece> pieces;
  std::vector<uint32_t> local_regions;  // distinct ids, pinned until completion
  // Peer mappings the pieces point into, kept alive until the batch completes even if
  // the peer's region list is refreshed meanwhile.
  std::vector<std::shared_ptr<ShmMapping>> remote_mappings;
  uint64_t bytes = 0;
  uint32_t descriptors = 0;
  std::atomic<int> abort_code{0};
  std::atomic<int> tasks_left{0};
  std::atomic<uint64_t> bytes_done{0};
  // Set on batches a wrapper (the link emulator) cuts from a caller's batch: the
  // parent's stop request reaches the child, and the child's completion goes to
  // `on_done` instead of the engine.
  std::shared_ptr<Batch> parent;
  BatchDone on_done;

  void Fail(const Status& s) {
    std::lock_guard<std::mutex> lock(mu_);
    if (status_.ok()) status_ = s;
  }
  Status status() {
    std::lock_guard<std::mutex> lock(mu_);
    return status_;
  }
  // The reason to stop early, or kOk.
  Code StopCode() const {
    int c = abort_code.load(std::memory_order_relaxed);
    if (c == 0 && parent) return parent->StopCode();
    return static_cast<Code>(c);
  }
  void RequestStop(Code c) {
    int expected = 0;
    abort_code.compare_exchange_strong(expected, static_cast<int>(c));
  }

 private:
  std::mutex mu_;
  Status status_;
};

class Transport {
 public:
  virtual ~Transport() = default;
  virtual const char* name() const = 0;
  // Makes one region of a peer addressable.
  virtual Status Attach(const RemoteRegionSpec& spec, RemoteRegion* out) = 0;
  virtual void Detach(RemoteRegion* region) = 0;
  // Moves the batch. Calls the engine's completion exactly once, after the last
  // byte of the batch was touched. May be called from any thread.
  virtual void Run(std::shared_ptr<Batch> batch) = 0;

  // Optional per-peer state. AddPeer/RemovePeer run on the JS thread; RemovePeer
  // releases everything (joins threads) and fails what is still in flight.
  virtual Status AddPeer(const std::shared_ptr<Peer>& peer) { return Status::Ok(); }
  virtual void RemovePeer(Peer* peer) {}
  // Any thread: cut the peer off now (its connections close, its batches fail with
  // ERR_PEER_LOST) without waiting for anything. Fault injection and loss use it.
  virtual void Sever(Peer* peer) {}
  // Called after batch->RequestStop(): a transport whose workers block (sockets)
  // uses it to unblock them; `code` is the reason of this request, which may be a
  // deadline arriving after an abort.
  virtual void Stop(const std::shared_ptr<Batch>& batch, Code code) {}
  // Engine shutdown: fail what is in flight, join threads.
  virtual void Shutdown() {}

  // Vendor engines that must know local memory (Mooncake registers it for one-sided
  // access): told once a region exists, and before its memory is released.
  virtual Status RegisterRegion(const Region& region) { return Status::Ok(); }
  virtual void UnregisterRegion(const Region& region) {}
  // Whether a local piece may be device memory, given by its device address (pieces
  // of device regions that are not host-addressable), and whether it must be.
  virtual bool AddressesDeviceMemory() const { return false; }
  virtual bool RequiresDeviceMemory() const { return false; }
};

class WorkQueue;
std::unique_ptr<Transport> CreateShmTransport(WorkQueue* pool, Device* device, size_t chunk_bytes,
                                              BatchDone done);

}  // namespace epd
