// Bookkeeping shared by the vendor devices (acl, cuda): which device ranges are ours,
// which are IPC imports, and the IPC key format that carries a sub-range.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <iterator>
#include <map>
#include <string>

#include "device.h"

namespace epd {
namespace vendor {

struct DeviceAllocation {
  size_t bytes = 0;     // what the caller asked for (bounds checks)
  size_t capacity = 0;  // what the runtime mapped (IPC export, destMax)
  bool imported = false;
  std::string ipc_key;  // owner: the vendor export key, once exported; importer: the key it came from
  int import_refs = 0;  // importer: opens of the same key in this process
};

// Allocations and imports by base address. Not thread-safe: the device locks.
class AllocationTable {
 public:
  using Map = std::map<DevicePtr, DeviceAllocation>;

  // The entry whose [base, base + bytes) holds [ptr, ptr + len), or end().
  Map::iterator Find(DevicePtr ptr, size_t len) {
    auto it = map_.upper_bound(ptr);
    if (it == map_.begin()) return map_.end();
    --it;
    const size_t bytes = it->second.bytes;
    if (ptr - it->first <= bytes && len <= bytes - (ptr - it->first)) return it;
    return map_.end();
  }
  // True when [ptr, ptr + len) touches any entry's mapped capacity.
  bool Overlaps(DevicePtr ptr, size_t len) const {
    const DevicePtr end = ptr + (len == 0 ? 1 : len);
    auto it = map_.lower_bound(end);
    if (it == map_.begin()) return false;
    --it;
    return ptr < it->first + std::max(it->second.capacity, it->second.bytes);
  }
  Map::iterator FindImportByKey(const std::string& key) {
    for (auto it = map_.begin(); it != map_.end(); ++it) {
      if (it->second.imported && it->second.ipc_key == key) return it;
    }
    return map_.end();
  }
  Map::iterator end() { return map_.end(); }
  Map& map() { return map_; }

 private:
  Map map_;
};

// "<tag>:<offset>:<bytes>:<capacity>:<vendor key>": the vendor key names the whole
// exported allocation; offset and bytes name the part the key is for.
inline std::string FormatIpcKey(const char* tag, size_t offset, size_t bytes, size_t capacity,
                                const std::string& vendor_key) {
  return std::string(tag) + ":" + std::to_string(offset) + ":" + std::to_string(bytes) + ":" +
         std::to_string(capacity) + ":" + vendor_key;
}

struct ParsedIpcKey {
  size_t offset = 0;
  size_t bytes = 0;
  size_t capacity = 0;
  std::string vendor_key;
};

inline bool ParseIpcKey(const std::string& key, const char* tag, ParsedIpcKey* out) {
  const std::string prefix = std::string(tag) + ":";
  if (key.compare(0, prefix.size(), prefix) != 0) return false;
  size_t pos = prefix.size();
  size_t* fields[] = {&out->offset, &out->bytes, &out->capacity};
  for (size_t* f : fields) {
    size_t colon = key.find(':', pos);
    if (colon == std::string::npos || colon == pos) return false;
    char* end = nullptr;
    unsigned long long v = std::strtoull(key.c_str() + pos, &end, 10);
    if (end != key.c_str() + colon) return false;
    *f = static_cast<size_t>(v);
    pos = colon + 1;
  }
  out->vendor_key = key.substr(pos);
  return !out->vendor_key.empty() && out->bytes > 0 && out->offset <= out->capacity &&
         out->bytes <= out->capacity - out->offset;
}

// The device kind an IPC key belongs to ("acl", "cuda"), or null for a host key.
inline const char* IpcKeyDeviceKind(const std::string& key) {
  if (key.compare(0, 5, "acl1:") == 0) return "acl";
  if (key.compare(0, 6, "cuda1:") == 0) return "cuda";
  return nullptr;
}

inline std::string HexAddress(DevicePtr p) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(p));
  return buf;
}

}  // namespace vendor
}  // namespace epd
