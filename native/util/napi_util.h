// Helpers shared by the binding files: typed errors and argument checks.
#pragma once

#include <napi.h>

#include <string>

#include "status.h"

namespace epd {

// Per-environment state: the TypeScript error class the binding constructs, so that
// `err instanceof TransferError` holds for errors born in C++.
struct AddonState {
  Napi::FunctionReference error_class;
  Napi::FunctionReference engine_class;
  Napi::FunctionReference stream_class;
  Napi::FunctionReference event_class;
};

inline AddonState* State(Napi::Env env) { return env.GetInstanceData<AddonState>(); }

inline Napi::Object MakeError(Napi::Env env, Code code, const std::string& message, int sys_errno = 0) {
  Napi::Object err;
  AddonState* st = State(env);
  if (st != nullptr && !st->error_class.IsEmpty()) {
    err = st->error_class.New({Napi::String::New(env, message), Napi::String::New(env, CodeName(code))});
  } else {
    err = Napi::Error::New(env, message).Value();
    err.Set("code", Napi::String::New(env, CodeName(code)));
  }
  if (sys_errno != 0) err.Set("errno", Napi::Number::New(env, sys_errno));
  return err;
}

inline Napi::Object MakeError(Napi::Env env, const Status& s) {
  return MakeError(env, s.code(), s.message(), s.sys_errno());
}

[[noreturn]] inline void Throw(Napi::Env env, const Status& s) { throw Napi::Error(env, MakeError(env, s)); }
[[noreturn]] inline void Throw(Napi::Env env, Code code, const std::string& message) {
  throw Napi::Error(env, MakeError(env, code, message));
}

inline void Check(Napi::Env env, const Status& s) {
  if (!s.ok()) Throw(env, s);
}

// A non-negative safe integer, or ERR_BAD_ARGUMENT naming the argument.
inline uint64_t ArgIndex(const Napi::CallbackInfo& info, size_t i, const char* name) {
  Napi::Env env = info.Env();
  if (info.Length() > i && info[i].IsNumber()) {
    double d = info[i].As<Napi::Number>().DoubleValue();
    if (d >= 0 && d <= 9007199254740991.0 && static_cast<double>(static_cast<uint64_t>(d)) == d) {
      return static_cast<uint64_t>(d);
    }
  }
  if (info.Length() > i && info[i].IsBigInt()) {
    bool lossless = false;
    uint64_t v = info[i].As<Napi::BigInt>().Uint64Value(&lossless);
    if (lossless) return v;
  }
  Throw(env, Code::kBadArgument, std::string("Expected a non-negative integer for ") + name);
}

inline uint64_t ArgPointer(const Napi::CallbackInfo& info, size_t i, const char* name) {
  if (info.Length() > i && info[i].IsBigInt()) {
    bool lossless = false;
    uint64_t v = info[i].As<Napi::BigInt>().Uint64Value(&lossless);
    if (lossless) return v;
  }
  Throw(info.Env(), Code::kBadArgument, std::string("Expected a bigint device pointer for ") + name);
}

// Bytes of a Buffer, TypedArray, DataView or ArrayBuffer argument.
inline bool BytesOf(Napi::Value v, uint8_t** data, size_t* length) {
  if (v.IsTypedArray()) {
    auto ta = v.As<Napi::TypedArray>();
    auto ab = ta.ArrayBuffer();
    *data = static_cast<uint8_t*>(ab.Data()) + ta.ByteOffset();
    *length = ta.ByteLength();
    return true;
  }
  if (v.IsArrayBuffer()) {
    auto ab = v.As<Napi::ArrayBuffer>();
    *data = static_cast<uint8_t*>(ab.Data());
    *length = ab.ByteLength();
    return true;
  }
  if (v.IsDataView()) {
    auto dv = v.As<Napi::DataView>();
    *data = static_cast<uint8_t*>(dv.ArrayBuffer().Data()) + dv.ByteOffset();
    *length = dv.ByteLength();
    return true;
  }
  return false;
}

}  // namespace epd
