// The mooncake transport: one-sided reads and writes through Mooncake's transfer
// engine C API (vendor/mooncake.h), which moves the bytes over RDMA, HCCS (Ascend) or
// TCP. Our batch maps onto one Mooncake batch: one transfer request per piece, the
// target named by the peer's segment and the remote region's absolute address.
//
// Mooncake has no blocking wait and no cancel. One thread (never the JS thread: a
// first transfer to a segment may have to connect) submits batches and polls
// getTransferStatus with a short backoff, and reports each batch once: when every task
// completed, when one failed, or when the engine asked it to stop (deadline, abort,
// peer lost). A batch reported early stays on the poller's list until Mooncake lets go
// of it, and only then is its batch id freed.
//
// Memory: every local region is registered with the Mooncake engine when it is
// created (so peers can reach it) and unregistered before its memory is released.
// Unregistering is what fences transfers Mooncake still has on that memory (an RDMA
// memory region that is gone can no longer be touched); we also give such stragglers a
// short bounded wait.
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <unordered_map>

#include "transport_poller.h"
#include "vendor/device_common.h"
#include "vendor/mooncake.h"
#include "vendor/transports.h"

namespace epd {
namespace {

namespace mc = vendor::mooncake;

constexpr int kErrBatchBusy = -4;
constexpr auto kStragglerWait = std::chrono::milliseconds(2000);

const char* StatusName(int s) {
  switch (s) {
    case mc::kWaiting: return "WAITING";
    case mc::kPending: return "PENDING";
    case mc::kInvalid: return "INVALID";
    case mc::kCanceled: return "CANCELED";
    case mc::kCompleted: return "COMPLETED";
    case mc::kTimeout: return "TIMEOUT";
    case mc::kFailed: return "FAILED";
  }
  return "UNKNOWN";
}

class MooncakeTransportImpl final : public PollingTransport<MooncakeTransport> {
 public:
  MooncakeTransportImpl(const mc::Runtime* rt, mc::transfer_engine_t engine, std::string segment, Device* device,
                        BatchDone done)
      : PollingTransport(std::move(done)), api_(rt->api), engine_(engine), segment_(std::move(segment)), device_(device) {
    StartPoller();
  }

  ~MooncakeTransportImpl() override { Shutdown(); }

  const char* name() const override { return "mooncake"; }
  const std::string& segment() const override { return segment_; }
  bool AddressesDeviceMemory() const override { return true; }

  Status RegisterRegion(const Region& r) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (engine_ == nullptr) return Status(Code::kClosed, "mooncake engine is closed");
    void* addr = Address(r);
    std::string location = Location(r);
    int rc = api_.registerLocalMemory(engine_, addr, r.length, location.c_str(), /*remote_accessible=*/1);
    if (rc != 0) {
      Status st = mc::Error(rc, "registerLocalMemory(" + vendor::HexAddress(reinterpret_cast<uintptr_t>(addr)) + ", " +
                                    std::to_string(r.length) + " bytes, " + location + ")");
      if (rc == -7) return Status(Code::kBadArgument, st.message() + ": it overlaps a region already registered");
      return st;
    }
    registered_[r.id] = {reinterpret_cast<uintptr_t>(addr), r.length};
    return Status::Ok();
  }

  void UnregisterRegion(const Region& r) override {
    std::unique_lock<std::mutex> lock(mu_);
    auto it = registered_.find(r.id);
    if (it == registered_.end()) return;
    const auto [lo, len] = it->second;
    registered_.erase(it);
    if (engine_ == nullptr) return;  // destroyTransferEngine already released everything
    api_.unregisterLocalMemory(engine_, reinterpret_cast<void*>(lo));
    // Transfers reported early (deadline, abort) may still hold this memory inside
    // Mooncake: give them a bounded moment to finish before the memory goes.
    const auto until = std::chrono::steady_clock::now() + kStragglerWait;
    while (Touches(lo, len) && std::chrono::steady_clock::now() < until) {
      wake_.notify_all();
      idle_.wait_until(lock, until);
    }
  }

  Status Attach(const RemoteRegionSpec& spec, RemoteRegion* out) override {
    if (spec.addr == 0) {
      return Status(Code::kNotShareable, "peer region " + std::to_string(spec.id) +
                                             " has no address (the peer did not open with mooncake)");
    }
    out->id = spec.id;
    out->length = spec.length;
    out->ptr = reinterpret_cast<uint8_t*>(static_cast<uintptr_t>(spec.addr));  // remote VA, never dereferenced here
    return Status::Ok();
  }

  void Detach(RemoteRegion* region) override { region->ptr = nullptr; }

  Status AddPeer(const std::shared_ptr<Peer>& peer) override {
    const std::string& name = peer->vendor.mooncake_segment;
    if (name.empty()) return Status(Code::kBadArgument, "peer '" + peer->name + "' has no mooncake segment");
    std::lock_guard<std::mutex> lock(mu_);
    if (engine_ == nullptr) return Status(Code::kClosed, "mooncake engine is closed");
    mc::segment_id_t seg = api_.openSegment(engine_, name.c_str());
    if (seg < 0) {
      return Status(Code::kConnect, mc::Error(seg, "openSegment(" + name + ")").message() +
                                        " (is the peer's mooncake engine reachable?)");
    }
    segments_[peer.get()] = seg;
    return Status::Ok();
  }

  void RemovePeer(Peer* peer) override {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = segments_.find(peer);
    if (it == segments_.end()) return;
    if (engine_ != nullptr) api_.closeSegment(engine_, it->second);
    segments_.erase(it);
    wake_.notify_all();  // its batches were asked to stop: report them
  }

  void Sever(Peer* peer) override { wake_.notify_all(); }
  void Stop(const std::shared_ptr<Batch>& batch, Code code) override { wake_.notify_all(); }

  void Run(std::shared_ptr<Batch> batch) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!stopping_) {
        pending_.push_back(std::move(batch));
        wake_.notify_all();
        return;
      }
    }
    Finish(batch, Status(Code::kClosed, "engine is closed"));
  }

  void Shutdown() override {
    if (!StopPoller()) return;
    std::vector<std::shared_ptr<Batch>> unreported;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (Active& a : active_) {
        if (!a.reported) unreported.push_back(a.batch);
      }
      for (auto& b : pending_) unreported.push_back(b);
      pending_.clear();
      active_.clear();
      // Stops every transfer and joins Mooncake's threads; nothing touches our memory after.
      if (engine_ != nullptr) api_.destroyTransferEngine(engine_);
      engine_ = nullptr;
      segments_.clear();
      registered_.clear();
    }
    idle_.notify_all();
    for (auto& b : unreported) Finish(b, Status(Code::kClosed, "engine closed while the batch was in flight"));
  }

 private:
  struct Active {
    std::shared_ptr<Batch> batch;
    mc::batch_id_t id;
    std::vector<int> state;  // per task: mc::kWaiting until it reaches a final status
    size_t left;
    bool reported = false;
    Status failure;
  };

  static bool Final(int s) { return s == mc::kCompleted || s == mc::kFailed || s == mc::kTimeout || s == mc::kCanceled || s == mc::kInvalid; }

  void* Address(const Region& r) const {
    return r.ptr != nullptr ? static_cast<void*>(r.ptr) : reinterpret_cast<void*>(static_cast<uintptr_t>(r.device_ptr));
  }

  // Mooncake's memory location tag: device memory by kind and ordinal, host memory
  // "*" (Mooncake finds its NUMA node itself).
  std::string Location(const Region& r) const {
    if (r.kind != RegionKind::kDevice || r.ptr != nullptr) return "*";
    const std::string kind = device_->kind();
    const std::string prefix = kind == "acl" ? "npu" : kind;
    return prefix + ":" + std::to_string(device_->ordinal());
  }

  // Caller holds mu_: does a straggler still have a piece in [lo, lo + len)?
  bool Touches(uintptr_t lo, size_t len) const {
    for (const Active& a : active_) {
      for (const Piece& p : a.batch->pieces) {
        uintptr_t s = reinterpret_cast<uintptr_t>(p.local);
        if (s < lo + len && lo < s + p.length) return true;
      }
    }
    return false;
  }

  // Poller thread, without mu_ held: Mooncake calls here may block (connecting).
  Status Submit(const std::shared_ptr<Batch>& batch) {
    mc::segment_id_t target;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (engine_ == nullptr || stopping_) return Status(Code::kClosed, "engine is closed");
      auto seg = segments_.find(batch->peer.get());
      if (seg == segments_.end()) return Status(Code::kPeerLost, "peer '" + batch->peer->name + "' is not connected");
      target = seg->second;
    }
    if (batch->StopCode() != Code::kOk) return Status();  // stopped before it started: the engine says why
    const size_t n = batch->pieces.size();
    std::vector<mc::TransferRequest> requests(n);
    for (size_t i = 0; i < n; ++i) {
      const Piece& p = batch->pieces[i];
      requests[i] = mc::TransferRequest{batch->op == Op::kWrite ? mc::kOpcodeWrite : mc::kOpcodeRead, p.local, target,
                                        static_cast<uint64_t>(reinterpret_cast<uintptr_t>(p.remote)),
                                        static_cast<uint64_t>(p.length)};
    }
    mc::batch_id_t id = api_.allocateBatchID(engine_, n);
    if (id == mc::kInvalidBatch) return Status(Code::kSystem, "Mooncake allocateBatchID(" + std::to_string(n) + ") failed", EIO);
    int rc = api_.submitTransfer(engine_, id, requests.data(), n);
    std::lock_guard<std::mutex> lock(mu_);
    if (rc != 0) {
      if (api_.freeBatchID(engine_, id) == kErrBatchBusy) {
        // Some requests started after all: track them to the end; the batch is reported now.
        active_.push_back(Active{batch, id, std::vector<int>(n, mc::kWaiting), n, true, Status()});
      }
      return mc::Error(rc, "submitTransfer(" + std::to_string(n) + " requests to " + batch->peer->vendor.mooncake_segment + ")");
    }
    active_.push_back(Active{batch, id, std::vector<int>(n, mc::kWaiting), n, false, Status()});
    return Status::Ok();
  }

  // One pass over the active batches; returns whether anything changed.
  bool PollOnce(std::vector<std::shared_ptr<Batch>>* report) {
    bool progress = false;
    for (auto it = active_.begin(); it != active_.end();) {
      Active& a = *it;
      for (size_t i = 0; i < a.state.size(); ++i) {
        if (Final(a.state[i])) continue;
        mc::TransferStatusRecord st{};
        int rc = api_.getTransferStatus(engine_, a.id, i, &st);
        if (rc != 0) {
          st.status = mc::kFailed;
          if (a.failure.ok()) a.failure = mc::Error(rc, "getTransferStatus");
        }
        if (!Final(st.status)) continue;
        progress = true;
        a.state[i] = st.status;
        a.left--;
        if (st.status == mc::kCompleted) {
          a.batch->bytes_done.fetch_add(a.batch->pieces[i].length, std::memory_order_relaxed);
        } else if (a.failure.ok()) {
          a.failure = Status(st.status == mc::kTimeout ? Code::kTimeout : Code::kSystem,
                             "Mooncake transfer " + std::to_string(i) + " of batch " + std::to_string(a.batch->id) +
                                 " ended " + StatusName(st.status) + " (" + std::to_string(a.batch->pieces[i].length) +
                                 " bytes to " + a.batch->peer->vendor.mooncake_segment + ")",
                             st.status == mc::kTimeout ? 0 : EIO);
        }
      }
      if (!a.reported && (a.left == 0 || !a.failure.ok() || a.batch->StopCode() != Code::kOk)) {
        // Fail fast: a failed task fails the batch now; a stop request (deadline,
        // abort, lost peer) reports it now. The rest is polled to the end below.
        if (!a.failure.ok()) a.batch->Fail(a.failure);
        a.reported = true;
        report->push_back(a.batch);
        progress = true;
      }
      if (a.left == 0 && api_.freeBatchID(engine_, a.id) != kErrBatchBusy) {
        it = active_.erase(it);
        progress = true;
        continue;
      }
      ++it;
    }
    return progress;
  }

  bool HasWork() const override { return !pending_.empty() || !active_.empty(); }

  // Submits what is pending (then passes again at once), else polls what is active.
  Pass PollPass(std::unique_lock<std::mutex>& lock) override {
    if (!pending_.empty()) {
      std::vector<std::shared_ptr<Batch>> submit;
      submit.swap(pending_);
      lock.unlock();
      for (auto& b : submit) {
        Status st = Submit(b);
        if (!st.ok() || b->StopCode() != Code::kOk) {
          // Failed (or stopped) before Mooncake took it: report it now, unless
          // Submit handed it to the poller as a straggler already reported.
          if (!st.ok()) b->Fail(st);
          bool tracked = false;
          {
            std::lock_guard<std::mutex> l(mu_);
            for (const Active& a : active_) tracked = tracked || (a.batch == b && !a.reported);
          }
          if (!tracked) done_(b);
        }
      }
      lock.lock();
      return Pass::kAgain;
    }
    std::vector<std::shared_ptr<Batch>> report;
    bool progress = PollOnce(&report);
    if (active_.empty() || progress) idle_.notify_all();
    if (!report.empty()) {
      lock.unlock();
      for (auto& b : report) done_(b);
      lock.lock();
    }
    return progress ? Pass::kProgress : Pass::kNoProgress;
  }

  const mc::Api& api_;
  mc::transfer_engine_t engine_;
  const std::string segment_;
  Device* device_;

  // mu_ (PollingTransport) guards engine_, segments_, registered_, pending_, active_.
  std::condition_variable idle_;  // UnregisterRegion: a straggler finished
  std::unordered_map<Peer*, mc::segment_id_t> segments_;
  std::unordered_map<uint32_t, std::pair<uintptr_t, size_t>> registered_;
  std::vector<std::shared_ptr<Batch>> pending_;  // waiting to be submitted by the poller
  std::vector<Active> active_;
};

}  // namespace

Status CreateMooncakeTransport(const MooncakeOptions& options, Device* device, BatchDone done,
                               std::unique_ptr<MooncakeTransport>* out) {
  const mc::Runtime* rt = mc::Load();
  if (rt->lib.why != vendor::Unavailable::kNone) return vendor::UnavailableStatus("mooncake", rt->lib.reason);
  if (options.hostname.empty()) return Status(Code::kBadArgument, "mooncake needs the hostname or IP peers reach this engine at");
  const mc::Api& api = rt->api;
  const bool discover = options.protocol.empty();
  // Returns NULL when init fails. (Mooncake aborts the process instead when the
  // metadata scheme names a plugin it was built without: docs/VENDOR.md.)
  mc::transfer_engine_t engine = api.createTransferEngine(options.metadata.c_str(), options.hostname.c_str(),
                                                          options.hostname.c_str(), options.rpc_port, discover ? 1 : 0);
  if (engine == nullptr) {
    return Status(Code::kBackendUnavailable, "Mooncake createTransferEngine(" + options.metadata + ", " +
                                                 options.hostname + ") failed (see Mooncake's log)");
  }
  if (!discover) {
    // rdma (and barex) take { priority matrix JSON, NULL }; other protocols take NULL.
    void* args[2] = {const_cast<char*>(options.nic_priority_matrix.c_str()), nullptr};
    void** argp = options.nic_priority_matrix.empty() ? nullptr : args;
    if (api.installTransport(engine, options.protocol.c_str(), argp) == nullptr) {
      api.destroyTransferEngine(engine);
      return Status(Code::kBackendUnavailable, "Mooncake installTransport(" + options.protocol + ") failed");
    }
  }
  std::string segment = options.hostname;
  if (options.metadata == "P2PHANDSHAKE") {
    // The engine bound a free RPC port and renamed itself "ip:port": that is the segment.
    char buf[256] = {0};
    if (api.getLocalIpAndPort(engine, buf, sizeof buf) != 0 || buf[0] == '\0') {
      api.destroyTransferEngine(engine);
      return Status(Code::kSystem, "Mooncake getLocalIpAndPort failed", EIO);
    }
    segment = buf;
  }
  out->reset(new MooncakeTransportImpl(rt, engine, segment, device, std::move(done)));
  return Status::Ok();
}

}  // namespace epd
