// The encoder-cache store: embeddings keyed by mmHash in one POSIX shared-memory
// object per store name, shared by every process on the host.
//
// One object holds everything (docs/ENCODER_CACHE.md has the picture):
//
//   header | entries[maxEntries] | buckets[] | attachments[maxProcesses] |
//   pin ledgers[maxProcesses][maxPinsPerProcess] | arena (capacity bytes)
//
// Concurrency: one robust, process-shared mutex guards the index; it is held only
// for short index updates, never while bytes are copied. Bytes move outside the
// lock: a writer fills its reserved range while the entry is WRITING (invisible to
// lookups) and publishes it with one store of READY; a reader pins the entry first,
// and eviction never takes a pinned entry.
//
// Crash safety: every index change is ordered so that the *authoritative* fields
// (entry state/offset/size, attachments, pin ledgers) are consistent after any
// single store; everything else (hash chains, LRU and address lists, pin counts,
// totals) is *derived* and rebuilt from them when the mutex reports EOWNERDEAD.
// Processes are identified by (pid, start time), so a dead one is recognised
// exactly: its WRITING entries are dropped and its pins released.
#pragma once

#include <pthread.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace epd {
namespace ec {

// Error currency of the store: the TransferError code and a message ("" = ok).
struct Result {
  std::string code;
  std::string message;
  int sys_errno = 0;

  bool ok() const { return code.empty(); }
  static Result Ok() { return Result(); }
  static Result Error(const char* code, std::string message, int sys_errno = 0) {
    Result r;
    r.code = code;
    r.message = std::move(message);
    r.sys_errno = sys_errno;
    return r;
  }
};

constexpr size_t kKeyMax = 255;
constexpr size_t kMetaMax = 256;
constexpr uint32_t kNil = 0xffffffffu;

struct OpenOptions {
  uint64_t capacity = 0;          // 0: open an existing store only
  uint32_t max_entries = 0;       // 0: derived from capacity
  uint64_t alignment = 0;         // 0: 4096
  uint32_t max_processes = 0;     // 0: 128
  uint32_t max_pins = 0;          // per process; 0: 1024
  uint32_t lock_timeout_ms = 2000;
  bool prefault = false;          // touch the whole arena at creation
};

// The layout a store was created with (what `info()` reports).
struct Layout {
  uint64_t capacity = 0;
  uint64_t alignment = 0;
  uint32_t max_entries = 0;
  uint32_t max_processes = 0;
  uint32_t max_pins = 0;
  uint64_t total_bytes = 0;
};

struct Stats {
  uint64_t used_bytes = 0;     // reserved by WRITING, READY and retired entries
  uint32_t entries = 0;        // READY entries
  uint32_t writing = 0;
  uint32_t pinned = 0;         // entries with at least one pin
  uint32_t processes = 0;      // live attachments
  uint64_t hits = 0, misses = 0, saves = 0, dedups = 0, evictions = 0, evicted_bytes = 0;
  uint64_t capacity_errors = 0, recoveries = 0, reaped_processes = 0, reaped_writes = 0;
};

// An entry as a reader or writer sees it. `ticket` names (slot, generation) and
// stays valid for this entry only, whatever happens to the slot later.
struct EntryRef {
  uint64_t ticket = 0;
  uint64_t offset = 0;  // in the arena
  uint64_t size = 0;
  std::string meta;
};

enum class ReserveOutcome { kReserved, kExists, kBusy };

struct Mapping {
  uint8_t* data = nullptr;
  size_t size = 0;
  ~Mapping();
};

struct Header;
struct Entry;
struct Attachment;
struct PinSlot;

class Store {
 public:
  // Opens (creating when `options.capacity` > 0 and it does not exist) the store
  // `name` ([A-Za-z0-9._-]{1,64}) and attaches this handle to it.
  static Result Open(const std::string& name, const OpenOptions& options, std::unique_ptr<Store>* out);
  // Removes stores whose every attached process is dead (or that never finished
  // initialising). Returns how many were removed.
  static Result ReclaimStale(int* removed);
  static std::string ObjectName(const std::string& name);

  ~Store();
  Store(const Store&) = delete;
  Store& operator=(const Store&) = delete;

  // Lookups. `Has` neither pins nor touches the LRU order.
  Result Has(const char* key, size_t key_len, bool* found);
  Result Stat(const char* key, size_t key_len, bool* found, EntryRef* ref);

  // Single flight: kExists when the key is READY, kBusy while another live writer
  // holds it (a dead writer's reservation is reclaimed and ours is made).
  Result Reserve(const char* key, size_t key_len, uint64_t size, const std::string& meta, ReserveOutcome* outcome,
                 EntryRef* ref);
  Result Commit(uint64_t ticket);
  Result Abort(uint64_t ticket);

  // Pins a READY entry and marks it most recently used; *found = false on a miss.
  Result Acquire(const char* key, size_t key_len, bool* found, EntryRef* ref);
  Result Release(uint64_t ticket);
  // Removes a READY entry (its bytes go when the last pin does). *found = false if absent.
  Result Delete(const char* key, size_t key_len, bool* found);
  Result Keys(std::vector<std::string>* keys);
  Result GetStats(Stats* stats);
  // Checks every attached process and releases what dead ones held.
  Result Recover(int* reaped);

  // Test hook: takes the index lock and leaves it held with the derived state
  // scrambled, as a process killed inside a critical section would.
  Result LockAndScrambleForTest();

  // Detaches this handle: aborts its writes, drops its pins; the last live handle
  // removes the shared-memory object. Idempotent.
  void Close();
  bool closed() const { return closed_; }

  const Layout& layout() const { return layout_; }
  const std::string& name() const { return name_; }
  std::shared_ptr<Mapping> mapping() const { return mapping_; }
  uint8_t* arena() const;

 private:
  Store() = default;

  // Index helpers; all run with the mutex held.
  class Locked;
  Result Lock();
  void Unlock();
  void Rebuild();
  uint32_t Find(const char* key, size_t key_len, uint64_t hash) const;
  bool AttachmentAlive(uint32_t a) const;
  int ReapDead();
  void ReapAttachment(uint32_t a);
  void FreeEntry(uint32_t e);
  void Evict(uint32_t e);
  bool FindHole(uint64_t alloc, uint64_t* offset, uint32_t* prev, std::vector<uint32_t>* victims);
  uint32_t OldestEvictable(const std::vector<uint32_t>& except) const;
  void LruUnlink(uint32_t e);
  void LruAppend(uint32_t e);
  void AddrUnlink(uint32_t e);
  void AddrInsertAfter(uint32_t prev, uint32_t e);
  void BucketInsert(uint32_t e);
  void BucketRemove(uint32_t e);
  Result Pin(uint32_t e);
  Result Unpin(uint32_t e, uint32_t gen);
  Result Attach();
  void Detach();
  Result Decode(uint64_t ticket, uint32_t* e, uint32_t* gen) const;

  std::string name_;
  std::string object_;
  int fd_ = -1;
  std::shared_ptr<Mapping> mapping_;
  Header* h_ = nullptr;
  Entry* entries_ = nullptr;
  uint32_t* buckets_ = nullptr;
  Attachment* attachments_ = nullptr;
  PinSlot* ledgers_ = nullptr;
  uint8_t* arena_ = nullptr;
  Layout layout_;
  uint32_t self_ = kNil;  // our attachment slot
  uint32_t self_gen_ = 0;
  uint32_t lock_timeout_ms_ = 2000;
  bool closed_ = false;
};

// A process's start time (clock ticks since boot; with the pid it names one process
// for the life of the boot) and its state letter (R, S, Z = zombie, …) from /proc.
bool ProcessStartTime(long pid, unsigned long long* out, char* state = nullptr);

}  // namespace ec
}  // namespace epd
