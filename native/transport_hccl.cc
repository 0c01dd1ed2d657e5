// The hccl transport: NPU-to-NPU pushes and pulls with HCCL point-to-point
// operations (vendor/hccl.h) on an ACL stream of the engine's acl device.
//
// HCCL is two-sided: a send completes only against the matching receive, and pairs
// match by order. Each peer gets its own two-rank communicator (set up from a
// root-info blob exchanged over our control plane, lib/vendor/hccl.ts) and its own
// stream. A batch posts one HcclSend (write) or HcclRecv (read) per piece, in
// descriptor order (one HcclBatchSendRecv where the runtime has it), then records an
// ACL event; a poller thread reports the batch when the event completes.
//
// HCCL cannot cancel a posted operation. A batch stopped by its deadline, an abort or
// a lost peer is reported at once, and its link is closed (the communicator is
// destroyed, which fails what is still queued on it): later batches to that peer fail
// with ERR_PEER_LOST until the caller connects again.
#include <cstring>
#include <mutex>
#include <unordered_map>

#include "transport_poller.h"
#include "vendor/acl.h"
#include "vendor/acl_device.h"
#include "vendor/hccl.h"
#include "vendor/poll.h"
#include "vendor/transports.h"

namespace epd {
namespace {

namespace acl = vendor::acl;
namespace hc = vendor::hccl;

constexpr int64_t kTeardownWaitMs = 5'000;

struct Link {
  // Held while operations are posted on the link and while it is torn down, so a
  // teardown never destroys the communicator under a post. Taken before mu_.
  std::mutex op_mu;
  uint64_t id = 0;
  hc::HcclComm comm = nullptr;
  uint32_t rank = 0;
  acl::aclrtStream stream = nullptr;
  Peer* peer = nullptr;  // while the peer holds the link
  bool broken = false;
  std::string why;
};

class HcclTransportImpl final : public PollingTransport<HcclTransport> {
 public:
  HcclTransportImpl(Device* device, const acl::Runtime* acl_rt, const hc::Runtime* hccl_rt, BatchDone done)
      : PollingTransport(std::move(done)), device_(device), acl_(acl_rt->api), hccl_(hccl_rt->api) {
    StartPoller();
  }
  ~HcclTransportImpl() override { Shutdown(); }

  const char* name() const override { return "hccl"; }
  bool AddressesDeviceMemory() const override { return true; }
  bool RequiresDeviceMemory() const override { return true; }

  Status RootInfo(std::string* blob) override {
    EPD_RETURN_IF_ERROR(acl::BindThread(device_));
    hc::RootInfo info;
    std::memset(&info, 0, sizeof info);
    hc::HcclResult rc = hccl_.HcclGetRootInfo(&info);
    if (rc != hc::kSuccess) return hc::Error(hccl_, rc, "HcclGetRootInfo");
    blob->assign(info.internal, sizeof info.internal);
    return Status::Ok();
  }

  Status Join(const std::string& root_info, uint32_t rank, uint64_t* id) override {
    if (root_info.size() != hc::kRootInfoBytes) {
      return Status(Code::kBadArgument, "an HCCL root info is " + std::to_string(hc::kRootInfoBytes) + " bytes, not " +
                                            std::to_string(root_info.size()));
    }
    if (rank > 1) return Status(Code::kBadArgument, "a two-rank link has ranks 0 and 1");
    EPD_RETURN_IF_ERROR(acl::BindThread(device_));
    hc::RootInfo info;
    std::memcpy(info.internal, root_info.data(), sizeof info.internal);
    auto link = std::make_shared<Link>();
    link->rank = rank;
    // Blocks until the other rank joins (or HCCL's own connect timeout).
    hc::HcclResult rc = hccl_.HcclCommInitRootInfo(2, &info, rank, &link->comm);
    if (rc != hc::kSuccess) return hc::Error(hccl_, rc, "HcclCommInitRootInfo(rank " + std::to_string(rank) + ")");
    acl::aclError arc = acl_.aclrtCreateStream(&link->stream);
    if (arc != acl::kSuccess) {
      hccl_.HcclCommDestroy(link->comm);
      return acl::Error(acl_, arc, "aclrtCreateStream");
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!stopping_) {
        link->id = next_link_++;
        unclaimed_[link->id] = link;
        *id = link->id;
        return Status::Ok();
      }
    }
    Teardown(link);  // the engine closed while we waited for the other rank
    return Status(Code::kClosed, "engine closed while the HCCL link was being set up");
  }

  void Discard(uint64_t id) override {
    std::shared_ptr<Link> link;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = unclaimed_.find(id);
      if (it == unclaimed_.end()) return;
      link = it->second;
      unclaimed_.erase(it);
    }
    Teardown(link);
  }

  Status AddPeer(const std::shared_ptr<Peer>& peer) override {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = unclaimed_.find(peer->vendor.hccl_link);
    if (it == unclaimed_.end()) {
      return Status(Code::kBadArgument, "no joined HCCL link " + std::to_string(peer->vendor.hccl_link) + " for peer '" +
                                            peer->name + "'");
    }
    it->second->peer = peer.get();
    links_[peer.get()] = it->second;
    unclaimed_.erase(it);
    return Status::Ok();
  }

  void RemovePeer(Peer* peer) override {
    std::shared_ptr<Link> link;
    std::vector<std::shared_ptr<Batch>> held;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = links_.find(peer);
      if (it == links_.end()) return;
      link = it->second;
      links_.erase(it);
      Break(link.get(), "peer '" + peer->name + "' was disconnected");
      link->peer = nullptr;
      for (auto h = held_.begin(); h != held_.end();) {
        if (h->second->peer.get() == peer) {
          held.push_back(h->second);
          h = held_.erase(h);
        } else {
          ++h;
        }
      }
    }
    for (auto& b : held) Finish(b, Status(Code::kPeerLost, "peer '" + peer->name + "' was disconnected"));
    {
      std::lock_guard<std::mutex> lock(mu_);
      retire_.push_back(link);  // torn down by the poller (or Shutdown)
    }
    wake_.notify_all();
  }

  Status Attach(const RemoteRegionSpec& spec, RemoteRegion* out) override {
    // HCCL matches sends and receives by order: remote regions are only checked for
    // bounds by the engine, never addressed here.
    out->id = spec.id;
    out->length = spec.length;
    return Status::Ok();
  }
  void Detach(RemoteRegion*) override {}

  void Run(std::shared_ptr<Batch> batch) override {
    std::shared_ptr<Link> link;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = links_.find(batch->peer.get());
      if (it == links_.end() || it->second->broken || stopping_) {
        const std::string why = it == links_.end() || stopping_ ? "no HCCL link to peer '" + batch->peer->name + "'"
                                                                : it->second->why;
        Finish(batch, Status(Code::kPeerLost, why + "; connect again"));
        return;
      }
      link = it->second;
      if (batch->peer->vendor.hccl_initiator) {
        // Posted by Release once the other side has posted its half.
        held_[batch->id] = batch;
        return;
      }
    }
    Post(link, batch);
  }

  Status Release(uint64_t batch_id) override {
    std::shared_ptr<Batch> batch;
    std::shared_ptr<Link> link;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = held_.find(batch_id);
      if (it == held_.end()) return Status(Code::kBadArgument, "batch " + std::to_string(batch_id) + " is not held");
      batch = it->second;
      held_.erase(it);
      auto l = links_.find(batch->peer.get());
      if (l == links_.end() || l->second->broken) {
        const std::string why = l == links_.end() ? "peer '" + batch->peer->name + "' was disconnected" : l->second->why;
        Finish(batch, Status(Code::kPeerLost, why));
        return Status::Ok();
      }
      link = l->second;
    }
    Post(link, batch);
    return Status::Ok();
  }

  void Stop(const std::shared_ptr<Batch>& batch, Code code) override {
    std::shared_ptr<Batch> held;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = held_.find(batch->id);
      if (it != held_.end()) {
        held = it->second;
        held_.erase(it);
      }
    }
    if (held) {
      done_(held);  // nothing was posted: the engine reports the stop code
      return;
    }
    wake_.notify_all();
  }

  void Sever(Peer* peer) override {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = links_.find(peer);
    if (it != links_.end()) Break(it->second.get(), "peer '" + peer->name + "' was lost");
    wake_.notify_all();
  }

  void Shutdown() override {
    if (!StopPoller()) return;
    std::vector<std::shared_ptr<Batch>> unreported;
    std::vector<std::shared_ptr<Link>> all;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto& [id, b] : held_) unreported.push_back(b);
      held_.clear();
      for (Active& a : active_) {
        if (!a.reported) unreported.push_back(a.batch);
      }
      for (auto& [p, l] : links_) all.push_back(l);
      for (auto& [id, l] : unclaimed_) all.push_back(l);
      for (auto& l : retire_) all.push_back(l);
      links_.clear();
      unclaimed_.clear();
      retire_.clear();
    }
    for (auto& l : all) Teardown(l);
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (acl::BindThread(device_).ok()) {
        for (Active& a : active_) acl_.aclrtDestroyEvent(a.event);
      }
      active_.clear();
    }
    for (auto& b : unreported) Finish(b, Status(Code::kClosed, "engine closed while the batch was in flight"));
  }

 private:
  struct Active {
    std::shared_ptr<Batch> batch;
    std::shared_ptr<Link> link;
    acl::aclrtEvent event;
    bool reported = false;
  };

  // Caller holds mu_. The peer is marked lost too, so new batches to it fail at
  // submit and the caller's next connect() makes a new link.
  void Break(Link* link, const std::string& why) {
    if (link->broken) return;
    link->broken = true;
    link->why = why;
    if (link->peer != nullptr) {
      int expected = 0;
      link->peer->lost.compare_exchange_strong(expected, static_cast<int>(Code::kPeerLost));
    }
  }

  void Post(const std::shared_ptr<Link>& link, const std::shared_ptr<Batch>& batch) {
    std::unique_lock<std::mutex> op(link->op_mu);
    if (link->comm == nullptr) {
      op.unlock();
      std::lock_guard<std::mutex> lock(mu_);
      Finish(batch, Status(Code::kPeerLost, (link->why.empty() ? "the HCCL link is closed" : link->why) + "; connect again"));
      return;
    }
    Status st = acl::BindThread(device_);
    const bool send = batch->op == Op::kWrite;
    const uint32_t other = 1 - link->rank;
    size_t posted = 0;
    if (st.ok() && hccl_.HcclBatchSendRecv != nullptr && batch->pieces.size() > 1) {
      std::vector<hc::SendRecvItem> items;
      items.reserve(batch->pieces.size());
      for (const Piece& p : batch->pieces) {
        items.push_back(hc::SendRecvItem{send ? hc::kSend : hc::kRecv, p.local, p.length, hc::kDataTypeUint8, other});
      }
      hc::HcclResult rc = hccl_.HcclBatchSendRecv(items.data(), static_cast<uint32_t>(items.size()), link->comm, link->stream);
      if (rc != hc::kSuccess) st = hc::Error(hccl_, rc, "HcclBatchSendRecv");
      else posted = items.size();
    } else if (st.ok()) {
      for (const Piece& p : batch->pieces) {
        hc::HcclResult rc = send ? hccl_.HcclSend(p.local, p.length, hc::kDataTypeUint8, other, link->comm, link->stream)
                                 : hccl_.HcclRecv(p.local, p.length, hc::kDataTypeUint8, other, link->comm, link->stream);
        if (rc != hc::kSuccess) {
          st = hc::Error(hccl_, rc, send ? "HcclSend" : "HcclRecv");
          break;
        }
        posted++;
      }
    }
    acl::aclrtEvent event = nullptr;
    if (st.ok()) {
      acl::aclError rc = acl_.aclrtCreateEvent(&event);
      if (rc == acl::kSuccess) rc = acl_.aclrtRecordEvent(event, link->stream);
      if (rc != acl::kSuccess) st = acl::Error(acl_, rc, "recording the batch's completion event");
    }
    if (!st.ok()) {
      if (event != nullptr) acl_.aclrtDestroyEvent(event);
      std::lock_guard<std::mutex> lock(mu_);
      // Operations posted before the failure would pair with the wrong ones later.
      if (posted > 0) Break(link.get(), "an HCCL post failed midway: " + st.message());
      Finish(batch, st);
      return;
    }
    std::lock_guard<std::mutex> lock(mu_);
    active_.push_back(Active{batch, link, event, false});
    wake_.notify_all();
  }

  // Caller holds mu_. One pass; returns whether anything changed.
  bool PollOnce(std::vector<std::pair<std::shared_ptr<Batch>, Status>>* report,
                std::vector<std::shared_ptr<Link>>* teardown) {
    bool progress = false;
    for (auto it = active_.begin(); it != active_.end();) {
      Active& a = *it;
      if (a.reported && a.link->stream == nullptr) {
        // Its link was torn down: the stream (and what was recorded on it) is gone.
        it = active_.erase(it);
        progress = true;
        continue;
      }
      bool complete = false;
      Status st = acl::QueryEvent(acl_, a.event, &complete);
      hc::HcclResult async = hc::kSuccess;
      if (st.ok() && hccl_.HcclGetCommAsyncError != nullptr) {
        hc::HcclResult async_rc = hccl_.HcclGetCommAsyncError(a.link->comm, &async);
        if (async_rc != hc::kSuccess) async = async_rc;
      }
      if (st.ok() && async != hc::kSuccess) st = hc::Error(hccl_, async, "HCCL (asynchronous)");
      if (!a.reported) {
        if (!st.ok()) {
          Break(a.link.get(), st.message());
          report->emplace_back(a.batch, st);
          a.reported = true;
          progress = true;
        } else if (complete) {
          a.batch->bytes_done.store(a.batch->bytes, std::memory_order_relaxed);
          report->emplace_back(a.batch, Status::Ok());
          a.reported = true;
          progress = true;
        } else if (a.batch->StopCode() != Code::kOk || a.link->broken) {
          Break(a.link.get(), "a batch to peer '" + a.batch->peer->name +
                                  "' was stopped while HCCL operations were posted (HCCL cannot cancel them)");
          report->emplace_back(a.batch, Status());
          a.reported = true;
          progress = true;
        }
      }
      if (a.link->broken && a.link->comm != nullptr) teardown->push_back(a.link);
      if (complete || (!st.ok() && a.reported)) {
        acl_.aclrtDestroyEvent(a.event);
        it = active_.erase(it);
        progress = true;
        continue;
      }
      ++it;
    }
    for (auto& l : retire_) teardown->push_back(l);
    retire_.clear();
    return progress;
  }

  void OnPollerThread() override {
    acl::BindThread(device_);  // every ACL call of the poller runs on its thread
  }

  bool HasWork() const override { return !active_.empty() || !retire_.empty(); }

  Pass PollPass(std::unique_lock<std::mutex>& lock) override {
    std::vector<std::pair<std::shared_ptr<Batch>, Status>> report;
    std::vector<std::shared_ptr<Link>> teardown;
    bool progress = PollOnce(&report, &teardown);
    lock.unlock();
    for (auto& [b, st] : report) Finish(b, st);
    for (auto& l : teardown) Teardown(l);
    lock.lock();
    return progress ? Pass::kProgress : Pass::kNoProgress;
  }

  // Destroys the communicator (which fails what is still queued on it), drains the
  // stream for a bounded time and destroys it. Idempotent.
  void Teardown(const std::shared_ptr<Link>& link) {
    hc::HcclComm comm;
    acl::aclrtStream stream;
    {
      std::lock_guard<std::mutex> op(link->op_mu);  // waits for a post in progress
      std::lock_guard<std::mutex> lock(mu_);
      comm = link->comm;
      stream = link->stream;
      link->comm = nullptr;
      link->stream = nullptr;
    }
    if (comm == nullptr && stream == nullptr) return;
    if (!acl::BindThread(device_).ok()) return;
    if (comm != nullptr) hccl_.HcclCommDestroy(comm);
    if (stream == nullptr) return;
    acl::aclrtEvent e = nullptr;
    bool drained = false;
    if (acl_.aclrtCreateEvent(&e) == acl::kSuccess && acl_.aclrtRecordEvent(e, stream) == acl::kSuccess) {
      drained = vendor::PollUntil([&](bool* done) { return acl::QueryEvent(acl_, e, done); }, kTeardownWaitMs, "hccl stream").ok();
    }
    if (e != nullptr && drained) acl_.aclrtDestroyEvent(e);
    if (!drained && acl_.aclrtDestroyStreamForce != nullptr) {
      acl_.aclrtDestroyStreamForce(stream);
    } else {
      acl_.aclrtDestroyStream(stream);
    }
  }

  Device* device_;
  const acl::Api& acl_;
  const hc::Api& hccl_;

  uint64_t next_link_ = 1;
  std::unordered_map<uint64_t, std::shared_ptr<Link>> unclaimed_;  // joined, no peer yet
  std::unordered_map<Peer*, std::shared_ptr<Link>> links_;
  std::vector<std::shared_ptr<Link>> retire_;  // removed peers' links, torn down by the poller
  std::unordered_map<uint64_t, std::shared_ptr<Batch>> held_;
  std::vector<Active> active_;
};

}  // namespace

Status CreateHcclTransport(Device* device, BatchDone done, std::unique_ptr<HcclTransport>* out) {
  const acl::Runtime* acl_rt = acl::RuntimeOf(device);
  if (acl_rt == nullptr) {
    return Status(Code::kBackendUnavailable, std::string("the hccl transport needs an acl device; this engine's device is ") +
                                                 device->kind());
  }
  const hc::Runtime* rt = hc::Load();
  if (rt->lib.why != vendor::Unavailable::kNone) return vendor::UnavailableStatus("hccl", rt->lib.reason);
  out->reset(new HcclTransportImpl(device, acl_rt, rt, std::move(done)));
  return Status::Ok();
}

}  // namespace epd
