// The acl device: Ascend NPU memory, streams, events and IPC through the ACL runtime
// (libascendcl.so), loaded at run time (vendor/acl.h). The Device interface itself is
// VendorDevice (device_vendor.h); this file holds the ACL calls, the context, and the
// pid whitelist ACL puts in front of IPC imports.
//
// The context is the device's default context (aclrtSetDevice), the one other users
// of the device in this process share; Bind makes it current on the calling thread.
#include <algorithm>
#include <cstring>
#include <mutex>
#include <set>

#include "device.h"
#include "device_vendor.h"
#include "vendor/acl.h"
#include "vendor/acl_device.h"
#include "vendor/device_common.h"

namespace epd {
namespace {

using vendor::DeviceAllocation;
using vendor::HexAddress;
namespace acl = vendor::acl;

// Allocations are rounded up to 2 MiB so that each one is page-table aligned and can
// be exported whole (ACL refuses IPC export of ranges that are not; vendor-apis §1.7).
constexpr size_t kIpcGranule = 2u << 20;
constexpr vendor::VendorTraits kTraits{"acl", "acl1", "aclrtEvent", kIpcGranule};

class AclDevice final : public vendor::VendorDevice {
 public:
  AclDevice(const acl::Runtime* rt, int ordinal, acl::aclrtContext ctx)
      : VendorDevice(kTraits, ordinal), rt_(rt), api_(rt->api), ctx_(ctx) {}

  ~AclDevice() override {
    ReleaseAll();
    if (Bind().ok()) api_.aclrtResetDevice(ordinal());
  }

  const acl::Runtime* runtime() const { return rt_; }

  Status Bind() const override {
    acl::aclrtContext current = nullptr;
    if (api_.aclrtGetCurrentContext(&current) == acl::kSuccess && current == ctx_) return Status::Ok();
    acl::aclError rc = api_.aclrtSetCurrentContext(ctx_);
    if (rc != acl::kSuccess) return acl::Error(api_, rc, "aclrtSetCurrentContext(device " + std::to_string(ordinal()) + ")");
    return Status::Ok();
  }

  // --- IPC access control (ACL only) --------------------------------------------------
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
    if (!vendor::ParseIpcKey(key, kTraits.key_tag, &parsed)) return Status(Code::kBadArgument, "malformed acl IPC key");
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

 protected:
  Status RequireIpc() const override {
    if (api_.has_ipc()) return Status::Ok();
    return Status(Code::kBackendUnavailable, rt_->lib.path +
                                                 " lacks the aclrtIpcMem* functions (IPC memory sharing needs "
                                                 "CANN 8.3 or later)");
  }

  // --- memory -----------------------------------------------------------------
  Status Malloc(size_t capacity, DevicePtr* out) override {
    void* p = nullptr;
    acl::aclError rc = api_.aclrtMalloc(&p, capacity, acl::kMallocHugeFirst);
    if (rc != acl::kSuccess) return acl::Error(api_, rc, "aclrtMalloc(" + std::to_string(capacity) + " bytes)");
    *out = Key(p);
    return Status::Ok();
  }

  Status FreeMemory(DevicePtr base) override {
    acl::aclError rc = api_.aclrtFree(Ptr(base));
    if (rc != acl::kSuccess) return acl::Error(api_, rc, "aclrtFree(" + HexAddress(base) + ")");
    return Status::Ok();
  }

  // The exporter closes its key before freeing (importers must have closed theirs).
  Status Unexport(DeviceAllocation& a) override {
    if (a.ipc_key.empty()) return Status::Ok();
    acl::aclError rc = api_.aclrtIpcMemClose(a.ipc_key.c_str());
    if (rc != acl::kSuccess) return acl::Error(api_, rc, "aclrtIpcMemClose (exporter)");
    a.ipc_key.clear();
    return Status::Ok();
  }

  bool IsForeignMemory(DevicePtr ptr, size_t bytes) const override {
    return api_.aclrtPointerGetAttributes != nullptr && IsOurDeviceMemory(ptr) && IsOurDeviceMemory(ptr + bytes - 1);
  }

  // aclrtMemcpy's destMax is the room left in the destination allocation.
  Status CopyIn(DevicePtr dst, size_t room, const void* src, size_t bytes) override {
    acl::aclError rc = api_.aclrtMemcpy(Ptr(dst), room, src, bytes, acl::kMemcpyHostToDevice);
    if (rc != acl::kSuccess) return acl::Error(api_, rc, "aclrtMemcpy(host to device)");
    return Status::Ok();
  }

  Status CopyOut(void* dst, DevicePtr src, size_t bytes) override {
    acl::aclError rc = api_.aclrtMemcpy(dst, bytes, Ptr(src), bytes, acl::kMemcpyDeviceToHost);
    if (rc != acl::kSuccess) return acl::Error(api_, rc, "aclrtMemcpy(device to host)");
    return Status::Ok();
  }

  Status CopyOnStream(StreamHandle s, DevicePtr dst, size_t room, DevicePtr src, size_t bytes) override {
    acl::aclError rc = api_.aclrtMemcpyAsync(Ptr(dst), room, Ptr(src), bytes, acl::kMemcpyDeviceToDevice, s);
    if (rc != acl::kSuccess) return acl::Error(api_, rc, "aclrtMemcpyAsync(device to device)");
    return Status::Ok();
  }

  // --- streams and events ---------------------------------------------------------
  Status NewStream(StreamHandle* s) override {
    acl::aclError rc = api_.aclrtCreateStream(s);
    if (rc != acl::kSuccess) return acl::Error(api_, rc, "aclrtCreateStream");
    return Status::Ok();
  }

  // ACL wants a stream idle before it is destroyed; one that could not drain in time
  // (wedged by a transfer that never completes) is destroyed by force where possible.
  void DestroyStream(StreamHandle s, bool drained) override {
    if (!drained && api_.aclrtDestroyStreamForce != nullptr) {
      api_.aclrtDestroyStreamForce(s);
    } else {
      api_.aclrtDestroyStream(s);
    }
  }

  Status NewEvent(EventHandle* e, bool waitable) override {
    if (waitable && api_.aclrtCreateEventWithFlag != nullptr) {
      // ACL_EVENT_SYNC: without it an event may not be waited on by another stream.
      acl::aclError rc = api_.aclrtCreateEventWithFlag(e, acl::kEventSync);
      if (rc != acl::kSuccess) return acl::Error(api_, rc, "aclrtCreateEventWithFlag(ACL_EVENT_SYNC)");
      return Status::Ok();
    }
    acl::aclError rc = api_.aclrtCreateEvent(e);
    if (rc != acl::kSuccess) return acl::Error(api_, rc, "aclrtCreateEvent");
    return Status::Ok();
  }

  void DestroyEvent(EventHandle e) override { api_.aclrtDestroyEvent(e); }

  Status Record(EventHandle e, StreamHandle s) override {
    acl::aclError rc = api_.aclrtRecordEvent(e, s);
    if (rc != acl::kSuccess) return acl::Error(api_, rc, "aclrtRecordEvent");
    return Status::Ok();
  }

  Status WaitOnStream(StreamHandle s, EventHandle e) override {
    acl::aclError rc = api_.aclrtStreamWaitEvent(s, e);
    if (rc != acl::kSuccess) return acl::Error(api_, rc, "aclrtStreamWaitEvent");
    return Status::Ok();
  }

  Status Query(EventHandle e, bool* complete) const override { return acl::QueryEvent(api_, e, complete); }

  // The runtime's timed waits where it has them; polling otherwise.
  Status SyncStream(StreamHandle s, int64_t timeout_ms) override {
    if (api_.aclrtSynchronizeStreamWithTimeout == nullptr) return PollStream(s, timeout_ms);
    acl::aclError rc = api_.aclrtSynchronizeStreamWithTimeout(s, ClampMs(timeout_ms));
    return TimedWait(rc, "aclrtSynchronizeStreamWithTimeout", "stream", timeout_ms);
  }

  Status SyncEvent(EventHandle e, int64_t timeout_ms) override {
    if (api_.aclrtSynchronizeEventWithTimeout == nullptr) return VendorDevice::SyncEvent(e, timeout_ms);
    acl::aclError rc = api_.aclrtSynchronizeEventWithTimeout(e, ClampMs(timeout_ms));
    return TimedWait(rc, "aclrtSynchronizeEventWithTimeout", "event", timeout_ms);
  }

  // --- IPC ----------------------------------------------------------------------
  // The whole allocation, which is 2 MiB-granular and so page-table aligned.
  Status ExportKey(DevicePtr base, const DeviceAllocation& a, std::string* vendor_key) override {
    char buf[256] = {0};  // the runtime writes at most kIpcKeyLength bytes
    acl::aclError rc = api_.aclrtIpcMemGetExportKey(Ptr(base), a.capacity, buf, acl::kIpcKeyLength,
                                                    acl::kIpcExportFlagDefault);
    if (rc != acl::kSuccess) return acl::Error(api_, rc, "aclrtIpcMemGetExportKey");
    std::string key(buf, strnlen(buf, acl::kIpcKeyLength));
    if (key.empty()) return Status(Code::kSystem, "aclrtIpcMemGetExportKey returned an empty key", EIO);
    // Processes already allowed to import every key get this one too.
    for (int32_t pid : allowed_all_) EPD_RETURN_IF_ERROR(SetImportPid(key, pid));
    *vendor_key = key;
    return Status::Ok();
  }

  Status OpenImport(const std::string& vendor_key, DevicePtr* base) override {
    void* p = nullptr;
    acl::aclError rc = api_.aclrtIpcMemImportByKey(&p, vendor_key.c_str(), acl::kIpcImportFlagDefault);
    if (rc != acl::kSuccess) {
      Status st = acl::Error(api_, rc, "aclrtIpcMemImportByKey");
      if (rc == 207006) {
        return Status(st.code(), st.message() + " (the exporter must allow this process first: ipcAllow with " +
                                     "this process's ipcProcessId)", st.sys_errno());
      }
      return st;
    }
    *base = Key(p);
    return Status::Ok();
  }

  Status CloseImport(DevicePtr, const DeviceAllocation& a) override {
    acl::aclError rc = api_.aclrtIpcMemClose(a.ipc_key.c_str());
    if (rc != acl::kSuccess) return acl::Error(api_, rc, "aclrtIpcMemClose (importer)");
    return Status::Ok();
  }

 private:
  static int32_t ClampMs(int64_t ms) { return static_cast<int32_t>(std::min<int64_t>(std::max<int64_t>(ms, 0), INT32_MAX)); }

  Status TimedWait(acl::aclError rc, const char* call, const char* what, int64_t timeout_ms) const {
    if (rc == acl::kSuccess) return Status::Ok();
    Status st = acl::Error(api_, rc, call);
    if (st.code() == Code::kTimeout) {
      return Status(Code::kTimeout, std::string(what) + " did not complete within " + std::to_string(timeout_ms) + " ms");
    }
    return st;
  }

  // Caller holds mu_.
  Status SetImportPid(const std::string& vendor_key, int32_t pid) {
    int32_t p = pid;
    acl::aclError rc = api_.aclrtIpcMemSetImportPid(vendor_key.c_str(), &p, 1);
    if (rc != acl::kSuccess) return acl::Error(api_, rc, "aclrtIpcMemSetImportPid(" + std::to_string(pid) + ")");
    return Status::Ok();
  }

  bool IsOurDeviceMemory(DevicePtr p) const {
    if (!Bind().ok()) return false;
    acl::PtrAttributes attrs{};
    return api_.aclrtPointerGetAttributes(Ptr(p), &attrs) == acl::kSuccess &&
           attrs.location.type == acl::kMemLocationDevice && attrs.location.id == static_cast<uint32_t>(ordinal());
  }

  const acl::Runtime* rt_;
  const acl::Api& api_;
  const acl::aclrtContext ctx_;
  std::set<int32_t> allowed_all_;  // under mu_
};

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
