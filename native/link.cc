#include "link.h"

#include <sys/prctl.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <queue>
#include <unordered_map>

namespace epd {

int64_t MonotonicNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// ---------------------------------------------------------------------------------
// LinkModel

LinkModel::LinkModel(const LinkSpec& spec) : spec_(spec), rng_(spec.seed) {}

double LinkModel::Uniform() {
  // splitmix64: every seed, 0 included, gives a full-quality stream.
  uint64_t z = (rng_ += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<double>(z >> 11) * 0x1.0p-53;
}

int64_t LinkModel::Send(int64_t now_ns, uint64_t bytes) {
  const int64_t start = std::max(now_ns, busy_until_);
  const int64_t wire = spec_.bandwidth > 0 ? std::llround(static_cast<double>(bytes) * 1e9 / spec_.bandwidth) : 0;
  busy_until_ = start + wire;
  double delay = spec_.latency;
  if (spec_.jitter > 0) delay += (2 * Uniform() - 1) * spec_.jitter;
  if (delay < 0) delay = 0;
  // A link does not reorder: a message never arrives before the one ahead of it.
  const int64_t arrival = std::max<int64_t>(busy_until_ + std::llround(delay * 1e9), last_arrival_);
  last_arrival_ = arrival;
  return arrival;
}

// ---------------------------------------------------------------------------------
// LinkTimer

LinkTimer::LinkTimer() : thread_([this] { Loop(); }) {}

LinkTimer::~LinkTimer() { Shutdown(); }

bool LinkTimer::At(int64_t when_ns, std::function<void()> fn) {
  std::lock_guard<std::mutex> lock(mu_);
  if (stopping_) return false;
  auto it = events_.emplace(when_ns, std::move(fn));
  if (it == events_.begin()) cv_.notify_one();
  return true;
}

void LinkTimer::Loop() {
  // Default timer slack is 50 us; emulated latencies are a few microseconds.
  prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    if (stopping_) return;
    if (events_.empty()) {
      cv_.wait(lock);
      continue;
    }
    const int64_t when = events_.begin()->first;
    if (when > MonotonicNs()) {
      cv_.wait_until(lock, std::chrono::steady_clock::time_point(std::chrono::nanoseconds(when)));
      continue;
    }
    auto fn = std::move(events_.begin()->second);
    events_.erase(events_.begin());
    lock.unlock();
    fn();
    lock.lock();
  }
}

void LinkTimer::Shutdown() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_ && !thread_.joinable()) return;
    stopping_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
  for (;;) {
    std::multimap<int64_t, std::function<void()>> rest;
    {
      std::lock_guard<std::mutex> lock(mu_);
      rest.swap(events_);
    }
    if (rest.empty()) break;
    for (auto& [when, fn] : rest) fn();
  }
}

// ---------------------------------------------------------------------------------
// LinkTransport

namespace {

class LinkTransport final : public Transport, public std::enable_shared_from_this<LinkTransport> {
 public:
  LinkTransport(Transport* inner, const LinkSpec& spec, LinkTimer* timer, BatchDone done)
      : inner_(inner), spec_(spec), model_(spec), timer_(timer), done_(std::move(done)) {}

  const char* name() const override { return inner_->name(); }
  Status Attach(const RemoteRegionSpec& spec, RemoteRegion* out) override { return inner_->Attach(spec, out); }
  void Detach(RemoteRegion* region) override { inner_->Detach(region); }
  Status AddPeer(const std::shared_ptr<Peer>& peer) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      peer_ = peer;
    }
    return inner_->AddPeer(peer);
  }
  void RemovePeer(Peer* peer) override { inner_->RemovePeer(peer); }
  void Sever(Peer* peer) override { inner_->Sever(peer); }

  void Run(std::shared_ptr<Batch> batch) override {
    auto p = std::make_shared<Pending>();
    p->batch = batch;
    int64_t wake = 0;
    bool dropped;
    {
      std::lock_guard<std::mutex> lock(mu_);
      dropped = dropped_;
      if (!dropped) {
        const int64_t now = MonotonicNs();
        for (const Piece& piece : batch->pieces) {
          const int64_t extra = descriptors_++ == spec_.delay_index ? std::llround(spec_.delay * 1e9) : 0;
          for (size_t off = 0; off < piece.length;) {
            if (offered_ >= spec_.drop_after) {  // beyond the drop: never sent
              p->doomed = true;
              break;
            }
            size_t n = std::min(kLinkQuantum, piece.length - off);
            n = static_cast<size_t>(std::min<uint64_t>(n, spec_.drop_after - offered_));
            offered_ += n;
            Piece sub = piece;
            sub.local += off;
            if (sub.remote != nullptr) sub.remote += off;
            sub.remote_offset += off;
            sub.length = n;
            heap_.push(Message{model_.Send(now, n) + extra, seq_++, p, sub});
            p->unreleased++;
            off += n;
          }
        }
        pending_[batch.get()] = p;
        wake = NextWakeLocked();
      }
    }
    if (dropped) {
      batch->RequestStop(Code::kPeerLost);
      done_(batch);
      return;
    }
    if (wake != 0) Wake(wake);
    // A batch wholly beyond the drop point has nothing to send: it waits for the drop.
    CheckDrop();
  }

  void Stop(const std::shared_ptr<Batch>& batch, Code code) override {
    std::vector<std::shared_ptr<Batch>> children;
    bool finished = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = pending_.find(batch.get());
      if (it == pending_.end()) return;
      Pending& p = *it->second;
      p.stopped = true;
      children = p.children;
      finished = FinishLocked(it->second);
    }
    for (auto& c : children) inner_->Stop(c, code);
    if (finished) done_(batch);
  }

 private:
  struct Pending {
    std::shared_ptr<Batch> batch;
    size_t unreleased = 0;                          // messages not yet handed on
    std::vector<std::shared_ptr<Batch>> children;   // handed on, not yet done
    bool doomed = false;  // has bytes beyond the drop point: can only fail
    bool stopped = false;
    bool finished = false;
  };
  struct Message {
    int64_t arrival;
    uint64_t seq;
    std::shared_ptr<Pending> owner;
    Piece piece;
  };
  struct Later {
    bool operator()(const Message& a, const Message& b) const {
      return a.arrival != b.arrival ? a.arrival > b.arrival : a.seq > b.seq;
    }
  };

  static bool Halted(const Pending& p) {
    return p.stopped || p.batch->StopCode() != Code::kOk || !p.batch->status().ok();
  }

  // True (once) when the batch has nothing left in the link or the inner transport.
  bool FinishLocked(const std::shared_ptr<Pending>& p) {
    if (p->finished || !p->children.empty()) return false;
    if ((p->unreleased != 0 || p->doomed) && !Halted(*p)) return false;
    p->finished = true;
    pending_.erase(p->batch.get());
    return true;
  }

  // The earliest arrival not yet covered by a timer event, or 0.
  int64_t NextWakeLocked() {
    if (heap_.empty()) return 0;
    const int64_t next = heap_.top().arrival;
    if (next >= wake_at_) return 0;
    wake_at_ = next;
    return next;
  }

  void Wake(int64_t when) {
    if (!timer_->At(when, [self = shared_from_this()] { self->Pump(false); })) Pump(true);
  }

  // Timer thread: hands every message that has arrived to the inner transport, one
  // child batch per caller batch. `closing` (the engine shuts down, the timer is
  // gone): every message still in the link is dropped and its batch fails.
  void Pump(bool closing) {
    std::vector<std::shared_ptr<Batch>> children;
    std::vector<std::shared_ptr<Pending>> finished;
    int64_t wake = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      wake_at_ = INT64_MAX;
      const int64_t now = closing ? INT64_MAX : MonotonicNs();
      std::unordered_map<Pending*, std::shared_ptr<Batch>> cut;
      while (!heap_.empty() && heap_.top().arrival <= now) {
        Message m = heap_.top();
        heap_.pop();
        Pending& p = *m.owner;
        if (p.finished) continue;
        p.unreleased--;
        if (closing) p.batch->RequestStop(Code::kClosed);
        if (Halted(p)) {
          if (FinishLocked(m.owner)) finished.push_back(m.owner);
          continue;
        }
        std::shared_ptr<Batch>& child = cut[&p];
        if (!child) {
          child = std::make_shared<Batch>();
          child->id = p.batch->id;
          child->op = p.batch->op;
          child->peer = p.batch->peer;
          child->parent = p.batch;
          std::weak_ptr<LinkTransport> weak = shared_from_this();
          std::shared_ptr<Pending> owner = m.owner;
          child->on_done = [weak, owner](std::shared_ptr<Batch> c) {
            if (auto self = weak.lock()) self->OnChildDone(owner, std::move(c));
          };
          p.children.push_back(child);
          children.push_back(child);
        }
        child->pieces.push_back(m.piece);
        child->bytes += m.piece.length;
        child->descriptors++;
      }
      if (!closing) wake = NextWakeLocked();
    }
    if (wake != 0) Wake(wake);
    for (auto& c : children) inner_->Run(c);
    for (auto& p : finished) done_(p->batch);
  }

  void OnChildDone(const std::shared_ptr<Pending>& owner, std::shared_ptr<Batch> child) {
    Batch& parent = *owner->batch;
    const uint64_t moved = child->bytes_done.load();
    parent.bytes_done.fetch_add(moved);
    Status st = child->status();
    if (!st.ok()) parent.Fail(st);
    // A stop the inner transport raised on the child (peer gone) stops the parent.
    const int own = child->abort_code.load();
    if (own != 0) parent.RequestStop(static_cast<Code>(own));
    bool finished;
    {
      std::lock_guard<std::mutex> lock(mu_);
      delivered_ += moved;
      auto& kids = owner->children;
      kids.erase(std::remove(kids.begin(), kids.end(), child), kids.end());
      finished = FinishLocked(owner);
    }
    CheckDrop();
    if (finished) done_(owner->batch);
  }

  // Fault injection: once `drop_after` bytes were delivered, the peer is cut off as
  // if its connection had dropped.
  void CheckDrop() {
    std::vector<std::shared_ptr<Pending>> victims;
    std::shared_ptr<Peer> peer;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (dropped_ || spec_.drop_after == UINT64_MAX || delivered_ < spec_.drop_after) return;
      dropped_ = true;
      for (auto& [b, p] : pending_) victims.push_back(p);
      peer = peer_.lock();
    }
    if (peer) {
      int expected = 0;
      peer->lost.compare_exchange_strong(expected, static_cast<int>(Code::kPeerLost));
      inner_->Sever(peer.get());
    }
    for (auto& v : victims) {
      v->batch->RequestStop(Code::kPeerLost);
      Stop(v->batch, Code::kPeerLost);
    }
  }

  Transport* inner_;
  const LinkSpec spec_;
  LinkModel model_;
  LinkTimer* timer_;
  BatchDone done_;

  std::mutex mu_;
  std::weak_ptr<Peer> peer_;
  std::priority_queue<Message, std::vector<Message>, Later> heap_;
  std::unordered_map<Batch*, std::shared_ptr<Pending>> pending_;
  uint64_t seq_ = 0;
  uint64_t descriptors_ = 0;
  uint64_t offered_ = 0;
  uint64_t delivered_ = 0;
  bool dropped_ = false;
  int64_t wake_at_ = INT64_MAX;
};

}  // namespace

std::shared_ptr<Transport> CreateLinkTransport(Transport* inner, const LinkSpec& spec, LinkTimer* timer,
                                               BatchDone done) {
  return std::make_shared<LinkTransport>(inner, spec, timer, std::move(done));
}

}  // namespace epd
