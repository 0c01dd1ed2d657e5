// JS faces of device streams and events (created by NativeEngine.createStream /
// createEvent). Waits that block (synchronize) run off the JS thread and resolve a
// promise; everything else is a cheap enqueue.
#include <napi.h>

#include "engine_binding.h"
#include "util/napi_util.h"

namespace epd {
namespace {

// Unwraps `v` only if it really is an instance of `cls` (unwrapping another wrapped
// class would reinterpret its memory).
template <typename T>
T* UnwrapAs(Napi::Env env, Napi::Value v, Napi::FunctionReference& cls, const char* what) {
  if (!v.IsObject() || !v.As<Napi::Object>().InstanceOf(cls.Value())) {
    Throw(env, Code::kBadArgument, std::string("Expected ") + what);
  }
  return Napi::ObjectWrap<T>::Unwrap(v.As<Napi::Object>());
}

class DeviceObject {
 protected:
  void Bind(const Napi::CallbackInfo& info) {
    if (info.Length() < 1) Throw(info.Env(), Code::kBadArgument, "created by the engine only");
    UnwrapAs<EngineWrap>(info.Env(), info[0], State(info.Env())->engine_class, "an engine");
    EngineWrap* owner = Napi::ObjectWrap<EngineWrap>::Unwrap(info[0].As<Napi::Object>());
    device_ = owner->device();
    closed_ = owner->closed_flag();
    owner_ref_ = Napi::Persistent(info[0].As<Napi::Object>());
  }
  void CheckOpen(Napi::Env env, bool destroyed) {
    if (closed_->load()) Throw(env, Code::kClosed, "engine is closed");
    if (destroyed) Throw(env, Code::kClosed, "already destroyed");
  }
  std::shared_ptr<Device> device_;
  std::shared_ptr<std::atomic<bool>> closed_;
  Napi::ObjectReference owner_ref_;  // the engine outlives its streams and events
};

// Runs a blocking device wait on the libuv pool and settles a promise.
class WaitWorker : public Napi::AsyncWorker {
 public:
  WaitWorker(Napi::Env env, std::function<Status()> wait)
      : Napi::AsyncWorker(env), wait_(std::move(wait)), deferred_(Napi::Promise::Deferred::New(env)) {}
  Napi::Promise Promise() { return deferred_.Promise(); }
  void Execute() override { status_ = wait_(); }
  void OnOK() override {
    if (status_.ok()) {
      deferred_.Resolve(Env().Undefined());
    } else {
      deferred_.Reject(MakeError(Env(), status_));
    }
  }
  void OnError(const Napi::Error& e) override { deferred_.Reject(e.Value()); }

 private:
  std::function<Status()> wait_;
  Napi::Promise::Deferred deferred_;
  Status status_;
};

int64_t TimeoutArg(const Napi::CallbackInfo& info, size_t i) {
  return static_cast<int64_t>(ArgIndex(info, i, "timeoutMs"));
}

class EventWrap;

class StreamWrap : public Napi::ObjectWrap<StreamWrap>, DeviceObject {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "NativeStream",
                       {InstanceMethod<&StreamWrap::Copy>("copy"), InstanceMethod<&StreamWrap::WaitEvent>("waitEvent"),
                        InstanceMethod<&StreamWrap::Sleep>("sleep"),
                        InstanceMethod<&StreamWrap::Synchronize>("synchronize"),
                        InstanceMethod<&StreamWrap::Destroy>("destroy")});
  }
  explicit StreamWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<StreamWrap>(info) {
    Bind(info);
    std::unique_ptr<Stream> s;
    Check(info.Env(), device_->CreateStream(&s));
    stream_ = std::shared_ptr<Stream>(std::move(s));
  }
  std::shared_ptr<Stream> stream(Napi::Env env) {
    CheckOpen(env, !stream_);
    return stream_;
  }
  Device* device() { return device_.get(); }

 private:
  Napi::Value Copy(const Napi::CallbackInfo& info) {
    auto s = stream(info.Env());
    Check(info.Env(), device_->CopyAsync(s.get(), ArgPointer(info, 0, "dst"), ArgPointer(info, 1, "src"),
                                         ArgIndex(info, 2, "bytes")));
    return info.Env().Undefined();
  }
  Napi::Value WaitEvent(const Napi::CallbackInfo& info);
  Napi::Value Sleep(const Napi::CallbackInfo& info) {
    auto s = stream(info.Env());
    Check(info.Env(), device_->SleepOnStream(s.get(), ArgIndex(info, 0, "micros")));
    return info.Env().Undefined();
  }
  Napi::Value Synchronize(const Napi::CallbackInfo& info) {
    auto s = stream(info.Env());
    int64_t timeout = TimeoutArg(info, 0);
    auto dev = device_;
    auto* w = new WaitWorker(info.Env(), [dev, s, timeout] { return dev->SynchronizeStream(s.get(), timeout); });
    auto p = w->Promise();
    w->Queue();
    return p;
  }
  Napi::Value Destroy(const Napi::CallbackInfo& info) {
    stream_.reset();  // drains the stream's queue (pending waits are cancelled)
    return info.Env().Undefined();
  }

  std::shared_ptr<Stream> stream_;
};

class EventWrap : public Napi::ObjectWrap<EventWrap>, DeviceObject {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "NativeEvent",
                       {InstanceMethod<&EventWrap::Record>("record"), InstanceMethod<&EventWrap::Query>("query"),
                        InstanceMethod<&EventWrap::Synchronize>("synchronize"),
                        InstanceMethod<&EventWrap::Handle>("handle"),
                        InstanceMethod<&EventWrap::Destroy>("destroy")});
  }
  // (engine) creates an event; (engine, handle) wraps a foreign one (Device::WrapEvent).
  explicit EventWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<EventWrap>(info) {
    Bind(info);
    std::unique_ptr<Event> e;
    if (info.Length() > 1) {
      Check(info.Env(), device_->WrapEvent(ArgPointer(info, 1, "event handle"), &e));
    } else {
      Check(info.Env(), device_->CreateEvent(&e));
    }
    event_ = std::shared_ptr<Event>(std::move(e));
  }
  std::shared_ptr<Event> event(Napi::Env env) {
    CheckOpen(env, !event_);
    return event_;
  }

 private:
  Napi::Value Record(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto e = event(env);
    auto s = UnwrapAs<StreamWrap>(env, info[0], State(env)->stream_class, "a stream for record")->stream(env);
    Check(env, device_->RecordEvent(e.get(), s.get()));
    return env.Undefined();
  }
  Napi::Value Query(const Napi::CallbackInfo& info) {
    auto e = event(info.Env());
    bool done = false;
    Check(info.Env(), device_->QueryEvent(e.get(), &done));
    return Napi::Boolean::New(info.Env(), done);
  }
  Napi::Value Synchronize(const Napi::CallbackInfo& info) {
    auto e = event(info.Env());
    int64_t timeout = TimeoutArg(info, 0);
    auto dev = device_;
    auto* w = new WaitWorker(info.Env(), [dev, e, timeout] { return dev->SynchronizeEvent(e.get(), timeout); });
    auto p = w->Promise();
    w->Queue();
    return p;
  }
  Napi::Value Handle(const Napi::CallbackInfo& info) {
    auto e = event(info.Env());
    return Napi::BigInt::New(info.Env(), e->native_handle());
  }
  Napi::Value Destroy(const Napi::CallbackInfo& info) {
    event_.reset();
    return info.Env().Undefined();
  }

  std::shared_ptr<Event> event_;
};

Napi::Value StreamWrap::WaitEvent(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto s = stream(env);
  auto e = UnwrapAs<EventWrap>(env, info[0], State(env)->event_class, "an event for waitEvent")->event(env);
  Check(env, device_->StreamWaitEvent(s.get(), e.get()));
  return env.Undefined();
}

}  // namespace

Napi::Function DefineStream(Napi::Env env) { return StreamWrap::Define(env); }
Napi::Function DefineEvent(Napi::Env env) { return EventWrap::Define(env); }

}  // namespace epd
