// The Device interface over a vendor runtime, written once (device_vendor.h).
#include "device_vendor.h"

#include "vendor/poll.h"

namespace epd {
namespace vendor {

namespace {
constexpr int64_t kTeardownWaitMs = 30'000;
}  // namespace

// Streams and events keep their device alive (`keep`): a wait running on a pool
// thread may hold the last reference to a stream after the engine is gone.
class VendorDevice::VendorStream final : public Stream {
 public:
  VendorStream(VendorDevice* device, std::shared_ptr<Device> keep, StreamHandle s)
      : device_(device), keep_(std::move(keep)), handle_(s) {}
  ~VendorStream() override { device_->ReleaseStream(this); }
  StreamHandle handle() const { return handle_; }

 private:
  VendorDevice* device_;
  std::shared_ptr<Device> keep_;
  StreamHandle handle_;
};

class VendorDevice::VendorEvent : public Event {
 public:
  VendorEvent(EventHandle e, bool recorded) : event(e), recorded(recorded) {}
  uint64_t native_handle() const override { return reinterpret_cast<uintptr_t>(event); }
  EventHandle event;
  // An event never recorded is complete (as on the host device), without asking the
  // runtime, whose answer for that case is not documented everywhere. Wrapped foreign
  // events count as recorded: their owner recorded them.
  std::atomic<bool> recorded;
};

class VendorDevice::OwnedEvent final : public VendorEvent {
 public:
  OwnedEvent(VendorDevice* d, std::shared_ptr<Device> keep, EventHandle e)
      : VendorEvent(e, false), device_(d), keep_(std::move(keep)) {}
  ~OwnedEvent() override {
    if (device_->Bind().ok()) device_->DestroyEvent(event);
  }

 private:
  VendorDevice* device_;
  std::shared_ptr<Device> keep_;
};

VendorDevice::StreamHandle VendorDevice::StreamOf(Stream* stream) {
  return static_cast<VendorStream*>(stream)->handle();
}

// --- memory -------------------------------------------------------------------

Status VendorDevice::Alloc(size_t bytes, DevicePtr* out) {
  if (bytes == 0) return Status(Code::kBadArgument, "device allocation size must be > 0");
  const size_t granule = traits_.alloc_granule;
  if (granule > 1 && bytes > SIZE_MAX - granule) return Status(Code::kBadArgument, "device allocation size is too large");
  EPD_RETURN_IF_ERROR(Bind());
  const size_t capacity = (bytes + granule - 1) / granule * granule;
  DevicePtr p = 0;
  EPD_RETURN_IF_ERROR(Malloc(capacity, &p));
  std::lock_guard<std::mutex> lock(mu_);
  DeviceAllocation& a = table_.map()[p];
  a.bytes = bytes;
  a.capacity = capacity;
  *out = p;
  return Status::Ok();
}

Status VendorDevice::Free(DevicePtr ptr) {
  EPD_RETURN_IF_ERROR(Bind());
  // Queued copies may still touch the memory: let this device's streams drain first.
  EPD_RETURN_IF_ERROR(DrainStreams());
  std::lock_guard<std::mutex> lock(mu_);
  auto it = table_.map().find(ptr);
  if (it == table_.map().end() || it->second.imported) {
    return Status(Code::kBadArgument, "not a device allocation: " + HexAddress(ptr));
  }
  EPD_RETURN_IF_ERROR(Unexport(it->second));
  EPD_RETURN_IF_ERROR(FreeMemory(ptr));
  table_.map().erase(it);
  return Status::Ok();
}

Status VendorDevice::CheckRange(DevicePtr ptr, size_t bytes) const {
  size_t room = 0;
  return Locate(ptr, bytes, &room);
}

Status VendorDevice::CopyToDevice(DevicePtr dst, const void* src, size_t bytes) {
  EPD_RETURN_IF_ERROR(Bind());
  size_t room = 0;
  EPD_RETURN_IF_ERROR(Locate(dst, bytes, &room));
  return CopyIn(dst, room, src, bytes);
}

Status VendorDevice::CopyToHost(void* dst, DevicePtr src, size_t bytes) {
  EPD_RETURN_IF_ERROR(Bind());
  size_t unused = 0;
  EPD_RETURN_IF_ERROR(Locate(src, bytes, &unused));
  return CopyOut(dst, src, bytes);
}

Status VendorDevice::Locate(DevicePtr ptr, size_t bytes, size_t* room) const {
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = table_.Find(ptr, bytes);
    if (it != table_.end()) {
      *room = it->second.bytes - static_cast<size_t>(ptr - it->first);
      return Status::Ok();
    }
    // Inside (or running past) one of our allocations, including its rounding slack:
    // out of range, whatever the runtime would say about the address.
    if (table_.Overlaps(ptr, bytes)) return OutOfRange(ptr, bytes);
  }
  if (bytes > 0 && IsForeignMemory(ptr, bytes)) {
    *room = bytes;
    return Status::Ok();
  }
  return OutOfRange(ptr, bytes);
}

Status VendorDevice::OutOfRange(DevicePtr ptr, size_t bytes) const {
  return Status(Code::kOutOfRange, "[" + HexAddress(ptr) + ", +" + std::to_string(bytes) + ") is not memory of " +
                                       traits_.kind + " device " + std::to_string(ordinal_));
}

// --- streams --------------------------------------------------------------------

Status VendorDevice::CreateStream(std::unique_ptr<Stream>* out) {
  EPD_RETURN_IF_ERROR(Bind());
  StreamHandle s = nullptr;
  EPD_RETURN_IF_ERROR(NewStream(&s));
  auto* stream = new VendorStream(this, weak_from_this().lock(), s);
  {
    std::lock_guard<std::mutex> lock(streams_mu_);
    streams_.insert(stream);
  }
  out->reset(stream);
  return Status::Ok();
}

Status VendorDevice::CopyAsync(Stream* stream, DevicePtr dst, DevicePtr src, size_t bytes) {
  EPD_RETURN_IF_ERROR(Bind());
  size_t room = 0, unused = 0;
  EPD_RETURN_IF_ERROR(Locate(dst, bytes, &room));
  EPD_RETURN_IF_ERROR(Locate(src, bytes, &unused));
  return CopyOnStream(StreamOf(stream), dst, room, src, bytes);
}

Status VendorDevice::StreamWaitEvent(Stream* stream, Event* event) {
  EPD_RETURN_IF_ERROR(Bind());
  auto* e = static_cast<VendorEvent*>(event);
  if (!e->recorded.load()) return Status::Ok();  // nothing to wait for
  return WaitOnStream(StreamOf(stream), e->event);
}

Status VendorDevice::SynchronizeStream(Stream* stream, int64_t timeout_ms) {
  EPD_RETURN_IF_ERROR(Bind());
  return SyncStream(StreamOf(stream), timeout_ms);
}

Status VendorDevice::SleepOnStream(Stream*, uint64_t) {
  return Status(Code::kBackendUnavailable, "simulated compute (stream.sleep) exists only on the host device");
}

Status VendorDevice::SyncStream(StreamHandle s, int64_t timeout_ms) { return PollStream(s, timeout_ms); }

Status VendorDevice::PollStream(StreamHandle s, int64_t timeout_ms) {
  EventHandle e = nullptr;
  EPD_RETURN_IF_ERROR(NewEvent(&e, /*waitable=*/false));
  Status st = Record(e, s);
  if (st.ok()) st = PollUntil([&](bool* done) { return Query(e, done); }, timeout_ms, "stream");
  DestroyEvent(e);
  return st;
}

void VendorDevice::ReleaseStream(VendorStream* s) {
  {
    std::lock_guard<std::mutex> lock(streams_mu_);
    streams_.erase(s);
  }
  if (!Bind().ok()) return;
  // Queued work gets a bounded chance to finish while the caller's memory is valid;
  // the runtime decides what a stream that did not drain needs.
  Status st = SyncStream(s->handle(), kTeardownWaitMs);
  DestroyStream(s->handle(), st.ok());
}

Status VendorDevice::DrainStreams() {
  std::lock_guard<std::mutex> lock(streams_mu_);
  for (VendorStream* s : streams_) EPD_RETURN_IF_ERROR(SyncStream(s->handle(), kTeardownWaitMs));
  return Status::Ok();
}

// --- events ---------------------------------------------------------------------

Status VendorDevice::CreateEvent(std::unique_ptr<Event>* out) {
  EPD_RETURN_IF_ERROR(Bind());
  EventHandle e = nullptr;
  EPD_RETURN_IF_ERROR(NewEvent(&e, /*waitable=*/true));
  out->reset(new OwnedEvent(this, weak_from_this().lock(), e));
  return Status::Ok();
}

Status VendorDevice::RecordEvent(Event* event, Stream* stream) {
  EPD_RETURN_IF_ERROR(Bind());
  auto* e = static_cast<VendorEvent*>(event);
  EPD_RETURN_IF_ERROR(Record(e->event, StreamOf(stream)));
  e->recorded.store(true);
  return Status::Ok();
}

Status VendorDevice::QueryEvent(Event* event, bool* complete) {
  auto* e = static_cast<VendorEvent*>(event);
  if (!e->recorded.load()) {
    *complete = true;
    return Status::Ok();
  }
  EPD_RETURN_IF_ERROR(Bind());
  return Query(e->event, complete);
}

Status VendorDevice::SynchronizeEvent(Event* event, int64_t timeout_ms) {
  auto* e = static_cast<VendorEvent*>(event);
  if (!e->recorded.load()) return Status::Ok();
  EPD_RETURN_IF_ERROR(Bind());
  return SyncEvent(e->event, timeout_ms);
}

Status VendorDevice::SyncEvent(EventHandle e, int64_t timeout_ms) {
  return PollUntil([&](bool* done) { return Query(e, done); }, timeout_ms, "event");
}

Status VendorDevice::WrapEvent(uint64_t handle, std::unique_ptr<Event>* out) {
  if (handle == 0) return Status(Code::kBadArgument, std::string("Expected a non-null ") + traits_.event_type + " handle");
  out->reset(new VendorEvent(reinterpret_cast<EventHandle>(static_cast<uintptr_t>(handle)), /*recorded=*/true));
  return Status::Ok();
}

// --- IPC --------------------------------------------------------------------------

Status VendorDevice::IpcExport(DevicePtr ptr, size_t bytes, std::string* key) {
  EPD_RETURN_IF_ERROR(RequireIpc());
  EPD_RETURN_IF_ERROR(Bind());
  std::lock_guard<std::mutex> lock(mu_);
  auto it = table_.Find(ptr, bytes);
  if (it == table_.end() || it->second.imported) {
    return Status(Code::kNotShareable, "[" + HexAddress(ptr) + ", +" + std::to_string(bytes) +
                                           ") is not inside an allocation of this device (only memory from "
                                           "device.alloc() can be exported)");
  }
  DeviceAllocation& a = it->second;
  if (a.ipc_key.empty()) {
    // The runtime's key names the whole allocation, taken once and reused.
    std::string vendor_key;
    EPD_RETURN_IF_ERROR(ExportKey(it->first, a, &vendor_key));
    a.ipc_key = vendor_key;
  }
  *key = FormatIpcKey(traits_.key_tag, static_cast<size_t>(ptr - it->first), bytes, a.capacity, a.ipc_key);
  return Status::Ok();
}

Status VendorDevice::IpcImport(const std::string& key, DevicePtr* ptr, size_t* bytes) {
  EPD_RETURN_IF_ERROR(RequireIpc());
  ParsedIpcKey parsed;
  if (!ParseIpcKey(key, traits_.key_tag, &parsed) || !IsVendorKey(parsed.vendor_key)) {
    return Status(Code::kBadArgument, std::string("malformed ") + traits_.kind + " IPC key");
  }
  EPD_RETURN_IF_ERROR(Bind());
  std::lock_guard<std::mutex> lock(mu_);
  // One open per key, counted: the runtimes refcount repeated opens (CUDA returns the
  // same address), so ours close once, with the last IpcClose.
  auto existing = table_.FindImportByKey(parsed.vendor_key);
  if (existing != table_.end()) {
    existing->second.import_refs++;
    *ptr = existing->first + parsed.offset;
    *bytes = parsed.bytes;
    return Status::Ok();
  }
  DevicePtr base = 0;
  EPD_RETURN_IF_ERROR(OpenImport(parsed.vendor_key, &base));
  table_.map()[base] = DeviceAllocation{parsed.capacity, parsed.capacity, /*imported=*/true, parsed.vendor_key,
                                        /*import_refs=*/1};
  *ptr = base + parsed.offset;
  *bytes = parsed.bytes;
  return Status::Ok();
}

Status VendorDevice::IpcClose(DevicePtr imported) {
  EPD_RETURN_IF_ERROR(Bind());
  EPD_RETURN_IF_ERROR(DrainStreams());
  std::lock_guard<std::mutex> lock(mu_);
  auto it = table_.Find(imported, 0);
  if (it == table_.end() || !it->second.imported) return Status(Code::kBadArgument, "not an IPC import");
  if (--it->second.import_refs > 0) return Status::Ok();
  Status st = CloseImport(it->first, it->second);
  table_.map().erase(it);
  return st;
}

void VendorDevice::ReleaseAll() {
  if (!Bind().ok()) return;  // the runtime is gone; nothing can be released
  DrainStreams();
  std::lock_guard<std::mutex> lock(mu_);
  for (auto& [base, a] : table_.map()) {
    if (a.imported) CloseImport(base, a);
  }
  for (auto& [base, a] : table_.map()) {
    if (a.imported) continue;
    Unexport(a);
    FreeMemory(base);
  }
  table_.map().clear();
}

}  // namespace vendor
}  // namespace epd
