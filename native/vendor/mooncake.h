// Mooncake's transfer engine C API (libtransfer_engine.so, transfer_engine_c.h),
// declared here from ../shared/docs/vendor-apis.md Part B (Mooncake 0.3.12.post1).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "util/status.h"
#include "vendor/loader.h"

namespace epd {
namespace vendor {
namespace mooncake {

using transfer_engine_t = void*;
using transport_t = void*;
using segment_id_t = int32_t;  // -1 / negative = failure
using batch_id_t = uint64_t;

constexpr batch_id_t kInvalidBatch = UINT64_MAX;
constexpr int kOpcodeRead = 0;
constexpr int kOpcodeWrite = 1;

// transfer_status.status
enum TransferStatus : int {
  kWaiting = 0,
  kPending = 1,
  kInvalid = 2,
  kCanceled = 3,
  kCompleted = 4,
  kTimeout = 5,
  kFailed = 6,
};

struct TransferRequest {
  int opcode;
  void* source;
  segment_id_t target_id;
  uint64_t target_offset;  // the remote absolute address
  uint64_t length;
};
struct TransferStatusRecord {
  int status;
  uint64_t transferred_bytes;
};

struct Api {
  // Required.
  transfer_engine_t (*createTransferEngine)(const char* metadata_conn_string, const char* local_server_name,
                                            const char* ip_or_host_name, uint64_t rpc_port, int auto_discover);
  void (*destroyTransferEngine)(transfer_engine_t engine);
  transport_t (*installTransport)(transfer_engine_t engine, const char* proto, void** args);
  int (*getLocalIpAndPort)(transfer_engine_t engine, char* buf_out, size_t buf_len);
  segment_id_t (*openSegment)(transfer_engine_t engine, const char* segment_name);
  int (*closeSegment)(transfer_engine_t engine, segment_id_t segment_id);
  int (*registerLocalMemory)(transfer_engine_t engine, void* addr, size_t length, const char* location,
                             int remote_accessible);
  int (*unregisterLocalMemory)(transfer_engine_t engine, void* addr);
  batch_id_t (*allocateBatchID)(transfer_engine_t engine, size_t batch_size);
  int (*submitTransfer)(transfer_engine_t engine, batch_id_t batch_id, TransferRequest* entries, size_t count);
  int (*getTransferStatus)(transfer_engine_t engine, batch_id_t batch_id, size_t task_id,
                           TransferStatusRecord* status);
  int (*freeBatchID)(transfer_engine_t engine, batch_id_t batch_id);
};

struct Runtime {
  Api api{};
  Opened lib;
};

// Loads libtransfer_engine.so (EPD_TRANSFER_MOONCAKE_LIB overrides). Loading starts
// nothing: an engine is created only when a TransferEngine opens with mooncake.
const Runtime* Load();

// Mooncake's name for an error code (its error.h), or "".
const char* ErrorName(int rc);
Status Error(int rc, const std::string& what);

}  // namespace mooncake
}  // namespace vendor
}  // namespace epd
