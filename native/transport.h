// Transport: moves the pieces of a batch between local memory and a peer's regions.
// The engine validates and resolves a batch (every piece is in bounds) before a
// transport sees it; a transport only moves bytes and reports the outcome.
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
};

struct Peer {
  uint32_t id = 0;
  std::string name;
  int pid = 0;
  int pidfd = -1;  // same-host liveness: readable once the peer process exited
  std::atomic<int> lost{0};  // a Code once the peer is lost
  std::unordered_map<uint32_t, RemoteRegion> regions;

  ~Peer();
  // False once the peer process is known to be gone (cheap: one poll()).
  bool Alive();
};

struct Piece {
  uint8_t* local;
  uint8_t* remote;
  size_t length;
};

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

  void Fail(const Status& s) {
    std::lock_guard<std::mutex> lock(mu_);
    if (status_.ok()) status_ = s;
  }
  Status status() {
    std::lock_guard<std::mutex> lock(mu_);
    return status_;
  }
  // The reason to stop early, or kOk.
  Code StopCode() const { return static_cast<Code>(abort_code.load(std::memory_order_relaxed)); }
  void RequestStop(Code c) {
    int expected = 0;
    abort_code.compare_exchange_strong(expected, static_cast<int>(c));
  }

 private:
  std::mutex mu_;
  Status status_;
};

using BatchDone = std::function<void(std::shared_ptr<Batch>)>;

class Transport {
 public:
  virtual ~Transport() = default;
  virtual const char* name() const = 0;
  // Makes one region of a peer addressable.
  virtual Status Attach(const RemoteRegionSpec& spec, RemoteRegion* out) = 0;
  virtual void Detach(RemoteRegion* region) = 0;
  // Moves the batch. Calls the engine's completion exactly once, after the last
  // byte of the batch was touched.
  virtual void Run(std::shared_ptr<Batch> batch) = 0;
};

class WorkQueue;
std::unique_ptr<Transport> CreateShmTransport(WorkQueue* pool, Device* device, size_t chunk_bytes,
                                              BatchDone done);

}  // namespace epd
