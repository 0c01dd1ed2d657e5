// vendorBackends(): what each vendor backend found on this host and, when it cannot
// run, why. Loading a backend here is its "first use": the library is opened and, for
// device runtimes, initialised (aclInit / cuInit, no context).
#include <napi.h>

#include "util/napi_util.h"
#include "vendor/acl.h"
#include "vendor/cuda.h"
#include "vendor/hccl.h"
#include "vendor/mooncake.h"

namespace epd {
namespace {

Napi::Object Describe(Napi::Env env, const vendor::Opened& lib) {
  auto o = Napi::Object::New(env);
  const bool ok = lib.why == vendor::Unavailable::kNone;
  o.Set("available", Napi::Boolean::New(env, ok));
  o.Set("status", Napi::String::New(env, vendor::UnavailableName(lib.why)));
  if (!ok) o.Set("reason", Napi::String::New(env, lib.reason));
  if (!lib.path.empty()) o.Set("library", Napi::String::New(env, lib.path));
  return o;
}

}  // namespace

Napi::Value VendorBackends(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto out = Napi::Object::New(env);

  const vendor::acl::Runtime* acl = vendor::acl::Load();
  auto a = Describe(env, acl->lib);
  if (acl->lib.why == vendor::Unavailable::kNone) {
    a.Set("devices", Napi::Number::New(env, acl->devices));
    if (!acl->version.empty()) a.Set("version", Napi::String::New(env, acl->version));
    a.Set("ipc", Napi::Boolean::New(env, acl->api.has_ipc()));
  }
  out.Set("acl", a);

  const vendor::cuda::Runtime* cuda = vendor::cuda::Load();
  auto c = Describe(env, cuda->lib);
  if (cuda->lib.why == vendor::Unavailable::kNone) {
    c.Set("devices", Napi::Number::New(env, cuda->devices));
    c.Set("driverVersion", Napi::Number::New(env, cuda->driver_version));
    c.Set("ipc", Napi::Boolean::New(env, cuda->api.has_ipc()));
  }
  out.Set("cuda", c);

  const vendor::hccl::Runtime* hccl = vendor::hccl::Load();
  auto h = Describe(env, hccl->lib);
  if (hccl->lib.why == vendor::Unavailable::kNone) {
    h.Set("batchSendRecv", Napi::Boolean::New(env, hccl->api.HcclBatchSendRecv != nullptr));
  }
  out.Set("hccl", h);

  out.Set("mooncake", Describe(env, vendor::mooncake::Load()->lib));
  return out;
}

}  // namespace epd
