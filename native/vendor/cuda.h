// The CUDA driver API (libcuda.so.1), declared here from ../shared/docs/vendor-apis.md
// §4.4. Symbols are looked up by their versioned export names (cuMemAlloc_v2, ...):
// the unsuffixed exports of several of them are legacy ABIs. test/vendor checks these
// declarations against the toolkit's cuda.h when one is installed on the machine.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "util/status.h"
#include "vendor/loader.h"

namespace epd {
namespace vendor {
namespace cuda {

using CUresult = int;
using CUdevice = int;
using CUdeviceptr = unsigned long long;  // CUdeviceptr_v2 on every 64-bit platform
using CUcontext = void*;
using CUstream = void*;
using CUevent = void*;

constexpr size_t kIpcHandleSize = 64;
struct CUipcMemHandle {
  char reserved[kIpcHandleSize];
};

constexpr CUresult kSuccess = 0;
constexpr CUresult kErrorStubLibrary = 34;
constexpr CUresult kErrorNoDevice = 100;
constexpr CUresult kErrorNotReady = 600;

constexpr unsigned kStreamNonBlocking = 0x1;       // CU_STREAM_NON_BLOCKING
constexpr unsigned kEventDisableTiming = 0x2;      // CU_EVENT_DISABLE_TIMING
constexpr unsigned kIpcMemLazyEnablePeerAccess = 0x1;  // CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS

struct Api {
  // Required.
  CUresult (*cuInit)(unsigned int flags);
  CUresult (*cuDriverGetVersion)(int* version);
  CUresult (*cuDeviceGetCount)(int* count);
  CUresult (*cuDeviceGet)(CUdevice* device, int ordinal);
  CUresult (*cuDevicePrimaryCtxRetain)(CUcontext* ctx, CUdevice dev);
  CUresult (*cuDevicePrimaryCtxRelease_v2)(CUdevice dev);
  CUresult (*cuCtxGetCurrent)(CUcontext* ctx);
  CUresult (*cuCtxSetCurrent)(CUcontext ctx);
  CUresult (*cuMemAlloc_v2)(CUdeviceptr* dptr, size_t bytesize);
  CUresult (*cuMemFree_v2)(CUdeviceptr dptr);
  CUresult (*cuMemGetAddressRange_v2)(CUdeviceptr* pbase, size_t* psize, CUdeviceptr dptr);
  CUresult (*cuMemcpyHtoD_v2)(CUdeviceptr dstDevice, const void* srcHost, size_t byteCount);
  CUresult (*cuMemcpyDtoH_v2)(void* dstHost, CUdeviceptr srcDevice, size_t byteCount);
  CUresult (*cuMemcpyDtoDAsync_v2)(CUdeviceptr dstDevice, CUdeviceptr srcDevice, size_t byteCount, CUstream stream);
  CUresult (*cuStreamCreate)(CUstream* stream, unsigned int flags);
  CUresult (*cuStreamDestroy_v2)(CUstream stream);
  CUresult (*cuStreamWaitEvent)(CUstream stream, CUevent event, unsigned int flags);
  CUresult (*cuEventCreate)(CUevent* event, unsigned int flags);
  CUresult (*cuEventDestroy_v2)(CUevent event);
  CUresult (*cuEventRecord)(CUevent event, CUstream stream);
  CUresult (*cuEventQuery)(CUevent event);
  CUresult (*cuGetErrorName)(CUresult error, const char** str);
  CUresult (*cuGetErrorString)(CUresult error, const char** str);

  // Optional: IPC is absent or refused on some platforms (WSL, some containers).
  CUresult (*cuIpcGetMemHandle)(CUipcMemHandle* handle, CUdeviceptr dptr);
  CUresult (*cuIpcOpenMemHandle_v2)(CUdeviceptr* pdptr, CUipcMemHandle handle, unsigned int flags);
  CUresult (*cuIpcCloseMemHandle)(CUdeviceptr dptr);

  bool has_ipc() const {
    return cuIpcGetMemHandle != nullptr && cuIpcOpenMemHandle_v2 != nullptr && cuIpcCloseMemHandle != nullptr;
  }
};

struct Runtime {
  Api api{};
  Opened lib;
  int devices = 0;
  int driver_version = 0;  // e.g. 12040 for 12.4
};

// Loads libcuda.so.1 (EPD_TRANSFER_CUDA_LIB overrides), resolves it, calls cuInit(0)
// once and counts devices. No context is created here: that costs device memory and
// happens only when a cuda device is opened. Never null; check rt->lib.why.
const Runtime* Load();

// A Status for a failed driver call `what`, with the driver's name and text for `rc`.
Status Error(const Api& api, CUresult rc, const std::string& what);

}  // namespace cuda
}  // namespace vendor
}  // namespace epd
