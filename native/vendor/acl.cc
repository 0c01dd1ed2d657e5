#include "vendor/acl.h"

#include <cerrno>
#include <cstring>
#include <cstdlib>
#include <map>
#include <mutex>

namespace epd {
namespace vendor {
namespace acl {
namespace {

LibrarySpec Spec() {
  LibrarySpec spec{"acl", "EPD_TRANSFER_ACL_LIB", {}};
  // The set_env.sh layouts of CANN 7/8 (ascend-toolkit) and 8.5+/9.x (cann), then
  // the loader's own search path (LD_LIBRARY_PATH, ld.so.cache).
  for (const char* var : {"ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME"}) {
    const char* v = std::getenv(var);
    if (v != nullptr && *v != '\0') spec.candidates.push_back(std::string(v) + "/lib64/libascendcl.so");
  }
  spec.candidates.push_back("libascendcl.so");
  spec.candidates.push_back("/usr/local/Ascend/ascend-toolkit/latest/lib64/libascendcl.so");
  spec.candidates.push_back("/usr/local/Ascend/cann/lib64/libascendcl.so");
  return spec;
}

std::vector<Symbol> Symbols(Api* a) {
#define REQ(f) Symbol{#f, reinterpret_cast<void**>(&a->f), true}
#define OPT(f) Symbol{#f, reinterpret_cast<void**>(&a->f), false}
  return {
      REQ(aclInit), REQ(aclrtSetDevice), REQ(aclrtResetDevice), REQ(aclrtGetDeviceCount),
      REQ(aclrtGetCurrentContext), REQ(aclrtSetCurrentContext), REQ(aclrtMalloc), REQ(aclrtFree),
      REQ(aclrtMemcpy), REQ(aclrtMemcpyAsync), REQ(aclrtCreateStream), REQ(aclrtDestroyStream),
      REQ(aclrtCreateEvent), REQ(aclrtDestroyEvent), REQ(aclrtRecordEvent), REQ(aclrtStreamWaitEvent),
      OPT(aclGetRecentErrMsg), OPT(aclrtCreateEventWithFlag), OPT(aclrtQueryEventStatus), OPT(aclrtQueryEvent),
      OPT(aclrtSynchronizeEventWithTimeout), OPT(aclrtSynchronizeStreamWithTimeout), OPT(aclrtDestroyStreamForce),
      OPT(aclrtPointerGetAttributes), OPT(aclrtDeviceGetBareTgid), OPT(aclrtIpcMemGetExportKey),
      OPT(aclrtIpcMemSetImportPid), OPT(aclrtIpcMemImportByKey), OPT(aclrtIpcMemClose), OPT(aclsysGetVersionStr),
  };
#undef REQ
#undef OPT
}

Runtime* Open() {
  auto* rt = new Runtime();
  rt->lib = OpenLibrary(Spec(), Symbols(&rt->api));
  if (rt->lib.why != Unavailable::kNone) return rt;
  const Api& api = rt->api;
  if (api.aclrtQueryEventStatus == nullptr && api.aclrtQueryEvent == nullptr) {
    rt->lib.why = Unavailable::kMissingSymbol;
    rt->lib.reason = rt->lib.path + " has neither aclrtQueryEventStatus nor aclrtQueryEvent";
    return rt;
  }
  // Once per process (per library). A runtime someone else in the process already
  // initialised answers ACL_ERROR_REPEAT_INITIALIZE, which is success for us.
  aclError rc = api.aclInit(nullptr);
  if (rc == kErrorCompilingStubMode) {
    rt->lib.why = Unavailable::kStubLibrary;
    rt->lib.reason = rt->lib.path +
                     " is the CANN stub library (aclInit returned ACL_ERROR_COMPILING_STUB_MODE 100039): the NPU "
                     "driver is missing or LD_LIBRARY_PATH points at the toolkit's devlib";
    return rt;
  }
  if (rc != kSuccess && rc != kErrorRepeatInitialize) {
    rt->lib.why = Unavailable::kInitFailed;
    rt->lib.reason = Error(api, rc, "aclInit").message();
    return rt;
  }
  uint32_t count = 0;
  rc = api.aclrtGetDeviceCount(&count);
  if (rc == kErrorCompilingStubMode) {
    rt->lib.why = Unavailable::kStubLibrary;
    rt->lib.reason = rt->lib.path + " is the CANN stub library (aclrtGetDeviceCount returned 100039)";
    return rt;
  }
  if (rc == kErrorRtNoDevice || (rc == kSuccess && count == 0)) {
    rt->lib.why = Unavailable::kNoDevice;
    rt->lib.reason = "the ACL runtime at " + rt->lib.path + " sees no NPU (check ASCEND_RT_VISIBLE_DEVICES)";
    return rt;
  }
  if (rc != kSuccess) {
    rt->lib.why = Unavailable::kInitFailed;
    rt->lib.reason = Error(api, rc, "aclrtGetDeviceCount").message();
    return rt;
  }
  rt->devices = count;
  if (api.aclsysGetVersionStr != nullptr) {
    char pkg[] = "runtime";
    char version[128] = {0};  // ACL_PKG_VERSION_MAX_SIZE
    if (api.aclsysGetVersionStr(pkg, version) == kSuccess) rt->version.assign(version, strnlen(version, sizeof version));
  }
  return rt;
}

}  // namespace

const Runtime* Load() {
  static std::mutex mu;
  static auto* cache = new std::map<std::string, Runtime*>();  // never freed: runtimes outlive exit handlers
  std::lock_guard<std::mutex> lock(mu);
  std::string key = OverrideOf(Spec());
  auto it = cache->find(key);
  if (it != cache->end()) return it->second;
  Runtime* rt = Open();
  (*cache)[key] = rt;
  return rt;
}

const char* ErrorName(aclError rc) {
  switch (rc) {
    case 100000: return "ACL_ERROR_INVALID_PARAM";
    case 100001: return "ACL_ERROR_UNINITIALIZE";
    case 100002: return "ACL_ERROR_REPEAT_INITIALIZE";
    case 100037: return "ACL_ERROR_REPEAT_FINALIZE";
    case 100039: return "ACL_ERROR_COMPILING_STUB_MODE";
    case 200000: return "ACL_ERROR_BAD_ALLOC";
    case 200001: return "ACL_ERROR_API_NOT_SUPPORT";
    case 200002: return "ACL_ERROR_INVALID_DEVICE";
    case 500000: return "ACL_ERROR_INTERNAL_ERROR";
    case 500001: return "ACL_ERROR_FAILURE";
    case 500003: return "ACL_ERROR_RT_FAILURE";
    case 500004: return "ACL_ERROR_DRV_FAILURE";
    case 107000: return "ACL_ERROR_RT_PARAM_INVALID";
    case 107001: return "ACL_ERROR_RT_INVALID_DEVICEID";
    case 107002: return "ACL_ERROR_RT_CONTEXT_NULL";
    case 107003: return "ACL_ERROR_RT_STREAM_CONTEXT";
    case 107019: return "ACL_ERROR_RT_WAIT_TIMEOUT";
    case 207000: return "ACL_ERROR_RT_FEATURE_NOT_SUPPORT";
    case 207001: return "ACL_ERROR_RT_MEMORY_ALLOCATION";
    case 207004: return "ACL_ERROR_RT_NO_DEVICE";
    case 207006: return "ACL_ERROR_RT_NO_PERMISSION";
    case 207018: return "ACL_ERROR_RT_DEVICE_OOM";
    case 507000: return "ACL_ERROR_RT_INTERNAL_ERROR";
    case 507006: return "ACL_ERROR_RT_EVENT_NOT_COMPLETE";
    case 507033: return "ACL_ERROR_RT_DEV_SETUP_ERROR";
    case 507046: return "ACL_ERROR_RT_STREAM_SYNC_TIMEOUT";
    case 507047: return "ACL_ERROR_RT_EVENT_SYNC_TIMEOUT";
    case 507899: return "ACL_ERROR_RT_DRV_INTERNAL_ERROR";
  }
  return "";
}

Status Error(const Api& api, aclError rc, const std::string& what) {
  std::string msg = what + " failed: ACL error " + std::to_string(rc);
  const char* name = ErrorName(rc);
  if (*name != '\0') msg += std::string(" ") + name;
  if (api.aclGetRecentErrMsg != nullptr) {
    const char* recent = api.aclGetRecentErrMsg();
    if (recent != nullptr && *recent != '\0') msg += std::string(": ") + recent;
  }
  switch (rc) {
    case 100000:
    case 107000:
      return Status(Code::kBadArgument, msg);
    case 200000:
    case 207001:
    case 207018:
      return Status(Code::kSystem, msg, ENOMEM);
    case 107019:
    case 507046:
    case 507047:
      return Status(Code::kTimeout, msg);
    case 100039:
    case 107001:
    case 200001:
    case 200002:
    case 207000:
    case 207004:
      return Status(Code::kBackendUnavailable, msg);
    case 207006:
      return Status(Code::kSystem, msg, EACCES);
    default:
      return Status(Code::kSystem, msg, EIO);
  }
}

Status QueryEvent(const Api& api, aclrtEvent e, bool* complete) {
  int status = -1;
  if (api.aclrtQueryEventStatus != nullptr) {
    aclError rc = api.aclrtQueryEventStatus(e, &status);
    if (rc != kSuccess) return Error(api, rc, "aclrtQueryEventStatus");
    *complete = status == kEventRecordedStatusComplete;
    return Status::Ok();
  }
  aclError rc = api.aclrtQueryEvent(e, &status);
  if (rc != kSuccess) return Error(api, rc, "aclrtQueryEvent");
  *complete = status == kEventStatusComplete;  // the deprecated enum: COMPLETE = 0
  return Status::Ok();
}

}  // namespace acl
}  // namespace vendor
}  // namespace epd
