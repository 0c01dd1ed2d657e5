// Waiting on vendor work that offers only a non-blocking query (cuEventQuery,
// aclrtQueryEventStatus, Mooncake's getTransferStatus): query, then sleep with a
// growing backoff.
#pragma once

#include <algorithm>
#include <chrono>
#include <string>
#include <thread>

#include "util/status.h"

namespace epd {
namespace vendor {

// The pause between two queries: 20 µs at first and after progress, so short waits
// stay short, doubling to 1 ms while nothing changes, so long ones cost little CPU.
class Backoff {
 public:
  std::chrono::microseconds pause() const { return pause_; }
  void Reset() { pause_ = kFirst; }
  void Grow() { pause_ = std::min<std::chrono::microseconds>(pause_ * 2, kLast); }

 private:
  static constexpr std::chrono::microseconds kFirst{20};
  static constexpr std::chrono::microseconds kLast{1000};
  std::chrono::microseconds pause_ = kFirst;
};

// Calls `query(bool* done)` until it reports done, fails, or `timeout_ms` passes
// (ERR_TIMEOUT naming `what`).
template <typename Query>
Status PollUntil(Query query, int64_t timeout_ms, const std::string& what) {
  using Clock = std::chrono::steady_clock;
  const auto deadline = Clock::now() + std::chrono::milliseconds(std::max<int64_t>(timeout_ms, 0));
  Backoff backoff;
  for (;;) {
    bool done = false;
    EPD_RETURN_IF_ERROR(query(&done));
    if (done) return Status::Ok();
    if (Clock::now() >= deadline) {
      return Status(Code::kTimeout, what + " did not complete within " + std::to_string(timeout_ms) + " ms");
    }
    std::this_thread::sleep_for(backoff.pause());
    backoff.Grow();
  }
}

}  // namespace vendor
}  // namespace epd
