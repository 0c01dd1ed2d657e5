// JS <-> LinkSpec: the link options object lib/engine.ts hands to the addon, and
// linkSchedule(), which exposes the deterministic link model to tests and benches.
#pragma once

#include <napi.h>

#include "transport.h"

namespace epd {

// { bandwidth (B/s), latencyUs, jitterUs, seed, dropAfterBytes?, delayIndex?, delayMs? }
LinkSpec ParseLinkSpec(Napi::Env env, Napi::Value value);

// linkSchedule(spec, sizes: number[]): arrival of each message in microseconds when
// all are offered at time 0 — what the emulator would do, without waiting.
Napi::Value LinkSchedule(const Napi::CallbackInfo& info);

}  // namespace epd
