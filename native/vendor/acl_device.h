// What transports that drive ACL themselves (hccl) need from an acl device.
#pragma once

#include "device.h"
#include "vendor/acl.h"

namespace epd {
namespace vendor {
namespace acl {

// The runtime of an acl device, or null when `device` is not one.
const Runtime* RuntimeOf(Device* device);
// Makes the device's context current on the calling thread.
Status BindThread(Device* device);

}  // namespace acl
}  // namespace vendor
}  // namespace epd
