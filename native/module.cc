// Addon entry: defines the classes and free functions lib/native.ts declares.
#include <napi.h>

#include "ec_binding.h"
#include "engine_binding.h"
#include "link_binding.h"
#include "shm.h"
#include "util/napi_util.h"

namespace epd {

Napi::Value MemcpyBandwidth(const Napi::CallbackInfo& info);
Napi::Value VendorBackends(const Napi::CallbackInfo& info);
Napi::Value HmacSha256Js(const Napi::CallbackInfo& info);
Napi::Value TcpPump(const Napi::CallbackInfo& info);
Napi::Value TcpPumpReceiver(const Napi::CallbackInfo& info);
Napi::Value TcpPumpReceiverClose(const Napi::CallbackInfo& info);
Napi::Value TcpPumpSend(const Napi::CallbackInfo& info);

namespace {

// setErrorClass(TransferError): errors built in C++ become instances of it.
Napi::Value SetErrorClass(const Napi::CallbackInfo& info) {
  if (info.Length() < 1 || !info[0].IsFunction()) {
    Throw(info.Env(), Code::kBadArgument, "Expected a constructor for setErrorClass");
  }
  State(info.Env())->error_class = Napi::Persistent(info[0].As<Napi::Function>());
  return info.Env().Undefined();
}

Napi::Value ReclaimStale(const Napi::CallbackInfo& info) {
  int removed = 0;
  Check(info.Env(), ReclaimStaleShm(&removed));
  return Napi::Number::New(info.Env(), removed);
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  auto* state = new AddonState();
  env.SetInstanceData(state);  // deleted with the environment
  Napi::Function engine = EngineWrap::Define(env);
  Napi::Function stream = DefineStream(env);
  Napi::Function event = DefineEvent(env);
  state->engine_class = Napi::Persistent(engine);
  state->stream_class = Napi::Persistent(stream);
  state->event_class = Napi::Persistent(event);
  exports.Set("NativeEngine", engine);
  exports.Set("NativeStream", stream);
  exports.Set("NativeEvent", event);
  exports.Set("setErrorClass", Napi::Function::New<SetErrorClass>(env, "setErrorClass"));
  exports.Set("reclaimStaleShm", Napi::Function::New<ReclaimStale>(env, "reclaimStaleShm"));
  exports.Set("NativeEcStore", DefineEcStore(env));
  exports.Set("reclaimStaleEcStores", Napi::Function::New<ReclaimStaleEcStores>(env, "reclaimStaleEcStores"));
  exports.Set("memcpyBandwidth", Napi::Function::New<MemcpyBandwidth>(env, "memcpyBandwidth"));
  exports.Set("hmacSha256", Napi::Function::New<HmacSha256Js>(env, "hmacSha256"));
  exports.Set("tcpPump", Napi::Function::New<TcpPump>(env, "tcpPump"));
  exports.Set("tcpPumpReceiver", Napi::Function::New<TcpPumpReceiver>(env, "tcpPumpReceiver"));
  exports.Set("tcpPumpReceiverClose", Napi::Function::New<TcpPumpReceiverClose>(env, "tcpPumpReceiverClose"));
  exports.Set("tcpPumpSend", Napi::Function::New<TcpPumpSend>(env, "tcpPumpSend"));
  exports.Set("linkSchedule", Napi::Function::New<LinkSchedule>(env, "linkSchedule"));
  exports.Set("vendorBackends", Napi::Function::New<VendorBackends>(env, "vendorBackends"));
  exports.Set("wireVersion", Napi::Number::New(env, EPD_TRANSFER_WIRE_VERSION));
  exports.Set("napiVersion", Napi::Number::New(env, NAPI_VERSION));
  return exports;
}

}  // namespace
}  // namespace epd

static Napi::Object InitModule(Napi::Env env, Napi::Object exports) { return epd::Init(env, exports); }

NODE_API_MODULE(epd_transfer, InitModule)
