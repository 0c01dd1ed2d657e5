// The shm transport: a peer on the same host exposes its regions as POSIX shared
// memory (or device IPC); we map them and copy directly, one-sided: the peer's CPU
// does nothing. A batch is cut into tasks of about `chunk_bytes` that the engine's
// worker threads run in parallel.
#include <poll.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstring>

#include "transport.h"
#include "util/work_queue.h"

namespace epd {

Peer::~Peer() {
  if (pidfd >= 0) close(pidfd);
}

bool Peer::Alive() {
  if (lost.load(std::memory_order_relaxed) != 0) return false;
  if (pidfd < 0) return true;
  struct pollfd p = {pidfd, POLLIN, 0};
  if (poll(&p, 1, 0) > 0) {
    int expected = 0;
    lost.compare_exchange_strong(expected, static_cast<int>(Code::kPeerLost));
    return false;
  }
  return true;
}

namespace {

class ShmTransport final : public Transport {
 public:
  ShmTransport(WorkQueue* pool, Device* device, size_t chunk_bytes, BatchDone done)
      : pool_(pool), device_(device), chunk_bytes_(chunk_bytes), done_(std::move(done)) {}

  const char* name() const override { return "shm"; }

  Status Attach(const RemoteRegionSpec& spec, RemoteRegion* out) override {
    out->id = spec.id;
    out->length = spec.length;
    if (!spec.shm.empty()) {
      std::shared_ptr<ShmMapping> m;
      EPD_RETURN_IF_ERROR(ShmMapping::Attach(spec.shm, 0, /*prefault=*/true, &m));
      if (spec.offset > m->size() || spec.length > m->size() - spec.offset) {
        return Status(Code::kOutOfRange, "peer region " + std::to_string(spec.id) + " exceeds its shm object");
      }
      out->ptr = m->data() + spec.offset;
      out->mapping = std::move(m);
      return Status::Ok();
    }
    if (!spec.ipc_key.empty()) {
      DevicePtr p = 0;
      size_t bytes = 0;
      EPD_RETURN_IF_ERROR(device_->IpcImport(spec.ipc_key, &p, &bytes));
      if (bytes < spec.length) {
        device_->IpcClose(p);
        return Status(Code::kOutOfRange, "peer device region is smaller than advertised");
      }
      out->imported = p;
      out->ptr = device_->HostView(p, spec.length);
      if (out->ptr == nullptr) {
        device_->IpcClose(p);
        return Status(Code::kBackendUnavailable, "peer device memory is not host-addressable for shm copies");
      }
      return Status::Ok();
    }
    return Status(Code::kNotShareable, "peer region " + std::to_string(spec.id) + " has no shm location");
  }

  void Detach(RemoteRegion* region) override {
    if (region->imported != 0) device_->IpcClose(region->imported);
    region->imported = 0;
    region->mapping.reset();
    region->ptr = nullptr;
  }

  void Run(std::shared_ptr<Batch> batch) override {
    // Cut the piece list into tasks of about chunk_bytes; a piece larger than that is
    // split so several threads share it.
    std::vector<std::pair<size_t, size_t>> ranges;  // [first, last) piece indices
    std::vector<Piece> split;
    split.reserve(batch->pieces.size());
    for (const Piece& p : batch->pieces) {
      size_t off = 0;
      while (off < p.length) {
        size_t n = std::min(chunk_bytes_, p.length - off);
        split.push_back(Piece{p.local + off, p.remote + off, n, p.remote_region, p.remote_offset + off});
        off += n;
      }
    }
    batch->pieces.swap(split);
    size_t first = 0, acc = 0;
    for (size_t i = 0; i < batch->pieces.size(); ++i) {
      acc += batch->pieces[i].length;
      if (acc >= chunk_bytes_) {
        ranges.emplace_back(first, i + 1);
        first = i + 1;
        acc = 0;
      }
    }
    if (first < batch->pieces.size()) ranges.emplace_back(first, batch->pieces.size());

    batch->tasks_left.store(static_cast<int>(ranges.size()));
    std::vector<WorkQueue::Task> tasks;
    tasks.reserve(ranges.size());
    for (auto [a, b] : ranges) {
      tasks.emplace_back([this, batch, a = a, b = b] { RunTask(batch, a, b); });
    }
    if (!pool_->PushAll(tasks)) {
      batch->Fail(Status(Code::kClosed, "engine is closed"));
      done_(batch);
    }
  }

 private:
  void RunTask(const std::shared_ptr<Batch>& batch, size_t first, size_t last) {
    if (!batch->peer->Alive()) batch->RequestStop(Code::kPeerLost);
    const bool write = batch->op == Op::kWrite;
    uint64_t moved = 0;
    for (size_t i = first; i < last; ++i) {
      Code stop = batch->StopCode();
      if (stop != Code::kOk) break;
      const Piece& p = batch->pieces[i];
      if (write) {
        std::memcpy(p.remote, p.local, p.length);
      } else {
        std::memcpy(p.local, p.remote, p.length);
      }
      moved += p.length;
    }
    batch->bytes_done.fetch_add(moved, std::memory_order_relaxed);
    if (batch->tasks_left.fetch_sub(1) == 1) {
      // Last task: a peer that died while we copied makes the batch fail, because
      // the bytes landed in memory nobody will read.
      if (!batch->peer->Alive()) batch->RequestStop(Code::kPeerLost);
      done_(batch);
    }
  }

  WorkQueue* pool_;
  Device* device_;
  size_t chunk_bytes_;
  BatchDone done_;
};

}  // namespace

std::unique_ptr<Transport> CreateShmTransport(WorkQueue* pool, Device* device, size_t chunk_bytes,
                                              BatchDone done) {
  return std::unique_ptr<Transport>(new ShmTransport(pool, device, chunk_bytes, std::move(done)));
}

}  // namespace epd
