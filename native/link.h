// Link emulation: a transport wrapper that paces the real transfers of any
// transport (shm, tcp, ...) to an emulated link of a given bandwidth, latency and
// jitter, so layerwise scheduling can be studied at HCCS/RoCE-like speeds on a CPU
// box. Also fault injection for reliability tests: drop the peer after N bytes,
// hold one descriptor back.
//
// Model (LinkModel, deterministic for a seed): a batch is cut into messages of at
// most kLinkQuantum bytes. The link serialises messages: a message offered at t
// starts at max(t, link busy until), occupies the link for bytes / bandwidth, and
// arrives latency ± U(jitter) later, never before the message ahead of it. Each
// message is handed to the inner transport at its arrival time, so bytes land in
// the target progressively, as on a real link; the batch completes when the
// inner transport has moved its last message.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "transport.h"

namespace epd {

// Messages are at most this big: small enough that pacing is smooth at tens of
// GB/s, large enough that the inner transport still moves big pieces.
constexpr size_t kLinkQuantum = 256 * 1024;

class LinkModel {
 public:
  explicit LinkModel(const LinkSpec& spec);
  // A message of `bytes` offered at `now_ns` (monotonic ns): when its last byte
  // arrives.
  int64_t Send(int64_t now_ns, uint64_t bytes);

 private:
  double Uniform();  // [0, 1), from the seeded generator

  LinkSpec spec_;
  uint64_t rng_;
  int64_t busy_until_ = 0;
  int64_t last_arrival_ = 0;
};

// One thread per engine that runs timed callbacks for every emulated link.
class LinkTimer {
 public:
  LinkTimer();
  ~LinkTimer();
  LinkTimer(const LinkTimer&) = delete;
  LinkTimer& operator=(const LinkTimer&) = delete;

  // Runs `fn` on the timer thread at `when_ns` (monotonic). False after Shutdown():
  // `fn` will not run, and the caller must settle without the timer.
  bool At(int64_t when_ns, std::function<void()> fn);
  // Runs every pending callback now, then joins the thread. Idempotent.
  void Shutdown();

 private:
  void Loop();

  std::mutex mu_;
  std::condition_variable cv_;
  std::multimap<int64_t, std::function<void()>> events_;
  bool stopping_ = false;
  std::thread thread_;
};

int64_t MonotonicNs();

// Wraps `inner` for one peer. `done` receives finished caller batches (the engine's
// completion); children cut from them go through `inner`.
std::shared_ptr<Transport> CreateLinkTransport(Transport* inner, const LinkSpec& spec, LinkTimer* timer,
                                               BatchDone done);

}  // namespace epd
