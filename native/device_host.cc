// The host device: CPU memory stands in for device memory, a stream is a worker
// thread running queued operations in order, and an event is a fence those
// operations complete.
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <thread>

#include "device.h"
#include "shm.h"
#include "util/work_queue.h"

namespace epd {
namespace {

struct EventState {
  std::mutex mu;
  std::condition_variable cv;
  uint64_t recorded = 0;   // generation of the last Record
  uint64_t completed = 0;  // highest generation whose work has run
};

class HostEvent final : public Event {
 public:
  std::shared_ptr<EventState> state = std::make_shared<EventState>();
};

class HostStream final : public Stream {
 public:
  HostStream() : queue(1) {}
  ~HostStream() override {
    cancelled.store(true);
    queue.Shutdown();
  }
  std::atomic<bool> cancelled{false};
  WorkQueue queue;
};

struct Allocation {
  std::shared_ptr<ShmMapping> mapping;
  uint8_t* base;
  size_t bytes;
  bool imported;
};

class HostDevice final : public Device {
 public:
  const char* kind() const override { return "host"; }
  int ordinal() const override { return 0; }

  Status Alloc(size_t bytes, DevicePtr* out) override {
    std::shared_ptr<ShmMapping> m;
    EPD_RETURN_IF_ERROR(ShmMapping::Create(bytes, /*prefault=*/true, &m));
    std::lock_guard<std::mutex> lock(mu_);
    allocations_[Key(m->data())] = Allocation{m, m->data(), bytes, false};
    *out = Key(m->data());
    return Status::Ok();
  }

  Status Free(DevicePtr ptr) override {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = allocations_.find(ptr);
    if (it == allocations_.end() || it->second.imported) {
      return Status(Code::kBadArgument, "not a device allocation: 0x" + Hex(ptr));
    }
    allocations_.erase(it);  // queued copies hold their own reference to the mapping
    return Status::Ok();
  }

  Status CheckRange(DevicePtr ptr, size_t bytes) const override {
    std::lock_guard<std::mutex> lock(mu_);
    return Find(ptr, bytes, nullptr);
  }

  Status CopyToDevice(DevicePtr dst, const void* src, size_t bytes) override {
    std::shared_ptr<ShmMapping> keep;
    {
      std::lock_guard<std::mutex> lock(mu_);
      EPD_RETURN_IF_ERROR(Find(dst, bytes, &keep));
    }
    std::memcpy(Ptr(dst), src, bytes);
    return Status::Ok();
  }

  Status CopyToHost(void* dst, DevicePtr src, size_t bytes) override {
    std::shared_ptr<ShmMapping> keep;
    {
      std::lock_guard<std::mutex> lock(mu_);
      EPD_RETURN_IF_ERROR(Find(src, bytes, &keep));
    }
    std::memcpy(dst, Ptr(src), bytes);
    return Status::Ok();
  }

  uint8_t* HostView(DevicePtr ptr, size_t bytes, std::shared_ptr<void>* keep) const override {
    std::lock_guard<std::mutex> lock(mu_);
    std::shared_ptr<ShmMapping> m;
    if (!Find(ptr, bytes, &m).ok()) return nullptr;
    if (keep != nullptr) *keep = std::move(m);
    return Ptr(ptr);
  }

  Status CreateStream(std::unique_ptr<Stream>* out) override {
    out->reset(new HostStream());
    return Status::Ok();
  }

  Status CopyAsync(Stream* stream, DevicePtr dst, DevicePtr src, size_t bytes) override {
    std::shared_ptr<ShmMapping> keep_dst, keep_src;
    {
      std::lock_guard<std::mutex> lock(mu_);
      EPD_RETURN_IF_ERROR(Find(dst, bytes, &keep_dst));
      EPD_RETURN_IF_ERROR(Find(src, bytes, &keep_src));
    }
    auto* s = static_cast<HostStream*>(stream);
    s->queue.Push([keep_dst, keep_src, dst, src, bytes] { std::memmove(Ptr(dst), Ptr(src), bytes); });
    return Status::Ok();
  }

  Status StreamWaitEvent(Stream* stream, Event* event) override {
    auto* s = static_cast<HostStream*>(stream);
    auto state = static_cast<HostEvent*>(event)->state;
    uint64_t target;
    {
      std::lock_guard<std::mutex> lock(state->mu);
      target = state->recorded;
    }
    s->queue.Push([s, state, target] {
      std::unique_lock<std::mutex> lock(state->mu);
      // Poll the stream's cancel flag so destroying a stream never hangs on an
      // event that can no longer complete.
      while (state->completed < target && !s->cancelled.load()) {
        state->cv.wait_for(lock, std::chrono::milliseconds(20));
      }
    });
    return Status::Ok();
  }

  Status SynchronizeStream(Stream* stream, int64_t timeout_ms) override {
    HostEvent fence;
    EPD_RETURN_IF_ERROR(RecordEvent(&fence, stream));
    return SynchronizeEvent(&fence, timeout_ms);
  }

  Status SleepOnStream(Stream* stream, uint64_t micros) override {
    auto* s = static_cast<HostStream*>(stream);
    s->queue.Push([micros] { std::this_thread::sleep_for(std::chrono::microseconds(micros)); });
    return Status::Ok();
  }

  Status CreateEvent(std::unique_ptr<Event>* out) override {
    out->reset(new HostEvent());
    return Status::Ok();
  }

  Status RecordEvent(Event* event, Stream* stream) override {
    auto state = static_cast<HostEvent*>(event)->state;
    uint64_t gen;
    {
      std::lock_guard<std::mutex> lock(state->mu);
      gen = ++state->recorded;
    }
    auto* s = static_cast<HostStream*>(stream);
    if (!s->queue.Push([state, gen] {
          {
            std::lock_guard<std::mutex> lock(state->mu);
            if (gen > state->completed) state->completed = gen;
          }
          state->cv.notify_all();
        })) {
      return Status(Code::kClosed, "stream is destroyed");
    }
    return Status::Ok();
  }

  Status QueryEvent(Event* event, bool* complete) override {
    auto& state = static_cast<HostEvent*>(event)->state;
    std::lock_guard<std::mutex> lock(state->mu);
    *complete = state->completed >= state->recorded;
    return Status::Ok();
  }

  Status SynchronizeEvent(Event* event, int64_t timeout_ms) override {
    auto& state = static_cast<HostEvent*>(event)->state;
    std::unique_lock<std::mutex> lock(state->mu);
    uint64_t target = state->recorded;
    bool done = state->cv.wait_for(lock, std::chrono::milliseconds(timeout_ms < 0 ? 0 : timeout_ms),
                                   [&] { return state->completed >= target; });
    if (!done) return Status(Code::kTimeout, "event did not complete within " + std::to_string(timeout_ms) + " ms");
    return Status::Ok();
  }

  Status IpcExport(DevicePtr ptr, size_t bytes, std::string* key) override {
    std::shared_ptr<ShmMapping> m;
    std::lock_guard<std::mutex> lock(mu_);
    EPD_RETURN_IF_ERROR(Find(ptr, bytes, &m));
    size_t offset = static_cast<size_t>(ptr - Key(m->data()));
    *key = m->name() + ":" + std::to_string(offset) + ":" + std::to_string(bytes);
    return Status::Ok();
  }

  Status IpcImport(const std::string& key, DevicePtr* ptr, size_t* bytes) override {
    size_t c2 = key.rfind(':');
    size_t c1 = c2 == std::string::npos || c2 == 0 ? std::string::npos : key.rfind(':', c2 - 1);
    if (c1 == std::string::npos) return Status(Code::kBadArgument, "malformed host IPC key");
    std::string name = key.substr(0, c1);
    unsigned long long offset = 0, length = 0;
    if (std::sscanf(key.c_str() + c1 + 1, "%llu", &offset) != 1 ||
        std::sscanf(key.c_str() + c2 + 1, "%llu", &length) != 1 || length == 0) {
      return Status(Code::kBadArgument, "malformed host IPC key");
    }
    std::shared_ptr<ShmMapping> m;
    EPD_RETURN_IF_ERROR(ShmMapping::Attach(name, 0, /*prefault=*/false, &m));
    if (offset + length > m->size()) return Status(Code::kOutOfRange, "IPC key range exceeds its memory");
    std::lock_guard<std::mutex> lock(mu_);
    DevicePtr p = Key(m->data()) + offset;
    allocations_[Key(m->data())] = Allocation{m, m->data(), m->size(), true};
    *ptr = p;
    *bytes = static_cast<size_t>(length);
    return Status::Ok();
  }

  Status IpcClose(DevicePtr imported) override {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = allocations_.upper_bound(imported);
    if (it == allocations_.begin()) return Status(Code::kBadArgument, "not an IPC import");
    --it;
    if (!it->second.imported || imported >= it->first + it->second.bytes) {
      return Status(Code::kBadArgument, "not an IPC import");
    }
    allocations_.erase(it);
    return Status::Ok();
  }

  void ReleaseAll() override {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [ptr, a] : allocations_) {
      if (!a.imported) a.mapping->Unlink();
    }
    allocations_.clear();
  }

 private:
  static DevicePtr Key(const uint8_t* p) { return reinterpret_cast<uintptr_t>(p); }
  static uint8_t* Ptr(DevicePtr p) { return reinterpret_cast<uint8_t*>(static_cast<uintptr_t>(p)); }
  static std::string Hex(DevicePtr p) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%llx", static_cast<unsigned long long>(p));
    return buf;
  }

  // Caller holds mu_.
  Status Find(DevicePtr ptr, size_t bytes, std::shared_ptr<ShmMapping>* keep) const {
    auto it = allocations_.upper_bound(ptr);
    if (it != allocations_.begin()) {
      --it;
      const Allocation& a = it->second;
      if (ptr >= it->first && ptr - it->first <= a.bytes && bytes <= a.bytes - (ptr - it->first)) {
        if (keep != nullptr) *keep = a.mapping;
        return Status::Ok();
      }
    }
    return Status(Code::kOutOfRange, "[0x" + Hex(ptr) + ", +" + std::to_string(bytes) +
                                         ") is not inside memory of this device");
  }

  mutable std::mutex mu_;
  std::map<DevicePtr, Allocation> allocations_;
};

}  // namespace

std::unique_ptr<Device> CreateHostDevice() { return std::unique_ptr<Device>(new HostDevice()); }

}  // namespace epd
