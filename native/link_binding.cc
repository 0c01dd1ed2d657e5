#include "link_binding.h"

#include <cmath>

#include "link.h"
#include "util/napi_util.h"

namespace epd {
namespace {

double NumberField(Napi::Env env, Napi::Object o, const char* key, double fallback, double max) {
  Napi::Value v = o.Get(key);
  if (v.IsUndefined()) return fallback;
  double d = v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : -1;
  if (!(d >= 0 && d <= max) || !std::isfinite(d)) {
    Throw(env, Code::kBadArgument, std::string("Expected a non-negative number for link.") + key);
  }
  return d;
}

}  // namespace

LinkSpec ParseLinkSpec(Napi::Env env, Napi::Value value) {
  LinkSpec spec;
  if (value.IsUndefined() || value.IsNull()) return spec;
  if (!value.IsObject()) Throw(env, Code::kBadArgument, "Expected an object for link");
  auto o = value.As<Napi::Object>();
  constexpr double kSafe = 9007199254740991.0;
  spec.bandwidth = NumberField(env, o, "bandwidth", 0, 1e15);
  spec.latency = NumberField(env, o, "latencyUs", 0, 1e9) / 1e6;
  spec.jitter = NumberField(env, o, "jitterUs", 0, 1e9) / 1e6;
  spec.seed = static_cast<uint64_t>(NumberField(env, o, "seed", 1, kSafe));
  if (!o.Get("dropAfterBytes").IsUndefined()) {
    spec.drop_after = static_cast<uint64_t>(NumberField(env, o, "dropAfterBytes", 0, kSafe));
  }
  if (!o.Get("delayIndex").IsUndefined()) {
    spec.delay_index = static_cast<uint64_t>(NumberField(env, o, "delayIndex", 0, kSafe));
    spec.delay = NumberField(env, o, "delayMs", 0, 1e9) / 1e3;
  }
  return spec;
}

Napi::Value LinkSchedule(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  LinkSpec spec = ParseLinkSpec(env, info.Length() > 0 ? info[0] : env.Undefined());
  if (info.Length() < 2 || !info[1].IsArray()) Throw(env, Code::kBadArgument, "Expected an array of message sizes");
  auto sizes = info[1].As<Napi::Array>();
  LinkModel model(spec);
  auto out = Napi::Float64Array::New(env, sizes.Length());
  for (uint32_t i = 0; i < sizes.Length(); ++i) {
    Napi::Value v = sizes.Get(i);
    double d = v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : -1;
    if (!(d >= 0 && d <= 9007199254740991.0)) Throw(env, Code::kBadArgument, "Expected byte counts in sizes");
    out[i] = static_cast<double>(model.Send(0, static_cast<uint64_t>(d))) / 1e3;
  }
  return out;
}

}  // namespace epd
