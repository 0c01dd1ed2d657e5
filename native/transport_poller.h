// What the vendor transports (transport_hccl.cc, transport_mooncake.cc) share. Neither
// library can block until its work completes, so each transport runs one poller
// thread that asks the library about the batches in flight, backing off from 20 µs to
// 1 ms while nothing changes (vendor/poll.h), and reports each batch once through
// BatchDone. The thread's lifecycle, the loop and the report live here; a transport
// fills in one pass over its own work.
#pragma once

#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>

#include "transport.h"
#include "vendor/poll.h"

namespace epd {

template <class Interface>
class PollingTransport : public Interface {
 protected:
  explicit PollingTransport(BatchDone done) : done_(std::move(done)) {}
  // A subclass's destructor stops the poller (StopPoller, from its Shutdown): the
  // hooks the thread calls are gone by the time this destructor runs.
  ~PollingTransport() override = default;

  // Starts the poller. Called last in a subclass's constructor: the thread calls its hooks.
  void StartPoller() { poller_ = std::thread([this] { Loop(); }); }

  // Asks the poller to stop and joins it; false when it had been stopped already.
  bool StopPoller() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stopping_) return false;
      stopping_ = true;
    }
    wake_.notify_all();
    if (poller_.joinable()) poller_.join();
    return true;
  }

  // Reports a batch to the engine, failed with `st` unless it is OK.
  void Finish(const std::shared_ptr<Batch>& batch, const Status& st) {
    if (!st.ok()) batch->Fail(st);
    done_(batch);
  }

  // --- hooks, on the poller thread ------------------------------------------------
  enum class Pass { kNoProgress, kProgress, kAgain };
  // Once, before the first pass, without mu_.
  virtual void OnPollerThread() {}
  // With mu_ held: is there anything to poll? The poller sleeps on wake_ until there is.
  virtual bool HasWork() const = 0;
  // With mu_ held (it may unlock `lock` to call into the library or to report): one
  // pass over the work. kAgain: run the next pass at once, without a pause.
  virtual Pass PollPass(std::unique_lock<std::mutex>& lock) = 0;

  BatchDone done_;
  std::mutex mu_;
  std::condition_variable wake_;  // the poller: new work, a stop request, shutdown
  bool stopping_ = false;

 private:
  void Loop() {
    OnPollerThread();
    vendor::Backoff backoff;
    std::unique_lock<std::mutex> lock(mu_);
    while (!stopping_) {
      if (!HasWork()) {
        wake_.wait(lock, [this] { return stopping_ || HasWork(); });
        backoff.Reset();
        continue;
      }
      const Pass pass = PollPass(lock);
      if (pass == Pass::kAgain) {
        backoff.Reset();
        continue;
      }
      if (pass == Pass::kProgress) {
        backoff.Reset();
      } else {
        backoff.Grow();
      }
      wake_.wait_for(lock, backoff.pause());
    }
  }

  std::thread poller_;
};

}  // namespace epd
