/*
 * A conformance fake of the CUDA driver (libcuda.so.1) over host memory. It exports
 * the versioned symbol names (cuMemAlloc_v2, ...) and not the legacy unsuffixed ones
 * where those are a different ABI, so a loader that binds the wrong name fails here.
 * Rules kept: cuInit before anything; a current context on the calling thread for
 * every memory, stream and event call (CUDA_ERROR_INVALID_CONTEXT otherwise); IPC
 * handles taken from an allocation's base; importers close before the exporter frees.
 * Variants: FAKE_STUB (cuInit returns CUDA_ERROR_STUB_LIBRARY, like the toolkit's
 * stubs/libcuda.so), FAKE_OMIT_REQUIRED (no cuMemcpyDtoDAsync_v2).
 */
#include "fake_common.h"

typedef int CUresult;
typedef unsigned long long CUdeviceptr;

#define CUDA_SUCCESS 0
#define CUDA_ERROR_INVALID_VALUE 1
#define CUDA_ERROR_OUT_OF_MEMORY 2
#define CUDA_ERROR_NOT_INITIALIZED 3
#define CUDA_ERROR_STUB_LIBRARY 34
#define CUDA_ERROR_INVALID_DEVICE 101
#define CUDA_ERROR_INVALID_CONTEXT 201
#define CUDA_ERROR_INVALID_HANDLE 400
#define CUDA_ERROR_NOT_READY 600

#define FAKE_MAX_DEVICES 8
#define FAKE_PAGE 4096u

typedef struct {
  char reserved[64];
} CUipcMemHandle;

struct fake_ctx {
  int device;
  int retains;
};

static struct fake_ctx primary[FAKE_MAX_DEVICES];
static __thread struct fake_ctx* tls_ctx;
static int initialized;
static struct fake_memory memory = {PTHREAD_MUTEX_INITIALIZER, {{0}}};

static CUresult fail(CUresult rc, const char* fn, const char* why) { return fake_fail("cuda", rc, fn, why); }

#define ENTRY(fn)                                                                          \
  do {                                                                                     \
    if (!__atomic_load_n(&initialized, __ATOMIC_SEQ_CST)) return fail(CUDA_ERROR_NOT_INITIALIZED, #fn, "cuInit not called"); \
    FAKE_RETURN_IF_FORCED("cuda", fn);                                                     \
  } while (0)

#define REQUIRE_CTX(fn) \
  if (tls_ctx == NULL || tls_ctx->retains <= 0) return fail(CUDA_ERROR_INVALID_CONTEXT, fn, "no current context on this thread")

static int devices(void) { return (int)fake_control_long("cuda.devices", 1); }

FAKE_EXPORT CUresult cuInit(unsigned flags) {
#ifdef FAKE_STUB
  return CUDA_ERROR_STUB_LIBRARY;
#else
  if (flags != 0) return fail(CUDA_ERROR_INVALID_VALUE, "cuInit", "flags must be 0");
  __atomic_store_n(&initialized, 1, __ATOMIC_SEQ_CST);
  fake_trace("cuda", "cuInit", 0, "");
  return CUDA_SUCCESS;
#endif
}

FAKE_EXPORT CUresult cuDriverGetVersion(int* v) {
  *v = 12040;
  return CUDA_SUCCESS;
}

FAKE_EXPORT CUresult cuDeviceGetCount(int* n) {
  ENTRY(cuDeviceGetCount);
  *n = devices();
  return CUDA_SUCCESS;
}

FAKE_EXPORT CUresult cuDeviceGet(int* dev, int ordinal) {
  ENTRY(cuDeviceGet);
  if (ordinal < 0 || ordinal >= devices() || ordinal >= FAKE_MAX_DEVICES) return fail(CUDA_ERROR_INVALID_DEVICE, "cuDeviceGet", "no such device");
  *dev = ordinal;
  return CUDA_SUCCESS;
}

FAKE_EXPORT CUresult cuDevicePrimaryCtxRetain(void** ctx, int dev) {
  ENTRY(cuDevicePrimaryCtxRetain);
  if (dev < 0 || dev >= FAKE_MAX_DEVICES) return fail(CUDA_ERROR_INVALID_DEVICE, "cuDevicePrimaryCtxRetain", "no such device");
  primary[dev].device = dev;
  __atomic_add_fetch(&primary[dev].retains, 1, __ATOMIC_SEQ_CST);
  *ctx = &primary[dev];
  fake_trace("cuda", "cuDevicePrimaryCtxRetain", 0, "device=%d", dev);
  return CUDA_SUCCESS;
}

FAKE_EXPORT CUresult cuDevicePrimaryCtxRelease_v2(int dev) {
  ENTRY(cuDevicePrimaryCtxRelease_v2);
  if (dev < 0 || dev >= FAKE_MAX_DEVICES) return fail(CUDA_ERROR_INVALID_DEVICE, "cuDevicePrimaryCtxRelease_v2", "no such device");
  __atomic_sub_fetch(&primary[dev].retains, 1, __ATOMIC_SEQ_CST);
  fake_trace("cuda", "cuDevicePrimaryCtxRelease_v2", 0, "device=%d", dev);
  return CUDA_SUCCESS;
}

FAKE_EXPORT CUresult cuCtxGetCurrent(void** ctx) {
  ENTRY(cuCtxGetCurrent);
  *ctx = tls_ctx; /* NULL is a valid answer */
  return CUDA_SUCCESS;
}

FAKE_EXPORT CUresult cuCtxSetCurrent(void* ctx) {
  ENTRY(cuCtxSetCurrent);
  struct fake_ctx* c = (struct fake_ctx*)ctx;
  if (c != NULL && (c < &primary[0] || c >= &primary[FAKE_MAX_DEVICES] || c->retains <= 0)) {
    return fail(CUDA_ERROR_INVALID_CONTEXT, "cuCtxSetCurrent", "not a live context");
  }
  tls_ctx = c;
  fake_trace("cuda", "cuCtxSetCurrent", 0, "device=%d", c != NULL ? c->device : -1);
  return CUDA_SUCCESS;
}

FAKE_EXPORT CUresult cuGetErrorName(CUresult rc, const char** out) {
  switch (rc) {
    case 0: *out = "CUDA_SUCCESS"; return 0;
    case 1: *out = "CUDA_ERROR_INVALID_VALUE"; return 0;
    case 2: *out = "CUDA_ERROR_OUT_OF_MEMORY"; return 0;
    case 201: *out = "CUDA_ERROR_INVALID_CONTEXT"; return 0;
    case 400: *out = "CUDA_ERROR_INVALID_HANDLE"; return 0;
    case 600: *out = "CUDA_ERROR_NOT_READY"; return 0;
    case 700: *out = "CUDA_ERROR_ILLEGAL_ADDRESS"; return 0;
  }
  *out = NULL;
  return CUDA_ERROR_INVALID_VALUE;
}

FAKE_EXPORT CUresult cuGetErrorString(CUresult rc, const char** out) {
  const char* name = NULL;
  if (cuGetErrorName(rc, &name) != 0) {
    *out = NULL;
    return CUDA_ERROR_INVALID_VALUE;
  }
  *out = rc == 2 ? "out of memory (fake)" : "fake driver error";
  return CUDA_SUCCESS;
}

/* ---- memory ------------------------------------------------------------------------- */

FAKE_EXPORT CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t size) {
  ENTRY(cuMemAlloc_v2);
  REQUIRE_CTX("cuMemAlloc_v2");
  if (size == 0) return fail(CUDA_ERROR_INVALID_VALUE, "cuMemAlloc_v2", "size 0");
  char name[64];
  size_t mapped = (size + FAKE_PAGE - 1) / FAKE_PAGE * FAKE_PAGE;
  void* m = fake_shm_create("epdfake-cuda", mapped, name);
  if (m == NULL || !fake_memory_add(&memory, m, size, 0, name)) return fail(CUDA_ERROR_OUT_OF_MEMORY, "cuMemAlloc_v2", "out of fake memory");
  *p = (CUdeviceptr)(uintptr_t)m;
  fake_trace("cuda", "cuMemAlloc_v2", 0, "size=%zu ptr=%p", size, m);
  return CUDA_SUCCESS;
}

FAKE_EXPORT CUresult cuMemFree_v2(CUdeviceptr p) {
  ENTRY(cuMemFree_v2);
  REQUIRE_CTX("cuMemFree_v2");
  struct fake_alloc a;
  if (!fake_memory_find(&memory, (uintptr_t)p, 0, &a) || a.base != (uintptr_t)p || a.imported) {
    return fail(CUDA_ERROR_INVALID_VALUE, "cuMemFree_v2", "not the base of an allocation");
  }
  fake_memory_remove(&memory, a.base, NULL);
  munmap((void*)a.base, (a.size + FAKE_PAGE - 1) / FAKE_PAGE * FAKE_PAGE);
  shm_unlink(a.name);
  fake_trace("cuda", "cuMemFree_v2", 0, "ptr=%p", (void*)(uintptr_t)p);
  return CUDA_SUCCESS;
}

FAKE_EXPORT CUresult cuMemGetAddressRange_v2(CUdeviceptr* base, size_t* size, CUdeviceptr p) {
  ENTRY(cuMemGetAddressRange_v2);
  REQUIRE_CTX("cuMemGetAddressRange_v2");
  struct fake_alloc a;
  if (!fake_memory_find(&memory, (uintptr_t)p, 1, &a)) return CUDA_ERROR_INVALID_VALUE;
  if (base != NULL) *base = a.base;
  if (size != NULL) *size = a.size;
  return CUDA_SUCCESS;
}

static CUresult check(const char* fn, uintptr_t dst, int dst_dev, uintptr_t src, int src_dev, size_t n) {
  if (fake_memory_find(&memory, dst, n, NULL) != dst_dev || fake_memory_find(&memory, src, n, NULL) != src_dev) {
    return fail(CUDA_ERROR_INVALID_VALUE, fn, "dst/src are not where this copy says (or leave their allocation)");
  }
  return CUDA_SUCCESS;
}

FAKE_EXPORT CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
  ENTRY(cuMemcpyHtoD_v2);
  REQUIRE_CTX("cuMemcpyHtoD_v2");
  CUresult rc = check("cuMemcpyHtoD_v2", (uintptr_t)dst, 1, (uintptr_t)src, 0, n);
  if (rc == CUDA_SUCCESS) memmove((void*)(uintptr_t)dst, src, n);
  return rc;
}

FAKE_EXPORT CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) {
  ENTRY(cuMemcpyDtoH_v2);
  REQUIRE_CTX("cuMemcpyDtoH_v2");
  CUresult rc = check("cuMemcpyDtoH_v2", (uintptr_t)dst, 0, (uintptr_t)src, 1, n);
  if (rc == CUDA_SUCCESS) memmove(dst, (const void*)(uintptr_t)src, n);
  return rc;
}

#ifndef FAKE_OMIT_REQUIRED
FAKE_EXPORT CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, void* stream) {
  ENTRY(cuMemcpyDtoDAsync_v2);
  REQUIRE_CTX("cuMemcpyDtoDAsync_v2");
  CUresult rc = check("cuMemcpyDtoDAsync_v2", (uintptr_t)dst, 1, (uintptr_t)src, 1, n);
  if (rc != CUDA_SUCCESS) return rc;
  if (stream == NULL) return fail(CUDA_ERROR_INVALID_HANDLE, "cuMemcpyDtoDAsync_v2", "epd-transfer must not use the legacy default stream");
  struct fake_task* t = fake_task_new(1);
  t->dst = (void*)(uintptr_t)dst;
  t->src = (const void*)(uintptr_t)src;
  t->bytes = n;
  fake_stream_push((struct fake_stream*)stream, t);
  return CUDA_SUCCESS;
}
#endif

/* For bench/device/dtod_peak, which the fake also runs (a smoke test of the GPU check). */
FAKE_EXPORT CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char value, size_t n) {
  ENTRY(cuMemsetD8_v2);
  REQUIRE_CTX("cuMemsetD8_v2");
  if (!fake_memory_find(&memory, (uintptr_t)dst, n, NULL)) return fail(CUDA_ERROR_INVALID_VALUE, "cuMemsetD8_v2", "not device memory");
  memset((void*)(uintptr_t)dst, value, n);
  return CUDA_SUCCESS;
}

/* ---- streams and events ------------------------------------------------------------------ */

FAKE_EXPORT CUresult cuStreamCreate(void** stream, unsigned flags) {
  ENTRY(cuStreamCreate);
  REQUIRE_CTX("cuStreamCreate");
  struct fake_stream* s = fake_stream_new("cuda");
  if (s == NULL) return fail(CUDA_ERROR_OUT_OF_MEMORY, "cuStreamCreate", "thread creation failed");
  *stream = s;
  fake_trace("cuda", "cuStreamCreate", 0, "flags=%u", flags);
  return CUDA_SUCCESS;
}

FAKE_EXPORT CUresult cuStreamDestroy_v2(void* stream) {
  ENTRY(cuStreamDestroy_v2);
  REQUIRE_CTX("cuStreamDestroy_v2");
  /* CUDA releases a busy stream once it is idle; a hung fake stream is abandoned. */
  fake_stream_destroy((struct fake_stream*)stream, 1);
  return CUDA_SUCCESS;
}

FAKE_EXPORT CUresult cuStreamSynchronize(void* stream) {
  ENTRY(cuStreamSynchronize);
  REQUIRE_CTX("cuStreamSynchronize");
  fake_stream_sync((struct fake_stream*)stream, -1);
  return CUDA_SUCCESS;
}

FAKE_EXPORT CUresult cuEventCreate(void** event, unsigned flags) {
  ENTRY(cuEventCreate);
  REQUIRE_CTX("cuEventCreate");
  *event = fake_event_new(flags);
  return CUDA_SUCCESS;
}

FAKE_EXPORT CUresult cuEventDestroy_v2(void* event) {
  ENTRY(cuEventDestroy_v2);
  REQUIRE_CTX("cuEventDestroy_v2");
  (void)event; /* kept: a queued record may still point at it */
  return CUDA_SUCCESS;
}

FAKE_EXPORT CUresult cuEventRecord(void* event, void* stream) {
  ENTRY(cuEventRecord);
  REQUIRE_CTX("cuEventRecord");
  if (event == NULL || stream == NULL) return fail(CUDA_ERROR_INVALID_HANDLE, "cuEventRecord", "null handle");
  fake_event_record((struct fake_event*)event, (struct fake_stream*)stream);
  return CUDA_SUCCESS;
}

FAKE_EXPORT CUresult cuEventQuery(void* event) {
  ENTRY(cuEventQuery);
  REQUIRE_CTX("cuEventQuery");
  return fake_event_done((struct fake_event*)event) ? CUDA_SUCCESS : CUDA_ERROR_NOT_READY;
}

FAKE_EXPORT CUresult cuStreamWaitEvent(void* stream, void* event, unsigned flags) {
  ENTRY(cuStreamWaitEvent);
  REQUIRE_CTX("cuStreamWaitEvent");
  if (flags != 0) return fail(CUDA_ERROR_INVALID_VALUE, "cuStreamWaitEvent", "flags must be 0");
  fake_stream_wait_event((struct fake_stream*)stream, (struct fake_event*)event);
  return CUDA_SUCCESS;
}

/* ---- IPC ------------------------------------------------------------------------------------ */

FAKE_EXPORT CUresult cuIpcGetMemHandle(CUipcMemHandle* h, CUdeviceptr p) {
  ENTRY(cuIpcGetMemHandle);
  REQUIRE_CTX("cuIpcGetMemHandle");
  struct fake_alloc a;
  if (!fake_memory_find(&memory, (uintptr_t)p, 0, &a) || a.imported || a.base != (uintptr_t)p) {
    return fail(CUDA_ERROR_INVALID_VALUE, "cuIpcGetMemHandle", "not the base of an allocation of this process");
  }
  memset(h, 0, sizeof *h);
  snprintf(h->reserved, sizeof h->reserved, "%s:%zu", a.name, a.size);
  fake_trace("cuda", "cuIpcGetMemHandle", 0, "name=%s", a.name);
  return CUDA_SUCCESS;
}

FAKE_EXPORT CUresult cuIpcOpenMemHandle_v2(CUdeviceptr* p, CUipcMemHandle h, unsigned flags) {
  ENTRY(cuIpcOpenMemHandle_v2);
  REQUIRE_CTX("cuIpcOpenMemHandle_v2");
  char name[64];
  size_t size = 0;
  memcpy(name, h.reserved, sizeof name);
  name[63] = '\0';
  char* colon = strrchr(name, ':');
  if (colon == NULL) return fail(CUDA_ERROR_INVALID_HANDLE, "cuIpcOpenMemHandle_v2", "malformed handle");
  *colon = '\0';
  size = (size_t)strtoull(colon + 1, NULL, 10);
  void* m = fake_shm_attach(name, size);
  if (m == NULL) return fail(CUDA_ERROR_INVALID_HANDLE, "cuIpcOpenMemHandle_v2", "the exporter's memory is gone");
  fake_memory_add(&memory, m, size, 1, name);
  *p = (CUdeviceptr)(uintptr_t)m;
  fake_trace("cuda", "cuIpcOpenMemHandle_v2", 0, "name=%s flags=%u", name, flags);
  return CUDA_SUCCESS;
}

FAKE_EXPORT CUresult cuIpcCloseMemHandle(CUdeviceptr p) {
  ENTRY(cuIpcCloseMemHandle);
  REQUIRE_CTX("cuIpcCloseMemHandle");
  struct fake_alloc a;
  if (!fake_memory_find(&memory, (uintptr_t)p, 0, &a) || !a.imported || a.base != (uintptr_t)p) {
    return fail(CUDA_ERROR_INVALID_VALUE, "cuIpcCloseMemHandle", "not an imported base address");
  }
  fake_memory_remove(&memory, a.base, NULL);
  munmap((void*)a.base, a.size);
  fake_trace("cuda", "cuIpcCloseMemHandle", 0, "name=%s", a.name);
  return CUDA_SUCCESS;
}

/* Legacy unsuffixed exports with a 32-bit CUdeviceptr ABI: a loader that binds these by
 * mistake gets an error it cannot miss. */
FAKE_EXPORT CUresult cuMemAlloc(unsigned int* p, unsigned int size) {
  (void)p;
  (void)size;
  return fail(CUDA_ERROR_INVALID_VALUE, "cuMemAlloc", "legacy ABI called: bind cuMemAlloc_v2");
}
