// Device: the one interface over an accelerator runtime, shaped after what Ascend ACL
// (aclrtMalloc, streams, events, aclrtMemcpyAsync, aclrtIpcMem*) and the CUDA driver
// (cuMemAlloc, streams, events, cuMemcpyAsync, cuIpc*) both offer.
//
// `host` implements it on the CPU: device memory is shared host memory, a stream is a
// worker thread running its queue in order, an event is a real fence. The vendor
// implementations (device_acl.cc, device_cuda.cc) fill in the same interface.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include <unistd.h>

#include "util/status.h"

namespace epd {

// A device address. On `host` it is a process address; on ACL/CUDA an opaque device VA.
using DevicePtr = uint64_t;

class Stream {
 public:
  virtual ~Stream() = default;
};

class Event {
 public:
  virtual ~Event() = default;
  // The runtime's handle (aclrtEvent, CUevent) for code outside epd-transfer; 0 on host.
  virtual uint64_t native_handle() const { return 0; }
};

// Always owned by a shared_ptr (the engine's, and each JS stream/event wrapper's); the
// base is here, not in a subclass, so that converting the factories' unique_ptr<Device>
// to shared_ptr<Device> arms weak_from_this() for every backend.
class Device : public std::enable_shared_from_this<Device> {
 public:
  virtual ~Device() = default;

  virtual const char* kind() const = 0;  // "host" | "acl" | "cuda"
  virtual int ordinal() const = 0;

  // --- memory -----------------------------------------------------------------
  virtual Status Alloc(size_t bytes, DevicePtr* out) = 0;
  // Frees an allocation made by Alloc. Work already queued on streams that touches it
  // completes first (host: the memory stays mapped until then).
  virtual Status Free(DevicePtr ptr) = 0;
  // OK when [ptr, ptr + bytes) lies inside one allocation or IPC import of this device.
  virtual Status CheckRange(DevicePtr ptr, size_t bytes) const = 0;
  // Synchronous copies between a host buffer and device memory (aclrtMemcpy / cuMemcpy).
  virtual Status CopyToDevice(DevicePtr dst, const void* src, size_t bytes) = 0;
  virtual Status CopyToHost(void* dst, DevicePtr src, size_t bytes) = 0;
  // A host pointer the CPU may use to read/write [ptr, ptr + bytes), or null when the
  // device memory is not host-addressable (ACL/CUDA device memory). With `keep`, also
  // a reference that keeps the view mapped even if the memory is freed meanwhile.
  virtual uint8_t* HostView(DevicePtr ptr, size_t bytes, std::shared_ptr<void>* keep = nullptr) const = 0;

  // --- streams (FIFO) ---------------------------------------------------------
  virtual Status CreateStream(std::unique_ptr<Stream>* out) = 0;
  virtual Status CopyAsync(Stream* stream, DevicePtr dst, DevicePtr src, size_t bytes) = 0;
  // Everything queued on `stream` after this call waits until `event` has completed.
  virtual Status StreamWaitEvent(Stream* stream, Event* event) = 0;
  virtual Status SynchronizeStream(Stream* stream, int64_t timeout_ms) = 0;
  // Simulated compute: occupies the stream for `micros`. Only `host` offers it; the
  // layerwise simulation uses it to stand for a layer's kernels.
  virtual Status SleepOnStream(Stream* stream, uint64_t micros) = 0;

  // --- events ----------------------------------------------------------------
  virtual Status CreateEvent(std::unique_ptr<Event>* out) = 0;
  // Captures the work queued on `stream` so far; the event completes when it has run.
  virtual Status RecordEvent(Event* event, Stream* stream) = 0;
  // *complete = true when the last recorded work has run (or nothing was recorded).
  virtual Status QueryEvent(Event* event, bool* complete) = 0;
  // Blocks the calling thread until complete or `timeout_ms` (ERR_TIMEOUT).
  virtual Status SynchronizeEvent(Event* event, int64_t timeout_ms) = 0;

  // --- IPC ---------------------------------------------------------------------
  // A string key another process on the host can import (ACL: 65-byte key; CUDA:
  // hex of the 64-byte handle; host: shm name, offset and length).
  virtual Status IpcExport(DevicePtr ptr, size_t bytes, std::string* key) = 0;
  virtual Status IpcImport(const std::string& key, DevicePtr* ptr, size_t* bytes) = 0;
  virtual Status IpcClose(DevicePtr imported) = 0;

  // Engine close: forgets every allocation and import. Work still queued keeps the
  // memory it touches; names other processes import by are removed at once.
  virtual void ReleaseAll() = 0;

  // --- IPC access control --------------------------------------------------------
  // ACL only lets a process import a key after the exporter put the importer's pid
  // on the key's whitelist (aclrtIpcMemSetImportPid, with the pid from
  // aclrtDeviceGetBareTgid, which differs from getpid() inside containers). The three
  // methods above cannot express that step, hence these two; the defaults fit
  // runtimes without a whitelist (host, CUDA).
  //
  // The id an exporter must pass to IpcAllow for this process.
  virtual Status IpcProcessId(int32_t* pid) {
    *pid = static_cast<int32_t>(getpid());
    return Status::Ok();
  }
  // Lets process `pid` import `key`; with an empty key, every key this device has
  // exported and will export.
  virtual Status IpcAllow(const std::string& key, int32_t pid) { return Status::Ok(); }

  // --- foreign handles -----------------------------------------------------------
  // Wraps an event created outside epd-transfer (an aclrtEvent or CUevent, e.g. one a
  // framework recorded after a layer's kernels) so it can be queried and waited on
  // like our own. The wrapper never destroys the handle.
  virtual Status WrapEvent(uint64_t handle, std::unique_ptr<Event>* out) {
    return Status(Code::kBackendUnavailable, std::string("the ") + kind() + " device has no foreign event handles");
  }
};

// The CPU implementation. Never fails to load.
std::unique_ptr<Device> CreateHostDevice();

// Vendor devices (device_acl.cc, device_cuda.cc). They load their runtime with dlopen
// on first use and fail with ERR_BACKEND_UNAVAILABLE, saying why, where it cannot run.
Status CreateAclDevice(int ordinal, std::unique_ptr<Device>* out);
Status CreateCudaDevice(int ordinal, std::unique_ptr<Device>* out);

}  // namespace epd
