// Engine: regions, peers and batches. Everything here except the byte copies runs
// on the JS thread; workers only touch the memory of the batch they were given and
// report through the completion queue, which the binding drains on the JS thread.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "device.h"
#include "link.h"
#include "region.h"
#include "transport.h"
#include "transport_tcp.h"
#include "vendor/transports.h"
#include "util/status.h"
#include "util/work_queue.h"

namespace epd {

// Live counters, readable from JS through a typed-array view without a call.
enum Counter : int {
  kBytesWritten = 0,
  kBytesRead,
  kBatchesSubmitted,
  kBatchesCompleted,
  kBatchesFailed,
  kBatchesInFlight,
  kBytesInFlight,
  kDescriptors,
  kCounterCount,
};

struct Counters {
  std::atomic<uint64_t> v[kCounterCount];
  Counters() {
    for (auto& c : v) c.store(0);
  }
};

struct EngineOptions {
  size_t threads = 2;
  size_t chunk_bytes = 1 << 20;
  // The engine's device; null means the host device.
  std::shared_ptr<Device> device;
};

// Descriptor layout in the Float64Array a batch arrives as.
constexpr size_t kDescriptorStride = 5;  // localRegion, localOffset, remoteRegion, remoteOffset, length

// How to reach one peer: which transport, and the link emulated on top of it.
struct PeerConfig {
  std::string transport = "shm";  // "shm" | "tcp" | "mooncake" | "hccl"
  TcpPeerSpec tcp;
  VendorPeerSpec vendor;
  LinkSpec link;
};

struct Completion {
  std::shared_ptr<Batch> batch;
  Status status;
};

class Engine {
 public:
  // `notify` is called from any thread when the completion queue becomes non-empty.
  Engine(const EngineOptions& options, std::function<void()> notify);
  ~Engine();

  Device* device() { return device_.get(); }
  std::shared_ptr<Device> shared_device() { return device_; }
  RegionTable& regions() { return regions_; }
  std::shared_ptr<Counters> counters() { return counters_; }
  const EngineOptions& options() const { return options_; }
  TcpTransport* tcp() { return tcp_.get(); }
  // Region `id` is being freed: peers can no longer reach it over tcp.
  void RegionFreeing(uint32_t id) { tcp_->Unexpose(id); }

  // Vendor transports (vendor/transports.h), started on request: they load their
  // library then and fail with ERR_BACKEND_UNAVAILABLE where it cannot run.
  Status StartMooncake(const MooncakeOptions& options);
  MooncakeTransport* mooncake() { return mooncake_.get(); }
  Status Hccl(HcclTransport** out);
  bool has_hccl() const { return hccl_ != nullptr; }

  Status AddPeer(const std::string& name, int pid, const std::vector<RemoteRegionSpec>& specs,
                 const PeerConfig& config, uint32_t* id);
  std::shared_ptr<Peer> FindPeer(uint32_t id) const;
  // Replaces a peer's region list (after a refresh of its segment descriptor).
  Status UpdatePeer(uint32_t id, const std::vector<RemoteRegionSpec>& specs);
  // Marks the peer lost, stops its in-flight batches with `code` and releases its
  // transport state (connections); removes it from the table when `remove`.
  void DropPeer(uint32_t id, Code code, bool remove);
  bool HasPeer(uint32_t id) const { return peers_.count(id) != 0; }

  // Validates every descriptor, then starts the batch. Nothing moves when it fails.
  Status Submit(Op op, uint32_t peer_id, const double* desc, size_t count, uint64_t* batch_id);
  // Asks an in-flight batch to stop; it completes with `code` once its workers let go.
  void Abort(uint64_t batch_id, Code code);
  void AbortAll(Code code);
  // Stops in-flight batches that touch local region `id`.
  void AbortTouching(uint32_t id, Code code);
  bool closed() const { return shut_down_; }

  // JS thread: takes finished batches, unpins their regions, updates counters.
  void DrainCompletions(std::vector<Completion>* out);
  size_t in_flight() const { return in_flight_.size(); }

  // Stops everything: in-flight batches end with ERR_CLOSED, threads are joined,
  // regions released (their shm objects unlinked).
  void Shutdown();

 private:
  void OnBatchDone(std::shared_ptr<Batch> batch);
  // Completion of any batch a transport ran: a child cut by a wrapper goes to its
  // wrapper, a caller's batch to the completion queue.
  void OnTransportDone(std::shared_ptr<Batch> batch);
  void StopBatch(const std::shared_ptr<Batch>& batch, Code code);
  Status Resolve(Op op, Peer* peer, const double* desc, size_t count, Batch* batch);

  EngineOptions options_;
  std::function<void()> notify_;
  std::shared_ptr<Device> device_;
  RegionTable regions_;
  std::unique_ptr<WorkQueue> pool_;
  std::unique_ptr<Transport> shm_;
  std::unique_ptr<TcpTransport> tcp_;
  std::unique_ptr<MooncakeTransport> mooncake_;
  std::unique_ptr<HcclTransport> hccl_;
  std::unique_ptr<LinkTimer> link_timer_;  // started with the first emulated link
  std::shared_ptr<Counters> counters_ = std::make_shared<Counters>();

  uint32_t next_peer_id_ = 1;
  std::unordered_map<uint32_t, std::shared_ptr<Peer>> peers_;
  uint64_t next_batch_id_ = 1;
  std::unordered_map<uint64_t, std::shared_ptr<Batch>> in_flight_;

  std::mutex done_mu_;
  std::vector<std::shared_ptr<Batch>> done_;
  bool shut_down_ = false;
};

}  // namespace epd
