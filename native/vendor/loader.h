// Run-time loading of vendor libraries (Ascend ACL and HCCL, Mooncake's transfer
// engine, the CUDA driver). Nothing here links against a vendor SDK: a library is
// opened with dlopen the first time a backend is used, its entry points are looked
// up by name, and the addon loads on a host that has none of them.
//
// Rules (docs/VENDOR.md):
// - The library comes from an environment override (EPD_TRANSFER_<X>_LIB, a file
//   path) or else from a short list of default names and install locations.
// - Required symbols are all-or-nothing: one missing disables the backend and the
//   reason names it. Optional symbols may be null and are tested before each use.
// - A library is never dlclose'd, even when it turned out unusable: its static
//   constructors may already have started threads or registered exit handlers.
// - Results are cached per override value, so each library is opened, resolved and
//   initialised once per process.
#pragma once

#include <string>
#include <vector>

#include "util/status.h"

namespace epd {
namespace vendor {

// One entry point to resolve into `*slot` (a function-pointer variable).
struct Symbol {
  const char* name;
  void** slot;
  bool required;
};

// Where to find a library: the override variable, then default candidates in order.
struct LibrarySpec {
  const char* backend;        // "acl", "cuda", ... (for messages)
  const char* env_override;   // e.g. "EPD_TRANSFER_ACL_LIB"
  std::vector<std::string> candidates;  // file names or absolute paths
};

// Why a backend is not usable, in a form probe and capabilities() report.
enum class Unavailable {
  kNone = 0,
  kMissingLibrary,   // no candidate could be opened
  kMissingSymbol,    // a required entry point is absent
  kStubLibrary,      // a vendor stub that answers every call with a fixed code
  kNoDevice,         // the runtime loaded but sees no device
  kInitFailed,       // the runtime refused to initialise
  kNeedsOther,       // depends on another backend that is unavailable
};

const char* UnavailableName(Unavailable u);

// The outcome of opening one library.
struct Opened {
  void* handle = nullptr;
  std::string path;      // the file that was opened (or the override that could not be)
  Unavailable why = Unavailable::kNone;
  std::string reason;    // human-readable; empty when usable
};

// The candidate list the loader will try for `spec` right now: just the override
// when the variable is set, else spec.candidates.
std::vector<std::string> Candidates(const LibrarySpec& spec);

// The override value, or "" when unset. Used as the cache key of a backend.
std::string OverrideOf(const LibrarySpec& spec);

// Opens the first loadable candidate (RTLD_NOW | RTLD_LOCAL) and resolves
// `symbols` against it. On a missing required symbol the handle is kept open (never
// unloaded) but reported unusable; every slot is reset to null.
Opened OpenLibrary(const LibrarySpec& spec, const std::vector<Symbol>& symbols);

// A Status for a backend that cannot run: ERR_BACKEND_UNAVAILABLE with the reason.
Status UnavailableStatus(const char* backend, const std::string& reason);

}  // namespace vendor
}  // namespace epd
