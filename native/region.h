// Regions: registered, addressable byte ranges that transfers read and write.
//
// Local regions live in the RegionTable and are touched only on the JS thread,
// except for their bytes, which worker threads copy through raw pointers captured at
// submit time. A region is "pinned" by every batch in flight over it, and its
// memory is released only once it is freed *and* unpinned, so no worker ever
// writes into memory that is gone.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <unordered_map>

#include "device.h"
#include "shm.h"
#include "util/status.h"

namespace epd {

enum class RegionKind { kHost, kExternal, kDevice };

inline const char* RegionKindName(RegionKind k) {
  switch (k) {
    case RegionKind::kHost: return "host";
    case RegionKind::kExternal: return "external";
    case RegionKind::kDevice: return "device";
  }
  return "?";
}

struct Region {
  uint32_t id = 0;
  RegionKind kind = RegionKind::kHost;
  uint8_t* ptr = nullptr;    // CPU address of the bytes (null if not host-addressable)
  DevicePtr device_ptr = 0;  // kDevice: the caller's device address
  // kDevice with a host view: keeps `ptr` mapped while the region exists, so a
  // device.free() of the memory under a registered region cannot fault a transfer.
  std::shared_ptr<void> device_memory;
  size_t length = 0;
  std::shared_ptr<ShmMapping> mapping;  // kHost: the shared-memory object
  std::string ipc_key;                  // kDevice: how another process imports it
  std::function<void()> release;        // kExternal: drops the pin on the JS buffer
  int pins = 0;                         // batches in flight that touch this region
  bool freeing = false;                 // free() called; waits for pins to drop

  bool shareable() const { return kind == RegionKind::kHost || !ipc_key.empty(); }
};

// How a peer describes one of its regions in its segment descriptor.
struct RemoteRegionSpec {
  uint32_t id = 0;
  size_t length = 0;
  std::string shm;      // shm object name (host regions)
  uint64_t offset = 0;  // offset of the region inside `shm`
  std::string ipc_key;  // device IPC key (device regions)
  uint64_t addr = 0;    // the region's address in the peer (one-sided vendor transports)
};

class RegionTable {
 public:
  explicit RegionTable(Device* device) : device_(device) {}
  ~RegionTable();

  Status AllocateHost(size_t bytes, bool prefault, Region** out);
  Status AddExternal(uint8_t* ptr, size_t bytes, std::function<void()> release, Region** out);
  Status AddDevice(DevicePtr ptr, size_t bytes, Region** out);

  // ERR_UNKNOWN_REGION for ids never issued or already released; ERR_REGION_FREED
  // for a region whose free() is pending.
  Status Lookup(uint32_t id, Region** out);
  Region* Find(uint32_t id);

  // Marks the region freeing. Returns true when it could be released at once.
  bool MarkFreeing(uint32_t id);
  // Releases the region if it is freeing and unpinned; true if it was released.
  bool ReleaseIfIdle(uint32_t id);
  void ReleaseAll();

  // Observers (the engine's vendor transports): told of each region once it exists,
  // which a failure undoes, and just before its memory is released.
  std::function<Status(Region&)> on_add;
  std::function<void(Region&)> on_release;

  template <typename F>
  void ForEach(F f) {
    for (auto& [id, r] : regions_) f(*r);
  }
  size_t size() const { return regions_.size(); }

 private:
  Status Insert(std::unique_ptr<Region> r, Region** out);

  Device* device_;
  uint32_t next_id_ = 1;
  std::unordered_map<uint32_t, std::unique_ptr<Region>> regions_;
};

}  // namespace epd
