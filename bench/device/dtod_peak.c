/*
 * The reference for the device bandwidth figures: device-to-device copy bandwidth of
 * the bare CUDA driver, cuMemcpyDtoDAsync_v2 in a loop on one stream, timed like
 * bench/device/cuda-bench.mjs times epd-transfer (wall clock from the first enqueue to
 * the stream's completion; here cuStreamSynchronize), measured in the same run. No CUDA
 * toolkit needed: the driver is opened with dlopen and the few prototypes are declared
 * here (vendor-apis.md §4.4).
 *
 *   dtod_peak <device> <bytes per copy> <copies per run> <runs>
 *
 * Prints one JSON line: { "device": ..., "bytes": ..., "copies": ..., "gbps": [per run] }.
 */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef void* CUcontext;
typedef void* CUstream;

static CUresult (*cuInit)(unsigned int);
static CUresult (*cuDeviceGet)(CUdevice*, int);
static CUresult (*cuDevicePrimaryCtxRetain)(CUcontext*, CUdevice);
static CUresult (*cuDevicePrimaryCtxRelease_v2)(CUdevice);
static CUresult (*cuCtxSetCurrent)(CUcontext);
static CUresult (*cuMemAlloc_v2)(CUdeviceptr*, size_t);
static CUresult (*cuMemFree_v2)(CUdeviceptr);
static CUresult (*cuMemsetD8_v2)(CUdeviceptr, unsigned char, size_t);
static CUresult (*cuStreamCreate)(CUstream*, unsigned int);
static CUresult (*cuStreamDestroy_v2)(CUstream);
static CUresult (*cuStreamSynchronize)(CUstream);
static CUresult (*cuMemcpyDtoDAsync_v2)(CUdeviceptr, CUdeviceptr, size_t, CUstream);

#define CHECK(call)                                                  \
  do {                                                               \
    CUresult rc_ = (call);                                           \
    if (rc_ != 0) {                                                  \
      fprintf(stderr, "dtod_peak: %s failed: CUDA error %d\n", #call, rc_); \
      exit(1);                                                       \
    }                                                                \
  } while (0)

static void* sym(void* lib, const char* name) {
  void* p = dlsym(lib, name);
  if (p == NULL) {
    fprintf(stderr, "dtod_peak: libcuda.so.1 lacks %s\n", name);
    exit(1);
  }
  return p;
}

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

int main(int argc, char** argv) {
  if (argc != 5) {
    fprintf(stderr, "usage: dtod_peak <device> <bytes per copy> <copies per run> <runs>\n");
    return 2;
  }
  int ordinal = atoi(argv[1]);
  size_t bytes = strtoull(argv[2], NULL, 10);
  int copies = atoi(argv[3]);
  int runs = atoi(argv[4]);
  const char* path = getenv("EPD_TRANSFER_CUDA_LIB");
  void* lib = dlopen(path != NULL && *path != '\0' ? path : "libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (lib == NULL) {
    fprintf(stderr, "dtod_peak: %s\n", dlerror());
    return 1;
  }
  *(void**)&cuInit = sym(lib, "cuInit");
  *(void**)&cuDeviceGet = sym(lib, "cuDeviceGet");
  *(void**)&cuDevicePrimaryCtxRetain = sym(lib, "cuDevicePrimaryCtxRetain");
  *(void**)&cuDevicePrimaryCtxRelease_v2 = sym(lib, "cuDevicePrimaryCtxRelease_v2");
  *(void**)&cuCtxSetCurrent = sym(lib, "cuCtxSetCurrent");
  *(void**)&cuMemAlloc_v2 = sym(lib, "cuMemAlloc_v2");
  *(void**)&cuMemFree_v2 = sym(lib, "cuMemFree_v2");
  *(void**)&cuMemsetD8_v2 = sym(lib, "cuMemsetD8_v2");
  *(void**)&cuStreamCreate = sym(lib, "cuStreamCreate");
  *(void**)&cuStreamDestroy_v2 = sym(lib, "cuStreamDestroy_v2");
  *(void**)&cuStreamSynchronize = sym(lib, "cuStreamSynchronize");
  *(void**)&cuMemcpyDtoDAsync_v2 = sym(lib, "cuMemcpyDtoDAsync_v2");

  CUdevice dev;
  CUcontext ctx;
  CUstream stream;
  CUdeviceptr a, b;
  CHECK(cuInit(0));
  CHECK(cuDeviceGet(&dev, ordinal));
  CHECK(cuDevicePrimaryCtxRetain(&ctx, dev));
  CHECK(cuCtxSetCurrent(ctx));
  CHECK(cuStreamCreate(&stream, 1 /* CU_STREAM_NON_BLOCKING */));
  CHECK(cuMemAlloc_v2(&a, bytes));
  CHECK(cuMemAlloc_v2(&b, bytes));
  CHECK(cuMemsetD8_v2(a, 1, bytes));
  CHECK(cuMemsetD8_v2(b, 2, bytes));

  /* Warm-up: first-touch and clocks. */
  for (int i = 0; i < copies; ++i) CHECK(cuMemcpyDtoDAsync_v2(b, a, bytes, stream));
  CHECK(cuStreamSynchronize(stream));

  printf("{\"device\":%d,\"bytes\":%zu,\"copies\":%d,\"gbps\":[", ordinal, bytes, copies);
  for (int r = 0; r < runs; ++r) {
    double t0 = now();
    for (int i = 0; i < copies; ++i) CHECK(cuMemcpyDtoDAsync_v2(b, a, bytes, stream));
    CHECK(cuStreamSynchronize(stream));
    double s = now() - t0;
    printf("%s%.3f", r == 0 ? "" : ",", (double)bytes * copies / s / 1e9);
  }
  printf("]}\n");

  CHECK(cuMemFree_v2(a));
  CHECK(cuMemFree_v2(b));
  CHECK(cuStreamDestroy_v2(stream));
  CHECK(cuDevicePrimaryCtxRelease_v2(dev));
  return 0;
}
