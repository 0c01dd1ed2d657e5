// NativeEcStore: one attached handle on a shared encoder-cache store.
//
// Index operations (has, stat, reserve, commit, acquire, release, delete) are
// short and synchronous. Byte copies of any size run on the libuv thread pool and
// resolve a promise; the JS buffers they touch are referenced until they finish,
// and the store mapping outlives the handle for as long as a copy or a view needs it.
#include "ec_binding.h"

#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <memory>
#include <unordered_map>
#include <vector>

#include "ec_store.h"
#include "util/napi_util.h"

namespace epd {
namespace {

using ec::Result;

// Copies below this size are done inline: a thread-pool hop costs more than the copy.
constexpr size_t kInlineCopyBytes = 256 << 10;

Napi::Object EcError(Napi::Env env, const Result& r) {
  Napi::Object err;
  AddonState* st = State(env);
  if (st != nullptr && !st->error_class.IsEmpty()) {
    err = st->error_class.New({Napi::String::New(env, r.message), Napi::String::New(env, r.code)});
  } else {
    err = Napi::Error::New(env, r.message).Value();
    err.Set("code", Napi::String::New(env, r.code));
  }
  if (r.sys_errno != 0) err.Set("errno", Napi::Number::New(env, r.sys_errno));
  return err;
}

void Check(Napi::Env env, const Result& r) {
  if (!r.ok()) throw Napi::Error(env, EcError(env, r));
}

[[noreturn]] void BadArgument(Napi::Env env, const std::string& message) {
  Check(env, Result::Error("ERR_BAD_ARGUMENT", message));
  throw 0;  // unreachable
}

struct Key {
  char data[ec::kKeyMax + 1];
  size_t len = 0;
};

void ReadKey(const Napi::CallbackInfo& info, size_t i, Key* key) {
  Napi::Env env = info.Env();
  if (info.Length() <= i || !info[i].IsString()) BadArgument(env, "Expected a string mmHash");
  napi_value v = info[i];
  size_t len = 0;
  if (napi_get_value_string_utf8(env, v, nullptr, 0, &len) != napi_ok) BadArgument(env, "Expected a string mmHash");
  if (len == 0 || len > ec::kKeyMax) {
    BadArgument(env, "Expected an mmHash of 1..255 UTF-8 bytes but received " + std::to_string(len) + " bytes");
  }
  napi_get_value_string_utf8(env, v, key->data, sizeof key->data, &key->len);
}

uint64_t Ticket(const Napi::CallbackInfo& info, size_t i) { return ArgIndex(info, i, "ticket"); }

// Zero-copy views are made in JS on top of a few ArrayBuffers over the arena: one
// external backing store per window, not one per view (V8 charges each external
// backing store to its GC heuristics). Window k covers [k GiB, k GiB + 4 GiB) of the
// arena (clipped at its end): Node 20 cannot create an external ArrayBuffer larger
// than 4 GiB, and with 1 GiB strides every entry up to 3 GiB lies wholly in window
// floor(offset / 1 GiB).
constexpr uint64_t kWindowStride = 1ull << 30;
constexpr uint64_t kWindowBytes = 4ull << 30;

Napi::ArrayBuffer WindowBuffer(Napi::Env env, const std::shared_ptr<ec::Mapping>& mapping, uint8_t* data, size_t len) {
  auto* keep = new std::shared_ptr<ec::Mapping>(mapping);
  return Napi::ArrayBuffer::New(env, data, len, [](Napi::Env, void*, std::shared_ptr<ec::Mapping>* k) { delete k; }, keep);
}

// One asynchronous copy; `finish` runs on the JS thread afterwards and may fail the
// promise (e.g. a commit that finds the store closed).
class CopyWork final : public Napi::AsyncWorker {
 public:
  using Finish = std::function<Napi::Value(Napi::Env, Result*)>;

  CopyWork(Napi::Env env, uint8_t* dst, const uint8_t* src, size_t len, std::shared_ptr<ec::Mapping> mapping,
           Napi::Value keep, Finish finish)
      : Napi::AsyncWorker(env, "epd-transfer:ec-copy"),
        deferred_(Napi::Promise::Deferred::New(env)),
        dst_(dst),
        src_(src),
        len_(len),
        mapping_(std::move(mapping)),
        finish_(std::move(finish)) {
    keep_ = Napi::Persistent(keep);
  }

  Napi::Promise Promise() { return deferred_.Promise(); }

  void Execute() override { std::memcpy(dst_, src_, len_); }

  void OnOK() override { Settle(); }
  void OnError(const Napi::Error&) override { Settle(); }

 private:
  void Settle() {
    Napi::Env env = Env();
    Napi::HandleScope scope(env);
    Result r;
    Napi::Value value = finish_(env, &r);
    keep_.Reset();
    if (r.ok()) deferred_.Resolve(value); else deferred_.Reject(EcError(env, r));
  }

  Napi::Promise::Deferred deferred_;
  uint8_t* dst_;
  const uint8_t* src_;
  size_t len_;
  std::shared_ptr<ec::Mapping> mapping_;
  Napi::Reference<Napi::Value> keep_;
  Finish finish_;
};

// Runs the copy inline when it is small, else on the thread pool.
Napi::Value Copy(Napi::Env env, uint8_t* dst, const uint8_t* src, size_t len, std::shared_ptr<ec::Mapping> mapping,
                 Napi::Value keep, CopyWork::Finish finish) {
  if (len <= kInlineCopyBytes) {
    std::memcpy(dst, src, len);
    auto deferred = Napi::Promise::Deferred::New(env);
    Result r;
    Napi::Value value = finish(env, &r);
    if (r.ok()) deferred.Resolve(value); else deferred.Reject(EcError(env, r));
    return deferred.Promise();
  }
  auto* work = new CopyWork(env, dst, src, len, std::move(mapping), keep, std::move(finish));
  Napi::Promise promise = work->Promise();
  work->Queue();
  return promise;
}

void CleanupHook(void* arg) { static_cast<ec::Store*>(arg)->Close(); }

class EcStoreWrap : public Napi::ObjectWrap<EcStoreWrap> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "NativeEcStore",
                       {
                           InstanceMethod<&EcStoreWrap::Arena>("arena"),
                           InstanceMethod<&EcStoreWrap::Has>("has"),
                           InstanceMethod<&EcStoreWrap::Stat>("stat"),
                           InstanceMethod<&EcStoreWrap::Reserve>("reserve"),
                           InstanceMethod<&EcStoreWrap::Write>("write"),
                           InstanceMethod<&EcStoreWrap::Commit>("commit"),
                           InstanceMethod<&EcStoreWrap::Abort>("abort"),
                           InstanceMethod<&EcStoreWrap::Acquire>("acquire"),
                           InstanceMethod<&EcStoreWrap::Release>("release"),
                           InstanceMethod<&EcStoreWrap::Load>("load"),
                           InstanceMethod<&EcStoreWrap::Delete>("delete"),
                           InstanceMethod<&EcStoreWrap::Keys>("keys"),
                           InstanceMethod<&EcStoreWrap::Stats>("stats"),
                           InstanceMethod<&EcStoreWrap::Info>("info"),
                           InstanceMethod<&EcStoreWrap::Recover>("recover"),
                           InstanceMethod<&EcStoreWrap::Close>("close"),
                           InstanceMethod<&EcStoreWrap::HoldLockForTest>("holdLockForTest"),
                       });
  }

  explicit EcStoreWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<EcStoreWrap>(info) {
    Napi::Env env = info.Env();
    if (info.Length() < 1 || !info[0].IsString()) BadArgument(env, "Expected a store name");
    ec::OpenOptions o;
    if (info.Length() > 1 && info[1].IsObject()) {
      auto opts = info[1].As<Napi::Object>();
      auto num = [&](const char* key, uint64_t max) -> uint64_t {
        Napi::Value v = opts.Get(key);
        if (v.IsUndefined()) return 0;
        double d = v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : -1;
        if (!(d >= 0 && d <= static_cast<double>(max)) || static_cast<double>(static_cast<uint64_t>(d)) != d) {
          BadArgument(env, std::string("Expected an integer in [0, ") + std::to_string(max) + "] for options." + key);
        }
        return static_cast<uint64_t>(d);
      };
      o.capacity = num("capacity", 9007199254740991ull);
      o.max_entries = static_cast<uint32_t>(num("maxEntries", 1u << 20));
      o.alignment = num("alignment", 2u << 20);
      o.max_processes = static_cast<uint32_t>(num("maxProcesses", 4096));
      o.max_pins = static_cast<uint32_t>(num("maxPinsPerProcess", 65536));
      uint64_t lock_ms = num("lockTimeoutMs", 0x7fffffff);
      if (lock_ms > 0) o.lock_timeout_ms = static_cast<uint32_t>(lock_ms);
      o.prefault = opts.Get("prefault").ToBoolean().Value();
    }
    Check(env, ec::Store::Open(info[0].As<Napi::String>().Utf8Value(), o, &store_));
    napi_add_env_cleanup_hook(env, CleanupHook, store_.get());
  }

  ~EcStoreWrap() override {
    if (store_) {
      napi_remove_env_cleanup_hook(Env(), CleanupHook, store_.get());
      store_->Close();
    }
  }

 private:
  ec::Store* store(Napi::Env env) {
    if (store_->closed()) Check(env, Result::Error("ERR_CLOSED", "encoder cache store '" + store_->name() + "' is closed"));
    return store_.get();
  }

  // arena(k) -> ArrayBuffer over window k of the arena (see WindowBuffer).
  Napi::Value Arena(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    ec::Store* s = store(env);
    const uint64_t capacity = s->layout().capacity;
    uint64_t k = ArgIndex(info, 0, "window");
    if (k * kWindowStride >= capacity) BadArgument(env, "window " + std::to_string(k) + " is past the arena");
    if (windows_.size() <= k) windows_.resize(k + 1);
    if (windows_[k].IsEmpty()) {
      uint64_t start = k * kWindowStride;
      uint64_t len = std::min(kWindowBytes, capacity - start);
      windows_[k] = Napi::Persistent(WindowBuffer(env, s->mapping(), s->arena() + start, static_cast<size_t>(len)));
    }
    return windows_[k].Value();
  }

  Napi::Value Has(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Key key;
    ReadKey(info, 0, &key);
    bool found = false;
    Check(env, store(env)->Has(key.data, key.len, &found));
    return Napi::Boolean::New(env, found);
  }

  Napi::Value Stat(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Key key;
    ReadKey(info, 0, &key);
    bool found = false;
    ec::EntryRef ref;
    Check(env, store(env)->Stat(key.data, key.len, &found, &ref));
    if (!found) return env.Null();
    auto out = Napi::Object::New(env);
    out.Set("size", Napi::Number::New(env, static_cast<double>(ref.size)));
    out.Set("meta", Napi::String::New(env, ref.meta));
    return out;
  }

  // reserve(key, size, meta) -> { ticket, offset } | "exists" | "busy"
  Napi::Value Reserve(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Key key;
    ReadKey(info, 0, &key);
    uint64_t size = ArgIndex(info, 1, "size");
    std::string meta = info.Length() > 2 && info[2].IsString() ? info[2].As<Napi::String>().Utf8Value() : "";
    ec::ReserveOutcome outcome;
    ec::EntryRef ref;
    ec::Store* s = store(env);
    Check(env, s->Reserve(key.data, key.len, size, meta, &outcome, &ref));
    if (outcome == ec::ReserveOutcome::kExists) return Napi::String::New(env, "exists");
    if (outcome == ec::ReserveOutcome::kBusy) return Napi::String::New(env, "busy");
    reservations_[ref.ticket] = ref;
    auto out = Napi::Object::New(env);
    out.Set("ticket", Napi::Number::New(env, static_cast<double>(ref.ticket)));
    out.Set("offset", Napi::Number::New(env, static_cast<double>(ref.offset)));
    return out;
  }

  // write(ticket, offset, source) -> Promise<void>: copies source into the reservation.
  Napi::Value Write(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    ec::Store* s = store(env);
    uint64_t ticket = Ticket(info, 0);
    uint64_t offset = ArgIndex(info, 1, "offset");
    uint8_t* src = nullptr;
    size_t len = 0;
    if (info.Length() < 3 || !BytesOf(info[2], &src, &len)) BadArgument(env, "Expected a Buffer, TypedArray, DataView or ArrayBuffer to save");
    auto it = reservations_.find(ticket);
    if (it == reservations_.end()) Check(env, Result::Error("ERR_ABORTED", "the reservation is gone (committed, aborted or closed)"));
    if (offset > it->second.size || len > it->second.size - offset) {
      Check(env, Result::Error("ERR_OUT_OF_RANGE", std::to_string(len) + " bytes at offset " + std::to_string(offset) +
                                                       " exceed the reserved " + std::to_string(it->second.size) + " bytes"));
    }
    uint8_t* dst = s->arena() + it->second.offset + offset;
    return Copy(env, dst, src, len, s->mapping(), info[2], [](Napi::Env env, Result*) { return env.Undefined(); });
  }

  Napi::Value Commit(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    uint64_t ticket = Ticket(info, 0);
    ec::Store* s = store(env);
    reservations_.erase(ticket);
    Check(env, s->Commit(ticket));
    return env.Undefined();
  }

  Napi::Value Abort(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    uint64_t ticket = Ticket(info, 0);
    reservations_.erase(ticket);
    if (store_->closed()) return env.Undefined();  // closing aborted it already
    Check(env, store_->Abort(ticket));
    return env.Undefined();
  }

  // acquire(key) -> { ticket, offset, size, meta } | null; pinned until release(ticket).
  Napi::Value Acquire(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Key key;
    ReadKey(info, 0, &key);
    ec::Store* s = store(env);
    bool found = false;
    ec::EntryRef ref;
    Check(env, s->Acquire(key.data, key.len, &found, &ref));
    if (!found) return env.Null();
    auto out = Napi::Object::New(env);
    out.Set("ticket", Napi::Number::New(env, static_cast<double>(ref.ticket)));
    out.Set("offset", Napi::Number::New(env, static_cast<double>(ref.offset)));
    out.Set("size", Napi::Number::New(env, static_cast<double>(ref.size)));
    out.Set("meta", Napi::String::New(env, ref.meta));
    return out;
  }

  Napi::Value Release(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    uint64_t ticket = Ticket(info, 0);
    if (store_->closed()) return env.Undefined();  // closing released every pin
    Check(env, store_->Release(ticket));
    return env.Undefined();
  }

  // load(key, target, targetOffset) -> Promise<{ size, meta }> | null (miss).
  // One copy from the store into target; the entry is pinned for the copy only.
  Napi::Value Load(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Key key;
    ReadKey(info, 0, &key);
    uint8_t* dst = nullptr;
    size_t dst_len = 0;
    if (info.Length() < 2 || !BytesOf(info[1], &dst, &dst_len)) BadArgument(env, "Expected a Buffer, TypedArray, DataView or ArrayBuffer to load into");
    uint64_t dst_off = ArgIndex(info, 2, "targetOffset");
    ec::Store* s = store(env);
    bool found = false;
    ec::EntryRef ref;
    Check(env, s->Acquire(key.data, key.len, &found, &ref));
    if (!found) return env.Null();
    if (dst_off > dst_len || ref.size > dst_len - dst_off) {
      s->Release(ref.ticket);
      Check(env, Result::Error("ERR_OUT_OF_RANGE", "the entry holds " + std::to_string(ref.size) + " bytes; the target has " +
                                                       std::to_string(dst_off > dst_len ? 0 : dst_len - dst_off) +
                                                       " bytes from offset " + std::to_string(dst_off)));
    }
    const uint64_t ticket = ref.ticket;
    const double size = static_cast<double>(ref.size);
    std::string meta = ref.meta;
    std::shared_ptr<ec::Mapping> mapping = s->mapping();
    // The handle object stays referenced (keep) so store_ outlives the copy.
    Napi::Object keep = Napi::Object::New(env);
    keep.Set("target", info[1]);
    keep.Set("store", Value());
    return Copy(env, dst + dst_off, s->arena() + ref.offset, static_cast<size_t>(ref.size), mapping, keep,
                [this, ticket, size, meta](Napi::Env env, Result* r) -> Napi::Value {
                  if (!store_->closed()) *r = store_->Release(ticket);
                  auto out = Napi::Object::New(env);
                  out.Set("size", Napi::Number::New(env, size));
                  out.Set("meta", Napi::String::New(env, meta));
                  return out;
                });
  }

  Napi::Value Delete(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Key key;
    ReadKey(info, 0, &key);
    bool found = false;
    Check(env, store(env)->Delete(key.data, key.len, &found));
    return Napi::Boolean::New(env, found);
  }

  Napi::Value Keys(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    std::vector<std::string> keys;
    Check(env, store(env)->Keys(&keys));
    auto arr = Napi::Array::New(env, keys.size());
    for (size_t i = 0; i < keys.size(); ++i) arr.Set(static_cast<uint32_t>(i), Napi::String::New(env, keys[i]));
    return arr;
  }

  Napi::Value Stats(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    ec::Stats s;
    Check(env, store(env)->GetStats(&s));
    auto out = Napi::Object::New(env);
    auto set = [&](const char* k, double v) { out.Set(k, Napi::Number::New(env, v)); };
    set("usedBytes", static_cast<double>(s.used_bytes));
    set("entries", s.entries);
    set("writing", s.writing);
    set("pinned", s.pinned);
    set("processes", s.processes);
    set("hits", static_cast<double>(s.hits));
    set("misses", static_cast<double>(s.misses));
    set("saves", static_cast<double>(s.saves));
    set("dedups", static_cast<double>(s.dedups));
    set("evictions", static_cast<double>(s.evictions));
    set("evictedBytes", static_cast<double>(s.evicted_bytes));
    set("capacityErrors", static_cast<double>(s.capacity_errors));
    set("recoveries", static_cast<double>(s.recoveries));
    set("reapedProcesses", static_cast<double>(s.reaped_processes));
    set("reapedWrites", static_cast<double>(s.reaped_writes));
    return out;
  }

  Napi::Value Info(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const ec::Layout& l = store_->layout();
    auto out = Napi::Object::New(env);
    out.Set("name", Napi::String::New(env, store_->name()));
    out.Set("object", Napi::String::New(env, ec::Store::ObjectName(store_->name())));
    out.Set("capacity", Napi::Number::New(env, static_cast<double>(l.capacity)));
    out.Set("alignment", Napi::Number::New(env, static_cast<double>(l.alignment)));
    out.Set("maxEntries", Napi::Number::New(env, l.max_entries));
    out.Set("maxProcesses", Napi::Number::New(env, l.max_processes));
    out.Set("maxPinsPerProcess", Napi::Number::New(env, l.max_pins));
    out.Set("totalBytes", Napi::Number::New(env, static_cast<double>(l.total_bytes)));
    return out;
  }

  Napi::Value Recover(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    int reaped = 0;
    Check(env, store(env)->Recover(&reaped));
    return Napi::Number::New(env, reaped);
  }

  // Only for the crash tests (EPD_TRANSFER_EC_TEST_HOOKS=1): dies holding the lock.
  Napi::Value HoldLockForTest(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const char* hooks = std::getenv("EPD_TRANSFER_EC_TEST_HOOKS");
    if (hooks == nullptr || std::strcmp(hooks, "1") != 0) {
      Check(env, Result::Error("ERR_BACKEND_UNAVAILABLE", "test hooks are off (EPD_TRANSFER_EC_TEST_HOOKS=1)"));
    }
    Check(env, store(env)->LockAndScrambleForTest());
    static const char kMsg[] = "LOCKED\n";
    if (::write(1, kMsg, sizeof kMsg - 1) < 0) {
    }
    for (;;) pause();
  }

  Napi::Value Close(const Napi::CallbackInfo& info) {
    reservations_.clear();
    store_->Close();
    return info.Env().Undefined();
  }

  std::unique_ptr<ec::Store> store_;
  std::vector<Napi::Reference<Napi::ArrayBuffer>> windows_;
  std::unordered_map<uint64_t, ec::EntryRef> reservations_;
};

}  // namespace

Napi::Function DefineEcStore(Napi::Env env) { return EcStoreWrap::Define(env); }

Napi::Value ReclaimStaleEcStores(const Napi::CallbackInfo& info) {
  int removed = 0;
  Check(info.Env(), ec::Store::ReclaimStale(&removed));
  return Napi::Number::New(info.Env(), removed);
}

}  // namespace epd
