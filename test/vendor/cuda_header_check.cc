// Compile-time check of native/vendor/cuda.h against NVIDIA's own cuda.h, built by
// test/vendor/cuda-header.test.ts where a CUDA toolkit is installed. Each
// function-pointer type we declared must match the real prototype in arity and, for
// every parameter and the result, in ABI: same size, pointer vs integer vs struct,
// the same pointee for pointers to complete types (an opaque handle may be void*).
#include <cuda.h>

#include <type_traits>

#include "vendor/cuda.h"

namespace {

template <class T, class = void>
struct is_complete : std::false_type {};
template <class T>
struct is_complete<T, std::void_t<decltype(sizeof(T))>> : std::true_type {};

template <class T>
constexpr bool opaque = std::is_void_v<T> || !is_complete<T>::value;

template <class A, class B>
struct same_abi {
  static constexpr bool value = !std::is_pointer_v<A> && !std::is_pointer_v<B> && sizeof(A) == sizeof(B) &&
                                (std::is_integral_v<A> || std::is_enum_v<A>) == (std::is_integral_v<B> || std::is_enum_v<B>) &&
                                std::is_class_v<A> == std::is_class_v<B>;
};
template <class A, class B>
struct same_abi<A*, B*> {
  using PA = std::remove_cv_t<A>;
  using PB = std::remove_cv_t<B>;
  // std::disjunction stops before instantiating same_abi on an opaque pointee.
  static constexpr bool value =
      std::is_const_v<A> == std::is_const_v<B> &&
      std::disjunction<std::bool_constant<opaque<PA> || opaque<PB>>, same_abi<PA, PB>>::value;
};
template <>
struct same_abi<void, void> : std::true_type {};

template <class... T>
struct list {};

template <class L1, class L2>
struct same_args;
template <class... A1, class... A2>
struct same_args<list<A1...>, list<A2...>> {
  static constexpr bool check() {
    if constexpr (sizeof...(A1) == sizeof...(A2)) {
      return (same_abi<A1, A2>::value && ...);
    } else {
      return false;
    }
  }
  static constexpr bool value = check();
};

template <class F, class G>
struct same_fn : std::false_type {};
template <class R1, class... A1, class R2, class... A2>
struct same_fn<R1 (*)(A1...), R2 (*)(A2...)> {
  static constexpr bool value = same_abi<R1, R2>::value && same_args<list<A1...>, list<A2...>>::value;
};

using Api = epd::vendor::cuda::Api;

#define CHECK(f) \
  static_assert(same_fn<decltype(Api::f), decltype(&::f)>::value, "native/vendor/cuda.h: " #f " does not match cuda.h")

CHECK(cuInit);
CHECK(cuDriverGetVersion);
CHECK(cuDeviceGetCount);
CHECK(cuDeviceGet);
CHECK(cuDevicePrimaryCtxRetain);
CHECK(cuDevicePrimaryCtxRelease_v2);
CHECK(cuCtxGetCurrent);
CHECK(cuCtxSetCurrent);
CHECK(cuMemAlloc_v2);
CHECK(cuMemFree_v2);
CHECK(cuMemGetAddressRange_v2);
CHECK(cuMemcpyHtoD_v2);
CHECK(cuMemcpyDtoH_v2);
CHECK(cuMemcpyDtoDAsync_v2);
CHECK(cuStreamCreate);
CHECK(cuStreamDestroy_v2);
CHECK(cuStreamWaitEvent);
CHECK(cuEventCreate);
CHECK(cuEventDestroy_v2);
CHECK(cuEventRecord);
CHECK(cuEventQuery);
CHECK(cuGetErrorName);
CHECK(cuGetErrorString);
CHECK(cuIpcGetMemHandle);
CHECK(cuIpcOpenMemHandle_v2);
CHECK(cuIpcCloseMemHandle);

static_assert(sizeof(epd::vendor::cuda::CUipcMemHandle) == sizeof(::CUipcMemHandle), "CUipcMemHandle size");
static_assert(sizeof(epd::vendor::cuda::CUdeviceptr) == sizeof(::CUdeviceptr), "CUdeviceptr size");
static_assert(epd::vendor::cuda::kErrorStubLibrary == ::CUDA_ERROR_STUB_LIBRARY, "CUDA_ERROR_STUB_LIBRARY");
static_assert(epd::vendor::cuda::kErrorNoDevice == ::CUDA_ERROR_NO_DEVICE, "CUDA_ERROR_NO_DEVICE");
static_assert(epd::vendor::cuda::kErrorNotReady == ::CUDA_ERROR_NOT_READY, "CUDA_ERROR_NOT_READY");
static_assert(epd::vendor::cuda::kStreamNonBlocking == ::CU_STREAM_NON_BLOCKING, "CU_STREAM_NON_BLOCKING");
static_assert(epd::vendor::cuda::kEventDisableTiming == ::CU_EVENT_DISABLE_TIMING, "CU_EVENT_DISABLE_TIMING");
static_assert(epd::vendor::cuda::kIpcMemLazyEnablePeerAccess == ::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS,
              "CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS");

}  // namespace
