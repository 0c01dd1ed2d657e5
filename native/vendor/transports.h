// The vendor transports: `mooncake` (Mooncake's transfer engine: RDMA, HCCS, TCP)
// and `hccl` (HCCL point-to-point between NPUs). Both load their library at run time
// (vendor/mooncake.h, vendor/hccl.h); see docs/VENDOR.md.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "device.h"
#include "region.h"
#include "transport.h"

namespace epd {

struct MooncakeOptions {
  std::string metadata = "P2PHANDSHAKE";  // metadata connection string
  std::string hostname;                   // local server name / IP peers reach
  uint64_t rpc_port = 12001;              // ignored in P2PHANDSHAKE mode (a free port is bound)
  // "" = let Mooncake discover the topology and install transports itself
  // (auto_discover); else the protocol to install ("rdma", "tcp", "ascend", ...).
  std::string protocol;
  std::string nic_priority_matrix;  // JSON; installTransport's args[0] for rdma
};

// One Mooncake engine per TransferEngine. Every local region is registered with it
// (so peers can write into it one-sided) and unregistered before its memory goes.
class MooncakeTransport : public Transport {
 public:
  // The segment name peers open ("ip:port" in P2PHANDSHAKE mode).
  virtual const std::string& segment() const = 0;
};

// `device` tells the memory location tags ("cpu:0", "npu:<id>", "cuda:<id>").
Status CreateMooncakeTransport(const MooncakeOptions& options, Device* device, BatchDone done,
                               std::unique_ptr<MooncakeTransport>* out);

// Two-rank HCCL communicators, one per peer, each with its own ACL stream. A batch of
// a peer is HcclSend (write) or HcclRecv (read) of its local pieces, in descriptor
// order; the other side posts the matching half (lib/vendor/hccl.ts arranges it over
// the control plane). Batches of an initiating peer are held until Release, so the
// initiator posts only after the other side has posted its half.
class HcclTransport : public Transport {
 public:
  // HcclGetRootInfo: the blob the other rank needs to join.
  virtual Status RootInfo(std::string* blob) = 0;
  // Blocking (run it off the JS thread): HcclCommInitRootInfo for a two-rank
  // communicator; returns a link id AddPeer's PeerConfig names.
  virtual Status Join(const std::string& root_info, uint32_t rank, uint64_t* link) = 0;
  // Drops a joined link no peer took (a failed connect).
  virtual void Discard(uint64_t link) = 0;
  // Posts a held batch.
  virtual Status Release(uint64_t batch_id) = 0;
};

Status CreateHcclTransport(Device* device, BatchDone done, std::unique_ptr<HcclTransport>* out);

}  // namespace epd
