// The JS face of the encoder-cache store (lib/ec/store.ts is its only user).
#pragma once

#include <napi.h>

namespace epd {

// class NativeEcStore(name, options)
Napi::Function DefineEcStore(Napi::Env env);
// reclaimStaleEcStores() -> number of stores removed
Napi::Value ReclaimStaleEcStores(const Napi::CallbackInfo& info);

}  // namespace epd
