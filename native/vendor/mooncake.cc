#include "vendor/mooncake.h"

#include <cerrno>
#include <map>
#include <mutex>

namespace epd {
namespace vendor {
namespace mooncake {
namespace {

LibrarySpec Spec() {
  // The Python wheel (mooncake-transfer-engine) installs the library inside
  // site-packages; name it with EPD_TRANSFER_MOONCAKE_LIB. A source install puts it
  // on the loader path.
  return LibrarySpec{"mooncake", "EPD_TRANSFER_MOONCAKE_LIB",
                     {"libtransfer_engine.so", "/usr/local/lib/libtransfer_engine.so"}};
}

std::vector<Symbol> Symbols(Api* a) {
#define REQ(f) Symbol{#f, reinterpret_cast<void**>(&a->f), true}
  return {REQ(createTransferEngine), REQ(destroyTransferEngine), REQ(installTransport), REQ(getLocalIpAndPort),
          REQ(openSegment),          REQ(closeSegment),          REQ(registerLocalMemory), REQ(unregisterLocalMemory),
          REQ(allocateBatchID),      REQ(submitTransfer),        REQ(getTransferStatus),   REQ(freeBatchID)};
#undef REQ
}

}  // namespace

const Runtime* Load() {
  static std::mutex mu;
  static auto* cache = new std::map<std::string, Runtime*>();
  std::lock_guard<std::mutex> lock(mu);
  std::string key = OverrideOf(Spec());
  auto it = cache->find(key);
  if (it != cache->end()) return it->second;
  auto* rt = new Runtime();
  rt->lib = OpenLibrary(Spec(), Symbols(&rt->api));
  (*cache)[key] = rt;
  return rt;
}

const char* ErrorName(int rc) {
  switch (rc) {
    case -1: return "ERR_INVALID_ARGUMENT";
    case -2: return "ERR_TOO_MANY_REQUESTS";
    case -3: return "ERR_ADDRESS_NOT_REGISTERED";
    case -4: return "ERR_BATCH_BUSY";
    case -6: return "ERR_DEVICE_NOT_FOUND";
    case -7: return "ERR_ADDRESS_OVERLAPPED";
  }
  return "";
}

Status Error(int rc, const std::string& what) {
  std::string msg = what + " failed: Mooncake error " + std::to_string(rc);
  const char* name = ErrorName(rc);
  if (*name != '\0') msg += std::string(" ") + name;
  switch (rc) {
    case -1:
    case -2:
    case -3:
    case -7:
      return Status(Code::kBadArgument, msg);
    case -6:
      return Status(Code::kBackendUnavailable, msg);
    default:
      return Status(Code::kSystem, msg, EIO);
  }
}

}  // namespace mooncake
}  // namespace vendor
}  // namespace epd
