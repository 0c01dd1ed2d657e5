// Deadline-bounded waiting on vendor work that offers only a non-blocking query
// (cuEventQuery, aclrtQueryEventStatus): query, then sleep with a growing backoff.
#pragma once

#include <algorithm>
#include <chrono>
#include <string>
#include <thread>

#include "util/status.h"

namespace epd {
namespace vendor {

// Calls `query(bool* done)` until it reports done, fails, or `timeout_ms` passes
// (ERR_TIMEOUT naming `what`). The sleep starts at 20 µs, so short waits stay short,
// and grows to 1 ms, so long ones cost little CPU.
template <typename Query>
Status PollUntil(Query query, int64_t timeout_ms, const std::string& what) {
  using Clock = std::chrono::steady_clock;
  const auto deadline = Clock::now() + std::chrono::milliseconds(std::max<int64_t>(timeout_ms, 0));
  auto pause = std::chrono::microseconds(20);
  for (;;) {
    bool done = false;
    EPD_RETURN_IF_ERROR(query(&done));
    if (done) return Status::Ok();
    if (Clock::now() >= deadline) {
      return Status(Code::kTimeout, what + " did not complete within " + std::to_string(timeout_ms) + " ms");
    }
    std::this_thread::sleep_for(pause);
    pause = std::min<std::chrono::microseconds>(pause * 2, std::chrono::milliseconds(1));
  }
}

}  // namespace vendor
}  // namespace epd
