#include "vendor/cuda.h"

#include <cerrno>
#include <map>
#include <mutex>

namespace epd {
namespace vendor {
namespace cuda {
namespace {

LibrarySpec Spec() {
  // Only the major-versioned soname: the unversioned libcuda.so is a development link
  // that often points at the toolkit's stub (stubs/libcuda.so).
  return LibrarySpec{"cuda", "EPD_TRANSFER_CUDA_LIB", {"libcuda.so.1"}};
}

std::vector<Symbol> Symbols(Api* a) {
#define REQ(f) Symbol{#f, reinterpret_cast<void**>(&a->f), true}
#define OPT(f) Symbol{#f, reinterpret_cast<void**>(&a->f), false}
  return {
      REQ(cuInit), REQ(cuDriverGetVersion), REQ(cuDeviceGetCount), REQ(cuDeviceGet),
      REQ(cuDevicePrimaryCtxRetain), REQ(cuDevicePrimaryCtxRelease_v2), REQ(cuCtxGetCurrent), REQ(cuCtxSetCurrent),
      REQ(cuMemAlloc_v2), REQ(cuMemFree_v2), REQ(cuMemGetAddressRange_v2), REQ(cuMemcpyHtoD_v2),
      REQ(cuMemcpyDtoH_v2), REQ(cuMemcpyDtoDAsync_v2), REQ(cuStreamCreate), REQ(cuStreamDestroy_v2),
      REQ(cuStreamWaitEvent), REQ(cuEventCreate), REQ(cuEventDestroy_v2), REQ(cuEventRecord),
      REQ(cuEventQuery), REQ(cuGetErrorName), REQ(cuGetErrorString),
      OPT(cuIpcGetMemHandle), OPT(cuIpcOpenMemHandle_v2), OPT(cuIpcCloseMemHandle),
  };
#undef REQ
#undef OPT
}

Runtime* Open() {
  auto* rt = new Runtime();
  rt->lib = OpenLibrary(Spec(), Symbols(&rt->api));
  if (rt->lib.why != Unavailable::kNone) return rt;
  const Api& api = rt->api;
  CUresult rc = api.cuInit(0);
  if (rc == kErrorStubLibrary) {
    rt->lib.why = Unavailable::kStubLibrary;
    rt->lib.reason = rt->lib.path +
                     " is the CUDA toolkit's stub driver (cuInit returned CUDA_ERROR_STUB_LIBRARY 34): no NVIDIA "
                     "driver is installed, or the stubs directory is on LD_LIBRARY_PATH";
    return rt;
  }
  if (rc == kErrorNoDevice) {
    rt->lib.why = Unavailable::kNoDevice;
    rt->lib.reason = "the CUDA driver at " + rt->lib.path + " sees no GPU (CUDA_ERROR_NO_DEVICE; check CUDA_VISIBLE_DEVICES)";
    return rt;
  }
  if (rc != kSuccess) {
    rt->lib.why = Unavailable::kInitFailed;
    rt->lib.reason = Error(api, rc, "cuInit").message();
    return rt;
  }
  int count = 0;
  rc = api.cuDeviceGetCount(&count);
  if (rc != kSuccess) {
    rt->lib.why = Unavailable::kInitFailed;
    rt->lib.reason = Error(api, rc, "cuDeviceGetCount").message();
    return rt;
  }
  if (count <= 0) {
    rt->lib.why = Unavailable::kNoDevice;
    rt->lib.reason = "the CUDA driver at " + rt->lib.path + " sees no GPU (check CUDA_VISIBLE_DEVICES)";
    return rt;
  }
  rt->devices = count;
  api.cuDriverGetVersion(&rt->driver_version);
  return rt;
}

}  // namespace

const Runtime* Load() {
  static std::mutex mu;
  static auto* cache = new std::map<std::string, Runtime*>();  // never freed, like the libraries
  std::lock_guard<std::mutex> lock(mu);
  std::string key = OverrideOf(Spec());
  auto it = cache->find(key);
  if (it != cache->end()) return it->second;
  Runtime* rt = Open();
  (*cache)[key] = rt;
  return rt;
}

Status Error(const Api& api, CUresult rc, const std::string& what) {
  const char* name = nullptr;
  const char* text = nullptr;
  if (api.cuGetErrorName == nullptr || api.cuGetErrorName(rc, &name) != kSuccess) name = nullptr;
  if (api.cuGetErrorString == nullptr || api.cuGetErrorString(rc, &text) != kSuccess) text = nullptr;
  std::string msg = what + " failed: CUDA error " + std::to_string(rc);
  if (name != nullptr) msg += std::string(" ") + name;
  if (text != nullptr) msg += std::string(": ") + text;
  switch (rc) {
    case 1:    // CUDA_ERROR_INVALID_VALUE
    case 400:  // CUDA_ERROR_INVALID_HANDLE
      return Status(Code::kBadArgument, msg);
    case 2:  // CUDA_ERROR_OUT_OF_MEMORY
      return Status(Code::kSystem, msg, ENOMEM);
    case 909:  // CUDA_ERROR_TIMEOUT
      return Status(Code::kTimeout, msg);
    case 3:    // CUDA_ERROR_NOT_INITIALIZED
    case 4:    // CUDA_ERROR_DEINITIALIZED
    case 34:   // CUDA_ERROR_STUB_LIBRARY
    case 35:   // CUDA_ERROR_INSUFFICIENT_DRIVER
    case 100:  // CUDA_ERROR_NO_DEVICE
    case 101:  // CUDA_ERROR_INVALID_DEVICE
    case 801:  // CUDA_ERROR_NOT_SUPPORTED
    case 803:  // CUDA_ERROR_SYSTEM_DRIVER_MISMATCH
    case 804:  // CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE
      return Status(Code::kBackendUnavailable, msg);
    default:
      return Status(Code::kSystem, msg, EIO);
  }
}

}  // namespace cuda
}  // namespace vendor
}  // namespace epd
