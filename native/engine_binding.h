// The JS face of Engine (and of its device), one instance per TransferEngine.
#pragma once

#include <napi.h>

#include <atomic>
#include <memory>
#include <unordered_map>
#include <vector>

#include "engine.h"

namespace epd {

class EngineWrap : public Napi::ObjectWrap<EngineWrap> {
 public:
  static Napi::Function Define(Napi::Env env);
  explicit EngineWrap(const Napi::CallbackInfo& info);
  ~EngineWrap() override;

  // Throws ERR_CLOSED after close().
  Engine* engine(Napi::Env env);
  std::shared_ptr<Device> device() { return device_; }
  std::shared_ptr<std::atomic<bool>> closed_flag() { return closed_; }

  // Completion channel: workers -> thread-safe function -> Drain on the JS thread.
  void Drain(Napi::Env env);

 private:
  struct Channel {
    EngineWrap* owner;
  };
  static void CallJs(Napi::Env env, Napi::Function, Channel* channel, void*);
  using Tsfn = Napi::TypedThreadSafeFunction<Channel, void, CallJs>;

  Napi::Value Allocate(const Napi::CallbackInfo& info);
  Napi::Value Register(const Napi::CallbackInfo& info);
  Napi::Value RegisterDevice(const Napi::CallbackInfo& info);
  Napi::Value Free(const Napi::CallbackInfo& info);
  Napi::Value Segment(const Napi::CallbackInfo& info);
  Napi::Value AddPeer(const Napi::CallbackInfo& info);
  Napi::Value UpdatePeer(const Napi::CallbackInfo& info);
  Napi::Value DropPeer(const Napi::CallbackInfo& info);
  Napi::Value Submit(const Napi::CallbackInfo& info);
  Napi::Value Abort(const Napi::CallbackInfo& info);
  Napi::Value Counters(const Napi::CallbackInfo& info);
  Napi::Value InFlight(const Napi::CallbackInfo& info);
  Napi::Value Close(const Napi::CallbackInfo& info);
  Napi::Value DeviceAlloc(const Napi::CallbackInfo& info);
  Napi::Value DeviceFree(const Napi::CallbackInfo& info);
  Napi::Value DeviceWrite(const Napi::CallbackInfo& info);
  Napi::Value DeviceRead(const Napi::CallbackInfo& info);
  Napi::Value DeviceIpcExport(const Napi::CallbackInfo& info);
  Napi::Value DeviceIpcImport(const Napi::CallbackInfo& info);
  Napi::Value DeviceIpcClose(const Napi::CallbackInfo& info);
  Napi::Value CreateStream(const Napi::CallbackInfo& info);
  Napi::Value CreateEvent(const Napi::CallbackInfo& info);
  Napi::Value WrapEvent(const Napi::CallbackInfo& info);
  Napi::Value DeviceInfo(const Napi::CallbackInfo& info);
  Napi::Value DeviceIpcProcessId(const Napi::CallbackInfo& info);
  Napi::Value DeviceIpcAllow(const Napi::CallbackInfo& info);
  Napi::Value MooncakeStart(const Napi::CallbackInfo& info);
  Napi::Value HcclEnable(const Napi::CallbackInfo& info);
  Napi::Value HcclRootInfo(const Napi::CallbackInfo& info);
  Napi::Value HcclJoin(const Napi::CallbackInfo& info);
  Napi::Value HcclRelease(const Napi::CallbackInfo& info);
  Napi::Value HcclDiscard(const Napi::CallbackInfo& info);
  Napi::Value TcpListen(const Napi::CallbackInfo& info);
  Napi::Value TcpGrant(const Napi::CallbackInfo& info);
  Napi::Value TcpRevoke(const Napi::CallbackInfo& info);
  Napi::Value TcpStats(const Napi::CallbackInfo& info);
  Napi::Value ConnectPeer(const Napi::CallbackInfo& info);

  void Shutdown(Napi::Env env);
  void UpdateLoopRef(Napi::Env env);
  void SettleFrees(Napi::Env env);

  std::unique_ptr<Engine> engine_;
  std::shared_ptr<Device> device_;
  std::shared_ptr<std::atomic<bool>> closed_ = std::make_shared<std::atomic<bool>>(false);
  Channel* channel_ = nullptr;
  Tsfn tsfn_;
  bool loop_ref_ = false;
  std::unordered_map<uint64_t, Napi::Promise::Deferred> pending_;
  std::unordered_map<uint32_t, std::vector<Napi::Promise::Deferred>> frees_;
  Napi::Reference<Napi::ArrayBuffer> counters_view_;
};

Napi::Function DefineStream(Napi::Env env);
Napi::Function DefineEvent(Napi::Env env);

}  // namespace epd
