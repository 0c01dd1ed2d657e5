#include "region.h"

namespace epd {

RegionTable::~RegionTable() { ReleaseAll(); }

Status RegionTable::Insert(std::unique_ptr<Region> r, Region** out) {
  r->id = next_id_++;
  Region* raw = r.get();
  if (on_add) {
    Status st = on_add(*raw);
    if (!st.ok()) {
      if (raw->release) raw->release();
      return st;
    }
  }
  regions_[raw->id] = std::move(r);
  *out = raw;
  return Status::Ok();
}

Status RegionTable::AllocateHost(size_t bytes, bool prefault, Region** out) {
  std::shared_ptr<ShmMapping> m;
  EPD_RETURN_IF_ERROR(ShmMapping::Create(bytes, prefault, &m));
  auto r = std::make_unique<Region>();
  r->kind = RegionKind::kHost;
  r->ptr = m->data();
  r->length = bytes;
  r->mapping = std::move(m);
  return Insert(std::move(r), out);
}

Status RegionTable::AddExternal(uint8_t* ptr, size_t bytes, std::function<void()> release, Region** out) {
  if (bytes == 0) return Status(Code::kBadArgument, "cannot register an empty buffer");
  auto r = std::make_unique<Region>();
  r->kind = RegionKind::kExternal;
  r->ptr = ptr;
  r->length = bytes;
  r->release = std::move(release);
  return Insert(std::move(r), out);
}

Status RegionTable::AddDevice(DevicePtr ptr, size_t bytes, Region** out) {
  if (bytes == 0) return Status(Code::kBadArgument, "device region length must be > 0");
  // Refuse wild pointers: the device must know the memory.
  EPD_RETURN_IF_ERROR(device_->CheckRange(ptr, bytes));
  auto r = std::make_unique<Region>();
  r->kind = RegionKind::kDevice;
  r->device_ptr = ptr;
  r->ptr = device_->HostView(ptr, bytes, &r->device_memory);
  r->length = bytes;
  std::string key;
  if (device_->IpcExport(ptr, bytes, &key).ok()) r->ipc_key = key;
  return Insert(std::move(r), out);
}

Status RegionTable::Lookup(uint32_t id, Region** out) {
  auto it = regions_.find(id);
  if (it == regions_.end()) return Status(Code::kUnknownRegion, "unknown region id " + std::to_string(id));
  if (it->second->freeing) return Status(Code::kRegionFreed, "region " + std::to_string(id) + " is being freed");
  *out = it->second.get();
  return Status::Ok();
}

Region* RegionTable::Find(uint32_t id) {
  auto it = regions_.find(id);
  return it == regions_.end() ? nullptr : it->second.get();
}

bool RegionTable::MarkFreeing(uint32_t id) {
  Region* r = Find(id);
  if (r == nullptr) return false;
  r->freeing = true;
  if (r->mapping) r->mapping->Unlink();  // no new peer may attach it
  return ReleaseIfIdle(id);
}

bool RegionTable::ReleaseIfIdle(uint32_t id) {
  auto it = regions_.find(id);
  if (it == regions_.end() || !it->second->freeing || it->second->pins > 0) return false;
  if (on_release) on_release(*it->second);
  if (it->second->release) it->second->release();
  regions_.erase(it);
  return true;
}

void RegionTable::ReleaseAll() {
  for (auto& [id, r] : regions_) {
    // JS views may keep the memory mapped past close; the name must go now.
    if (r->mapping) r->mapping->Unlink();
    if (on_release) on_release(*r);
    if (r->release) r->release();
  }
  regions_.clear();
}

}  // namespace epd
