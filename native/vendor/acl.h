// Ascend ACL runtime (libascendcl.so), declared here from the prototypes in
// ../shared/docs/vendor-apis.md §1 (hicann/runtime acl_rt.h, ACL 1.17). Only what
// the acl device uses. Enumerations are passed as int: every ACL enum we use fits
// in int, which is how the C ABI passes them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "util/status.h"
#include "vendor/loader.h"

namespace epd {
namespace vendor {
namespace acl {

using aclError = int;
using aclrtStream = void*;
using aclrtEvent = void*;
using aclrtContext = void*;

constexpr aclError kSuccess = 0;
constexpr aclError kErrorInvalidParam = 100000;
constexpr aclError kErrorRepeatInitialize = 100002;
constexpr aclError kErrorCompilingStubMode = 100039;  // every call of a stub libascendcl.so
constexpr aclError kErrorRtNoDevice = 207004;
constexpr aclError kErrorRtEventNotComplete = 507006;

// aclrtMemcpyKind
constexpr int kMemcpyHostToDevice = 1;
constexpr int kMemcpyDeviceToHost = 2;
constexpr int kMemcpyDeviceToDevice = 3;
// aclrtMemMallocPolicy
constexpr int kMallocHugeFirst = 0;
// aclrtEventRecordedStatus (aclrtQueryEventStatus): NOT_READY = 0, COMPLETE = 1.
constexpr int kEventRecordedStatusComplete = 1;
// aclrtEventStatus (deprecated aclrtQueryEvent): COMPLETE = 0, NOT_READY = 1. Note the
// opposite order.
constexpr int kEventStatusComplete = 0;
// Event flag that makes an event usable in aclrtStreamWaitEvent.
constexpr uint32_t kEventSync = 0x1u;
// aclrtMemLocationType
constexpr int kMemLocationDevice = 1;
// IPC export/import flags; 0 = whitelist on / peer access off, valid on every version.
constexpr uint64_t kIpcExportFlagDefault = 0;
constexpr uint64_t kIpcImportFlagDefault = 0;
constexpr size_t kIpcKeyLength = 65;  // the `len` aclrtIpcMemGetExportKey requires

struct MemLocation {
  uint32_t id;
  int type;  // aclrtMemLocationType
};
struct PtrAttributes {
  MemLocation location;
  uint32_t pageSize;
  uint32_t rsv[4];
};

struct Api {
  // Required.
  aclError (*aclInit)(const char* configPath);
  aclError (*aclrtSetDevice)(int32_t deviceId);
  aclError (*aclrtResetDevice)(int32_t deviceId);
  aclError (*aclrtGetDeviceCount)(uint32_t* count);
  aclError (*aclrtGetCurrentContext)(aclrtContext* context);
  aclError (*aclrtSetCurrentContext)(aclrtContext context);
  aclError (*aclrtMalloc)(void** devPtr, size_t size, int policy);
  aclError (*aclrtFree)(void* devPtr);
  aclError (*aclrtMemcpy)(void* dst, size_t destMax, const void* src, size_t count, int kind);
  aclError (*aclrtMemcpyAsync)(void* dst, size_t destMax, const void* src, size_t count, int kind, aclrtStream stream);
  aclError (*aclrtCreateStream)(aclrtStream* stream);
  aclError (*aclrtDestroyStream)(aclrtStream stream);
  aclError (*aclrtCreateEvent)(aclrtEvent* event);
  aclError (*aclrtDestroyEvent)(aclrtEvent event);
  aclError (*aclrtRecordEvent)(aclrtEvent event, aclrtStream stream);
  aclError (*aclrtStreamWaitEvent)(aclrtStream stream, aclrtEvent event);

  // Optional: tested before use.
  const char* (*aclGetRecentErrMsg)();
  aclError (*aclrtCreateEventWithFlag)(aclrtEvent* event, uint32_t flag);
  aclError (*aclrtQueryEventStatus)(aclrtEvent event, int* status);
  aclError (*aclrtQueryEvent)(aclrtEvent event, int* status);
  aclError (*aclrtSynchronizeEventWithTimeout)(aclrtEvent event, int32_t timeout);
  aclError (*aclrtSynchronizeStreamWithTimeout)(aclrtStream stream, int32_t timeout);
  aclError (*aclrtDestroyStreamForce)(aclrtStream stream);
  aclError (*aclrtPointerGetAttributes)(const void* ptr, PtrAttributes* attributes);
  aclError (*aclrtDeviceGetBareTgid)(int32_t* pid);
  aclError (*aclrtIpcMemGetExportKey)(void* devPtr, size_t size, char* key, size_t len, uint64_t flags);
  aclError (*aclrtIpcMemSetImportPid)(const char* key, int32_t* pid, size_t num);
  aclError (*aclrtIpcMemImportByKey)(void** devPtr, const char* key, uint64_t flags);
  aclError (*aclrtIpcMemClose)(const char* key);
  aclError (*aclsysGetVersionStr)(char* pkgName, char* versionStr);

  bool has_ipc() const {
    return aclrtIpcMemGetExportKey != nullptr && aclrtIpcMemImportByKey != nullptr && aclrtIpcMemClose != nullptr &&
           aclrtIpcMemSetImportPid != nullptr;
  }
};

// The loaded runtime: the API table, where it came from, and whether it can run.
struct Runtime {
  Api api{};
  Opened lib;
  uint32_t devices = 0;
  std::string version;  // aclsysGetVersionStr("runtime"), when available
};

// Loads libascendcl.so (EPD_TRANSFER_ACL_LIB, $ASCEND_HOME_PATH/lib64, ...), resolves
// it, calls aclInit once and counts devices. Never null; check rt->lib.why.
const Runtime* Load();

// A Status for a failed ACL call `what`: our code for `rc`, with ACL's name for it and
// the runtime's own message (aclGetRecentErrMsg, read on the failing thread).
Status Error(const Api& api, aclError rc, const std::string& what);

// Whether the work recorded on `e` has run: aclrtQueryEventStatus, or the deprecated
// aclrtQueryEvent (whose enum is the other way round) where the runtime lacks it.
Status QueryEvent(const Api& api, aclrtEvent e, bool* complete);

// ACL's name for an error code ("ACL_ERROR_RT_MEMORY_ALLOCATION"), or "".
const char* ErrorName(aclError rc);

}  // namespace acl
}  // namespace vendor
}  // namespace epd
