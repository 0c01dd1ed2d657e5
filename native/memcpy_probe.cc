// The reference every transfer figure is printed beside: single-thread memcpy
// bandwidth over a given working set, measured in the same run.
#include <napi.h>

#include <chrono>
#include <cstring>

#include "util/napi_util.h"

namespace epd {

// memcpyBandwidth(dst, src, blockBytes, minMillis) -> GB/s (1e9 bytes/s).
// Copies block after block with offsets rotating through the whole of src/dst, so a
// working set larger than the caches gives a DRAM-bound figure.
Napi::Value MemcpyBandwidth(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint8_t *dst = nullptr, *src = nullptr;
  size_t dst_len = 0, src_len = 0;
  if (info.Length() < 4 || !BytesOf(info[0], &dst, &dst_len) || !BytesOf(info[1], &src, &src_len)) {
    Throw(env, Code::kBadArgument, "memcpyBandwidth(dst, src, blockBytes, minMillis)");
  }
  uint64_t block = ArgIndex(info, 2, "blockBytes");
  uint64_t min_ms = ArgIndex(info, 3, "minMillis");
  size_t span = std::min(dst_len, src_len);
  if (block == 0 || block > span) Throw(env, Code::kBadArgument, "blockBytes must be in 1..min(dst, src) length");
  size_t slots = span / block;
  using Clock = std::chrono::steady_clock;
  auto start = Clock::now();
  auto deadline = start + std::chrono::milliseconds(min_ms);
  uint64_t bytes = 0;
  size_t slot = 0;
  do {
    for (int i = 0; i < 16; ++i) {
      std::memcpy(dst + slot * block, src + slot * block, block);
      bytes += block;
      slot = slot + 1 == slots ? 0 : slot + 1;
    }
  } while (Clock::now() < deadline);
  double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  return Napi::Number::New(env, static_cast<double>(bytes) / seconds / 1e9);
}

}  // namespace epd
