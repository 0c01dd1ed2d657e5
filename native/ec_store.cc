#include "ec_store.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <thread>
#include <unordered_map>
#include <unordered_set>

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

namespace epd {
namespace ec {

// ---------------------------------------------------------------------------
// Shared-memory layout. Every struct here lives in the object and is read by
// other processes: fixed-width fields only, sizes recorded in the header so a
// build with another layout refuses to attach instead of misreading it.

constexpr uint64_t kMagic = 0x3130434558445045ull;  // "EPDXEC01"
constexpr uint32_t kVersion = 1;
constexpr const char kObjectPrefix[] = "epdec-";

enum State : uint32_t { kFree = 0, kWriting = 1, kReady = 2, kRetired = 3 };

struct alignas(64) Entry {
  // Authoritative.
  uint32_t state;
  uint32_t gen;
  uint32_t writer;      // attachment slot of the writer (kWriting)
  uint32_t writer_gen;  // its generation
  uint64_t hash;
  uint64_t offset;
  uint64_t size;
  uint64_t alloc;
  uint64_t stamp;  // LRU clock at last use
  uint16_t key_len;
  uint16_t meta_len;
  // Derived (rebuilt after a crash).
  uint32_t pins;
  uint32_t bucket_next;
  uint32_t lru_prev, lru_next;
  uint32_t addr_prev, addr_next;
  uint32_t free_next;
  uint8_t key[kKeyMax + 1];
  uint8_t meta[kMetaMax];
};

struct Attachment {
  uint32_t state;  // 0 free, 1 live
  uint32_t gen;
  int32_t pid;
  uint32_t pins_used;  // length of the dense pin ledger
  uint64_t start_time;
  uint64_t pid_ns;  // inode of the pid namespace: liveness is judged only inside ours
};

struct PinSlot {
  uint32_t entry;
  uint32_t gen;
  uint32_t count;
  uint32_t pad;
};

struct Header {
  uint64_t magic;  // written last at creation
  uint32_t version;
  uint32_t entry_bytes, attachment_bytes, pin_bytes, mutex_bytes, header_bytes;
  uint64_t capacity, alignment, total_bytes;
  uint32_t max_entries, bucket_count, max_processes, max_pins;
  uint64_t entries_off, buckets_off, attachments_off, ledgers_off, arena_off;
  pthread_mutex_t mutex;
  // Derived.
  uint32_t free_head, lru_head, lru_tail, addr_head, addr_tail;
  uint32_t ready_count, writing_count, pad0;
  uint64_t used_bytes;
  uint64_t clock;
  // Statistics (monotonic, best effort).
  uint64_t hits, misses, saves, dedups, evictions, evicted_bytes, capacity_errors, recoveries, reaped_processes,
      reaped_writes;
};

namespace {

uint64_t AlignUp(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

uint64_t HashKey(const char* key, size_t len) {
  uint64_t h = 0xcbf29ce484222325ull;  // FNV-1a
  for (size_t i = 0; i < len; ++i) {
    h ^= static_cast<uint8_t>(key[i]);
    h *= 0x100000001b3ull;
  }
  return h;
}

template <typename T>
void StoreRelease(T* p, T v) {
  __atomic_store_n(p, v, __ATOMIC_RELEASE);
}

bool ValidName(const std::string& name) {
  if (name.empty() || name.size() > 64) return false;
  for (char c : name) {
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '-')) return false;
  }
  return name != "." && name != "..";
}

uint64_t PidNamespace() {
  static const uint64_t ns = [] {
    struct stat st;
    return stat("/proc/self/ns/pid", &st) == 0 ? static_cast<uint64_t>(st.st_ino) : 0;
  }();
  return ns;
}

timespec DeadlineIn(uint32_t ms) {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  ts.tv_sec += ms / 1000;
  ts.tv_nsec += static_cast<long>(ms % 1000) * 1000000L;
  if (ts.tv_nsec >= 1000000000L) {
    ts.tv_sec += 1;
    ts.tv_nsec -= 1000000000L;
  }
  return ts;
}

bool Before(const timespec& deadline) {
  timespec now;
  clock_gettime(CLOCK_MONOTONIC, &now);
  return now.tv_sec < deadline.tv_sec || (now.tv_sec == deadline.tv_sec && now.tv_nsec < deadline.tv_nsec);
}

// flock with a deadline; the kernel drops it when the holder dies.
Result FlockUntil(int fd, const timespec& deadline, const std::string& what) {
  for (;;) {
    if (flock(fd, LOCK_EX | LOCK_NB) == 0) return Result::Ok();
    if (errno != EWOULDBLOCK && errno != EINTR) {
      return Result::Error("ERR_SYSTEM", "flock(" + what + "): " + std::strerror(errno), errno);
    }
    if (!Before(deadline)) return Result::Error("ERR_TIMEOUT", "timed out waiting for another process opening " + what);
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

struct LayoutPlan {
  Layout layout;
  uint32_t bucket_count;
  uint64_t entries_off, buckets_off, attachments_off, ledgers_off, arena_off;
};

Result Plan(const OpenOptions& o, LayoutPlan* p) {
  Layout& l = p->layout;
  l.alignment = o.alignment == 0 ? 4096 : o.alignment;
  if ((l.alignment & (l.alignment - 1)) != 0 || l.alignment < 64 || l.alignment > (2u << 20)) {
    return Result::Error("ERR_BAD_ARGUMENT", "alignment must be a power of two in [64, 2 MiB]");
  }
  l.capacity = AlignUp(o.capacity, l.alignment);
  uint64_t derived = std::min<uint64_t>(65536, std::max<uint64_t>(256, l.capacity / (256 << 10)));
  l.max_entries = o.max_entries == 0 ? static_cast<uint32_t>(derived) : o.max_entries;
  if (l.max_entries < 1 || l.max_entries > (1u << 20)) {
    return Result::Error("ERR_BAD_ARGUMENT", "maxEntries must be in [1, 1048576]");
  }
  l.max_processes = o.max_processes == 0 ? 128 : o.max_processes;
  if (l.max_processes > 4096) return Result::Error("ERR_BAD_ARGUMENT", "maxProcesses must be in [1, 4096]");
  l.max_pins = o.max_pins == 0 ? 1024 : o.max_pins;
  if (l.max_pins > 65536) return Result::Error("ERR_BAD_ARGUMENT", "maxPinsPerProcess must be in [1, 65536]");
  uint32_t buckets = 1;
  while (buckets < l.max_entries * 2u) buckets <<= 1;
  p->bucket_count = buckets;
  uint64_t off = AlignUp(sizeof(Header), 4096);
  p->entries_off = off;
  off = AlignUp(off + uint64_t(l.max_entries) * sizeof(Entry), 64);
  p->buckets_off = off;
  off = AlignUp(off + uint64_t(buckets) * sizeof(uint32_t), 64);
  p->attachments_off = off;
  off = AlignUp(off + uint64_t(l.max_processes) * sizeof(Attachment), 64);
  p->ledgers_off = off;
  off += uint64_t(l.max_processes) * l.max_pins * sizeof(PinSlot);
  p->arena_off = AlignUp(off, std::max<uint64_t>(4096, l.alignment));
  l.total_bytes = p->arena_off + l.capacity;
  return Result::Ok();
}

}  // namespace

bool ProcessStartTime(long pid, unsigned long long* out, char* state) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  if (!in) return false;
  std::string line;
  std::getline(in, line);
  size_t close = line.rfind(')');  // comm may hold spaces and parentheses
  if (close == std::string::npos || close + 2 > line.size()) return false;
  std::istringstream fields(line.substr(close + 2));
  std::string field;
  fields >> field;  // #3: state
  if (state != nullptr) *state = field.empty() ? '?' : field[0];
  for (int i = 4; i < 22; ++i) fields >> field;  // start time is #22
  return static_cast<bool>(fields >> *out);
}

Mapping::~Mapping() {
  if (data != nullptr) munmap(data, size);
}

std::string Store::ObjectName(const std::string& name) { return std::string("/") + kObjectPrefix + name; }

uint8_t* Store::arena() const { return arena_; }

// ---------------------------------------------------------------------------
// Opening, creating, attaching.

namespace {

Result MapObject(int fd, size_t bytes, std::shared_ptr<Mapping>* out, const std::string& what) {
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) return Result::Error("ERR_SYSTEM", "mmap(" + what + "): " + std::strerror(errno), errno);
  auto m = std::make_shared<Mapping>();
  m->data = static_cast<uint8_t*>(p);
  m->size = bytes;
  *out = std::move(m);
  return Result::Ok();
}

// The magic is stored last at creation: without it the creator died mid-way.
bool HeaderPublished(const Header* h) { return __atomic_load_n(&h->magic, __ATOMIC_ACQUIRE) == kMagic; }

bool HeaderValid(const Header* h, uint64_t size) {
  return HeaderPublished(h) && h->version == kVersion &&
         h->entry_bytes == sizeof(Entry) && h->attachment_bytes == sizeof(Attachment) &&
         h->pin_bytes == sizeof(PinSlot) && h->mutex_bytes == sizeof(pthread_mutex_t) &&
         h->header_bytes == sizeof(Header) && h->total_bytes == size && h->arena_off + h->capacity == size &&
         h->max_entries > 0 && (h->bucket_count & (h->bucket_count - 1)) == 0;
}

}  // namespace

Result Store::Open(const std::string& name, const OpenOptions& options, std::unique_ptr<Store>* out) {
  if (!ValidName(name)) {
    return Result::Error("ERR_BAD_ARGUMENT", "store name must match [A-Za-z0-9._-]{1,64}, got '" + name + "'");
  }
  LayoutPlan plan{};
  if (options.capacity > 0) {
    Result r = Plan(options, &plan);
    if (!r.ok()) return r;
  }
  std::unique_ptr<Store> s(new Store());
  s->name_ = name;
  s->object_ = ObjectName(name);
  s->lock_timeout_ms_ = options.lock_timeout_ms == 0 ? 2000 : options.lock_timeout_ms;
  const timespec deadline = DeadlineIn(s->lock_timeout_ms_);
  bool created = false;
  for (;;) {
    int fd = shm_open(s->object_.c_str(), O_RDWR | (options.capacity > 0 ? O_CREAT : 0) | O_CLOEXEC, 0600);
    if (fd < 0) {
      if (errno == ENOENT) {
        return Result::Error("ERR_NOT_FOUND", "encoder cache store '" + name + "' does not exist; pass a capacity to create it");
      }
      return Result::Error("ERR_SYSTEM", "shm_open(" + s->object_ + "): " + std::strerror(errno), errno);
    }
    Result r = FlockUntil(fd, deadline, s->object_);
    if (!r.ok()) {
      close(fd);
      return r;
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
      int err = errno;
      close(fd);
      return Result::Error("ERR_SYSTEM", "fstat(" + s->object_ + "): " + std::strerror(err), err);
    }
    if (st.st_nlink == 0) {  // the last user removed it after we opened it: open the name again
      close(fd);
      continue;
    }
    s->fd_ = fd;
    const uint64_t size = static_cast<uint64_t>(st.st_size);
    bool valid = false;
    if (size >= sizeof(Header)) {
      r = MapObject(fd, size, &s->mapping_, s->object_);
      if (!r.ok()) return r;  // ~Store closes fd_ and drops the flock
      const Header* h = reinterpret_cast<Header*>(s->mapping_->data);
      valid = HeaderValid(h, size);
      if (!valid && HeaderPublished(h)) {
        // A live store of another build: never re-create it under its users.
        return Result::Error("ERR_PROTOCOL_VERSION", "encoder cache store '" + name + "' was created by an incompatible build (layout version " +
                                                         std::to_string(h->version) + ", this build " + std::to_string(kVersion) + ")");
      }
      if (!valid) s->mapping_.reset();
    }
    if (!valid) {
      // New, or left half-initialised by a creator that died: (re)create it.
      if (options.capacity == 0) {
        return Result::Error("ERR_NOT_FOUND", "encoder cache store '" + name + "' is not initialised; pass a capacity to create it");
      }
      if (ftruncate(fd, 0) != 0 || ftruncate(fd, static_cast<off_t>(plan.layout.total_bytes)) != 0) {
        int err = errno;
        return Result::Error("ERR_SYSTEM", "ftruncate(" + s->object_ + "): " + std::strerror(err), err);
      }
      r = MapObject(fd, plan.layout.total_bytes, &s->mapping_, s->object_);
      if (!r.ok()) return r;
      Header* h = reinterpret_cast<Header*>(s->mapping_->data);
      h->version = kVersion;
      h->entry_bytes = sizeof(Entry);
      h->attachment_bytes = sizeof(Attachment);
      h->pin_bytes = sizeof(PinSlot);
      h->mutex_bytes = sizeof(pthread_mutex_t);
      h->header_bytes = sizeof(Header);
      h->capacity = plan.layout.capacity;
      h->alignment = plan.layout.alignment;
      h->total_bytes = plan.layout.total_bytes;
      h->max_entries = plan.layout.max_entries;
      h->bucket_count = plan.bucket_count;
      h->max_processes = plan.layout.max_processes;
      h->max_pins = plan.layout.max_pins;
      h->entries_off = plan.entries_off;
      h->buckets_off = plan.buckets_off;
      h->attachments_off = plan.attachments_off;
      h->ledgers_off = plan.ledgers_off;
      h->arena_off = plan.arena_off;
      pthread_mutexattr_t attr;
      pthread_mutexattr_init(&attr);
      pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
      pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
      int rc = pthread_mutex_init(&h->mutex, &attr);
      pthread_mutexattr_destroy(&attr);
      if (rc != 0) return Result::Error("ERR_SYSTEM", std::string("pthread_mutex_init: ") + std::strerror(rc), rc);
      created = true;
    }
    break;
  }
  Header* h = reinterpret_cast<Header*>(s->mapping_->data);
  s->h_ = h;
  uint8_t* base = s->mapping_->data;
  s->entries_ = reinterpret_cast<Entry*>(base + h->entries_off);
  s->buckets_ = reinterpret_cast<uint32_t*>(base + h->buckets_off);
  s->attachments_ = reinterpret_cast<Attachment*>(base + h->attachments_off);
  s->ledgers_ = reinterpret_cast<PinSlot*>(base + h->ledgers_off);
  s->arena_ = base + h->arena_off;
  s->layout_ = Layout{h->capacity, h->alignment, h->max_entries, h->max_processes, h->max_pins, h->total_bytes};
  if (created) {
    // Fresh zero pages: build the empty derived structures, then publish the magic.
    s->Rebuild();
    StoreRelease(&h->magic, kMagic);
  } else if (options.capacity > 0) {
    if (AlignUp(options.capacity, h->alignment) != h->capacity ||
        (options.max_entries != 0 && options.max_entries != h->max_entries)) {
      flock(s->fd_, LOCK_UN);
      return Result::Error("ERR_BAD_ARGUMENT", "encoder cache store '" + name + "' exists with capacity " +
                                                   std::to_string(h->capacity) + " and maxEntries " +
                                                   std::to_string(h->max_entries) +
                                                   "; open it without a layout or with the same one");
    }
  }
  Result r = s->Attach();
  flock(s->fd_, LOCK_UN);
  if (!r.ok()) return r;
  if (created && options.prefault) {
    if (madvise(s->arena_, h->capacity, MADV_POPULATE_WRITE) != 0) {
      for (uint64_t off = 0; off < h->capacity; off += 4096) s->arena_[off] = 0;
    }
  }
  *out = std::move(s);
  return Result::Ok();
}

Store::~Store() {
  Close();
  if (fd_ >= 0) close(fd_);
}

Result Store::Attach() {
  Result r = Lock();
  if (!r.ok()) return r;
  ReapDead();
  uint32_t slot = kNil;
  for (uint32_t a = 0; a < h_->max_processes; ++a) {
    if (attachments_[a].state == 0) {
      slot = a;
      break;
    }
  }
  if (slot == kNil) {
    Unlock();
    return Result::Error("ERR_CAPACITY", "encoder cache store '" + name_ + "' already has " +
                                             std::to_string(h_->max_processes) + " processes attached (maxProcesses)");
  }
  unsigned long long start = 0;
  ProcessStartTime(getpid(), &start);
  Attachment& a = attachments_[slot];
  a.gen += 1;
  a.pid = getpid();
  a.start_time = start;
  a.pid_ns = PidNamespace();
  a.pins_used = 0;
  StoreRelease(&a.state, 1u);
  self_ = slot;
  self_gen_ = a.gen;
  Unlock();
  return Result::Ok();
}

void Store::Close() {
  if (closed_) return;
  closed_ = true;
  if (h_ == nullptr || self_ == kNil) return;
  // The flock orders us against openers: nobody attaches between our count and unlink.
  const timespec deadline = DeadlineIn(lock_timeout_ms_);
  bool flocked = FlockUntil(fd_, deadline, object_).ok();
  uint32_t live = 1;
  if (Lock().ok()) {
    ReapAttachment(self_);
    ReapDead();
    live = 0;
    for (uint32_t a = 0; a < h_->max_processes; ++a) live += attachments_[a].state == 1 ? 1 : 0;
    Unlock();
  }
  self_ = kNil;
  if (flocked && live == 0) {
    // Remove the name only if it still names our object.
    int fd = shm_open(object_.c_str(), O_RDONLY | O_CLOEXEC, 0);
    if (fd >= 0) {
      struct stat a, b;
      if (fstat(fd, &a) == 0 && fstat(fd_, &b) == 0 && a.st_ino == b.st_ino && a.st_dev == b.st_dev) {
        shm_unlink(object_.c_str());
      }
      close(fd);
    }
  }
  if (flocked) flock(fd_, LOCK_UN);
  close(fd_);
  fd_ = -1;
  h_ = nullptr;
  mapping_.reset();  // views handed out keep their own reference
}

Result Store::ReclaimStale(int* removed) {
  *removed = 0;
  DIR* dir = opendir("/dev/shm");
  if (dir == nullptr) return Result::Ok();
  std::vector<std::string> names;
  while (struct dirent* e = readdir(dir)) {
    if (std::strncmp(e->d_name, kObjectPrefix, sizeof kObjectPrefix - 1) == 0) names.push_back(e->d_name);
  }
  closedir(dir);
  for (const std::string& n : names) {
    std::string object = "/" + n;
    int fd = shm_open(object.c_str(), O_RDWR | O_CLOEXEC, 0);
    if (fd < 0) continue;
    if (flock(fd, LOCK_EX | LOCK_NB) != 0) {  // someone is opening or closing it: alive
      close(fd);
      continue;
    }
    struct stat st;
    bool stale = false;
    if (fstat(fd, &st) == 0 && st.st_nlink > 0) {
      uint64_t size = static_cast<uint64_t>(st.st_size);
      std::shared_ptr<Mapping> m;
      if (size < sizeof(Header) || !MapObject(fd, size, &m, object).ok()) {
        stale = true;  // a creator died before sizing it
      } else if (!HeaderPublished(reinterpret_cast<Header*>(m->data))) {
        stale = true;  // ... or before finishing its initialisation
      } else if (!HeaderValid(reinterpret_cast<Header*>(m->data), size)) {
        stale = false;  // another build's store: its liveness is not ours to judge
      } else {
        std::unique_ptr<Store> s(new Store());
        s->closed_ = true;  // a probe, not an attachment
        s->lock_timeout_ms_ = 0;  // busy means in use: skip it, never wait on another store
        s->name_ = n.substr(sizeof kObjectPrefix - 1);
        s->mapping_ = m;
        s->h_ = reinterpret_cast<Header*>(m->data);
        s->entries_ = reinterpret_cast<Entry*>(m->data + s->h_->entries_off);
        s->buckets_ = reinterpret_cast<uint32_t*>(m->data + s->h_->buckets_off);
        s->attachments_ = reinterpret_cast<Attachment*>(m->data + s->h_->attachments_off);
        s->ledgers_ = reinterpret_cast<PinSlot*>(m->data + s->h_->ledgers_off);
        s->arena_ = m->data + s->h_->arena_off;
        if (s->Lock().ok()) {
          s->ReapDead();
          uint32_t live = 0;
          for (uint32_t a = 0; a < s->h_->max_processes; ++a) live += s->attachments_[a].state == 1 ? 1 : 0;
          s->Unlock();
          stale = live == 0;
        }
      }
    }
    if (stale && shm_unlink(object.c_str()) == 0) ++*removed;
    flock(fd, LOCK_UN);
    close(fd);
  }
  return Result::Ok();
}

// ---------------------------------------------------------------------------
// The mutex and crash recovery.

Result Store::Lock() {
  int rc = pthread_mutex_trylock(&h_->mutex);
  if (rc == EBUSY && lock_timeout_ms_ == 0) rc = ETIMEDOUT;  // a probe never waits
  if (rc == EBUSY) {
    timespec deadline = DeadlineIn(lock_timeout_ms_);
    rc = pthread_mutex_clocklock(&h_->mutex, CLOCK_MONOTONIC, &deadline);
  }
  if (rc == 0) return Result::Ok();
  if (rc == EOWNERDEAD) {
    // A process died inside a critical section: the derived state may be torn.
    Rebuild();
    h_->recoveries += 1;
    pthread_mutex_consistent(&h_->mutex);
    return Result::Ok();
  }
  if (rc == ETIMEDOUT) {
    return Result::Error("ERR_TIMEOUT", "encoder cache store '" + name_ + "': index lock not acquired within " +
                                            std::to_string(lock_timeout_ms_) + " ms");
  }
  return Result::Error("ERR_SYSTEM", std::string("pthread_mutex_lock: ") + std::strerror(rc), rc);
}

void Store::Unlock() { pthread_mutex_unlock(&h_->mutex); }

void Store::Rebuild() {
  // 1. Attachments: forget dead processes (their ledgers go with them).
  for (uint32_t a = 0; a < h_->max_processes; ++a) {
    Attachment& at = attachments_[a];
    if (at.state != 1) {
      at.state = 0;
      continue;
    }
    if (a != self_ && !AttachmentAlive(a)) {
      at.state = 0;
      at.pins_used = 0;
      h_->reaped_processes += 1;
    } else if (at.pins_used > h_->max_pins) {
      at.pins_used = h_->max_pins;
    }
  }
  // 2. Entries: keep the consistent ones.
  const uint64_t cap = h_->capacity;
  std::vector<uint32_t> live;
  for (uint32_t e = 0; e < h_->max_entries; ++e) {
    Entry& x = entries_[e];
    x.pins = 0;
    x.bucket_next = x.lru_prev = x.lru_next = x.addr_prev = x.addr_next = x.free_next = kNil;
    bool ok = x.state == kWriting || x.state == kReady || x.state == kRetired;
    ok = ok && x.key_len > 0 && x.key_len <= kKeyMax && x.meta_len <= kMetaMax && x.size > 0 && x.alloc >= x.size &&
         x.offset <= cap && x.alloc <= cap - x.offset && x.offset % h_->alignment == 0;
    if (ok && x.state == kWriting) {
      const bool writer_live = x.writer < h_->max_processes && attachments_[x.writer].state == 1 &&
                               attachments_[x.writer].gen == x.writer_gen;
      if (!writer_live) {
        ok = false;
        h_->reaped_writes += 1;
      }
    }
    if (!ok) {
      x.state = kFree;
    } else {
      live.push_back(e);
    }
  }
  // 3. Pins from the ledgers of live attachments.
  for (uint32_t a = 0; a < h_->max_processes; ++a) {
    Attachment& at = attachments_[a];
    if (at.state != 1) continue;
    PinSlot* ledger = ledgers_ + uint64_t(a) * h_->max_pins;
    uint32_t kept = 0;
    for (uint32_t i = 0; i < at.pins_used; ++i) {
      PinSlot p = ledger[i];
      if (p.count == 0 || p.entry >= h_->max_entries) continue;
      Entry& x = entries_[p.entry];
      if (x.gen != p.gen || (x.state != kReady && x.state != kRetired)) continue;
      x.pins += p.count;
      ledger[kept++] = p;
    }
    at.pins_used = kept;
  }
  // 4. Overlaps cannot arise from our writes; drop any to stay safe.
  std::sort(live.begin(), live.end(), [this](uint32_t a, uint32_t b) { return entries_[a].offset < entries_[b].offset; });
  std::vector<uint32_t> placed;
  uint64_t end = 0;
  for (uint32_t e : live) {
    Entry& x = entries_[e];
    if (x.state == kRetired && x.pins == 0) {
      x.state = kFree;
      continue;
    }
    if (x.offset < end) {
      x.state = kFree;
      continue;
    }
    end = x.offset + x.alloc;
    placed.push_back(e);
  }
  // 5. Derived structures from scratch.
  std::fill(buckets_, buckets_ + h_->bucket_count, kNil);
  h_->lru_head = h_->lru_tail = h_->addr_head = h_->addr_tail = kNil;
  h_->used_bytes = 0;
  h_->ready_count = h_->writing_count = 0;
  uint64_t clock = 0;
  uint32_t prev = kNil;
  for (uint32_t e : placed) {
    Entry& x = entries_[e];
    AddrInsertAfter(prev, e);
    prev = e;
    h_->used_bytes += x.alloc;
    clock = std::max(clock, x.stamp);
    if (x.state != kRetired) BucketInsert(e);
    if (x.state == kWriting) h_->writing_count += 1;
  }
  std::vector<uint32_t> ready;
  for (uint32_t e : placed) {
    if (entries_[e].state == kReady) ready.push_back(e);
  }
  std::sort(ready.begin(), ready.end(), [this](uint32_t a, uint32_t b) { return entries_[a].stamp < entries_[b].stamp; });
  for (uint32_t e : ready) LruAppend(e);
  h_->ready_count = static_cast<uint32_t>(ready.size());
  h_->free_head = kNil;
  for (uint32_t e = h_->max_entries; e-- > 0;) {
    if (entries_[e].state == kFree) {
      entries_[e].free_next = h_->free_head;
      h_->free_head = e;
    }
  }
  h_->clock = std::max(h_->clock, clock) + 1;
}

bool Store::AttachmentAlive(uint32_t a) const {
  const Attachment& at = attachments_[a];
  if (at.state != 1) return false;
  if (at.pid_ns != 0 && at.pid_ns != PidNamespace()) return true;  // cannot judge another namespace
  unsigned long long start = 0;
  char state = '?';
  // A zombie (killed, not yet reaped by its parent) holds nothing any more: dead.
  if (ProcessStartTime(at.pid, &start, &state)) return start == at.start_time && state != 'Z' && state != 'X';
  // No readable /proc entry: gone, unless the pid exists and /proc hides it from us.
  return kill(at.pid, 0) == 0 || errno == EPERM;
}

int Store::ReapDead() {
  int reaped = 0;
  for (uint32_t a = 0; a < h_->max_processes; ++a) {
    if (a == self_ || attachments_[a].state != 1) continue;
    if (!AttachmentAlive(a)) {
      ReapAttachment(a);
      h_->reaped_processes += 1;
      ++reaped;
    }
  }
  return reaped;
}

void Store::ReapAttachment(uint32_t a) {
  Attachment& at = attachments_[a];
  for (uint32_t e = 0; e < h_->max_entries; ++e) {
    Entry& x = entries_[e];
    if (x.state == kWriting && x.writer == a && x.writer_gen == at.gen) {
      FreeEntry(e);
      if (a != self_) h_->reaped_writes += 1;
    }
  }
  PinSlot* ledger = ledgers_ + uint64_t(a) * h_->max_pins;
  for (uint32_t i = 0; i < at.pins_used; ++i) {
    PinSlot& p = ledger[i];
    if (p.entry >= h_->max_entries || p.count == 0) continue;
    Entry& x = entries_[p.entry];
    if (x.gen != p.gen || (x.state != kReady && x.state != kRetired)) continue;
    x.pins = x.pins > p.count ? x.pins - p.count : 0;
    if (x.pins == 0 && x.state == kRetired) FreeEntry(p.entry);
  }
  at.pins_used = 0;
  StoreRelease(&at.state, 0u);
}

// ---------------------------------------------------------------------------
// Lists and buckets (derived; mutex held).

void Store::LruUnlink(uint32_t e) {
  Entry& x = entries_[e];
  if (x.lru_prev != kNil) entries_[x.lru_prev].lru_next = x.lru_next; else h_->lru_head = x.lru_next;
  if (x.lru_next != kNil) entries_[x.lru_next].lru_prev = x.lru_prev; else h_->lru_tail = x.lru_prev;
  x.lru_prev = x.lru_next = kNil;
}

void Store::LruAppend(uint32_t e) {
  Entry& x = entries_[e];
  x.lru_prev = h_->lru_tail;
  x.lru_next = kNil;
  if (h_->lru_tail != kNil) entries_[h_->lru_tail].lru_next = e; else h_->lru_head = e;
  h_->lru_tail = e;
}

void Store::AddrUnlink(uint32_t e) {
  Entry& x = entries_[e];
  if (x.addr_prev != kNil) entries_[x.addr_prev].addr_next = x.addr_next; else h_->addr_head = x.addr_next;
  if (x.addr_next != kNil) entries_[x.addr_next].addr_prev = x.addr_prev; else h_->addr_tail = x.addr_prev;
  x.addr_prev = x.addr_next = kNil;
}

void Store::AddrInsertAfter(uint32_t prev, uint32_t e) {
  Entry& x = entries_[e];
  x.addr_prev = prev;
  x.addr_next = prev == kNil ? h_->addr_head : entries_[prev].addr_next;
  if (prev == kNil) h_->addr_head = e; else entries_[prev].addr_next = e;
  if (x.addr_next != kNil) entries_[x.addr_next].addr_prev = e; else h_->addr_tail = e;
}

void Store::BucketInsert(uint32_t e) {
  uint32_t& head = buckets_[entries_[e].hash & (h_->bucket_count - 1)];
  entries_[e].bucket_next = head;
  head = e;
}

void Store::BucketRemove(uint32_t e) {
  uint32_t* link = &buckets_[entries_[e].hash & (h_->bucket_count - 1)];
  while (*link != kNil) {
    if (*link == e) {
      *link = entries_[e].bucket_next;
      entries_[e].bucket_next = kNil;
      return;
    }
    link = &entries_[*link].bucket_next;
  }
}

uint32_t Store::Find(const char* key, size_t key_len, uint64_t hash) const {
  for (uint32_t e = buckets_[hash & (h_->bucket_count - 1)]; e != kNil; e = entries_[e].bucket_next) {
    const Entry& x = entries_[e];
    if (x.hash == hash && x.key_len == key_len && std::memcmp(x.key, key, key_len) == 0) return e;
  }
  return kNil;
}

void Store::FreeEntry(uint32_t e) {
  Entry& x = entries_[e];
  if (x.state == kWriting || x.state == kReady) BucketRemove(e);
  if (x.state == kReady) {
    LruUnlink(e);
    h_->ready_count -= 1;
  }
  if (x.state == kWriting) h_->writing_count -= 1;
  AddrUnlink(e);
  h_->used_bytes -= x.alloc;
  x.pins = 0;
  StoreRelease(&x.state, static_cast<uint32_t>(kFree));
  x.free_next = h_->free_head;
  h_->free_head = e;
}

void Store::Evict(uint32_t e) {
  h_->evictions += 1;
  h_->evicted_bytes += entries_[e].size;
  FreeEntry(e);
}

uint32_t Store::OldestEvictable(const std::vector<uint32_t>& except) const {
  for (uint32_t e = h_->lru_head; e != kNil; e = entries_[e].lru_next) {
    if (entries_[e].pins == 0 && std::find(except.begin(), except.end(), e) == except.end()) return e;
  }
  return kNil;
}

// Where `alloc` bytes can go. First a free gap (no victims); otherwise the oldest
// unpinned entries are considered in LRU order and the first contiguous range that
// the considered ones open up is chosen: only the entries inside it are victims.
// Nothing is changed here, so a failure loses nothing.
bool Store::FindHole(uint64_t alloc, uint64_t* offset, uint32_t* prev, std::vector<uint32_t>* victims) {
  victims->clear();
  uint64_t cursor = 0;
  uint32_t before = kNil;
  for (uint32_t e = h_->addr_head;; e = entries_[e].addr_next) {
    uint64_t limit = e == kNil ? h_->capacity : entries_[e].offset;
    if (limit - cursor >= alloc) {
      *offset = cursor;
      *prev = before;
      return true;
    }
    if (e == kNil) break;
    cursor = entries_[e].offset + entries_[e].alloc;
    before = e;
  }
  std::unordered_set<uint32_t> doomed;
  std::unordered_map<uint32_t, uint32_t> first_of_last, last_of_first;  // run endpoints
  for (uint32_t c = h_->lru_head; c != kNil; c = entries_[c].lru_next) {
    if (entries_[c].pins != 0) continue;
    doomed.insert(c);
    uint32_t l = entries_[c].addr_prev, r = entries_[c].addr_next;
    uint32_t first = (l != kNil && doomed.count(l)) ? first_of_last[l] : c;
    uint32_t last = (r != kNil && doomed.count(r)) ? last_of_first[r] : c;
    last_of_first[first] = last;
    first_of_last[last] = first;
    uint32_t p = entries_[first].addr_prev, n = entries_[last].addr_next;
    uint64_t lo = p == kNil ? 0 : entries_[p].offset + entries_[p].alloc;
    uint64_t hi = n == kNil ? h_->capacity : entries_[n].offset;
    if (hi - lo >= alloc) {
      for (uint32_t v = first;; v = entries_[v].addr_next) {
        victims->push_back(v);
        if (v == last) break;
      }
      *offset = lo;
      *prev = p;
      return true;
    }
  }
  return false;
}

// ---------------------------------------------------------------------------
// Pins.

Result Store::Pin(uint32_t e) {
  Attachment& at = attachments_[self_];
  PinSlot* ledger = ledgers_ + uint64_t(self_) * h_->max_pins;
  Entry& x = entries_[e];
  for (uint32_t i = 0; i < at.pins_used; ++i) {
    if (ledger[i].entry == e && ledger[i].gen == x.gen) {
      ledger[i].count += 1;
      x.pins += 1;
      return Result::Ok();
    }
  }
  if (at.pins_used == h_->max_pins) {
    return Result::Error("ERR_CAPACITY", "this process already pins " + std::to_string(h_->max_pins) +
                                             " entries (maxPinsPerProcess); release some first");
  }
  ledger[at.pins_used] = PinSlot{e, x.gen, 1, 0};
  StoreRelease(&at.pins_used, at.pins_used + 1);
  x.pins += 1;
  return Result::Ok();
}

Result Store::Unpin(uint32_t e, uint32_t gen) {
  Attachment& at = attachments_[self_];
  PinSlot* ledger = ledgers_ + uint64_t(self_) * h_->max_pins;
  for (uint32_t i = 0; i < at.pins_used; ++i) {
    if (ledger[i].entry != e || ledger[i].gen != gen) continue;
    ledger[i].count -= 1;
    if (ledger[i].count == 0) {
      ledger[i] = ledger[at.pins_used - 1];
      StoreRelease(&at.pins_used, at.pins_used - 1);
    }
    Entry& x = entries_[e];
    if (x.gen == gen && (x.state == kReady || x.state == kRetired) && x.pins > 0) {
      x.pins -= 1;
      if (x.pins == 0 && x.state == kRetired) FreeEntry(e);
    }
    return Result::Ok();
  }
  return Result::Error("ERR_BAD_ARGUMENT", "the entry is not pinned by this store handle (released twice?)");
}

Result Store::Decode(uint64_t ticket, uint32_t* e, uint32_t* gen) const {
  *e = static_cast<uint32_t>(ticket >> 32);
  *gen = static_cast<uint32_t>(ticket & 0xffffffffu);
  if (*e >= h_->max_entries) return Result::Error("ERR_BAD_ARGUMENT", "invalid entry ticket");
  return Result::Ok();
}

// ---------------------------------------------------------------------------
// Operations.

#define EC_LOCK_OR_RETURN()                                                                          \
  do {                                                                                              \
    if (closed_) return Result::Error("ERR_CLOSED", "encoder cache store '" + name_ + "' is closed"); \
    Result _r = Lock();                                                                             \
    if (!_r.ok()) return _r;                                                                        \
  } while (0)

Result Store::Has(const char* key, size_t key_len, bool* found) {
  const uint64_t hash = HashKey(key, key_len);
  EC_LOCK_OR_RETURN();
  uint32_t e = Find(key, key_len, hash);
  *found = e != kNil && entries_[e].state == kReady;
  if (*found) h_->hits += 1; else h_->misses += 1;
  Unlock();
  return Result::Ok();
}

Result Store::Stat(const char* key, size_t key_len, bool* found, EntryRef* ref) {
  const uint64_t hash = HashKey(key, key_len);
  EC_LOCK_OR_RETURN();
  uint32_t e = Find(key, key_len, hash);
  *found = e != kNil && entries_[e].state == kReady;
  if (*found) {
    const Entry& x = entries_[e];
    *ref = EntryRef{(uint64_t(e) << 32) | x.gen, x.offset, x.size, std::string(reinterpret_cast<const char*>(x.meta), x.meta_len)};
  }
  Unlock();
  return Result::Ok();
}

Result Store::Reserve(const char* key, size_t key_len, uint64_t size, const std::string& meta, ReserveOutcome* outcome,
                      EntryRef* ref) {
  if (key_len == 0 || key_len > kKeyMax) return Result::Error("ERR_BAD_ARGUMENT", "key length must be 1..255 bytes");
  if (meta.size() > kMetaMax) return Result::Error("ERR_BAD_ARGUMENT", "meta must be at most 256 bytes");
  if (size == 0) return Result::Error("ERR_BAD_ARGUMENT", "an entry must hold at least one byte");
  const uint64_t hash = HashKey(key, key_len);
  const uint64_t alloc = AlignUp(size, layout_.alignment);
  if (size > layout_.capacity) {
    EC_LOCK_OR_RETURN();
    h_->capacity_errors += 1;
    Unlock();
    return Result::Error("ERR_CAPACITY", "an entry of " + std::to_string(size) + " bytes is larger than the store's capacity of " +
                                             std::to_string(layout_.capacity) + " bytes");
  }
  EC_LOCK_OR_RETURN();
  uint32_t found = Find(key, key_len, hash);
  if (found != kNil) {
    Entry& x = entries_[found];
    if (x.state == kReady) {
      h_->dedups += 1;
      *outcome = ReserveOutcome::kExists;
      Unlock();
      return Result::Ok();
    }
    // WRITING: wait for a live writer; take over from a dead one.
    if ((x.writer == self_ && x.writer_gen == self_gen_) || (x.writer < h_->max_processes && attachments_[x.writer].state == 1 &&
                              attachments_[x.writer].gen == x.writer_gen && AttachmentAlive(x.writer))) {
      *outcome = ReserveOutcome::kBusy;
      Unlock();
      return Result::Ok();
    }
    if (x.writer < h_->max_processes && attachments_[x.writer].state == 1 && attachments_[x.writer].gen == x.writer_gen) {
      ReapAttachment(x.writer);
      h_->reaped_processes += 1;
    } else {
      FreeEntry(found);
      h_->reaped_writes += 1;
    }
  }
  uint64_t offset = 0;
  uint32_t prev = kNil;
  std::vector<uint32_t> victims;
  uint32_t slot_victim = kNil;
  bool placed = false;
  for (int attempt = 0; attempt < 2 && !placed; ++attempt) {
    if (attempt == 1 && ReapDead() == 0) break;  // dead processes may hold space or slots
    if (!FindHole(alloc, &offset, &prev, &victims)) continue;
    if (h_->free_head == kNil && victims.empty()) {
      slot_victim = OldestEvictable(victims);
      if (slot_victim == kNil) continue;
    }
    placed = true;
  }
  if (!placed) {
    h_->capacity_errors += 1;
    bool slots = h_->free_head == kNil;
    Unlock();
    return Result::Error("ERR_CAPACITY",
                         slots ? "every entry slot is in use by a pinned or in-progress entry (maxEntries " +
                                     std::to_string(layout_.max_entries) + ")"
                               : "no room for " + std::to_string(size) + " bytes: the rest of the " +
                                     std::to_string(layout_.capacity) + "-byte store is pinned or being written");
  }
  for (uint32_t v : victims) Evict(v);
  if (slot_victim != kNil) Evict(slot_victim);
  if (!victims.empty() || slot_victim != kNil) {
    // Evictions may have unlinked `prev`: find the block before `offset` again.
    prev = kNil;
    for (uint32_t e = h_->addr_head; e != kNil && entries_[e].offset < offset; e = entries_[e].addr_next) prev = e;
  }
  uint32_t e = h_->free_head;
  Entry& x = entries_[e];
  h_->free_head = x.free_next;
  // Authoritative fields first, the state last: a crash before it leaves a free slot.
  x.gen += 1;
  x.writer = self_;
  x.writer_gen = self_gen_;
  x.hash = hash;
  x.offset = offset;
  x.size = size;
  x.alloc = alloc;
  x.stamp = h_->clock++;
  x.key_len = static_cast<uint16_t>(key_len);
  std::memcpy(x.key, key, key_len);
  x.meta_len = static_cast<uint16_t>(meta.size());
  std::memcpy(x.meta, meta.data(), meta.size());
  x.pins = 0;
  StoreRelease(&x.state, static_cast<uint32_t>(kWriting));
  AddrInsertAfter(prev, e);
  BucketInsert(e);
  h_->used_bytes += alloc;
  h_->writing_count += 1;
  *outcome = ReserveOutcome::kReserved;
  *ref = EntryRef{(uint64_t(e) << 32) | x.gen, offset, size, meta};
  Unlock();
  return Result::Ok();
}

Result Store::Commit(uint64_t ticket) {
  uint32_t e, gen;
  EC_LOCK_OR_RETURN();
  Result r = Decode(ticket, &e, &gen);
  Entry& x = entries_[r.ok() ? e : 0];
  if (r.ok() && !(x.gen == gen && x.state == kWriting && x.writer == self_ && x.writer_gen == self_gen_)) {
    r = Result::Error("ERR_ABORTED", "the reservation is gone (aborted, or the store was closed)");
  }
  if (r.ok()) {
    x.stamp = h_->clock++;
    StoreRelease(&x.state, static_cast<uint32_t>(kReady));  // published: visible from here on
    h_->writing_count -= 1;
    h_->ready_count += 1;
    h_->saves += 1;
    LruAppend(e);
  }
  Unlock();
  return r;
}

Result Store::Abort(uint64_t ticket) {
  uint32_t e, gen;
  EC_LOCK_OR_RETURN();
  Result r = Decode(ticket, &e, &gen);
  if (r.ok()) {
    Entry& x = entries_[e];
    if (x.gen == gen && x.state == kWriting && x.writer == self_ && x.writer_gen == self_gen_) FreeEntry(e);
  }
  Unlock();
  return r;
}

Result Store::Acquire(const char* key, size_t key_len, bool* found, EntryRef* ref) {
  const uint64_t hash = HashKey(key, key_len);
  EC_LOCK_OR_RETURN();
  uint32_t e = Find(key, key_len, hash);
  *found = e != kNil && entries_[e].state == kReady;
  if (!*found) {
    h_->misses += 1;
    Unlock();
    return Result::Ok();
  }
  Result r = Pin(e);
  if (r.ok()) {
    Entry& x = entries_[e];
    h_->hits += 1;
    x.stamp = h_->clock++;
    LruUnlink(e);
    LruAppend(e);
    *ref = EntryRef{(uint64_t(e) << 32) | x.gen, x.offset, x.size, std::string(reinterpret_cast<const char*>(x.meta), x.meta_len)};
  }
  Unlock();
  return r;
}

Result Store::Release(uint64_t ticket) {
  uint32_t e, gen;
  EC_LOCK_OR_RETURN();
  Result r = Decode(ticket, &e, &gen);
  if (r.ok()) r = Unpin(e, gen);
  Unlock();
  return r;
}

Result Store::Delete(const char* key, size_t key_len, bool* found) {
  const uint64_t hash = HashKey(key, key_len);
  EC_LOCK_OR_RETURN();
  uint32_t e = Find(key, key_len, hash);
  *found = e != kNil && entries_[e].state == kReady;
  if (*found) {
    Entry& x = entries_[e];
    if (x.pins == 0) {
      FreeEntry(e);
    } else {
      // Invisible now; the bytes stay until the last reader lets go.
      BucketRemove(e);
      LruUnlink(e);
      h_->ready_count -= 1;
      StoreRelease(&x.state, static_cast<uint32_t>(kRetired));
    }
  }
  Unlock();
  return Result::Ok();
}

Result Store::Keys(std::vector<std::string>* keys) {
  EC_LOCK_OR_RETURN();
  keys->clear();
  keys->reserve(h_->ready_count);
  for (uint32_t e = h_->lru_head; e != kNil; e = entries_[e].lru_next) {
    keys->emplace_back(reinterpret_cast<const char*>(entries_[e].key), entries_[e].key_len);
  }
  Unlock();
  return Result::Ok();
}

Result Store::GetStats(Stats* s) {
  EC_LOCK_OR_RETURN();
  s->used_bytes = h_->used_bytes;
  s->entries = h_->ready_count;
  s->writing = h_->writing_count;
  s->pinned = 0;
  for (uint32_t e = h_->addr_head; e != kNil; e = entries_[e].addr_next) s->pinned += entries_[e].pins > 0 ? 1 : 0;
  s->processes = 0;
  for (uint32_t a = 0; a < h_->max_processes; ++a) s->processes += attachments_[a].state == 1 ? 1 : 0;
  s->hits = h_->hits;
  s->misses = h_->misses;
  s->saves = h_->saves;
  s->dedups = h_->dedups;
  s->evictions = h_->evictions;
  s->evicted_bytes = h_->evicted_bytes;
  s->capacity_errors = h_->capacity_errors;
  s->recoveries = h_->recoveries;
  s->reaped_processes = h_->reaped_processes;
  s->reaped_writes = h_->reaped_writes;
  Unlock();
  return Result::Ok();
}

Result Store::LockAndScrambleForTest() {
  EC_LOCK_OR_RETURN();
  std::fill(buckets_, buckets_ + h_->bucket_count, kNil);
  h_->lru_head = h_->lru_tail = h_->addr_head = h_->addr_tail = h_->free_head = kNil;
  h_->used_bytes = 0;
  return Result::Ok();  // still locked
}

Result Store::Recover(int* reaped) {
  EC_LOCK_OR_RETURN();
  *reaped = ReapDead();
  Unlock();
  return Result::Ok();
}

}  // namespace ec
}  // namespace epd
