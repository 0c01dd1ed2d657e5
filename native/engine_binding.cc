#include "engine_binding.h"

#include <cstdio>
#include <cstdlib>

#include <unistd.h>

#include "link_binding.h"
#include "util/napi_util.h"

namespace epd {
namespace {

Code CodeFromName(const std::string& name) {
  for (int c = static_cast<int>(Code::kBadArgument); c <= static_cast<int>(Code::kLastCode); ++c) {
    if (name == CodeName(static_cast<Code>(c))) return static_cast<Code>(c);
  }
  return Code::kAborted;
}

std::vector<RemoteRegionSpec> ParseSpecs(Napi::Env env, Napi::Value v) {
  if (!v.IsArray()) Throw(env, Code::kBadArgument, "Expected an array of region descriptors");
  auto arr = v.As<Napi::Array>();
  std::vector<RemoteRegionSpec> specs;
  specs.reserve(arr.Length());
  for (uint32_t i = 0; i < arr.Length(); ++i) {
    Napi::Value e = arr.Get(i);
    if (!e.IsObject()) Throw(env, Code::kBadArgument, "Expected an object for region descriptor " + std::to_string(i));
    auto o = e.As<Napi::Object>();
    RemoteRegionSpec s;
    auto num = [&](const char* key, bool required) -> uint64_t {
      Napi::Value x = o.Get(key);
      if (x.IsUndefined() && !required) return 0;
      double d = x.IsNumber() ? x.As<Napi::Number>().DoubleValue() : -1;
      if (!(d >= 0 && d <= 9007199254740991.0) || static_cast<double>(static_cast<uint64_t>(d)) != d) {
        Throw(env, Code::kBadArgument, std::string("Expected a non-negative integer for region descriptor ") +
                                           std::to_string(i) + " " + key);
      }
      return static_cast<uint64_t>(d);
    };
    s.id = static_cast<uint32_t>(num("id", true));
    s.length = static_cast<size_t>(num("length", true));
    s.offset = num("offset", false);
    Napi::Value shm = o.Get("shm");
    if (shm.IsString()) s.shm = shm.As<Napi::String>().Utf8Value();
    Napi::Value key = o.Get("ipcKey");
    if (key.IsString()) s.ipc_key = key.As<Napi::String>().Utf8Value();
    // The region's address in the peer, for one-sided vendor transports: a hex string
    // (addresses may exceed 2^53).
    Napi::Value addr = o.Get("addr");
    if (addr.IsString()) {
      std::string a = addr.As<Napi::String>().Utf8Value();
      char* end = nullptr;
      s.addr = std::strtoull(a.c_str(), &end, 16);
      if (a.empty() || end == nullptr || *end != '\0') {
        Throw(env, Code::kBadArgument, "Expected a hex address for region descriptor " + std::to_string(i) + " addr");
      }
    }
    specs.push_back(std::move(s));
  }
  return specs;
}

// options.device: "host" (default) | "acl" | "cuda"; options.deviceId: the ordinal.
std::shared_ptr<Device> CreateDevice(Napi::Env env, Napi::Object o) {
  std::string kind = "host";
  int ordinal = 0;
  if (!o.IsEmpty()) {
    Napi::Value k = o.Get("device");
    if (!k.IsUndefined()) {
      if (!k.IsString()) Throw(env, Code::kBadArgument, "Expected \"host\", \"acl\" or \"cuda\" for device");
      kind = k.As<Napi::String>().Utf8Value();
    }
    Napi::Value id = o.Get("deviceId");
    if (!id.IsUndefined()) {
      double d = id.IsNumber() ? id.As<Napi::Number>().DoubleValue() : -1;
      if (!(d >= 0 && d <= 1024) || static_cast<double>(static_cast<int>(d)) != d) {
        Throw(env, Code::kBadArgument, "Expected an integer in [0, 1024] for deviceId");
      }
      ordinal = static_cast<int>(d);
    }
  }
  std::unique_ptr<Device> device;
  if (kind == "host") {
    if (ordinal != 0) Throw(env, Code::kBadArgument, "the host device has only deviceId 0");
    device = CreateHostDevice();
  } else if (kind == "acl") {
    Check(env, CreateAclDevice(ordinal, &device));
  } else if (kind == "cuda") {
    Check(env, CreateCudaDevice(ordinal, &device));
  } else {
    Throw(env, Code::kBadArgument, "Expected \"host\", \"acl\" or \"cuda\" for device but received \"" + kind + "\"");
  }
  return std::shared_ptr<Device>(std::move(device));
}

// addPeer's options: { transport, link, tcp } (lib/engine.ts builds them).
PeerConfig ParsePeerConfig(Napi::Env env, Napi::Value v) {
  PeerConfig config;
  if (v.IsUndefined()) return config;
  if (!v.IsObject()) Throw(env, Code::kBadArgument, "Expected an object for peer options");
  auto o = v.As<Napi::Object>();
  Napi::Value t = o.Get("transport");
  if (t.IsString()) config.transport = t.As<Napi::String>().Utf8Value();
  config.link = ParseLinkSpec(env, o.Get("link"));
  Napi::Value mooncake = o.Get("mooncake");
  if (mooncake.IsObject()) {
    Napi::Value seg = mooncake.As<Napi::Object>().Get("segment");
    if (seg.IsString()) config.vendor.mooncake_segment = seg.As<Napi::String>().Utf8Value();
  }
  Napi::Value hccl = o.Get("hccl");
  if (hccl.IsObject()) {
    auto ho = hccl.As<Napi::Object>();
    Napi::Value link = ho.Get("link");
    if (link.IsNumber()) config.vendor.hccl_link = static_cast<uint64_t>(link.As<Napi::Number>().Int64Value());
    config.vendor.hccl_initiator = ho.Get("initiator").ToBoolean().Value();
  }
  Napi::Value tcp = o.Get("tcp");
  if (tcp.IsObject()) {
    auto to = tcp.As<Napi::Object>();
    Napi::Value addrs = to.Get("addresses");
    if (addrs.IsArray()) {
      auto a = addrs.As<Napi::Array>();
      for (uint32_t i = 0; i < a.Length(); ++i) {
        Napi::Value e = a.Get(i);
        if (e.IsString()) config.tcp.addresses.push_back(e.As<Napi::String>().Utf8Value());
      }
    }
    uint8_t* data = nullptr;
    size_t length = 0;
    if (BytesOf(to.Get("grant"), &data, &length)) config.tcp.grant.assign(reinterpret_cast<char*>(data), length);
    if (BytesOf(to.Get("key"), &data, &length)) config.tcp.key.assign(reinterpret_cast<char*>(data), length);
    Napi::Value n = to.Get("connections");
    if (n.IsNumber()) config.tcp.connections = n.As<Napi::Number>().Int32Value();
    Napi::Value ct = to.Get("connectTimeoutMs");
    if (ct.IsNumber()) config.tcp.connect_timeout = ct.As<Napi::Number>().DoubleValue() / 1e3;
    if (config.tcp.connections < 1 || config.tcp.connections > 16) {
      Throw(env, Code::kBadArgument, "tcp connections must be in 1..16");
    }
  }
  return config;
}

// Dials a tcp peer's data connections on a libuv worker, then hands them to the
// engine on the JS thread. The worker touches only its own copy of the spec, so the
// engine may close meanwhile: the sockets are then closed instead.
class DialWorker : public Napi::AsyncWorker {
 public:
  DialWorker(Napi::Env env, EngineWrap* wrap, std::shared_ptr<std::atomic<bool>> closed, std::shared_ptr<Peer> peer,
             Napi::Object self)
      : Napi::AsyncWorker(env, "epd-transfer:dial"),
        deferred_(Napi::Promise::Deferred::New(env)),
        wrap_(wrap),
        closed_(std::move(closed)),
        peer_(std::move(peer)),
        spec_(peer_->tcp) {
    self_ = Napi::Persistent(self);  // keeps the EngineWrap alive until OnOK/OnError
  }
  Napi::Promise Promise() { return deferred_.Promise(); }

  void Execute() override { status_ = DialTcpPeer(spec_, &fds_); }

  void OnOK() override {
    Napi::Env env = Env();
    if (!status_.ok()) {
      deferred_.Reject(MakeError(env, status_));
      return;
    }
    if (closed_->load()) {
      for (int fd : fds_) close(fd);
      deferred_.Reject(MakeError(env, Code::kClosed, "engine closed while connecting"));
      return;
    }
    Status st = wrap_->engine(env)->tcp()->Install(peer_, std::move(fds_));
    if (st.ok()) deferred_.Resolve(env.Undefined());
    else deferred_.Reject(MakeError(env, st));
  }

 private:
  Napi::Promise::Deferred deferred_;
  EngineWrap* wrap_;
  std::shared_ptr<std::atomic<bool>> closed_;
  std::shared_ptr<Peer> peer_;
  TcpPeerSpec spec_;
  Napi::ObjectReference self_;
  Status status_;
  std::vector<int> fds_;
};

std::vector<uint32_t> ParseIds(Napi::Env env, Napi::Value v) {
  if (!v.IsArray()) Throw(env, Code::kBadArgument, "Expected an array of region ids");
  auto a = v.As<Napi::Array>();
  std::vector<uint32_t> ids;
  for (uint32_t i = 0; i < a.Length(); ++i) {
    Napi::Value e = a.Get(i);
    if (!e.IsNumber()) Throw(env, Code::kBadArgument, "Expected numeric region ids");
    ids.push_back(e.As<Napi::Number>().Uint32Value());
  }
  return ids;
}

std::string BytesArg(const Napi::CallbackInfo& info, size_t i, size_t expect, const char* name) {
  uint8_t* data = nullptr;
  size_t length = 0;
  if (info.Length() <= i || !BytesOf(info[i], &data, &length) || length != expect) {
    Throw(info.Env(), Code::kBadArgument, std::string("Expected ") + std::to_string(expect) + " bytes for " + name);
  }
  return std::string(reinterpret_cast<char*>(data), length);
}

void CleanupHook(void* arg) {
  // The environment is going away (process exit or worker termination) without
  // close(): stop the worker threads before it does.
  static_cast<Engine*>(arg)->Shutdown();
}

}  // namespace

Napi::Function EngineWrap::Define(Napi::Env env) {
  return DefineClass(env, "NativeEngine",
                     {
                         InstanceMethod<&EngineWrap::Allocate>("allocate"),
                         InstanceMethod<&EngineWrap::Register>("register"),
                         InstanceMethod<&EngineWrap::RegisterDevice>("registerDevice"),
                         InstanceMethod<&EngineWrap::Free>("free"),
                         InstanceMethod<&EngineWrap::Segment>("segment"),
                         InstanceMethod<&EngineWrap::AddPeer>("addPeer"),
                         InstanceMethod<&EngineWrap::UpdatePeer>("updatePeer"),
                         InstanceMethod<&EngineWrap::DropPeer>("dropPeer"),
                         InstanceMethod<&EngineWrap::Submit>("submit"),
                         InstanceMethod<&EngineWrap::Abort>("abort"),
                         InstanceMethod<&EngineWrap::Counters>("counters"),
                         InstanceMethod<&EngineWrap::InFlight>("inFlight"),
                         InstanceMethod<&EngineWrap::Close>("close"),
                         InstanceMethod<&EngineWrap::DeviceAlloc>("deviceAlloc"),
                         InstanceMethod<&EngineWrap::DeviceFree>("deviceFree"),
                         InstanceMethod<&EngineWrap::DeviceWrite>("deviceWrite"),
                         InstanceMethod<&EngineWrap::DeviceRead>("deviceRead"),
                         InstanceMethod<&EngineWrap::DeviceIpcExport>("deviceIpcExport"),
                         InstanceMethod<&EngineWrap::DeviceIpcImport>("deviceIpcImport"),
                         InstanceMethod<&EngineWrap::DeviceIpcClose>("deviceIpcClose"),
                         InstanceMethod<&EngineWrap::CreateStream>("createStream"),
                         InstanceMethod<&EngineWrap::CreateEvent>("createEvent"),
                         InstanceMethod<&EngineWrap::WrapEvent>("wrapEvent"),
                         InstanceMethod<&EngineWrap::DeviceInfo>("deviceInfo"),
                         InstanceMethod<&EngineWrap::DeviceIpcProcessId>("deviceIpcProcessId"),
                         InstanceMethod<&EngineWrap::DeviceIpcAllow>("deviceIpcAllow"),
                         InstanceMethod<&EngineWrap::MooncakeStart>("mooncakeStart"),
                         InstanceMethod<&EngineWrap::HcclEnable>("hcclEnable"),
                         InstanceMethod<&EngineWrap::HcclRootInfo>("hcclRootInfo"),
                         InstanceMethod<&EngineWrap::HcclJoin>("hcclJoin"),
                         InstanceMethod<&EngineWrap::HcclRelease>("hcclRelease"),
                         InstanceMethod<&EngineWrap::HcclDiscard>("hcclDiscard"),
                         InstanceMethod<&EngineWrap::TcpListen>("tcpListen"),
                         InstanceMethod<&EngineWrap::TcpGrant>("tcpGrant"),
                         InstanceMethod<&EngineWrap::TcpRevoke>("tcpRevoke"),
                         InstanceMethod<&EngineWrap::TcpStats>("tcpStats"),
                         InstanceMethod<&EngineWrap::ConnectPeer>("connectPeer"),
                     });
}

EngineWrap::EngineWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<EngineWrap>(info) {
  Napi::Env env = info.Env();
  EngineOptions options;
  if (info.Length() > 0 && info[0].IsObject()) {
    auto o = info[0].As<Napi::Object>();
    if (o.Get("threads").IsNumber()) options.threads = o.Get("threads").As<Napi::Number>().Uint32Value();
    if (o.Get("chunkBytes").IsNumber()) {
      options.chunk_bytes = static_cast<size_t>(o.Get("chunkBytes").As<Napi::Number>().Int64Value());
    }
  }
  if (options.threads < 1 || options.threads > 64) Throw(env, Code::kBadArgument, "threads must be in 1..64");
  if (options.chunk_bytes < 4096) Throw(env, Code::kBadArgument, "chunkBytes must be at least 4096");
  options.device = CreateDevice(env, info.Length() > 0 && info[0].IsObject() ? info[0].As<Napi::Object>() : Napi::Object());

  channel_ = new Channel{this};
  tsfn_ = Tsfn::New(env, "epd-transfer:completions", 0, 1, channel_,
                    [](Napi::Env, void*, Channel* ch) {
                      if (ch->owner != nullptr) ch->owner->channel_ = nullptr;
                      delete ch;
                    });
  tsfn_.Unref(env);
  engine_ = std::make_unique<Engine>(options, [this] { tsfn_.NonBlockingCall(); });
  device_ = engine_->shared_device();
  napi_add_env_cleanup_hook(env, CleanupHook, engine_.get());
}

EngineWrap::~EngineWrap() {
  napi_remove_env_cleanup_hook(Env(), CleanupHook, engine_.get());
  engine_->Shutdown();  // joins workers: nothing calls the channel after this
  closed_->store(true);
  if (channel_ != nullptr) {
    channel_->owner = nullptr;
    tsfn_.Release();
  }
}

Engine* EngineWrap::engine(Napi::Env env) {
  if (closed_->load()) Throw(env, Code::kClosed, "engine is closed");
  return engine_.get();
}

void EngineWrap::CallJs(Napi::Env env, Napi::Function, Channel* channel, void*) {
  if (env == nullptr || channel == nullptr || channel->owner == nullptr) return;
  channel->owner->Drain(env);
}

void EngineWrap::Drain(Napi::Env env) {
  std::vector<Completion> done;
  engine_->DrainCompletions(&done);
  for (Completion& c : done) {
    auto it = pending_.find(c.batch->id);
    if (it == pending_.end()) continue;
    if (c.status.ok()) {
      it->second.Resolve(Napi::Number::New(env, static_cast<double>(c.batch->bytes_done.load())));
    } else {
      Napi::Object err = MakeError(env, c.status);
      err.Set("bytesMoved", Napi::Number::New(env, static_cast<double>(c.batch->bytes_done.load())));
      it->second.Reject(err);
    }
    pending_.erase(it);
  }
  SettleFrees(env);
  UpdateLoopRef(env);
}

void EngineWrap::SettleFrees(Napi::Env env) {
  for (auto it = frees_.begin(); it != frees_.end();) {
    if (engine_->regions().Find(it->first) == nullptr) {
      for (auto& d : it->second) d.Resolve(env.Undefined());
      it = frees_.erase(it);
    } else {
      ++it;
    }
  }
}

void EngineWrap::UpdateLoopRef(Napi::Env env) {
  // Keep the event loop alive exactly while work is in flight.
  bool want = !pending_.empty() && !closed_->load();
  if (want == loop_ref_ || channel_ == nullptr) return;
  if (want) tsfn_.Ref(env); else tsfn_.Unref(env);
  loop_ref_ = want;
}

Napi::Value EngineWrap::Allocate(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Engine* e = engine(env);
  uint64_t bytes = ArgIndex(info, 0, "bytes");
  if (bytes == 0) Throw(env, Code::kBadArgument, "Expected bytes > 0 for allocate");
  bool prefault = info.Length() < 2 || info[1].ToBoolean().Value();
  Region* r = nullptr;
  Check(env, e->regions().AllocateHost(static_cast<size_t>(bytes), prefault, &r));
  // The view keeps the mapping alive, so JS may hold it past free() without faulting.
  auto* keep = new std::shared_ptr<ShmMapping>(r->mapping);
  auto buffer = Napi::Buffer<uint8_t>::New(env, r->ptr, r->length,
                                          [](Napi::Env, uint8_t*, std::shared_ptr<ShmMapping>* k) { delete k; },
                                          keep);
  auto out = Napi::Object::New(env);
  out.Set("id", Napi::Number::New(env, r->id));
  out.Set("buffer", buffer);
  out.Set("shm", Napi::String::New(env, r->mapping->name()));
  return out;
}

Napi::Value EngineWrap::Register(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Engine* e = engine(env);
  uint8_t* data = nullptr;
  size_t length = 0;
  if (info.Length() < 1 || !BytesOf(info[0], &data, &length)) {
    Throw(env, Code::kBadArgument, "Expected a Buffer, TypedArray, DataView or ArrayBuffer for register");
  }
  if (length == 0) Throw(env, Code::kBadArgument, "cannot register an empty buffer");
  // Pin the JS memory for as long as the region exists.
  auto ref = std::make_shared<Napi::Reference<Napi::Value>>(Napi::Persistent(info[0]));
  Region* r = nullptr;
  Check(env, e->regions().AddExternal(data, length, [ref] { ref->Reset(); }, &r));
  return Napi::Number::New(env, r->id);
}

Napi::Value EngineWrap::RegisterDevice(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Engine* e = engine(env);
  uint64_t ptr = ArgPointer(info, 0, "devicePtr");
  uint64_t length = ArgIndex(info, 1, "length");
  Region* r = nullptr;
  Check(env, e->regions().AddDevice(ptr, static_cast<size_t>(length), &r));
  return Napi::Number::New(env, r->id);
}

Napi::Value EngineWrap::Free(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Engine* e = engine(env);
  uint64_t id = ArgIndex(info, 0, "region id");
  bool fail_in_flight = info.Length() > 1 && info[1].ToBoolean().Value();
  Region* r = e->regions().Find(static_cast<uint32_t>(id));
  if (r == nullptr || id > 0xffffffffu) Throw(env, Code::kUnknownRegion, "unknown region id " + std::to_string(id));
  auto deferred = Napi::Promise::Deferred::New(env);
  if (fail_in_flight) e->AbortTouching(r->id, Code::kRegionFreed);
  uint32_t rid = r->id;
  e->RegionFreeing(rid);
  if (e->regions().MarkFreeing(rid)) {
    deferred.Resolve(env.Undefined());
  } else {
    frees_[rid].push_back(deferred);
  }
  return deferred.Promise();
}

Napi::Value EngineWrap::Segment(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Engine* e = engine(env);
  auto arr = Napi::Array::New(env);
  uint32_t n = 0;
  e->regions().ForEach([&](Region& r) {
    // With a vendor transport every region is reachable (Mooncake registers them all;
    // HCCL names them by id), not only the ones shm or IPC can map.
    const bool vendor = e->mooncake() != nullptr || e->has_hccl();
    if (r.freeing || (!r.shareable() && !vendor)) return;
    auto o = Napi::Object::New(env);
    o.Set("id", Napi::Number::New(env, r.id));
    o.Set("length", Napi::Number::New(env, static_cast<double>(r.length)));
    o.Set("kind", Napi::String::New(env, RegionKindName(r.kind)));
    if (r.mapping) {
      o.Set("shm", Napi::String::New(env, r.mapping->name()));
      o.Set("offset", Napi::Number::New(env, 0));
    }
    if (!r.ipc_key.empty()) o.Set("ipcKey", Napi::String::New(env, r.ipc_key));
    if (e->mooncake() != nullptr) {
      char addr[24];
      const uintptr_t a = r.ptr != nullptr ? reinterpret_cast<uintptr_t>(r.ptr) : static_cast<uintptr_t>(r.device_ptr);
      std::snprintf(addr, sizeof addr, "%llx", static_cast<unsigned long long>(a));
      o.Set("addr", Napi::String::New(env, addr));
    }
    arr.Set(n++, o);
  });
  return arr;
}

Napi::Value EngineWrap::AddPeer(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Engine* e = engine(env);
  if (info.Length() < 3 || !info[0].IsString() || !info[1].IsNumber()) {
    Throw(env, Code::kBadArgument, "addPeer(name, pid, regions)");
  }
  uint32_t id = 0;
  PeerConfig config = ParsePeerConfig(env, info.Length() > 3 ? info[3] : env.Undefined());
  Check(env, e->AddPeer(info[0].As<Napi::String>().Utf8Value(), info[1].As<Napi::Number>().Int32Value(),
                        ParseSpecs(env, info[2]), config, &id));
  return Napi::Number::New(env, id);
}

Napi::Value EngineWrap::UpdatePeer(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Engine* e = engine(env);
  uint64_t id = ArgIndex(info, 0, "peer id");
  Check(env, e->UpdatePeer(static_cast<uint32_t>(id), ParseSpecs(env, info[1])));
  return env.Undefined();
}

Napi::Value EngineWrap::DropPeer(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Engine* e = engine(env);
  uint64_t id = ArgIndex(info, 0, "peer id");
  std::string code = info.Length() > 1 && info[1].IsString() ? info[1].As<Napi::String>().Utf8Value() : "ERR_PEER_LOST";
  bool remove = info.Length() > 2 && info[2].ToBoolean().Value();
  e->DropPeer(static_cast<uint32_t>(id), CodeFromName(code), remove);
  return env.Undefined();
}

Napi::Value EngineWrap::Submit(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Engine* e = engine(env);
  uint64_t op = ArgIndex(info, 0, "op");
  uint64_t peer = ArgIndex(info, 1, "peer id");
  if (info.Length() < 4 || !info[2].IsTypedArray() ||
      info[2].As<Napi::TypedArray>().TypedArrayType() != napi_float64_array) {
    Throw(env, Code::kBadArgument, "Expected a Float64Array of descriptors");
  }
  auto desc = info[2].As<Napi::Float64Array>();
  uint64_t count = ArgIndex(info, 3, "descriptor count");
  if (count * kDescriptorStride > desc.ElementLength()) {
    Throw(env, Code::kBadArgument, "descriptor count exceeds the descriptor array");
  }
  if (op > 1) Throw(env, Code::kBadArgument, "op must be 0 (write) or 1 (read)");
  uint64_t batch_id = 0;
  Check(env, e->Submit(op == 0 ? Op::kWrite : Op::kRead, static_cast<uint32_t>(peer), desc.Data(),
                       static_cast<size_t>(count), &batch_id));
  auto deferred = Napi::Promise::Deferred::New(env);
  pending_.emplace(batch_id, deferred);
  UpdateLoopRef(env);
  auto out = Napi::Array::New(env, 2);
  out.Set(0u, Napi::Number::New(env, static_cast<double>(batch_id)));
  out.Set(1u, deferred.Promise());
  return out;
}

Napi::Value EngineWrap::Abort(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (closed_->load()) return env.Undefined();
  uint64_t id = ArgIndex(info, 0, "batch id");
  std::string code = info.Length() > 1 && info[1].IsString() ? info[1].As<Napi::String>().Utf8Value() : "ERR_ABORTED";
  engine_->Abort(id, CodeFromName(code));
  return env.Undefined();
}

Napi::Value EngineWrap::Counters(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (counters_view_.IsEmpty()) {
    auto* keep = new std::shared_ptr<epd::Counters>(engine_->counters());
    auto ab = Napi::ArrayBuffer::New(env, (*keep)->v, sizeof((*keep)->v),
                                     [](Napi::Env, void*, std::shared_ptr<epd::Counters>* k) { delete k; }, keep);
    counters_view_ = Napi::Persistent(ab);
  }
  return Napi::BigUint64Array::New(env, kCounterCount, counters_view_.Value(), 0);
}

Napi::Value EngineWrap::InFlight(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), static_cast<double>(pending_.size()));
}

void EngineWrap::Shutdown(Napi::Env env) {
  if (closed_->load()) return;
  engine_->Shutdown();
  Drain(env);  // batches stopped by Shutdown reject with ERR_CLOSED
  for (auto& [id, d] : pending_) d.Reject(MakeError(env, Code::kClosed, "engine closed"));
  pending_.clear();
  for (auto& [id, ds] : frees_) {
    for (auto& d : ds) d.Resolve(env.Undefined());
  }
  frees_.clear();
  UpdateLoopRef(env);
  closed_->store(true);
  if (channel_ != nullptr) {
    channel_->owner = nullptr;
    channel_ = nullptr;
    tsfn_.Release();
  }
}

Napi::Value EngineWrap::Close(const Napi::CallbackInfo& info) {
  Shutdown(info.Env());
  return info.Env().Undefined();
}

Napi::Value EngineWrap::DeviceAlloc(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  engine(env);
  uint64_t bytes = ArgIndex(info, 0, "bytes");
  if (bytes == 0) Throw(env, Code::kBadArgument, "Expected bytes > 0 for device alloc");
  DevicePtr p = 0;
  Check(env, device_->Alloc(static_cast<size_t>(bytes), &p));
  return Napi::BigInt::New(env, static_cast<uint64_t>(p));
}

Napi::Value EngineWrap::DeviceFree(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  engine(env);
  Check(env, device_->Free(ArgPointer(info, 0, "devicePtr")));
  return env.Undefined();
}

Napi::Value EngineWrap::DeviceWrite(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  engine(env);
  DevicePtr dst = ArgPointer(info, 0, "devicePtr");
  uint8_t* data = nullptr;
  size_t length = 0;
  if (info.Length() < 2 || !BytesOf(info[1], &data, &length)) Throw(env, Code::kBadArgument, "Expected bytes to copy");
  Check(env, device_->CopyToDevice(dst, data, length));
  return env.Undefined();
}

Napi::Value EngineWrap::DeviceRead(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  engine(env);
  uint8_t* data = nullptr;
  size_t length = 0;
  if (info.Length() < 2 || !BytesOf(info[0], &data, &length)) Throw(env, Code::kBadArgument, "Expected a target buffer");
  Check(env, device_->CopyToHost(data, ArgPointer(info, 1, "devicePtr"), length));
  return env.Undefined();
}

Napi::Value EngineWrap::DeviceIpcExport(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  engine(env);
  std::string key;
  Check(env, device_->IpcExport(ArgPointer(info, 0, "devicePtr"), ArgIndex(info, 1, "length"), &key));
  return Napi::String::New(env, key);
}

Napi::Value EngineWrap::DeviceIpcImport(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  engine(env);
  if (info.Length() < 1 || !info[0].IsString()) Throw(env, Code::kBadArgument, "Expected a string IPC key");
  DevicePtr p = 0;
  size_t bytes = 0;
  Check(env, device_->IpcImport(info[0].As<Napi::String>().Utf8Value(), &p, &bytes));
  auto out = Napi::Object::New(env);
  out.Set("ptr", Napi::BigInt::New(env, static_cast<uint64_t>(p)));
  out.Set("length", Napi::Number::New(env, static_cast<double>(bytes)));
  return out;
}

Napi::Value EngineWrap::DeviceIpcClose(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  engine(env);
  Check(env, device_->IpcClose(ArgPointer(info, 0, "devicePtr")));
  return env.Undefined();
}

Napi::Value EngineWrap::CreateStream(const Napi::CallbackInfo& info) {
  engine(info.Env());
  return State(info.Env())->stream_class.New({Value()});
}

Napi::Value EngineWrap::CreateEvent(const Napi::CallbackInfo& info) {
  engine(info.Env());
  return State(info.Env())->event_class.New({Value()});
}

Napi::Value EngineWrap::WrapEvent(const Napi::CallbackInfo& info) {
  engine(info.Env());
  ArgPointer(info, 0, "event handle");
  return State(info.Env())->event_class.New({Value(), info[0]});
}

Napi::Value EngineWrap::DeviceInfo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto out = Napi::Object::New(env);
  out.Set("kind", Napi::String::New(env, device_->kind()));
  out.Set("ordinal", Napi::Number::New(env, device_->ordinal()));
  return out;
}

Napi::Value EngineWrap::DeviceIpcProcessId(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  engine(env);
  int32_t pid = 0;
  Check(env, device_->IpcProcessId(&pid));
  return Napi::Number::New(env, pid);
}

Napi::Value EngineWrap::DeviceIpcAllow(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  engine(env);
  if (info.Length() < 2 || !info[0].IsString()) Throw(env, Code::kBadArgument, "deviceIpcAllow(key, pid)");
  uint64_t pid = ArgIndex(info, 1, "pid");
  if (pid == 0 || pid > 0x7fffffff) Throw(env, Code::kBadArgument, "Expected a positive process id for pid");
  Check(env, device_->IpcAllow(info[0].As<Napi::String>().Utf8Value(), static_cast<int32_t>(pid)));
  return env.Undefined();
}

}  // namespace epd

namespace epd {

Napi::Value EngineWrap::TcpListen(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Engine* e = engine(env);
  if (info.Length() < 2 || !info[0].IsString()) Throw(env, Code::kBadArgument, "tcpListen(host, port)");
  uint64_t port = ArgIndex(info, 1, "port");
  if (port > 65535) Throw(env, Code::kBadArgument, "Expected a port in [0, 65535]");
  std::string address;
  Check(env, e->tcp()->Listen(info[0].As<Napi::String>().Utf8Value(), static_cast<int>(port), &address));
  return Napi::String::New(env, address);
}

Napi::Value EngineWrap::TcpGrant(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Engine* e = engine(env);
  std::string grant = BytesArg(info, 0, 16, "grant");
  std::string key = BytesArg(info, 1, 32, "key");
  std::vector<ExposedRegion> regions;
  for (uint32_t id : ParseIds(env, info.Length() > 2 ? info[2] : env.Undefined())) {
    Region* r = e->regions().Find(id);
    // Host regions only: their bytes stay mapped (the mapping is shared) while a
    // frame uses them, even if the region is freed meanwhile.
    if (r == nullptr || r->freeing || !r->mapping || r->ptr == nullptr) continue;
    regions.push_back(ExposedRegion{r->id, r->ptr, r->length, r->mapping});
  }
  e->tcp()->Grant(grant, key, std::move(regions));
  return env.Undefined();
}

Napi::Value EngineWrap::TcpRevoke(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (closed_->load()) return env.Undefined();
  engine_->tcp()->Revoke(BytesArg(info, 0, 16, "grant"));
  return env.Undefined();
}

Napi::Value EngineWrap::TcpStats(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto out = Napi::Object::New(env);
  std::vector<uint64_t> s = closed_->load() ? std::vector<uint64_t>{0, 0, 0} : engine_->tcp()->Stats();
  out.Set("listening", Napi::Boolean::New(env, s[0] != 0));
  out.Set("serverConnections", Napi::Number::New(env, static_cast<double>(s[1])));
  out.Set("clientConnections", Napi::Number::New(env, static_cast<double>(s[2])));
  return out;
}

Napi::Value EngineWrap::ConnectPeer(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Engine* e = engine(env);
  uint64_t id = ArgIndex(info, 0, "peer id");
  std::shared_ptr<Peer> peer = e->FindPeer(static_cast<uint32_t>(id));
  if (!peer) Throw(env, Code::kUnknownPeer, "unknown peer " + std::to_string(id));
  auto* worker = new DialWorker(env, this, closed_, peer, Value());
  Napi::Promise promise = worker->Promise();
  worker->Queue();
  return promise;
}

Napi::Value HmacSha256Js(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint8_t *k = nullptr, *m = nullptr;
  size_t kl = 0, ml = 0;
  if (info.Length() < 2 || !BytesOf(info[0], &k, &kl) || !BytesOf(info[1], &m, &ml)) {
    Throw(env, Code::kBadArgument, "hmacSha256(key, message) takes two byte arrays");
  }
  std::string mac = TcpHmac(std::string(reinterpret_cast<char*>(k), kl), std::string(reinterpret_cast<char*>(m), ml));
  return Napi::Buffer<uint8_t>::Copy(env, reinterpret_cast<const uint8_t*>(mac.data()), mac.size());
}

// mooncakeStart({ metadata, hostname, rpcPort, protocol, nicPriorityMatrix }) -> segment
Napi::Value EngineWrap::MooncakeStart(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Engine* e = engine(env);
  if (info.Length() < 1 || !info[0].IsObject()) Throw(env, Code::kBadArgument, "mooncakeStart(options)");
  auto o = info[0].As<Napi::Object>();
  MooncakeOptions options;
  auto str = [&](const char* key, std::string* out) {
    Napi::Value v = o.Get(key);
    if (v.IsString()) *out = v.As<Napi::String>().Utf8Value();
  };
  str("metadata", &options.metadata);
  str("hostname", &options.hostname);
  str("protocol", &options.protocol);
  str("nicPriorityMatrix", &options.nic_priority_matrix);
  if (o.Get("rpcPort").IsNumber()) options.rpc_port = static_cast<uint64_t>(o.Get("rpcPort").As<Napi::Number>().Int64Value());
  Check(env, e->StartMooncake(options));
  return Napi::String::New(env, e->mooncake()->segment());
}

Napi::Value EngineWrap::HcclEnable(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  HcclTransport* h = nullptr;
  Check(env, engine(env)->Hccl(&h));
  return env.Undefined();
}

Napi::Value EngineWrap::HcclRootInfo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  HcclTransport* h = nullptr;
  Check(env, engine(env)->Hccl(&h));
  std::string blob;
  Check(env, h->RootInfo(&blob));
  return Napi::Buffer<char>::Copy(env, blob.data(), blob.size());
}

namespace {

// HcclCommInitRootInfo blocks until the other rank joins: it runs on the libuv pool.
// The worker holds the engine object, so the transport outlives the call.
class HcclJoinWorker : public Napi::AsyncWorker {
 public:
  HcclJoinWorker(Napi::Object engine, HcclTransport* hccl, std::string root, uint32_t rank)
      : Napi::AsyncWorker(engine.Env()), engine_(Napi::Persistent(engine)), hccl_(hccl), root_(std::move(root)),
        rank_(rank), deferred_(Napi::Promise::Deferred::New(engine.Env())) {}
  Napi::Promise Promise() { return deferred_.Promise(); }
  void Execute() override { status_ = hccl_->Join(root_, rank_, &link_); }
  void OnOK() override {
    if (status_.ok()) deferred_.Resolve(Napi::Number::New(Env(), static_cast<double>(link_)));
    else deferred_.Reject(MakeError(Env(), status_));
  }
  void OnError(const Napi::Error& e) override { deferred_.Reject(e.Value()); }

 private:
  Napi::ObjectReference engine_;  // keeps the engine (and its transport) alive
  HcclTransport* hccl_;
  std::string root_;
  uint32_t rank_;
  uint64_t link_ = 0;
  Status status_;
  Napi::Promise::Deferred deferred_;
};

}  // namespace

// hcclJoin(rootInfo, rank) -> Promise<link id>
Napi::Value EngineWrap::HcclJoin(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  HcclTransport* h = nullptr;
  Check(env, engine(env)->Hccl(&h));
  uint8_t* data = nullptr;
  size_t length = 0;
  if (info.Length() < 2 || !BytesOf(info[0], &data, &length)) Throw(env, Code::kBadArgument, "hcclJoin(rootInfo, rank)");
  uint64_t rank = ArgIndex(info, 1, "rank");
  auto* w = new HcclJoinWorker(info.This().As<Napi::Object>(), h, std::string(reinterpret_cast<char*>(data), length),
                               static_cast<uint32_t>(rank));
  auto p = w->Promise();
  w->Queue();
  return p;
}

Napi::Value EngineWrap::HcclRelease(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  HcclTransport* h = nullptr;
  Check(env, engine(env)->Hccl(&h));
  Check(env, h->Release(ArgIndex(info, 0, "batch id")));
  return env.Undefined();
}

Napi::Value EngineWrap::HcclDiscard(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (closed_->load()) return env.Undefined();
  HcclTransport* h = nullptr;
  if (engine_->Hccl(&h).ok()) h->Discard(ArgIndex(info, 0, "link"));
  return env.Undefined();
}

}  // namespace epd
