// The cuda device: NVIDIA GPU memory, streams, events and IPC through the CUDA driver
// API (libcuda.so.1), loaded at run time (vendor/cuda.h). It exists so that the device
// path runs on a real accelerator where one is available (bench/device/run-cuda.sh).
// The Device interface itself is VendorDevice (device_vendor.h); this file holds the
// driver calls and the context.
//
// The device retains the GPU's primary context (the one the CUDA runtime and
// frameworks share); Bind makes it current on the calling thread.
#include <cstring>

#include "device.h"
#include "device_vendor.h"
#include "vendor/cuda.h"
#include "vendor/device_common.h"

namespace epd {
namespace {

using vendor::DeviceAllocation;
using vendor::HexAddress;
namespace cu = vendor::cuda;

constexpr vendor::VendorTraits kTraits{"cuda", "cuda1", "CUevent", 1};

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

class CudaDevice final : public vendor::VendorDevice {
 public:
  CudaDevice(const cu::Runtime* rt, int ordinal, cu::CUdevice dev, cu::CUcontext ctx)
      : VendorDevice(kTraits, ordinal), rt_(rt), api_(rt->api), dev_(dev), ctx_(ctx) {}

  ~CudaDevice() override {
    ReleaseAll();
    api_.cuDevicePrimaryCtxRelease_v2(dev_);
  }

  Status Bind() const override {
    cu::CUcontext current = nullptr;
    if (api_.cuCtxGetCurrent(&current) == cu::kSuccess && current == ctx_) return Status::Ok();
    cu::CUresult rc = api_.cuCtxSetCurrent(ctx_);
    if (rc != cu::kSuccess) return cu::Error(api_, rc, "cuCtxSetCurrent(device " + std::to_string(ordinal()) + ")");
    return Status::Ok();
  }

 protected:
  Status RequireIpc() const override {
    if (api_.has_ipc()) return Status::Ok();
    return Status(Code::kBackendUnavailable, rt_->lib.path + " lacks the cuIpc* functions");
  }

  // --- memory -----------------------------------------------------------------
  Status Malloc(size_t capacity, DevicePtr* out) override {
    cu::CUdeviceptr p = 0;
    cu::CUresult rc = api_.cuMemAlloc_v2(&p, capacity);
    if (rc != cu::kSuccess) return cu::Error(api_, rc, "cuMemAlloc(" + std::to_string(capacity) + " bytes)");
    *out = p;
    return Status::Ok();
  }

  Status FreeMemory(DevicePtr base) override {
    cu::CUresult rc = api_.cuMemFree_v2(base);
    if (rc != cu::kSuccess) return cu::Error(api_, rc, "cuMemFree(" + HexAddress(base) + ")");
    return Status::Ok();
  }

  // Memory another user of the primary context allocated (a framework's tensor).
  bool IsForeignMemory(DevicePtr ptr, size_t bytes) const override {
    if (!Bind().ok()) return false;
    cu::CUdeviceptr base = 0;
    size_t size = 0;
    return api_.cuMemGetAddressRange_v2(&base, &size, ptr) == cu::kSuccess && ptr - base <= size &&
           bytes <= size - (ptr - base);
  }

  Status CopyIn(DevicePtr dst, size_t, const void* src, size_t bytes) override {
    cu::CUresult rc = api_.cuMemcpyHtoD_v2(dst, src, bytes);
    if (rc != cu::kSuccess) return cu::Error(api_, rc, "cuMemcpyHtoD");
    return Status::Ok();
  }

  Status CopyOut(void* dst, DevicePtr src, size_t bytes) override {
    cu::CUresult rc = api_.cuMemcpyDtoH_v2(dst, src, bytes);
    if (rc != cu::kSuccess) return cu::Error(api_, rc, "cuMemcpyDtoH");
    return Status::Ok();
  }

  Status CopyOnStream(StreamHandle s, DevicePtr dst, size_t, DevicePtr src, size_t bytes) override {
    cu::CUresult rc = api_.cuMemcpyDtoDAsync_v2(dst, src, bytes, s);
    if (rc != cu::kSuccess) return cu::Error(api_, rc, "cuMemcpyDtoDAsync");
    return Status::Ok();
  }

  // --- streams and events ---------------------------------------------------------
  Status NewStream(StreamHandle* s) override {
    // Non-blocking: no implicit ordering with the legacy default stream other code uses.
    cu::CUresult rc = api_.cuStreamCreate(s, cu::kStreamNonBlocking);
    if (rc != cu::kSuccess) return cu::Error(api_, rc, "cuStreamCreate");
    return Status::Ok();
  }

  // Destroying a busy stream is legal in CUDA: it is released once idle.
  void DestroyStream(StreamHandle s, bool) override { api_.cuStreamDestroy_v2(s); }

  Status NewEvent(EventHandle* e, bool) override {
    cu::CUresult rc = api_.cuEventCreate(e, cu::kEventDisableTiming);
    if (rc != cu::kSuccess) return cu::Error(api_, rc, "cuEventCreate");
    return Status::Ok();
  }

  void DestroyEvent(EventHandle e) override { api_.cuEventDestroy_v2(e); }

  Status Record(EventHandle e, StreamHandle s) override {
    cu::CUresult rc = api_.cuEventRecord(e, s);
    if (rc != cu::kSuccess) return cu::Error(api_, rc, "cuEventRecord");
    return Status::Ok();
  }

  Status WaitOnStream(StreamHandle s, EventHandle e) override {
    cu::CUresult rc = api_.cuStreamWaitEvent(s, e, 0);
    if (rc != cu::kSuccess) return cu::Error(api_, rc, "cuStreamWaitEvent");
    return Status::Ok();
  }

  // The driver has no timed waits (cuEventSynchronize has no deadline): the defaults poll.
  Status Query(EventHandle e, bool* complete) const override {
    cu::CUresult rc = api_.cuEventQuery(e);
    if (rc == cu::kSuccess || rc == cu::kErrorNotReady) {
      *complete = rc == cu::kSuccess;
      return Status::Ok();
    }
    return cu::Error(api_, rc, "cuEventQuery");
  }

  // --- IPC ----------------------------------------------------------------------
  // The handle names the whole allocation; it must be taken from its base.
  Status ExportKey(DevicePtr base, const DeviceAllocation&, std::string* vendor_key) override {
    cu::CUipcMemHandle h;
    std::memset(&h, 0, sizeof h);
    cu::CUresult rc = api_.cuIpcGetMemHandle(&h, base);
    if (rc != cu::kSuccess) return cu::Error(api_, rc, "cuIpcGetMemHandle");
    *vendor_key = HexOf(h);
    return Status::Ok();
  }

  bool IsVendorKey(const std::string& vendor_key) const override {
    cu::CUipcMemHandle h;
    return HandleOf(vendor_key, &h);
  }

  Status OpenImport(const std::string& vendor_key, DevicePtr* base) override {
    cu::CUipcMemHandle h;
    HandleOf(vendor_key, &h);  // checked by IsVendorKey
    cu::CUdeviceptr p = 0;
    cu::CUresult rc = api_.cuIpcOpenMemHandle_v2(&p, h, cu::kIpcMemLazyEnablePeerAccess);
    if (rc != cu::kSuccess) return cu::Error(api_, rc, "cuIpcOpenMemHandle");
    *base = p;
    return Status::Ok();
  }

  Status CloseImport(DevicePtr base, const DeviceAllocation&) override {
    cu::CUresult rc = api_.cuIpcCloseMemHandle(base);
    if (rc != cu::kSuccess) return cu::Error(api_, rc, "cuIpcCloseMemHandle");
    return Status::Ok();
  }

 private:
  const cu::Runtime* rt_;
  const cu::Api& api_;
  const cu::CUdevice dev_;
  const cu::CUcontext ctx_;
};

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
