#include "vendor/loader.h"

#include <dlfcn.h>

#include <cstdlib>

namespace epd {
namespace vendor {

const char* UnavailableName(Unavailable u) {
  switch (u) {
    case Unavailable::kNone: return "available";
    case Unavailable::kMissingLibrary: return "missing-library";
    case Unavailable::kMissingSymbol: return "missing-symbol";
    case Unavailable::kStubLibrary: return "stub-library";
    case Unavailable::kNoDevice: return "no-device";
    case Unavailable::kInitFailed: return "init-failed";
    case Unavailable::kNeedsOther: return "needs-other-backend";
  }
  return "unknown";
}

std::string OverrideOf(const LibrarySpec& spec) {
  const char* v = spec.env_override != nullptr ? std::getenv(spec.env_override) : nullptr;
  return v != nullptr ? std::string(v) : std::string();
}

std::vector<std::string> Candidates(const LibrarySpec& spec) {
  std::string forced = OverrideOf(spec);
  if (!forced.empty()) return {forced};
  return spec.candidates;
}

Opened OpenLibrary(const LibrarySpec& spec, const std::vector<Symbol>& symbols) {
  Opened out;
  std::string tried;
  for (const std::string& file : Candidates(spec)) {
    dlerror();
    // RTLD_LOCAL: vendor symbols stay out of the global namespace, so two runtimes
    // (or a fake and a real one) never interpose on each other. A library the
    // process already loaded (same path or soname) is returned as is, sharing its
    // state, which is what a Node process embedding other vendor users needs.
    void* h = dlopen(file.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (h != nullptr) {
      out.handle = h;
      out.path = file;
      break;
    }
    const char* err = dlerror();
    if (!tried.empty()) tried += "; ";
    tried += err != nullptr ? err : file + ": cannot open";
  }
  if (out.handle == nullptr) {
    out.why = Unavailable::kMissingLibrary;
    std::string forced = OverrideOf(spec);
    out.path = forced;
    out.reason = forced.empty() ? "library not found (" + tried + ")"
                                : std::string(spec.env_override) + " names a library that cannot be loaded (" + tried + ")";
    return out;
  }

  for (const Symbol& s : symbols) {
    dlerror();
    void* p = dlsym(out.handle, s.name);
    const char* err = dlerror();
    if (err != nullptr) p = nullptr;
    *s.slot = p;
    if (p == nullptr && s.required) {
      for (const Symbol& r : symbols) *r.slot = nullptr;
      out.why = Unavailable::kMissingSymbol;
      out.reason = out.path + " lacks required symbol " + s.name + (err != nullptr ? std::string(" (") + err + ")" : "");
      // Deliberately no dlclose: see loader.h.
      out.handle = nullptr;
      return out;
    }
  }
  return out;
}

Status UnavailableStatus(const char* backend, const std::string& reason) {
  return Status(Code::kBackendUnavailable, std::string(backend) + " backend is unavailable: " + reason);
}

}  // namespace vendor
}  // namespace epd
