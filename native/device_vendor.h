// What the vendor devices (device_acl.cc, device_cuda.cc) share: the Device interface
// written once over a runtime with contexts, streams, events and IPC handles. Here
// live the bookkeeping (allocations, imports, live streams), range checks, event
// state, the IPC key format and the order of every teardown; a vendor device
// subclasses VendorDevice and fills in the hooks, each one runtime call with its
// error mapping.
//
// Threading: the runtimes bind a context to each OS thread. Every entry point first
// makes the device's context current on the calling thread (Bind), because calls
// arrive from the JS thread, libuv pool threads (waits) and transport workers alike.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <set>
#include <string>

#include "device.h"
#include "vendor/device_common.h"

namespace epd {
namespace vendor {

// What differs between vendors without being a runtime call.
struct VendorTraits {
  const char* kind;        // "acl", "cuda"
  const char* key_tag;     // IPC key prefix: "acl1", "cuda1"
  const char* event_type;  // the runtime's event handle type, for messages
  size_t alloc_granule;    // allocations are rounded up to a multiple of it (1: as asked)
};

class VendorDevice : public Device {
 public:
  // The runtime's opaque handles (aclrtStream / CUstream, aclrtEvent / CUevent).
  using StreamHandle = void*;
  using EventHandle = void*;

  const char* kind() const override { return traits_.kind; }
  int ordinal() const override { return ordinal_; }

  // Makes this device's context current on the calling thread.
  virtual Status Bind() const = 0;

  // --- memory -----------------------------------------------------------------
  Status Alloc(size_t bytes, DevicePtr* out) override;
  Status Free(DevicePtr ptr) override;
  Status CheckRange(DevicePtr ptr, size_t bytes) const override;
  Status CopyToDevice(DevicePtr dst, const void* src, size_t bytes) override;
  Status CopyToHost(void* dst, DevicePtr src, size_t bytes) override;
  uint8_t* HostView(DevicePtr, size_t, std::shared_ptr<void>*) const override { return nullptr; }

  // --- streams ----------------------------------------------------------------
  Status CreateStream(std::unique_ptr<Stream>* out) override;
  Status CopyAsync(Stream* stream, DevicePtr dst, DevicePtr src, size_t bytes) override;
  Status StreamWaitEvent(Stream* stream, Event* event) override;
  Status SynchronizeStream(Stream* stream, int64_t timeout_ms) override;
  Status SleepOnStream(Stream*, uint64_t) override;

  // --- events -----------------------------------------------------------------
  Status CreateEvent(std::unique_ptr<Event>* out) override;
  Status RecordEvent(Event* event, Stream* stream) override;
  Status QueryEvent(Event* event, bool* complete) override;
  Status SynchronizeEvent(Event* event, int64_t timeout_ms) override;
  Status WrapEvent(uint64_t handle, std::unique_ptr<Event>* out) override;

  // --- IPC ----------------------------------------------------------------------
  Status IpcExport(DevicePtr ptr, size_t bytes, std::string* key) override;
  Status IpcImport(const std::string& key, DevicePtr* ptr, size_t* bytes) override;
  Status IpcClose(DevicePtr imported) override;

  // Engine close (and destruction): imports closed first, then our exports, then the
  // memory, the order the runtimes require. Queued stream work gets a bounded drain.
  void ReleaseAll() override;

 protected:
  // A subclass's destructor calls ReleaseAll() itself: the hooks are gone by the time
  // ~VendorDevice runs.
  VendorDevice(const VendorTraits& traits, int ordinal) : traits_(traits), ordinal_(ordinal) {}

  static DevicePtr Key(const void* p) { return reinterpret_cast<uintptr_t>(p); }
  static void* Ptr(DevicePtr p) { return reinterpret_cast<void*>(static_cast<uintptr_t>(p)); }

  // --- hooks: one runtime call each, with its error mapping ----------------------
  // ERR_BACKEND_UNAVAILABLE, saying what is missing, when the runtime cannot do IPC.
  virtual Status RequireIpc() const = 0;
  virtual Status Malloc(size_t capacity, DevicePtr* out) = 0;
  virtual Status FreeMemory(DevicePtr base) = 0;
  // Withdraws the export of an allocation about to be freed (ACL closes its key).
  virtual Status Unexport(DeviceAllocation& a) { return Status::Ok(); }
  // Whether [ptr, ptr + bytes), bytes > 0, is memory of this device that another user
  // of the context allocated (a framework's tensor).
  virtual bool IsForeignMemory(DevicePtr ptr, size_t bytes) const = 0;
  // `room`: bytes from dst to the end of its allocation.
  virtual Status CopyIn(DevicePtr dst, size_t room, const void* src, size_t bytes) = 0;
  virtual Status CopyOut(void* dst, DevicePtr src, size_t bytes) = 0;
  virtual Status CopyOnStream(StreamHandle s, DevicePtr dst, size_t room, DevicePtr src, size_t bytes) = 0;
  virtual Status NewStream(StreamHandle* s) = 0;
  // `drained`: the stream's queued work finished within the teardown wait.
  virtual void DestroyStream(StreamHandle s, bool drained) = 0;
  // `waitable`: other streams may wait on the event (not needed for a private marker).
  virtual Status NewEvent(EventHandle* e, bool waitable) = 0;
  virtual void DestroyEvent(EventHandle e) = 0;
  virtual Status Record(EventHandle e, StreamHandle s) = 0;
  virtual Status WaitOnStream(StreamHandle s, EventHandle e) = 0;
  virtual Status Query(EventHandle e, bool* complete) const = 0;
  // Waits with a deadline. Defaults: poll (a private marker event for a stream).
  virtual Status SyncStream(StreamHandle s, int64_t timeout_ms);
  virtual Status SyncEvent(EventHandle e, int64_t timeout_ms);
  // The runtime's key for a whole allocation of ours. Caller holds mu_.
  virtual Status ExportKey(DevicePtr base, const DeviceAllocation& a, std::string* vendor_key) = 0;
  virtual bool IsVendorKey(const std::string& vendor_key) const { return true; }
  virtual Status OpenImport(const std::string& vendor_key, DevicePtr* base) = 0;
  virtual Status CloseImport(DevicePtr base, const DeviceAllocation& a) = 0;

  // Marks the stream's end with a private event and polls it until the deadline.
  Status PollStream(StreamHandle s, int64_t timeout_ms);

  mutable std::mutex mu_;  // table_
  mutable AllocationTable table_;

 private:
  class VendorStream;
  class VendorEvent;
  class OwnedEvent;

  // OK when [ptr, ptr + bytes) is ours, imported, or memory of this device another
  // user allocated. *room: bytes from ptr to the end of its allocation.
  Status Locate(DevicePtr ptr, size_t bytes, size_t* room) const;
  Status OutOfRange(DevicePtr ptr, size_t bytes) const;
  static StreamHandle StreamOf(Stream* stream);
  // Waits for every live stream of this device, so freed memory has no queued users.
  Status DrainStreams();
  void ReleaseStream(VendorStream* s);

  const VendorTraits traits_;
  const int ordinal_;
  // Live streams, under their own lock: a drain holds it while it waits, so a stream
  // cannot be destroyed under it.
  std::mutex streams_mu_;
  std::set<VendorStream*> streams_;
};

}  // namespace vendor
}  // namespace epd
