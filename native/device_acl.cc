// The acl device: Ascend NPU memory, streams, events and IPC through the ACL runtime
// (libascendcl.so), loaded at run time (vendor/acl.h).
//
// Threading: ACL binds a context to each OS thread. Every entry point here first
// makes this device's context current on the calling thread (Bind), because calls
// arrive from the JS thread, libuv pool threads (waits) and transport workers alike.
// The context is the device's default context (aclrtSetDevice), the one other users
// of the device in this process share.
#include <atomic>
#include <chrono>
#include <cstring>
#include <mutex>
#include <set>

#include "device.h"
#include "vendor/acl.h"
#include "vendor/acl_device.h"
#include "vendor/device_common.h"
#include "vendor/poll.h"

namespace epd {
namespace {

using vendor::DeviceAllocation;
using vendor::HexAddress;
namespace acl = vendor::acl;

// Allocations are rounded up to 2 MiB so that each one is page-table aligned and can
// be exported whole (ACL refuses IPC export of ranges that are not; vendor-apis §1.7).
constexpr size_t kIpcGranule = 2u << 20;
constexpr int64_t kTeardownWaitMs = 30'000;
constexpr const char kKeyTag[] = "acl1";

class AclDevice;

// Streams and events keep their device alive (`keep`): a wait running on a pool
// thread may hold the last reference to a stream after the engine is gone.
class AclStream final : public Stream {
 public:
  AclStream(AclDevice* device, std::shared_ptr<Device> keep, acl::aclrtStream s)
      : device_(device), keep_(std::move(keep)), stream_(s) {}
  ~AclStream() override;
  acl::aclrtStream handle() const { return stream_; }

 private:
  AclDevice* device_;
  std::shared_ptr<Device> keep_;
  acl::aclrtStream stream_;
};

class AclEvent : public Event {
 public:
  AclEvent(acl::aclrtEvent e, bool owned) : event(e), owned(owned), recorded(!owned) {}
  uint64_t native_handle() const override { return reinterpret_cast<uintptr_t>(event); }
  acl::aclrtEvent event;
  bool owned;
  // An event never recorded is complete (as on the host device), without asking ACL,
  // whose answer for that case is not documented. Wrapped foreign events count as
  // recorded: their owner recorded them.
  std::atomic<bool> recorded;
};

class AclDevice final : public Device, public std::enable_shared_from_this<AclDevice> {
 public:
  AclDevice(const acl::Runtime* rt, int ordinal, acl::aclrtContext ctx)
      : rt_(rt), api_(rt->api), ordinal_(ordinal), ctx_(ctx) {}

  ~AclDevice() override {
    ReleaseAll();
    if (Bind().ok()) api_.aclrtResetDevice(ordinal_);
  }

  // Engine close (and destruction): imports closed first, then our export keys, then
  // the memory, the order ACL requires. Queued stream work gets a bounded drain.
  void ReleaseAll() override {
    if (!Bind().ok()) return;  // the runtime is gone; nothing can be released
    DrainStreams();
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [base, a] : table_.map()) {
      if (a.imported) api_.aclrtIpcMemClose(a.ipc_key.c_str());
    }
    for (auto& [base, a] : table_.map()) {
      if (a.imported) continue;
      if (!a.ipc_key.empty()) api_.aclrtIpcMemClose(a.ipc_key.c_str());
      api_.aclrtFree(Ptr(base));
    }
    table_.map().clear();
  }

  const char* kind() const override { return "acl"; }
  int ordinal() const override { return ordinal_; }
  const acl::Runtime* runtime() const { return rt_; }

  // Makes this device's context current on the calling thread.
  Status Bind() const {
    acl::aclrtContext current = nullptr;
    if (api_.aclrtGetCurrentContext(&current) == acl::kSuccess && current == ctx_) return Status::Ok();
    acl::aclError rc = api_.aclrtSetCurrentContext(ctx_);
    if (rc != acl::kSuccess) return acl::Error(api_, rc, "aclrtSetCurrentContext(device " + std::to_string(ordinal_) + ")");
    return Status::Ok();
  }

  // --- memory -----------------------------------------------------------------
  Status Alloc(size_t bytes, DevicePtr* out) override {
    if (bytes == 0) return Status(Code::kBadArgument, "device allocation size must be > 0");
    if (bytes > SIZE_MAX - kIpcGranule) return Status(Code::kBadArgument, "device allocation size is too large");
    EPD_RETURN_IF_ERROR(Bind());
    const size_t capacity = (bytes + kIpcGranule - 1) / kIpcGranule * kIpcGranule;
    void* p = nullptr;
    acl::aclError rc = api_.aclrtMalloc(&p, capacity, acl::kMallocHugeFirst);
    if (rc != acl::kSuccess) return acl::Error(api_, rc, "aclrtMalloc(" + std::to_string(capacity) + " bytes)");
    std::lock_guard<std::mutex> lock(mu_);
    DeviceAllocation a;
    a.bytes = bytes;
    a.capacity = capacity;
    table_.map()[Key(p)] = a;
    *out = Key(p);
    return Status::Ok();
  }

  Status Free(DevicePtr ptr) override {
    EPD_RETURN_IF_ERROR(Bind());
    // Queued copies may still touch the memory: let this device's streams drain first.
    EPD_RETURN_IF_ERROR(DrainStreams());
    std::lock_guard<std::mutex> lock(mu_);
    auto it = table_.map().find(ptr);
    if (it == table_.map().end() || it->second.imported) {
      return Status(Code::kBadArgument, "not a device allocation: " + HexAddress(ptr));
    }
    // The exporter closes its key before freeing (importers must have closed theirs).
    if (!it->second.ipc_key.empty()) {
      acl::aclError rc = api_.aclrtIpcMemClose(it->second.ipc_key.c_str());
      if (rc != acl::kSuccess) return acl::Error(api_, rc, "aclrtIpcMemClose (exporter)");
      it->second.ipc_key.clear();
    }
    acl::aclError rc = api_.aclrtFree(Ptr(ptr));
    if (rc != acl::kSuccess) return acl::Error(api_, rc, "aclrtFree(" + HexAddress(ptr) + ")");
    table_.map().erase(it);
    return Status::Ok();
  }

  Status CheckRange(DevicePtr ptr, size_t bytes) const override {
    size_t dest_max = 0;
    return Locate(ptr, bytes, &dest_max);
  }

  Status CopyToDevice(DevicePtr dst, const void* src, size_t bytes) override {
    EPD_RETURN_IF_ERROR(Bind());
    size_t dest_max = 0;
    EPD_RETURN_IF_ERROR(Locate(dst, bytes, &dest_max));
    acl::aclError rc = api_.aclrtMemcpy(Ptr(dst), dest_max, src, bytes, acl::kMemcpyHostToDevice);
    if (rc != acl::kSuccess) return acl::Error(api_, rc, "aclrtMemcpy(host to device)");
    return Status::Ok();
  }

  Status CopyToHost(void* dst, DevicePtr src, size_t bytes) override {
    EPD_RETURN_IF_ERROR(Bind());
    size_t unused = 0;
    EPD_RETURN_IF_ERROR(Locate(src, bytes, &unused));
    acl::aclError rc = api_.aclrtMemcpy(dst, bytes, Ptr(src), bytes, acl::kMemcpyDeviceToHost);
    if (rc != acl::kSuccess) return acl::Error(api_, rc, "aclrtMemcpy(device to host)");
    return Status::Ok();
  }

  uint8_t* HostView(DevicePtr, size_t, std::shared_ptr<void>*) const override { return nullptr; }

  // --- streams ----------------------------------------------------------------
  Status CreateStream(std::unique_ptr<Stream>* out) override {
    EPD_RETURN_IF_ERROR(Bind());
    acl::aclrtStream s = nullptr;
    acl::aclError rc = api_.aclrtCreateStream(&s);
    if (rc != acl::kSuccess) return acl::Error(api_, rc, "aclrtCreateStream");
    auto* stream = new AclStream(this, weak_from_this().lock(), s);
    {
      std::lock_guard<std::mutex> lock(streams_mu_);
      streams_.insert(stream);
    }
    out->reset(stream);
    return Status::Ok();
  }

  Status CopyAsync(Stream* stream, DevicePtr dst, DevicePtr src, size_t bytes) override {
    EPD_RETURN_IF_ERROR(Bind());
    size_t dest_max = 0, unused = 0;
    EPD_RETURN_IF_ERROR(Locate(dst, bytes, &dest_max));
    EPD_RETURN_IF_ERROR(Locate(src, bytes, &unused));
    acl::aclError rc = api_.aclrtMemcpyAsync(Ptr(dst), dest_max, Ptr(src), bytes, acl::kMemcpyDeviceToDevice,
                                             static_cast<AclStream*>(stream)->handle());
    if (rc != acl::kSuccess) return acl::Error(api_, rc, "aclrtMemcpyAsync(device to device)");
    return Status::Ok();
  }

  Status StreamWaitEvent(Stream* stream, Event* event) override {
    EPD_RETURN_IF_ERROR(Bind());
    auto* e = static_cast<AclEvent*>(event);
    if (!e->recorded.load()) return Status::Ok();  // nothing to wait for
    acl::aclError rc = api_.aclrtStreamWaitEvent(static_cast<AclStream*>(stream)->handle(), e->event);
    if (rc != acl::kSuccess) return acl::Error(api_, rc, "aclrtStreamWaitEvent");
    return Status::Ok();
  }

  Status SynchronizeStream(Stream* stream, int64_t timeout_ms) override {
    EPD_RETURN_IF_ERROR(Bind());
    return SyncStream(static_cast<AclStream*>(stream)->handle(), timeout_ms);
  }

  Status SleepOnStream(Stream*, uint64_t) override {
    return Status(Code::kBackendUnavailable, "simulated compute (stream.sleep) exists only on the host device");
  }

  // --- events -----------------------------------------------------------------
  Status CreateEvent(std::unique_ptr<Event>* out) override {
    EPD_RETURN_IF_ERROR(Bind());
    acl::aclrtEvent e = nullptr;
    acl::aclError rc;
    if (api_.aclrtCreateEventWithFlag != nullptr) {
      // ACL_EVENT_SYNC: without it an event may not be waited on by another stream.
      rc = api_.aclrtCreateEventWithFlag(&e, acl::kEventSync);
      if (rc != acl::kSuccess) return acl::Error(api_, rc, "aclrtCreateEventWithFlag(ACL_EVENT_SYNC)");
    } else {
      rc = api_.aclrtCreateEvent(&e);
      if (rc != acl::kSuccess) return acl::Error(api_, rc, "aclrtCreateEvent");
    }
    out->reset(new OwnedEvent(this, weak_from_this().lock(), e));
    return Status::Ok();
  }

  Status RecordEvent(Event* event, Stream* stream) override {
    EPD_RETURN_IF_ERROR(Bind());
    auto* e = static_cast<AclEvent*>(event);
    acl::aclError rc = api_.aclrtRecordEvent(e->event, static_cast<AclStream*>(stream)->handle());
    if (rc != acl::kSuccess) return acl::Error(api_, rc, "aclrtRecordEvent");
    e->recorded.store(true);
    return Status::Ok();
  }

  Status QueryEvent(Event* event, bool* complete) override {
    auto* e = static_cast<AclEvent*>(event);
    if (!e->recorded.load()) {
      *complete = true;
      return Status::Ok();
    }
    EPD_RETURN_IF_ERROR(Bind());
    return Query(e->event, complete);
  }

  Status SynchronizeEvent(Event* event, int64_t timeout_ms) override {
    auto* e = static_cast<AclEvent*>(event);
    if (!e->recorded.load()) return Status::Ok();
    EPD_RETURN_IF_ERROR(Bind());
    return SyncEvent(e->event, timeout_ms, "event");
  }

  Status WrapEvent(uint64_t handle, std::unique_ptr<Event>* out) override {
    if (handle == 0) return Status(Code::kBadArgument, "Expected a non-null aclrtEvent handle");
    out->reset(new AclEvent(reinterpret_cast<acl::aclrtEvent>(static_cast<uintptr_t>(handle)), /*owned=*/false));
    return Status::Ok();
  }

  // --- IPC ----------------------------------------------------------------------
  Status IpcExport(DevicePtr ptr, size_t bytes, std::string* key) override {
    EPD_RETURN_IF_ERROR(RequireIpc());
    EPD_RETURN_IF_ERROR(Bind());
    std::lock_guard<std::mutex> lock(mu_);
    auto it = table_.Find(ptr, bytes);
    if (it == table_.end() || it->second.imported) {
      return Status(Code::kNotShareable, "[" + HexAddress(ptr) + ", +" + std::to_string(bytes) +
                                             ") is not inside an allocation of this device (only memory from "
                                             "device.alloc() can be exported)");
    }
    DeviceAllocation& a = it->second;
    if (a.ipc_key.empty()) {
      // The whole allocation, which is 2 MiB-granular and so page-table aligned.
      char buf[256] = {0};  // the runtime writes at most kIpcKeyLength bytes
      acl::aclError rc = api_.aclrtIpcMemGetExportKey(Ptr(it->first), a.capacity, buf, acl::kIpcKeyLength,
                                                      acl::kIpcExportFlagDefault);
      if (rc != acl::kSuccess) return acl::Error(api_, rc, "aclrtIpcMemGetExportKey");
      std::string vendor_key(buf, strnlen(buf, acl::kIpcKeyLength));
      if (vendor_key.empty()) return Status(Code::kSystem, "aclrtIpcMemGetExportKey returned an empty key", EIO);
      // Processes already allowed to import every key get this one too.
      for (int32_t pid : allowed_all_) EPD_RETURN_IF_ERROR(SetImportPid(vendor_key, pid));
      a.ipc_key = vendor_key;
    }
    *key = vendor::FormatIpcKey(kKeyTag, static_cast<size_t>(ptr - it->first), bytes, a.capacity, a.ipc_key);
    return Status::Ok();
  }

  Status IpcAllow(const std::string& key, int32_t pid) override {
    EPD_RETURN_IF_ERROR(RequireIpc());
    if (pid <= 0) return Status(Code::kBadArgument, "Expected a positive process id for ipcAllow");
    EPD_RETURN_IF_ERROR(Bind());
    std::lock_guard<std::mutex> lock(mu_);
    if (key.empty()) {
      if (!allowed_all_.insert(pid).second) return Status::Ok();
      for (auto& [base, a] : table_.map()) {
        if (!a.imported && !a.ipc_key.empty()) EPD_RETURN_IF_ERROR(SetImportPid(a.ipc_key, pid));
      }
      return Status::Ok();
    }
    vendor::ParsedIpcKey parsed;
    if (!vendor::ParseIpcKey(key, kKeyTag, &parsed)) return Status(Code::kBadArgument, "malformed acl IPC key");
    return SetImportPid(parsed.vendor_key, pid);
  }

  Status IpcProcessId(int32_t* pid) override {
    if (rt_->api.aclrtDeviceGetBareTgid == nullptr) return Device::IpcProcessId(pid);
    EPD_RETURN_IF_ERROR(Bind());
    // The host-physical pid: the one ACL checks, which differs from getpid() in containers.
    acl::aclError rc = api_.aclrtDeviceGetBareTgid(pid);
    if (rc != acl::kSuccess) return acl::Error(api_, rc, "aclrtDeviceGetBareTgid");
    return Status::Ok();
  }

  Status IpcImport(const std::string& key, DevicePtr* ptr, size_t* bytes) override {
    EPD_RETURN_IF_ERROR(RequireIpc());
    vendor::ParsedIpcKey parsed;
    if (!vendor::ParseIpcKey(key, kKeyTag, &parsed)) return Status(Code::kBadArgument, "malformed acl IPC key");
    EPD_RETURN_IF_ERROR(Bind());
    std::lock_guard<std::mutex> lock(mu_);
    auto existing = table_.FindImportByKey(parsed.vendor_key);
    if (existing != table_.end()) {
      existing->second.import_refs++;
      *ptr = existing->first + parsed.offset;
      *bytes = parsed.bytes;
      return Status::Ok();
    }
    void* p = nullptr;
    acl::aclError rc = api_.aclrtIpcMemImportByKey(&p, parsed.vendor_key.c_str(), acl::kIpcImportFlagDefault);
    if (rc != acl::kSuccess) {
      Status st = acl::Error(api_, rc, "aclrtIpcMemImportByKey");
      if (rc == 207006) {
        return Status(st.code(), st.message() + " (the exporter must allow this process first: ipcAllow with " +
                                     "this process's ipcProcessId)", st.sys_errno());
      }
      return st;
    }
    DeviceAllocation a;
    a.bytes = parsed.capacity;
    a.capacity = parsed.capacity;
    a.imported = true;
    a.ipc_key = parsed.vendor_key;
    a.import_refs = 1;
    table_.map()[Key(p)] = a;
    *ptr = Key(p) + parsed.offset;
    *bytes = parsed.bytes;
    return Status::Ok();
  }

  Status IpcClose(DevicePtr imported) override {
    EPD_RETURN_IF_ERROR(Bind());
    EPD_RETURN_IF_ERROR(DrainStreams());
    std::lock_guard<std::mutex> lock(mu_);
    auto it = table_.Find(imported, 0);
    if (it == table_.end() || !it->second.imported) return Status(Code::kBadArgument, "not an IPC import");
    if (--it->second.import_refs > 0) return Status::Ok();
    acl::aclError rc = api_.aclrtIpcMemClose(it->second.ipc_key.c_str());
    table_.map().erase(it);
    if (rc != acl::kSuccess) return acl::Error(api_, rc, "aclrtIpcMemClose (importer)");
    return Status::Ok();
  }

  // --- used by AclStream / OwnedEvent -------------------------------------------------
  void Forget(AclStream* s) {
    std::lock_guard<std::mutex> lock(streams_mu_);
    streams_.erase(s);
  }

  Status SyncStream(acl::aclrtStream s, int64_t timeout_ms) {
    if (api_.aclrtSynchronizeStreamWithTimeout != nullptr) {
      acl::aclError rc = api_.aclrtSynchronizeStreamWithTimeout(s, ClampMs(timeout_ms));
      if (rc == acl::kSuccess) return Status::Ok();
      Status st = acl::Error(api_, rc, "aclrtSynchronizeStreamWithTimeout");
      if (st.code() == Code::kTimeout) {
        return Status(Code::kTimeout, "stream did not complete within " + std::to_string(timeout_ms) + " ms");
      }
      return st;
    }
    // No timed wait in this runtime: mark the stream's end with an event and poll it.
    acl::aclrtEvent e = nullptr;
    acl::aclError rc = api_.aclrtCreateEvent(&e);
    if (rc != acl::kSuccess) return acl::Error(api_, rc, "aclrtCreateEvent");
    rc = api_.aclrtRecordEvent(e, s);
    Status st = rc == acl::kSuccess ? vendor::PollUntil([&](bool* done) { return Query(e, done); }, timeout_ms, "stream")
                                    : acl::Error(api_, rc, "aclrtRecordEvent");
    api_.aclrtDestroyEvent(e);
    return st;
  }

  const acl::Api& api() const { return api_; }

 private:
  class OwnedEvent final : public AclEvent {
   public:
    OwnedEvent(AclDevice* d, std::shared_ptr<Device> keep, acl::aclrtEvent e)
        : AclEvent(e, true), device_(d), keep_(std::move(keep)) {}
    ~OwnedEvent() override {
      if (device_->Bind().ok()) device_->api().aclrtDestroyEvent(event);
    }

   private:
    AclDevice* device_;
    std::shared_ptr<Device> keep_;
  };

  static DevicePtr Key(const void* p) { return reinterpret_cast<uintptr_t>(p); }
  static void* Ptr(DevicePtr p) { return reinterpret_cast<void*>(static_cast<uintptr_t>(p)); }
  static int32_t ClampMs(int64_t ms) { return static_cast<int32_t>(std::min<int64_t>(std::max<int64_t>(ms, 0), INT32_MAX)); }

  Status RequireIpc() const {
    if (api_.has_ipc()) return Status::Ok();
    return Status(Code::kBackendUnavailable, rt_->lib.path +
                                                 " lacks the aclrtIpcMem* functions (IPC memory sharing needs "
                                                 "CANN 8.3 or later)");
  }

  // Caller holds mu_.
  Status SetImportPid(const std::string& vendor_key, int32_t pid) {
    int32_t p = pid;
    acl::aclError rc = api_.aclrtIpcMemSetImportPid(vendor_key.c_str(), &p, 1);
    if (rc != acl::kSuccess) return acl::Error(api_, rc, "aclrtIpcMemSetImportPid(" + std::to_string(pid) + ")");
    return Status::Ok();
  }

  // OK when [ptr, ptr + bytes) is ours, imported, or (asked of the runtime) device
  // memory of this device that someone else in the process allocated. *dest_max is the
  // room from ptr to the end of its allocation (aclrtMemcpy's destMax).
  Status Locate(DevicePtr ptr, size_t bytes, size_t* dest_max) const {
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = table_.Find(ptr, bytes);
      if (it != table_.end()) {
        *dest_max = it->second.bytes - static_cast<size_t>(ptr - it->first);
        return Status::Ok();
      }
      // Inside (or running past) one of our allocations, including its rounding slack:
      // out of range, whatever the runtime would say about the address.
      if (table_.Overlaps(ptr, bytes)) return OutOfRange(ptr, bytes);
    }
    if (bytes > 0 && api_.aclrtPointerGetAttributes != nullptr && IsOurDeviceMemory(ptr) &&
        IsOurDeviceMemory(ptr + bytes - 1)) {
      *dest_max = bytes;
      return Status::Ok();
    }
    return OutOfRange(ptr, bytes);
  }

  Status OutOfRange(DevicePtr ptr, size_t bytes) const {
    return Status(Code::kOutOfRange, "[" + HexAddress(ptr) + ", +" + std::to_string(bytes) +
                                         ") is not memory of acl device " + std::to_string(ordinal_));
  }

  bool IsOurDeviceMemory(DevicePtr p) const {
    if (!Bind().ok()) return false;
    acl::PtrAttributes attrs{};
    return api_.aclrtPointerGetAttributes(Ptr(p), &attrs) == acl::kSuccess &&
           attrs.location.type == acl::kMemLocationDevice && attrs.location.id == static_cast<uint32_t>(ordinal_);
  }

  Status Query(acl::aclrtEvent e, bool* complete) const {
    int status = -1;
    if (api_.aclrtQueryEventStatus != nullptr) {
      acl::aclError rc = api_.aclrtQueryEventStatus(e, &status);
      if (rc != acl::kSuccess) return acl::Error(api_, rc, "aclrtQueryEventStatus");
      *complete = status == acl::kEventRecordedStatusComplete;
      return Status::Ok();
    }
    acl::aclError rc = api_.aclrtQueryEvent(e, &status);
    if (rc != acl::kSuccess) return acl::Error(api_, rc, "aclrtQueryEvent");
    *complete = status == acl::kEventStatusComplete;  // the deprecated enum: COMPLETE = 0
    return Status::Ok();
  }

  Status SyncEvent(acl::aclrtEvent e, int64_t timeout_ms, const char* what) const {
    if (api_.aclrtSynchronizeEventWithTimeout != nullptr) {
      acl::aclError rc = api_.aclrtSynchronizeEventWithTimeout(e, ClampMs(timeout_ms));
      if (rc == acl::kSuccess) return Status::Ok();
      Status st = acl::Error(api_, rc, "aclrtSynchronizeEventWithTimeout");
      if (st.code() == Code::kTimeout) {
        return Status(Code::kTimeout, std::string(what) + " did not complete within " + std::to_string(timeout_ms) + " ms");
      }
      return st;
    }
    return vendor::PollUntil([&](bool* done) { return Query(e, done); }, timeout_ms, what);
  }

  // Waits for every live stream of this device, so freed memory has no queued users.
  Status DrainStreams() {
    std::lock_guard<std::mutex> lock(streams_mu_);
    for (AclStream* s : streams_) EPD_RETURN_IF_ERROR(SyncStream(s->handle(), kTeardownWaitMs));
    return Status::Ok();
  }

  const acl::Runtime* rt_;
  const acl::Api& api_;
  const int ordinal_;
  const acl::aclrtContext ctx_;
  mutable std::mutex mu_;
  mutable vendor::AllocationTable table_;
  // Live streams, under their own lock: a drain holds it while it waits, so a stream
  // cannot be destroyed under it.
  std::mutex streams_mu_;
  std::set<AclStream*> streams_;
  std::set<int32_t> allowed_all_;
};

AclStream::~AclStream() {
  device_->Forget(this);
  if (!device_->Bind().ok()) return;
  // ACL wants a stream idle before it is destroyed; one that cannot drain in time
  // (wedged by a transfer that never completes) is destroyed by force where possible.
  Status st = device_->SyncStream(stream_, kTeardownWaitMs);
  if (!st.ok() && device_->api().aclrtDestroyStreamForce != nullptr) {
    device_->api().aclrtDestroyStreamForce(stream_);
  } else {
    device_->api().aclrtDestroyStream(stream_);
  }
}

}  // namespace

Status CreateAclDevice(int ordinal, std::unique_ptr<Device>* out) {
  const acl::Runtime* rt = acl::Load();
  if (rt->lib.why != vendor::Unavailable::kNone) return vendor::UnavailableStatus("acl", rt->lib.reason);
  if (ordinal < 0 || static_cast<uint32_t>(ordinal) >= rt->devices) {
    return Status(Code::kBadArgument, "acl deviceId " + std::to_string(ordinal) + " is out of range: the runtime sees " +
                                          std::to_string(rt->devices) + " NPU(s)");
  }
  const acl::Api& api = rt->api;
  // Creates (or takes a reference on) the device's default context and binds it to
  // this thread; other threads bind it with aclrtSetCurrentContext.
  acl::aclError rc = api.aclrtSetDevice(ordinal);
  if (rc != acl::kSuccess) return acl::Error(api, rc, "aclrtSetDevice(" + std::to_string(ordinal) + ")");
  acl::aclrtContext ctx = nullptr;
  rc = api.aclrtGetCurrentContext(&ctx);
  if (rc != acl::kSuccess || ctx == nullptr) {
    api.aclrtResetDevice(ordinal);
    return rc != acl::kSuccess ? acl::Error(api, rc, "aclrtGetCurrentContext")
                               : Status(Code::kSystem, "aclrtSetDevice left no current context", EIO);
  }
  out->reset(new AclDevice(rt, ordinal, ctx));
  return Status::Ok();
}

namespace vendor {
namespace acl {

const Runtime* RuntimeOf(Device* device) {
  auto* d = dynamic_cast<AclDevice*>(device);
  return d != nullptr ? d->runtime() : nullptr;
}

Status BindThread(Device* device) {
  auto* d = dynamic_cast<AclDevice*>(device);
  if (d == nullptr) return Status(Code::kBackendUnavailable, "not an acl device");
  return d->Bind();
}

}  // namespace acl
}  // namespace vendor
}  // namespace epd
