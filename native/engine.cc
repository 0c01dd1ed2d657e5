#include "engine.h"

#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>

#include "vendor/device_common.h"

namespace epd {
namespace {

constexpr double kMaxSafeInteger = 9007199254740991.0;  // 2^53 - 1

bool IsIndex(double d) { return d >= 0 && d <= kMaxSafeInteger && std::trunc(d) == d; }

std::string DescriptorField(size_t i, const char* field) {
  return "descriptor " + std::to_string(i) + " " + field;
}

int OpenPidfd(int pid) {
#ifdef SYS_pidfd_open
  if (pid > 0) {
    long fd = syscall(SYS_pidfd_open, pid, 0);
    if (fd >= 0) return static_cast<int>(fd);
  }
#endif
  return -1;
}

}  // namespace

Engine::Engine(const EngineOptions& options, std::function<void()> notify)
    : options_(options),
      notify_(std::move(notify)),
      device_(options.device ? options.device : std::shared_ptr<Device>(CreateHostDevice())),
      regions_(device_.get()),
      pool_(std::make_unique<WorkQueue>(options.threads)),
      shm_(CreateShmTransport(pool_.get(), device_.get(), options.chunk_bytes,
                              [this](std::shared_ptr<Batch> b) { OnTransportDone(std::move(b)); })),
      tcp_(CreateTcpTransport([this](std::shared_ptr<Batch> b) { OnTransportDone(std::move(b)); })) {
  // Vendor engines that register memory learn of every region (vendor/transports.h).
  regions_.on_add = [this](Region& r) { return mooncake_ ? mooncake_->RegisterRegion(r) : Status::Ok(); };
  regions_.on_release = [this](Region& r) {
    if (mooncake_) mooncake_->UnregisterRegion(r);
  };
}

Status Engine::StartMooncake(const MooncakeOptions& options) {
  if (shut_down_) return Status(Code::kClosed, "engine is closed");
  if (mooncake_) return Status(Code::kBadArgument, "mooncake is already started on this engine");
  std::unique_ptr<MooncakeTransport> t;
  EPD_RETURN_IF_ERROR(CreateMooncakeTransport(options, device_.get(),
                                              [this](std::shared_ptr<Batch> b) { OnTransportDone(std::move(b)); }, &t));
  // Regions made before it started become reachable too.
  Status st;
  std::vector<Region*> done;
  regions_.ForEach([&](Region& r) {
    if (!st.ok() || r.freeing) return;
    st = t->RegisterRegion(r);
    if (st.ok()) done.push_back(&r);
  });
  if (!st.ok()) {
    for (Region* r : done) t->UnregisterRegion(*r);
    t->Shutdown();
    return st;
  }
  mooncake_ = std::move(t);
  return Status::Ok();
}

Status Engine::Hccl(HcclTransport** out) {
  if (shut_down_) return Status(Code::kClosed, "engine is closed");
  if (!hccl_) {
    EPD_RETURN_IF_ERROR(
        CreateHcclTransport(device_.get(), [this](std::shared_ptr<Batch> b) { OnTransportDone(std::move(b)); }, &hccl_));
  }
  *out = hccl_.get();
  return Status::Ok();
}

Engine::~Engine() { Shutdown(); }

Status Engine::AddPeer(const std::string& name, int pid, const std::vector<RemoteRegionSpec>& specs,
                       const PeerConfig& config, uint32_t* id) {
  if (shut_down_) return Status(Code::kClosed, "engine is closed");
  Transport* base = nullptr;
  if (config.transport == "shm") {
    base = shm_.get();
  } else if (config.transport == "tcp") {
    base = tcp_.get();
  } else if (config.transport == "mooncake") {
    if (!mooncake_) return Status(Code::kBackendUnavailable, "this engine was not opened with mooncake");
    base = mooncake_.get();
  } else if (config.transport == "hccl") {
    HcclTransport* h = nullptr;
    EPD_RETURN_IF_ERROR(Hccl(&h));
    base = h;
  } else {
    return Status(Code::kBackendUnavailable, "transport '" + config.transport + "' is not built into this engine");
  }
  auto peer = std::make_shared<Peer>();
  peer->id = next_peer_id_++;
  peer->name = name;
  peer->pid = pid;
  peer->pidfd = OpenPidfd(pid);
  if (pid > 0 && peer->pidfd < 0 && errno == ESRCH) {
    return Status(Code::kPeerLost, "peer process " + std::to_string(pid) + " is not running");
  }
  peer->tcp = config.tcp;
  peer->vendor = config.vendor;
  peer->device_memory = base->AddressesDeviceMemory();
  peer->device_memory_only = base->RequiresDeviceMemory();
  peer->transport = base;
  if (config.link.enabled()) {
    if (!link_timer_) link_timer_ = std::make_unique<LinkTimer>();
    peer->link = CreateLinkTransport(base, config.link, link_timer_.get(),
                                     [this](std::shared_ptr<Batch> b) { OnTransportDone(std::move(b)); });
    peer->transport = peer->link.get();
  }
  EPD_RETURN_IF_ERROR(peer->transport->AddPeer(peer));
  peers_[peer->id] = peer;
  Status st = UpdatePeer(peer->id, specs);
  if (!st.ok()) {
    peer->transport->RemovePeer(peer.get());
    peers_.erase(peer->id);
    return st;
  }
  *id = peer->id;
  return Status::Ok();
}

std::shared_ptr<Peer> Engine::FindPeer(uint32_t id) const {
  auto it = peers_.find(id);
  return it == peers_.end() ? nullptr : it->second;
}

Status Engine::UpdatePeer(uint32_t id, const std::vector<RemoteRegionSpec>& specs) {
  auto it = peers_.find(id);
  if (it == peers_.end()) return Status(Code::kUnknownPeer, "unknown peer " + std::to_string(id));
  Peer& peer = *it->second;
  std::unordered_map<uint32_t, RemoteRegion> next;
  for (const RemoteRegionSpec& spec : specs) {
    auto old = peer.regions.find(spec.id);
    if (old != peer.regions.end() && old->second.length == spec.length) {
      next[spec.id] = old->second;  // keep the existing mapping
      continue;
    }
    RemoteRegion rr;
    const char* vendor_kind = vendor::IpcKeyDeviceKind(spec.ipc_key);
    Status st;
    if (spec.shm.empty() && vendor_kind != nullptr && !peer.device_memory) {
      // NPU/GPU memory, which a host-memory transport (shm, tcp) cannot copy: the
      // peer's other regions stay usable; descriptors naming this one fail.
      rr.id = spec.id;
      rr.length = spec.length;
      rr.unreachable = std::string("it is ") + vendor_kind + " device memory (use the mooncake or hccl transport)";
    } else {
      st = peer.transport->Attach(spec, &rr);
    }
    if (!st.ok()) {
      for (auto& [rid, r] : next) {
        if (peer.regions.count(rid) == 0) peer.transport->Detach(&r);
      }
      return st;
    }
    next[spec.id] = std::move(rr);
  }
  // Mappings of regions the peer no longer lists go away with their last batch:
  // in-flight batches hold their own references (Batch::remote_mappings).
  for (auto& [rid, r] : peer.regions) {
    if (next.count(rid) == 0 && r.imported == 0) r.mapping.reset();
  }
  peer.regions.swap(next);
  return Status::Ok();
}

void Engine::DropPeer(uint32_t id, Code code, bool remove) {
  auto it = peers_.find(id);
  if (it == peers_.end()) return;
  std::shared_ptr<Peer> peer = it->second;
  int expected = 0;
  peer->lost.compare_exchange_strong(expected, static_cast<int>(code));
  bool busy = false;
  for (auto& [bid, b] : in_flight_) {
    if (b->peer == peer) {
      StopBatch(b, code);
      busy = true;
    }
  }
  peer->transport->RemovePeer(peer.get());
  // A lost peer kept in the table (to answer ERR_PEER_LOST) need not keep its pidfd;
  // only batches in flight poll it, so it can close now if there are none.
  if (!busy && peer->pidfd >= 0) {
    close(peer->pidfd);
    peer->pidfd = -1;
  }
  if (remove) peers_.erase(it);
}

void Engine::StopBatch(const std::shared_ptr<Batch>& batch, Code code) {
  batch->RequestStop(code);
  batch->peer->transport->Stop(batch, code);
}

Status Engine::Resolve(Op op, Peer* peer, const double* desc, size_t count, Batch* batch) {
  batch->pieces.reserve(count);
  for (size_t i = 0; i < count; ++i) {
    const double* d = desc + i * kDescriptorStride;
    static const char* kFields[] = {"localRegion", "localOffset", "remoteRegion", "remoteOffset", "length"};
    for (size_t f = 0; f < kDescriptorStride; ++f) {
      if (!IsIndex(d[f])) {
        return Status(Code::kBadArgument,
                      "Expected a non-negative integer for " + DescriptorField(i, kFields[f]) + " but received " +
                          std::to_string(d[f]));
      }
    }
    if (d[0] > 0xffffffffu || d[2] > 0xffffffffu) {
      return Status(Code::kUnknownRegion, DescriptorField(i, "names a region id out of range"));
    }
    const uint32_t local_id = static_cast<uint32_t>(d[0]);
    const uint64_t local_off = static_cast<uint64_t>(d[1]);
    const uint32_t remote_id = static_cast<uint32_t>(d[2]);
    const uint64_t remote_off = static_cast<uint64_t>(d[3]);
    const uint64_t length = static_cast<uint64_t>(d[4]);
    if (length == 0) return Status(Code::kBadArgument, DescriptorField(i, "has length 0"));

    Region* local = nullptr;
    Status st = regions_.Lookup(local_id, &local);
    if (!st.ok()) return Status(st.code(), DescriptorField(i, "localRegion: ") + st.message());
    uint8_t* local_base = local->ptr;
    if (peer->device_memory_only && local->kind != RegionKind::kDevice) {
      return Status(Code::kBadArgument, DescriptorField(i, "localRegion is host memory; the ") +
                                            peer->transport->name() + " transport moves device memory only");
    }
    if (local_base == nullptr && peer->device_memory) {
      local_base = reinterpret_cast<uint8_t*>(static_cast<uintptr_t>(local->device_ptr));
    }
    if (local_base == nullptr) {
      return Status(Code::kBackendUnavailable, DescriptorField(i, "localRegion is device memory the ") +
                                                   peer->transport->name() + " transport cannot address");
    }
    if (local_off > local->length || length > local->length - local_off) {
      return Status(Code::kOutOfRange, DescriptorField(i, "local range [") + std::to_string(local_off) + ", +" +
                                           std::to_string(length) + ") exceeds region " + std::to_string(local_id) +
                                           " of " + std::to_string(local->length) + " bytes");
    }
    auto rit = peer->regions.find(remote_id);
    if (rit == peer->regions.end()) {
      return Status(Code::kUnknownRegion, DescriptorField(i, "remoteRegion: peer '") + peer->name +
                                              "' has no region " + std::to_string(remote_id));
    }
    const RemoteRegion& remote = rit->second;
    if (!remote.unreachable.empty()) {
      return Status(Code::kNotShareable, DescriptorField(i, "remoteRegion ") + std::to_string(remote_id) + " of peer '" +
                                             peer->name + "' cannot be reached over " + peer->transport->name() + ": " +
                                             remote.unreachable);
    }
    if (remote_off > remote.length || length > remote.length - remote_off) {
      return Status(Code::kOutOfRange, DescriptorField(i, "remote range [") + std::to_string(remote_off) + ", +" +
                                           std::to_string(length) + ") exceeds peer region " +
                                           std::to_string(remote_id) + " of " + std::to_string(remote.length) +
                                           " bytes");
    }
    if (remote.mapping && std::find(batch->remote_mappings.begin(), batch->remote_mappings.end(),
                                    remote.mapping) == batch->remote_mappings.end()) {
      batch->remote_mappings.push_back(remote.mapping);
    }
    batch->pieces.push_back(Piece{local_base + local_off, remote.ptr ? remote.ptr + remote_off : nullptr,
                                  static_cast<size_t>(length), remote_id, remote_off});
    batch->bytes += length;
    if (std::find(batch->local_regions.begin(), batch->local_regions.end(), local_id) ==
        batch->local_regions.end()) {
      batch->local_regions.push_back(local_id);
    }
  }
  (void)op;
  return Status::Ok();
}

Status Engine::Submit(Op op, uint32_t peer_id, const double* desc, size_t count, uint64_t* batch_id) {
  if (shut_down_) return Status(Code::kClosed, "engine is closed");
  if (count == 0) return Status(Code::kBadArgument, "a batch needs at least one descriptor");
  auto pit = peers_.find(peer_id);
  if (pit == peers_.end()) return Status(Code::kUnknownPeer, "unknown peer " + std::to_string(peer_id));
  std::shared_ptr<Peer> peer = pit->second;
  if (!peer->Alive()) {
    return Status(static_cast<Code>(peer->lost.load()), "peer '" + peer->name + "' is lost; connect again");
  }
  auto batch = std::make_shared<Batch>();
  EPD_RETURN_IF_ERROR(Resolve(op, peer.get(), desc, count, batch.get()));

  batch->id = next_batch_id_++;
  batch->op = op;
  batch->peer = peer;
  batch->descriptors = static_cast<uint32_t>(count);
  for (uint32_t id : batch->local_regions) regions_.Find(id)->pins++;
  in_flight_[batch->id] = batch;
  auto& c = counters_->v;
  c[kBatchesSubmitted].fetch_add(1, std::memory_order_relaxed);
  c[kBatchesInFlight].fetch_add(1, std::memory_order_relaxed);
  c[kBytesInFlight].fetch_add(batch->bytes, std::memory_order_relaxed);
  c[kDescriptors].fetch_add(count, std::memory_order_relaxed);
  *batch_id = batch->id;
  peer->transport->Run(batch);
  return Status::Ok();
}

void Engine::Abort(uint64_t batch_id, Code code) {
  auto it = in_flight_.find(batch_id);
  if (it != in_flight_.end()) StopBatch(it->second, code);
}

void Engine::AbortAll(Code code) {
  for (auto& [id, b] : in_flight_) StopBatch(b, code);
}

void Engine::AbortTouching(uint32_t id, Code code) {
  for (auto& [bid, b] : in_flight_) {
    if (std::find(b->local_regions.begin(), b->local_regions.end(), id) != b->local_regions.end()) {
      StopBatch(b, code);
    }
  }
}

void Engine::OnTransportDone(std::shared_ptr<Batch> batch) {
  if (batch->on_done) {
    BatchDone to = batch->on_done;  // keep it alive while it runs
    to(std::move(batch));
  } else {
    OnBatchDone(std::move(batch));
  }
}

void Engine::OnBatchDone(std::shared_ptr<Batch> batch) {
  bool first;
  {
    std::lock_guard<std::mutex> lock(done_mu_);
    first = done_.empty();
    done_.push_back(std::move(batch));
  }
  if (first && notify_) notify_();
}

void Engine::DrainCompletions(std::vector<Completion>* out) {
  std::vector<std::shared_ptr<Batch>> done;
  {
    std::lock_guard<std::mutex> lock(done_mu_);
    done.swap(done_);
  }
  auto& c = counters_->v;
  for (auto& b : done) {
    Status st = b->status();
    Code stop = b->StopCode();
    const uint64_t moved = b->bytes_done.load();
    if (st.ok() && stop != Code::kOk && (stop == Code::kPeerLost || moved < b->bytes)) {
      std::string what = stop == Code::kPeerLost ? "peer '" + b->peer->name + "' was lost during the batch"
                         : stop == Code::kTimeout ? "batch did not complete before its deadline"
                         : stop == Code::kAborted ? "batch was aborted"
                         : stop == Code::kClosed  ? "engine closed while the batch was in flight"
                         : stop == Code::kRegionFreed ? "a region of the batch was freed"
                                                      : "batch stopped";
      st = Status(stop, what + " (" + std::to_string(moved) + " of " + std::to_string(b->bytes) + " bytes moved)");
    }
    for (uint32_t id : b->local_regions) {
      if (Region* r = regions_.Find(id)) {
        r->pins--;
        regions_.ReleaseIfIdle(id);
      }
    }
    in_flight_.erase(b->id);
    c[kBatchesInFlight].fetch_sub(1, std::memory_order_relaxed);
    c[kBytesInFlight].fetch_sub(b->bytes, std::memory_order_relaxed);
    c[st.ok() ? kBatchesCompleted : kBatchesFailed].fetch_add(1, std::memory_order_relaxed);
    c[b->op == Op::kWrite ? kBytesWritten : kBytesRead].fetch_add(moved, std::memory_order_relaxed);
    out->push_back(Completion{std::move(b), std::move(st)});
  }
}

void Engine::Shutdown() {
  if (shut_down_) return;
  shut_down_ = true;
  AbortAll(Code::kClosed);
  // Emulated links first: they stop handing messages on; then the transports fail
  // and join whatever is still moving.
  if (link_timer_) link_timer_->Shutdown();
  for (auto& [id, peer] : peers_) peer->transport->RemovePeer(peer.get());
  tcp_->Shutdown();
  // Vendor engines stop their threads and let go of our memory before regions go.
  if (mooncake_) mooncake_->Shutdown();
  if (hccl_) hccl_->Shutdown();
  pool_->Shutdown();  // runs what is queued; stopped tasks return at once
  for (auto& [id, peer] : peers_) {
    for (auto& [rid, r] : peer->regions) peer->transport->Detach(&r);
  }
  peers_.clear();
  regions_.ReleaseAll();
  regions_.on_add = nullptr;
  regions_.on_release = nullptr;
  device_->ReleaseAll();
}

}  // namespace epd
