// The cuda device: NVIDIA GPU memory, streams, events and IPC through the CUDA driver
// API (libcuda.so.1), loaded at run time (vendor/cuda.h). It exists so that the device
// path runs on a real accelerator where one is available (bench/device/run-cuda.sh).
//
// Threading: the driver binds a context to each OS thread. The device retains the
// GPU's primary context (the one the CUDA runtime and frameworks share) and makes it
// current on the calling thread at every entry point (Bind).
#include <atomic>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <set>

#include "device.h"
#include "vendor/cuda.h"
#include "vendor/device_common.h"
#include "vendor/poll.h"

namespace epd {
namespace {

using vendor::DeviceAllocation;
using vendor::HexAddress;
namespace cu = vendor::cuda;

constexpr int64_t kTeardownWaitMs = 30'000;
constexpr const char kKeyTag[] = "cuda1";

class CudaDevice;

// Streams and events keep their device alive (see device_acl.cc).
class CudaStream final : public Stream {
 public:
  CudaStream(CudaDevice* device, std::shared_ptr<Device> keep, cu::CUstream s)
      : device_(device), keep_(std::move(keep)), stream_(s) {}
  ~CudaStream() override;
  cu::CUstream handle() const { return stream_; }

 private:
  CudaDevice* device_;
  std::shared_ptr<Device> keep_;
  cu::CUstream stream_;
};

class CudaEvent : public Event {
 public:
  CudaEvent(cu::CUevent e, bool recorded) : event(e), recorded(recorded) {}
  uint64_t native_handle() const override { return reinterpret_cast<uintptr_t>(event); }
  cu::CUevent event;
  std::atomic<bool> recorded;
};

std::string HexOf(const cu::CUipcMemHandle& h) {
  static const char kDigits[] = "0123456789abcdef";
  std::string out;
  out.reserve(2 * cu::kIpcHandleSize);
  for (unsigned char c : h.reserved) {
    out.push_back(kDigits[c >> 4]);
    out.push_back(kDigits[c & 15]);
  }
  return out;
}

bool HandleOf(const std::string& hex, cu::CUipcMemHandle* h) {
  if (hex.size() != 2 * cu::kIpcHandleSize) return false;
  auto nibble = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  };
  for (size_t i = 0; i < cu::kIpcHandleSize; ++i) {
    int hi = nibble(hex[2 * i]), lo = nibble(hex[2 * i + 1]);
    if (hi < 0 || lo < 0) return false;
    h->reserved[i] = static_cast<char>(hi << 4 | lo);
  }
  return true;
}

class CudaDevice final : public Device, public std::enable_shared_from_this<CudaDevice> {
 public:
  CudaDevice(const cu::Runtime* rt, int ordinal, cu::CUdevice dev, cu::CUcontext ctx)
      : rt_(rt), api_(rt->api), ordinal_(ordinal), dev_(dev), ctx_(ctx) {}

  ~CudaDevice() override {
    ReleaseAll();
    api_.cuDevicePrimaryCtxRelease_v2(dev_);
  }

  // Engine close (and destruction): imports closed before our memory is freed.
  void ReleaseAll() override {
    if (!Bind().ok()) return;
    DrainStreams();
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [base, a] : table_.map()) {
      if (a.imported) api_.cuIpcCloseMemHandle(base);
    }
    for (auto& [base, a] : table_.map()) {
      if (!a.imported) api_.cuMemFree_v2(base);
    }
    table_.map().clear();
  }

  const char* kind() const override { return "cuda"; }
  int ordinal() const override { return ordinal_; }
  const cu::Api& api() const { return api_; }

  Status Bind() const {
    cu::CUcontext current = nullptr;
    if (api_.cuCtxGetCurrent(&current) == cu::kSuccess && current == ctx_) return Status::Ok();
    cu::CUresult rc = api_.cuCtxSetCurrent(ctx_);
    if (rc != cu::kSuccess) return cu::Error(api_, rc, "cuCtxSetCurrent(device " + std::to_string(ordinal_) + ")");
    return Status::Ok();
  }

  // --- memory -----------------------------------------------------------------
  Status Alloc(size_t bytes, DevicePtr* out) override {
    if (bytes == 0) return Status(Code::kBadArgument, "device allocation size must be > 0");
    EPD_RETURN_IF_ERROR(Bind());
    cu::CUdeviceptr p = 0;
    cu::CUresult rc = api_.cuMemAlloc_v2(&p, bytes);
    if (rc != cu::kSuccess) return cu::Error(api_, rc, "cuMemAlloc(" + std::to_string(bytes) + " bytes)");
    std::lock_guard<std::mutex> lock(mu_);
    DeviceAllocation a;
    a.bytes = bytes;
    a.capacity = bytes;
    table_.map()[p] = a;
    *out = p;
    return Status::Ok();
  }

  Status Free(DevicePtr ptr) override {
    EPD_RETURN_IF_ERROR(Bind());
    EPD_RETURN_IF_ERROR(DrainStreams());
    std::lock_guard<std::mutex> lock(mu_);
    auto it = table_.map().find(ptr);
    if (it == table_.map().end() || it->second.imported) {
      return Status(Code::kBadArgument, "not a device allocation: " + HexAddress(ptr));
    }
    cu::CUresult rc = api_.cuMemFree_v2(ptr);
    if (rc != cu::kSuccess) return cu::Error(api_, rc, "cuMemFree(" + HexAddress(ptr) + ")");
    table_.map().erase(it);
    return Status::Ok();
  }

  Status CheckRange(DevicePtr ptr, size_t bytes) const override { return Locate(ptr, bytes); }

  Status CopyToDevice(DevicePtr dst, const void* src, size_t bytes) override {
    EPD_RETURN_IF_ERROR(Bind());
    EPD_RETURN_IF_ERROR(Locate(dst, bytes));
    cu::CUresult rc = api_.cuMemcpyHtoD_v2(dst, src, bytes);
    if (rc != cu::kSuccess) return cu::Error(api_, rc, "cuMemcpyHtoD");
    return Status::Ok();
  }

  Status CopyToHost(void* dst, DevicePtr src, size_t bytes) override {
    EPD_RETURN_IF_ERROR(Bind());
    EPD_RETURN_IF_ERROR(Locate(src, bytes));
    cu::CUresult rc = api_.cuMemcpyDtoH_v2(dst, src, bytes);
    if (rc != cu::kSuccess) return cu::Error(api_, rc, "cuMemcpyDtoH");
    return Status::Ok();
  }

  uint8_t* HostView(DevicePtr, size_t, std::shared_ptr<void>*) const override { return nullptr; }

  // --- streams ----------------------------------------------------------------
  Status CreateStream(std::unique_ptr<Stream>* out) override {
    EPD_RETURN_IF_ERROR(Bind());
    cu::CUstream s = nullptr;
    // Non-blocking: no implicit ordering with the legacy default stream other code uses.
    cu::CUresult rc = api_.cuStreamCreate(&s, cu::kStreamNonBlocking);
    if (rc != cu::kSuccess) return cu::Error(api_, rc, "cuStreamCreate");
    auto* stream = new CudaStream(this, weak_from_this().lock(), s);
    {
      std::lock_guard<std::mutex> lock(streams_mu_);
      streams_.insert(stream);
    }
    out->reset(stream);
    return Status::Ok();
  }

  Status CopyAsync(Stream* stream, DevicePtr dst, DevicePtr src, size_t bytes) override {
    EPD_RETURN_IF_ERROR(Bind());
    EPD_RETURN_IF_ERROR(Locate(dst, bytes));
    EPD_RETURN_IF_ERROR(Locate(src, bytes));
    cu::CUresult rc = api_.cuMemcpyDtoDAsync_v2(dst, src, bytes, static_cast<CudaStream*>(stream)->handle());
    if (rc != cu::kSuccess) return cu::Error(api_, rc, "cuMemcpyDtoDAsync");
    return Status::Ok();
  }

  Status StreamWaitEvent(Stream* stream, Event* event) override {
    EPD_RETURN_IF_ERROR(Bind());
    auto* e = static_cast<CudaEvent*>(event);
    if (!e->recorded.load()) return Status::Ok();
    cu::CUresult rc = api_.cuStreamWaitEvent(static_cast<CudaStream*>(stream)->handle(), e->event, 0);
    if (rc != cu::kSuccess) return cu::Error(api_, rc, "cuStreamWaitEvent");
    return Status::Ok();
  }

  Status SynchronizeStream(Stream* stream, int64_t timeout_ms) override {
    EPD_RETURN_IF_ERROR(Bind());
    return SyncStream(static_cast<CudaStream*>(stream)->handle(), timeout_ms);
  }

  Status SleepOnStream(Stream*, uint64_t) override {
    return Status(Code::kBackendUnavailable, "simulated compute (stream.sleep) exists only on the host device");
  }

  // --- events -----------------------------------------------------------------
  Status CreateEvent(std::unique_ptr<Event>* out) override {
    EPD_RETURN_IF_ERROR(Bind());
    cu::CUevent e = nullptr;
    cu::CUresult rc = api_.cuEventCreate(&e, cu::kEventDisableTiming);
    if (rc != cu::kSuccess) return cu::Error(api_, rc, "cuEventCreate");
    out->reset(new OwnedEvent(this, weak_from_this().lock(), e));
    return Status::Ok();
  }

  Status RecordEvent(Event* event, Stream* stream) override {
    EPD_RETURN_IF_ERROR(Bind());
    auto* e = static_cast<CudaEvent*>(event);
    cu::CUresult rc = api_.cuEventRecord(e->event, static_cast<CudaStream*>(stream)->handle());
    if (rc != cu::kSuccess) return cu::Error(api_, rc, "cuEventRecord");
    e->recorded.store(true);
    return Status::Ok();
  }

  Status QueryEvent(Event* event, bool* complete) override {
    auto* e = static_cast<CudaEvent*>(event);
    if (!e->recorded.load()) {
      *complete = true;
      return Status::Ok();
    }
    EPD_RETURN_IF_ERROR(Bind());
    return Query(e->event, complete);
  }

  Status SynchronizeEvent(Event* event, int64_t timeout_ms) override {
    auto* e = static_cast<CudaEvent*>(event);
    if (!e->recorded.load()) return Status::Ok();
    EPD_RETURN_IF_ERROR(Bind());
    // cuEventSynchronize has no timeout: poll, so the wait keeps its deadline.
    return vendor::PollUntil([&](bool* done) { return Query(e->event, done); }, timeout_ms, "event");
  }

  Status WrapEvent(uint64_t handle, std::unique_ptr<Event>* out) override {
    if (handle == 0) return Status(Code::kBadArgument, "Expected a non-null CUevent handle");
    out->reset(new CudaEvent(reinterpret_cast<cu::CUevent>(static_cast<uintptr_t>(handle)), /*recorded=*/true));
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
      // The handle names the whole allocation; it must be taken from its base.
      cu::CUipcMemHandle h;
      std::memset(&h, 0, sizeof h);
      cu::CUresult rc = api_.cuIpcGetMemHandle(&h, it->first);
      if (rc != cu::kSuccess) return cu::Error(api_, rc, "cuIpcGetMemHandle");
      a.ipc_key = HexOf(h);
    }
    *key = vendor::FormatIpcKey(kKeyTag, static_cast<size_t>(ptr - it->first), bytes, a.capacity, a.ipc_key);
    return Status::Ok();
  }

  Status IpcImport(const std::string& key, DevicePtr* ptr, size_t* bytes) override {
    EPD_RETURN_IF_ERROR(RequireIpc());
    vendor::ParsedIpcKey parsed;
    cu::CUipcMemHandle h;
    if (!vendor::ParseIpcKey(key, kKeyTag, &parsed) || !HandleOf(parsed.vendor_key, &h)) {
      return Status(Code::kBadArgument, "malformed cuda IPC key");
    }
    EPD_RETURN_IF_ERROR(Bind());
    std::lock_guard<std::mutex> lock(mu_);
    // The driver refcounts repeated opens of one handle and returns the same address;
    // we keep one open per handle and count ours.
    auto existing = table_.FindImportByKey(parsed.vendor_key);
    if (existing != table_.end()) {
      existing->second.import_refs++;
      *ptr = existing->first + parsed.offset;
      *bytes = parsed.bytes;
      return Status::Ok();
    }
    cu::CUdeviceptr base = 0;
    cu::CUresult rc = api_.cuIpcOpenMemHandle_v2(&base, h, cu::kIpcMemLazyEnablePeerAccess);
    if (rc != cu::kSuccess) return cu::Error(api_, rc, "cuIpcOpenMemHandle");
    DeviceAllocation a;
    a.bytes = parsed.capacity;
    a.capacity = parsed.capacity;
    a.imported = true;
    a.ipc_key = parsed.vendor_key;
    a.import_refs = 1;
    table_.map()[base] = a;
    *ptr = base + parsed.offset;
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
    cu::CUresult rc = api_.cuIpcCloseMemHandle(it->first);
    table_.map().erase(it);
    if (rc != cu::kSuccess) return cu::Error(api_, rc, "cuIpcCloseMemHandle");
    return Status::Ok();
  }

  // --- used by CudaStream ----------------------------------------------------------
  void Forget(CudaStream* s) {
    std::lock_guard<std::mutex> lock(streams_mu_);
    streams_.erase(s);
  }

  // Marks the stream's end with a private event and polls it until the deadline.
  Status SyncStream(cu::CUstream s, int64_t timeout_ms) const {
    cu::CUevent e = nullptr;
    cu::CUresult rc = api_.cuEventCreate(&e, cu::kEventDisableTiming);
    if (rc != cu::kSuccess) return cu::Error(api_, rc, "cuEventCreate");
    rc = api_.cuEventRecord(e, s);
    Status st = rc == cu::kSuccess ? vendor::PollUntil([&](bool* done) { return Query(e, done); }, timeout_ms, "stream")
                                   : cu::Error(api_, rc, "cuEventRecord");
    api_.cuEventDestroy_v2(e);
    return st;
  }

 private:
  class OwnedEvent final : public CudaEvent {
   public:
    OwnedEvent(CudaDevice* d, std::shared_ptr<Device> keep, cu::CUevent e)
        : CudaEvent(e, false), device_(d), keep_(std::move(keep)) {}
    ~OwnedEvent() override {
      if (device_->Bind().ok()) device_->api().cuEventDestroy_v2(event);
    }

   private:
    CudaDevice* device_;
    std::shared_ptr<Device> keep_;
  };

  Status RequireIpc() const {
    if (api_.has_ipc()) return Status::Ok();
    return Status(Code::kBackendUnavailable, rt_->lib.path + " lacks the cuIpc* functions");
  }

  Status Locate(DevicePtr ptr, size_t bytes) const {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (table_.Find(ptr, bytes) != table_.end()) return Status::Ok();
      if (table_.Overlaps(ptr, bytes)) return OutOfRange(ptr, bytes);
    }
    // Memory another user of the primary context allocated (a framework's tensor).
    if (bytes > 0 && Bind().ok()) {
      cu::CUdeviceptr base = 0;
      size_t size = 0;
      if (api_.cuMemGetAddressRange_v2(&base, &size, ptr) == cu::kSuccess && ptr - base <= size &&
          bytes <= size - (ptr - base)) {
        return Status::Ok();
      }
    }
    return OutOfRange(ptr, bytes);
  }

  Status OutOfRange(DevicePtr ptr, size_t bytes) const {
    return Status(Code::kOutOfRange, "[" + HexAddress(ptr) + ", +" + std::to_string(bytes) +
                                         ") is not memory of cuda device " + std::to_string(ordinal_));
  }

  Status Query(cu::CUevent e, bool* complete) const {
    cu::CUresult rc = api_.cuEventQuery(e);
    if (rc == cu::kSuccess || rc == cu::kErrorNotReady) {
      *complete = rc == cu::kSuccess;
      return Status::Ok();
    }
    return cu::Error(api_, rc, "cuEventQuery");
  }

  Status DrainStreams() {
    std::lock_guard<std::mutex> lock(streams_mu_);
    for (CudaStream* s : streams_) EPD_RETURN_IF_ERROR(SyncStream(s->handle(), kTeardownWaitMs));
    return Status::Ok();
  }

  const cu::Runtime* rt_;
  const cu::Api& api_;
  const int ordinal_;
  const cu::CUdevice dev_;
  const cu::CUcontext ctx_;
  mutable std::mutex mu_;
  mutable vendor::AllocationTable table_;
  std::mutex streams_mu_;
  std::set<CudaStream*> streams_;
};

CudaStream::~CudaStream() {
  device_->Forget(this);
  if (!device_->Bind().ok()) return;
  // Destroying a busy stream is legal in CUDA (it is released once idle), but we still
  // give queued work a bounded chance to finish while the caller's memory is valid.
  device_->SyncStream(stream_, kTeardownWaitMs);
  device_->api().cuStreamDestroy_v2(stream_);
}

}  // namespace

Status CreateCudaDevice(int ordinal, std::unique_ptr<Device>* out) {
  const cu::Runtime* rt = cu::Load();
  if (rt->lib.why != vendor::Unavailable::kNone) return vendor::UnavailableStatus("cuda", rt->lib.reason);
  if (ordinal < 0 || ordinal >= rt->devices) {
    return Status(Code::kBadArgument, "cuda deviceId " + std::to_string(ordinal) + " is out of range: the driver sees " +
                                          std::to_string(rt->devices) + " GPU(s)");
  }
  const cu::Api& api = rt->api;
  cu::CUdevice dev = 0;
  cu::CUresult rc = api.cuDeviceGet(&dev, ordinal);
  if (rc != cu::kSuccess) return cu::Error(api, rc, "cuDeviceGet(" + std::to_string(ordinal) + ")");
  cu::CUcontext ctx = nullptr;
  rc = api.cuDevicePrimaryCtxRetain(&ctx, dev);
  if (rc != cu::kSuccess) return cu::Error(api, rc, "cuDevicePrimaryCtxRetain");
  rc = api.cuCtxSetCurrent(ctx);
  if (rc != cu::kSuccess) {
    api.cuDevicePrimaryCtxRelease_v2(dev);
    return cu::Error(api, rc, "cuCtxSetCurrent");
  }
  out->reset(new CudaDevice(rt, ordinal, dev, ctx));
  return Status::Ok();
}

}  // namespace epd
