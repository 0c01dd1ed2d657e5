#include "shm.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <fstream>
#include <random>
#include <sstream>

namespace epd {
namespace {

constexpr const char kPrefix[] = "epdx-";

// Field 22 of /proc/<pid>/stat: start time in clock ticks since boot. Together with
// the pid it names one process for the life of the boot.
bool ProcessStartTime(long pid, unsigned long long* out) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  if (!in) return false;
  std::string line;
  std::getline(in, line);
  // comm may contain spaces and parentheses: skip to the last ')'.
  size_t close = line.rfind(')');
  if (close == std::string::npos) return false;
  std::istringstream fields(line.substr(close + 2));
  std::string field;
  // After ')' the fields start at #3 (state); starttime is #22.
  for (int i = 3; i < 22; ++i) fields >> field;
  if (!(fields >> *out)) return false;
  return true;
}

std::string NewName() {
  static std::atomic<uint64_t> seq{0};
  static const unsigned long long start = [] {
    unsigned long long t = 0;
    ProcessStartTime(getpid(), &t);
    return t;
  }();
  std::random_device rd;
  char buf[96];
  std::snprintf(buf, sizeof buf, "/%s%d-%llu-%llu-%08x", kPrefix, static_cast<int>(getpid()), start,
                static_cast<unsigned long long>(seq.fetch_add(1)), static_cast<unsigned>(rd()));
  return buf;
}

}  // namespace

Status ShmMapping::Create(size_t bytes, bool prefault, std::shared_ptr<ShmMapping>* out) {
  if (bytes == 0) return Status(Code::kBadArgument, "region size must be > 0");
  std::string name = NewName();
  int fd = shm_open(name.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
  if (fd < 0) return Status::FromErrno("shm_open(" + name + ")");
  if (ftruncate(fd, static_cast<off_t>(bytes)) != 0) {
    int err = errno;
    close(fd);
    shm_unlink(name.c_str());
    return Status::FromErrno("ftruncate(" + name + ")", err);
  }
  int flags = MAP_SHARED | (prefault ? MAP_POPULATE : 0);
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, flags, fd, 0);
  int err = errno;
  close(fd);
  if (p == MAP_FAILED) {
    shm_unlink(name.c_str());
    return Status::FromErrno("mmap(" + name + ")", err);
  }
  out->reset(new ShmMapping(name, static_cast<uint8_t*>(p), bytes, true));
  return Status::Ok();
}

Status ShmMapping::Attach(const std::string& name, size_t min_bytes, bool prefault,
                          std::shared_ptr<ShmMapping>* out) {
  if (!IsEngineShmName(name)) return Status(Code::kBadArgument, "not an epd-transfer shm name: " + name);
  int fd = shm_open(name.c_str(), O_RDWR, 0);
  if (fd < 0) return Status::FromErrno("shm_open(" + name + ")");
  struct stat st;
  if (fstat(fd, &st) != 0) {
    int err = errno;
    close(fd);
    return Status::FromErrno("fstat(" + name + ")", err);
  }
  size_t size = static_cast<size_t>(st.st_size);
  if (size < min_bytes || size == 0) {
    close(fd);
    return Status(Code::kOutOfRange, "shm object " + name + " is smaller than the region it should back");
  }
  int flags = MAP_SHARED | (prefault ? MAP_POPULATE : 0);
  void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, flags, fd, 0);
  int err = errno;
  close(fd);
  if (p == MAP_FAILED) return Status::FromErrno("mmap(" + name + ")", err);
  out->reset(new ShmMapping(name, static_cast<uint8_t*>(p), size, false));
  return Status::Ok();
}

ShmMapping::~ShmMapping() {
  Unlink();
  munmap(data_, size_);
}

void ShmMapping::Unlink() {
  if (owner_ && !unlinked_) {
    shm_unlink(name_.c_str());
    unlinked_ = true;
  }
}

bool IsEngineShmName(const std::string& name) {
  const char* s = name.c_str();
  if (*s == '/') ++s;
  if (std::strncmp(s, kPrefix, sizeof kPrefix - 1) != 0) return false;
  if (std::strchr(s, '/') != nullptr) return false;
  return true;
}

Status ReclaimStaleShm(int* removed) {
  *removed = 0;
  DIR* dir = opendir("/dev/shm");
  if (dir == nullptr) return Status::Ok();  // no /dev/shm: nothing to reclaim
  while (struct dirent* e = readdir(dir)) {
    std::string name = e->d_name;
    if (!IsEngineShmName(name)) continue;
    long pid = 0;
    unsigned long long start = 0;
    if (std::sscanf(name.c_str() + sizeof kPrefix - 1, "%ld-%llu-", &pid, &start) != 2) continue;
    unsigned long long actual = 0;
    bool alive = ProcessStartTime(pid, &actual) && actual == start;
    if (!alive && kill(static_cast<pid_t>(pid), 0) == 0 && !ProcessStartTime(pid, &actual)) {
      alive = true;  // exists but /proc is hidden from us: leave it
    }
    if (!alive && shm_unlink(("/" + name).c_str()) == 0) ++*removed;
  }
  closedir(dir);
  return Status::Ok();
}

}  // namespace epd
