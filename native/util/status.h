// Status: the error currency of the native core. Codes are the same strings the
// TypeScript TransferError carries, so an error keeps its identity across the boundary.
#pragma once

#include <cerrno>
#include <cstring>
#include <string>
#include <utility>

namespace epd {

enum class Code : int {
  kOk = 0,
  kBadArgument,      // ERR_BAD_ARGUMENT
  kOutOfRange,       // ERR_OUT_OF_RANGE
  kUnknownRegion,    // ERR_UNKNOWN_REGION
  kUnknownPeer,      // ERR_UNKNOWN_PEER
  kClosed,           // ERR_CLOSED
  kAborted,          // ERR_ABORTED
  kTimeout,          // ERR_TIMEOUT
  kPeerLost,         // ERR_PEER_LOST
  kRegionFreed,      // ERR_REGION_FREED
  kNotShareable,     // ERR_NOT_SHAREABLE
  kBackendUnavailable,  // ERR_BACKEND_UNAVAILABLE
  kSystem,           // ERR_SYSTEM (carries errno)
  kProtocol,         // ERR_PROTOCOL (a peer sent something malformed)
  kAuth,             // ERR_AUTH (a peer failed the shared-secret proof)
  kConnect,          // ERR_CONNECT (a peer's address could not be reached)
  kProtocolVersion,  // ERR_PROTOCOL_VERSION (a peer speaks another wire version)
  kLastCode = kProtocolVersion,
};

inline const char* CodeName(Code c) {
  switch (c) {
    case Code::kOk: return "OK";
    case Code::kBadArgument: return "ERR_BAD_ARGUMENT";
    case Code::kOutOfRange: return "ERR_OUT_OF_RANGE";
    case Code::kUnknownRegion: return "ERR_UNKNOWN_REGION";
    case Code::kUnknownPeer: return "ERR_UNKNOWN_PEER";
    case Code::kClosed: return "ERR_CLOSED";
    case Code::kAborted: return "ERR_ABORTED";
    case Code::kTimeout: return "ERR_TIMEOUT";
    case Code::kPeerLost: return "ERR_PEER_LOST";
    case Code::kRegionFreed: return "ERR_REGION_FREED";
    case Code::kNotShareable: return "ERR_NOT_SHAREABLE";
    case Code::kBackendUnavailable: return "ERR_BACKEND_UNAVAILABLE";
    case Code::kSystem: return "ERR_SYSTEM";
    case Code::kProtocol: return "ERR_PROTOCOL";
    case Code::kAuth: return "ERR_AUTH";
    case Code::kConnect: return "ERR_CONNECT";
    case Code::kProtocolVersion: return "ERR_PROTOCOL_VERSION";
  }
  return "ERR_UNKNOWN";
}

class Status {
 public:
  Status() = default;
  Status(Code code, std::string message, int sys_errno = 0)
      : code_(code), message_(std::move(message)), errno_(sys_errno) {}

  static Status Ok() { return Status(); }
  // An OS failure; keeps the errno so JS can expose its name (ENOENT, EMFILE, ...).
  static Status FromErrno(const std::string& what, int err = errno) {
    return Status(Code::kSystem, what + ": " + std::strerror(err), err);
  }

  bool ok() const { return code_ == Code::kOk; }
  Code code() const { return code_; }
  const std::string& message() const { return message_; }
  int sys_errno() const { return errno_; }

 private:
  Code code_ = Code::kOk;
  std::string message_;
  int errno_ = 0;
};

#define EPD_RETURN_IF_ERROR(expr)      \
  do {                                 \
    ::epd::Status _st = (expr);        \
    if (!_st.ok()) return _st;         \
  } while (0)

}  // namespace epd
