// POSIX shared-memory objects that back host regions, so another process on the
// host can map them (the zero-copy same-host path).
//
// Naming: /epdx-<pid>-<starttime>-<seq>-<nonce>. The owner's pid and process start
// time (from /proc/<pid>/stat) identify the creating process exactly, so an object
// whose creator is gone (crash, SIGKILL) is recognised as stale and reclaimed by the
// next engine that opens on this host (ReclaimStaleShm), or by `epd-transfer shm-gc`.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "util/status.h"

namespace epd {

class ShmMapping {
 public:
  // Creates and maps a new object of `bytes`. With `prefault`, pages are touched
  // now (MAP_POPULATE) so the first transfer does not pay page-fault cost.
  static Status Create(size_t bytes, bool prefault, std::shared_ptr<ShmMapping>* out);
  // Maps an existing object created by another engine. Its size must be at least
  // `min_bytes`.
  static Status Attach(const std::string& name, size_t min_bytes, bool prefault,
                       std::shared_ptr<ShmMapping>* out);

  ~ShmMapping();
  ShmMapping(const ShmMapping&) = delete;
  ShmMapping& operator=(const ShmMapping&) = delete;

  // Removes the name (owner only; idempotent). The mapping stays valid until the
  // last reference goes, so peers still mapping it never fault.
  void Unlink();

  uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& name() const { return name_; }
  bool owner() const { return owner_; }

 private:
  ShmMapping(std::string name, uint8_t* data, size_t size, bool owner)
      : name_(std::move(name)), data_(data), size_(size), owner_(owner) {}

  std::string name_;
  uint8_t* data_;
  size_t size_;
  bool owner_;
  bool unlinked_ = false;
};

// Removes objects in /dev/shm named by dead epd-transfer processes. Returns how
// many were removed in *removed.
Status ReclaimStaleShm(int* removed);

// True when `name` has the form our engines create.
bool IsEngineShmName(const std::string& name);

}  // namespace epd
