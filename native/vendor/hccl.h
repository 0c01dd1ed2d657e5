// HCCL (libhccl.so), declared here from ../shared/docs/vendor-apis.md §2 (hicann/hccl
// hccl.h, hicann/hcomm hccl_types.h / hccl_comm.h). Only point-to-point use: a
// two-rank communicator per peer, HcclSend/HcclRecv (or HcclBatchSendRecv) of bytes
// on an ACL stream.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "util/status.h"
#include "vendor/loader.h"

namespace epd {
namespace vendor {
namespace hccl {

using HcclResult = int;
using HcclComm = void*;
using aclrtStream = void*;

constexpr HcclResult kSuccess = 0;
constexpr uint32_t kRootInfoBytes = 4108;  // HCCL_ROOT_INFO_BYTES
struct RootInfo {
  char internal[kRootInfoBytes];
};

constexpr int kDataTypeUint8 = 7;  // HCCL_DATA_TYPE_UINT8: count = bytes
constexpr int kSend = 0;           // HCCL_SEND
constexpr int kRecv = 1;           // HCCL_RECV

struct SendRecvItem {
  int sendRecvType;  // HcclSendRecvType
  void* buf;
  uint64_t count;
  int dataType;  // HcclDataType
  uint32_t remoteRank;
};

struct Api {
  // Required.
  HcclResult (*HcclGetRootInfo)(RootInfo* rootInfo);
  HcclResult (*HcclCommInitRootInfo)(uint32_t nRanks, const RootInfo* rootInfo, uint32_t rank, HcclComm* comm);
  HcclResult (*HcclCommDestroy)(HcclComm comm);
  HcclResult (*HcclSend)(void* sendBuf, uint64_t count, int dataType, uint32_t destRank, HcclComm comm,
                         aclrtStream stream);
  HcclResult (*HcclRecv)(void* recvBuf, uint64_t count, int dataType, uint32_t srcRank, HcclComm comm,
                         aclrtStream stream);
  // Optional.
  const char* (*HcclGetErrorString)(HcclResult code);
  HcclResult (*HcclBatchSendRecv)(SendRecvItem* items, uint32_t itemNum, HcclComm comm, aclrtStream stream);
  HcclResult (*HcclGetCommAsyncError)(HcclComm comm, HcclResult* asyncError);
};

struct Runtime {
  Api api{};
  Opened lib;
};

// Loads libhccl.so (EPD_TRANSFER_HCCL_LIB overrides). HCCL runs on ACL streams, so it
// is usable only when the acl backend is: rt->lib.why says kNeedsOther otherwise.
const Runtime* Load();

Status Error(const Api& api, HcclResult rc, const std::string& what);

}  // namespace hccl
}  // namespace vendor
}  // namespace epd
