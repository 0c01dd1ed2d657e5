#include "vendor/hccl.h"

#include <cerrno>
#include <cstdlib>
#include <map>
#include <mutex>

#include "vendor/acl.h"

namespace epd {
namespace vendor {
namespace hccl {
namespace {

LibrarySpec Spec() {
  LibrarySpec spec{"hccl", "EPD_TRANSFER_HCCL_LIB", {}};
  for (const char* var : {"ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME"}) {
    const char* v = std::getenv(var);
    if (v != nullptr && *v != '\0') spec.candidates.push_back(std::string(v) + "/lib64/libhccl.so");
  }
  spec.candidates.push_back("libhccl.so");
  spec.candidates.push_back("/usr/local/Ascend/ascend-toolkit/latest/lib64/libhccl.so");
  spec.candidates.push_back("/usr/local/Ascend/cann/lib64/libhccl.so");
  return spec;
}

std::vector<Symbol> Symbols(Api* a) {
#define REQ(f) Symbol{#f, reinterpret_cast<void**>(&a->f), true}
#define OPT(f) Symbol{#f, reinterpret_cast<void**>(&a->f), false}
  return {REQ(HcclGetRootInfo), REQ(HcclCommInitRootInfo), REQ(HcclCommDestroy), REQ(HcclSend), REQ(HcclRecv),
          OPT(HcclGetErrorString), OPT(HcclBatchSendRecv), OPT(HcclGetCommAsyncError)};
#undef REQ
#undef OPT
}

Runtime* Open() {
  auto* rt = new Runtime();
  // ACL first: libhccl.so depends on libascendcl.so by soname, and the dynamic loader
  // then reuses the runtime we opened instead of searching for another copy.
  const acl::Runtime* acl_rt = acl::Load();
  if (acl_rt->lib.why != Unavailable::kNone) {
    rt->lib.why = Unavailable::kNeedsOther;
    rt->lib.reason = "HCCL sends on ACL streams, and the acl backend is unavailable: " + acl_rt->lib.reason;
    return rt;
  }
  rt->lib = OpenLibrary(Spec(), Symbols(&rt->api));
  return rt;
}

}  // namespace

const Runtime* Load() {
  static std::mutex mu;
  static auto* cache = new std::map<std::string, Runtime*>();
  std::lock_guard<std::mutex> lock(mu);
  // The cache key covers both libraries: HCCL's usability depends on ACL's.
  std::string key = OverrideOf(Spec()) + "\n" + OverrideOf(LibrarySpec{"acl", "EPD_TRANSFER_ACL_LIB", {}});
  auto it = cache->find(key);
  if (it != cache->end()) return it->second;
  Runtime* rt = Open();
  (*cache)[key] = rt;
  return rt;
}

Status Error(const Api& api, HcclResult rc, const std::string& what) {
  std::string msg = what + " failed: HCCL error " + std::to_string(rc);
  if (api.HcclGetErrorString != nullptr) {
    const char* text = api.HcclGetErrorString(rc);
    if (text != nullptr && *text != '\0') msg += std::string(": ") + text;
  }
  switch (rc) {
    case 1:  // HCCL_E_PARA
    case 2:  // HCCL_E_PTR
      return Status(Code::kBadArgument, msg);
    case 3:   // HCCL_E_MEMORY
    case 24:  // HCCL_E_OOM
      return Status(Code::kSystem, msg, ENOMEM);
    case 5:  // HCCL_E_NOT_SUPPORT
    case 7:  // HCCL_E_UNAVAIL
      return Status(Code::kBackendUnavailable, msg);
    case 9:  // HCCL_E_TIMEOUT
      return Status(Code::kTimeout, msg);
    case 11:  // HCCL_E_TCP_CONNECT
    case 12:  // HCCL_E_ROCE_CONNECT
    case 13:  // HCCL_E_TCP_TRANSFER
    case 14:  // HCCL_E_ROCE_TRANSFER
    case 19:  // HCCL_E_NETWORK
    case 21:  // HCCL_E_REMOTE
      return Status(Code::kPeerLost, msg);
    default:
      return Status(Code::kSystem, msg, EIO);
  }
}

}  // namespace hccl
}  // namespace vendor
}  // namespace epd
