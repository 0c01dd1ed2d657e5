/*
 * A conformance fake of the Ascend ACL runtime (libascendcl.so) over host memory.
 * It keeps the rules of the real runtime that epd-transfer must follow, and fails
 * loudly when they are broken:
 *   - every runtime call needs a context bound to the calling thread
 *     (ACL_ERROR_RT_CONTEXT_NULL otherwise): aclrtSetDevice / aclrtSetCurrentContext;
 *   - aclrtMemcpy* checks the copy kind against where dst and src really are, and
 *     destMax >= count;
 *   - an event created with flags but without ACL_EVENT_SYNC cannot be waited on;
 *   - IPC: 65-byte key length, page-aligned export ranges, import only for
 *     whitelisted pids (the bare tgid), and aclrtFree of memory whose export key is
 *     still open fails.
 * Variants (compile-time): FAKE_STUB (every call returns 100039, like CANN's stub
 * library), FAKE_OMIT_REQUIRED (no aclrtMemcpyAsync), FAKE_MINIMAL (none of the
 * optional symbols the loader can do without).
 */
#include "fake_common.h"

typedef int aclError;

#define ACL_SUCCESS 0
#define ACL_ERROR_INVALID_PARAM 100000
#define ACL_ERROR_REPEAT_INITIALIZE 100002
#define ACL_ERROR_COMPILING_STUB_MODE 100039
#define ACL_ERROR_RT_INVALID_DEVICEID 107001
#define ACL_ERROR_RT_CONTEXT_NULL 107002
#define ACL_ERROR_RT_MEMORY_ALLOCATION 207001
#define ACL_ERROR_RT_NO_PERMISSION 207006
#define ACL_ERROR_RT_INTERNAL_ERROR 507000
#define ACL_ERROR_RT_STREAM_SYNC_TIMEOUT 507046
#define ACL_ERROR_RT_EVENT_SYNC_TIMEOUT 507047

#define ACL_EVENT_SYNC 0x1u
#define FAKE_MAX_DEVICES 8
#define FAKE_PAGE 4096u

#ifdef FAKE_STUB
#define ENTRY(fn) \
  do {            \
    (void)#fn;    \
    return ACL_ERROR_COMPILING_STUB_MODE; \
  } while (0)
#else
#define ENTRY(fn) FAKE_RETURN_IF_FORCED("acl", fn)
#endif

struct fake_ctx {
  int device;
  int refs;
  int is_default;
};

static struct fake_ctx default_ctx[FAKE_MAX_DEVICES];
static __thread struct fake_ctx* tls_ctx;
static __thread char recent_msg[256];
static int initialized;
static struct fake_memory memory = {PTHREAD_MUTEX_INITIALIZER, {{0}}};

static aclError fail(aclError rc, const char* fn, const char* why) {
  snprintf(recent_msg, sizeof recent_msg, "EZ9999: fake %s: %s", fn, why);
  return fake_fail("acl", rc, fn, why);
}

#define REQUIRE_CTX(fn)                                 \
  if (tls_ctx == NULL || tls_ctx->refs <= 0)            \
  return fail(ACL_ERROR_RT_CONTEXT_NULL, fn, "no live context is bound to the calling thread")

static int devices(void) { return (int)fake_control_long("acl.devices", 1); }

/* ---- init, devices, contexts -------------------------------------------------- */

FAKE_EXPORT aclError aclInit(const char* config) {
  ENTRY(aclInit);
  if (__atomic_exchange_n(&initialized, 1, __ATOMIC_SEQ_CST)) {
    fake_trace("acl", "aclInit", ACL_ERROR_REPEAT_INITIALIZE, "");
    return ACL_ERROR_REPEAT_INITIALIZE;
  }
  fake_trace("acl", "aclInit", 0, "");
  return ACL_SUCCESS;
}

FAKE_EXPORT aclError aclrtGetDeviceCount(uint32_t* count) {
  ENTRY(aclrtGetDeviceCount);
  *count = (uint32_t)devices();
  return ACL_SUCCESS;
}

FAKE_EXPORT aclError aclrtSetDevice(int32_t id) {
  ENTRY(aclrtSetDevice);
  if (id < 0 || id >= devices() || id >= FAKE_MAX_DEVICES) return fail(ACL_ERROR_RT_INVALID_DEVICEID, "aclrtSetDevice", "no such device");
  __atomic_add_fetch(&default_ctx[id].refs, 1, __ATOMIC_SEQ_CST);
  default_ctx[id].device = id;
  default_ctx[id].is_default = 1;
  tls_ctx = &default_ctx[id];
  fake_trace("acl", "aclrtSetDevice", 0, "device=%d", id);
  return ACL_SUCCESS;
}

FAKE_EXPORT aclError aclrtResetDevice(int32_t id) {
  ENTRY(aclrtResetDevice);
  if (id < 0 || id >= FAKE_MAX_DEVICES) return fail(ACL_ERROR_RT_INVALID_DEVICEID, "aclrtResetDevice", "no such device");
  __atomic_sub_fetch(&default_ctx[id].refs, 1, __ATOMIC_SEQ_CST);
  if (tls_ctx == &default_ctx[id]) tls_ctx = NULL;
  fake_trace("acl", "aclrtResetDevice", 0, "device=%d", id);
  return ACL_SUCCESS;
}

FAKE_EXPORT aclError aclrtGetCurrentContext(void** ctx) {
  ENTRY(aclrtGetCurrentContext);
  if (tls_ctx == NULL) return ACL_ERROR_RT_CONTEXT_NULL; /* quietly: callers probe with it */
  *ctx = tls_ctx;
  return ACL_SUCCESS;
}

FAKE_EXPORT aclError aclrtSetCurrentContext(void* ctx) {
  ENTRY(aclrtSetCurrentContext);
  struct fake_ctx* c = (struct fake_ctx*)ctx;
  if (c < &default_ctx[0] || c >= &default_ctx[FAKE_MAX_DEVICES] || c->refs <= 0) {
    return fail(ACL_ERROR_INVALID_PARAM, "aclrtSetCurrentContext", "not a live context");
  }
  tls_ctx = c;
  fake_trace("acl", "aclrtSetCurrentContext", 0, "device=%d", c->device);
  return ACL_SUCCESS;
}

FAKE_EXPORT const char* aclGetRecentErrMsg(void) {
#ifdef FAKE_STUB
  return NULL;
#else
  return recent_msg[0] != '\0' ? recent_msg : NULL;
#endif
}

FAKE_EXPORT aclError aclsysGetVersionStr(char* pkg, char* version) {
  ENTRY(aclsysGetVersionStr);
  snprintf(version, 128, "fake-9.1.0");
  return ACL_SUCCESS;
}

/* ---- memory ---------------------------------------------------------------------- */

/* Export state of one allocation, in shared memory next to it ("<name>-ipc"), so the
 * importer's process sees the exporter's whitelist and the importer count. */
struct ipc_record {
  uint64_t size;
  int32_t exporter;
  int32_t npids;
  int32_t pids[32];
  int32_t imports;
  int32_t closed;
};

static aclError check_kind(const char* fn, void* dst, size_t dmax, const void* src, size_t count, int kind) {
  if (dmax < count) return fail(ACL_ERROR_INVALID_PARAM, fn, "destMax < count");
  int dst_dev = fake_memory_find(&memory, (uintptr_t)dst, count, NULL);
  int src_dev = fake_memory_find(&memory, (uintptr_t)src, count, NULL);
  int want_dst, want_src;
  switch (kind) {
    case 0: want_dst = 0; want_src = 0; break; /* HOST_TO_HOST */
    case 1: want_dst = 1; want_src = 0; break; /* HOST_TO_DEVICE */
    case 2: want_dst = 0; want_src = 1; break; /* DEVICE_TO_HOST */
    case 3: want_dst = 1; want_src = 1; break; /* DEVICE_TO_DEVICE */
    default: return fail(ACL_ERROR_INVALID_PARAM, fn, "unsupported aclrtMemcpyKind");
  }
  if (dst_dev != want_dst || src_dev != want_src) {
    return fail(ACL_ERROR_INVALID_PARAM, fn, "the copy kind does not match where dst/src are (or the range leaves its allocation)");
  }
  return ACL_SUCCESS;
}

FAKE_EXPORT aclError aclrtMalloc(void** p, size_t size, int policy) {
  ENTRY(aclrtMalloc);
  REQUIRE_CTX("aclrtMalloc");
  if (size == 0) return fail(ACL_ERROR_INVALID_PARAM, "aclrtMalloc", "size 0");
  char name[64];
  size_t mapped = (size + FAKE_PAGE - 1) / FAKE_PAGE * FAKE_PAGE;
  void* m = fake_shm_create("epdfake-acl", mapped, name);
  if (m == NULL || !fake_memory_add(&memory, m, size, 0, name)) {
    return fail(ACL_ERROR_RT_MEMORY_ALLOCATION, "aclrtMalloc", "out of fake device memory");
  }
  *p = m;
  fake_trace("acl", "aclrtMalloc", 0, "size=%zu policy=%d ptr=%p", size, policy, m);
  return ACL_SUCCESS;
}

FAKE_EXPORT aclError aclrtFree(void* p) {
  ENTRY(aclrtFree);
  REQUIRE_CTX("aclrtFree");
  struct fake_alloc a;
  if (!fake_memory_find(&memory, (uintptr_t)p, 0, &a) || a.base != (uintptr_t)p || a.imported) {
    return fail(ACL_ERROR_INVALID_PARAM, "aclrtFree", "not the base of an allocation");
  }
  char ipc_name[80];
  snprintf(ipc_name, sizeof ipc_name, "%s-ipc", a.name);
  struct ipc_record* rec = (struct ipc_record*)fake_shm_attach(ipc_name, sizeof *rec);
  if (rec != NULL) {
    int open_key = !rec->closed;
    munmap(rec, sizeof *rec);
    if (open_key) return fail(ACL_ERROR_RT_INTERNAL_ERROR, "aclrtFree", "memory is freed while its IPC export key is open");
  }
  fake_memory_remove(&memory, a.base, NULL);
  munmap(p, (a.size + FAKE_PAGE - 1) / FAKE_PAGE * FAKE_PAGE);
  shm_unlink(a.name);
  fake_trace("acl", "aclrtFree", 0, "ptr=%p", p);
  return ACL_SUCCESS;
}

FAKE_EXPORT aclError aclrtMemcpy(void* dst, size_t dmax, const void* src, size_t count, int kind) {
  ENTRY(aclrtMemcpy);
  REQUIRE_CTX("aclrtMemcpy");
  aclError rc = check_kind("aclrtMemcpy", dst, dmax, src, count, kind);
  if (rc != ACL_SUCCESS) return rc;
  memmove(dst, src, count);
  return ACL_SUCCESS;
}

#ifndef FAKE_MINIMAL
struct attrs {
  uint32_t id;
  int type;
  uint32_t page_size;
  uint32_t rsv[4];
};

FAKE_EXPORT aclError aclrtPointerGetAttributes(const void* p, struct attrs* out) {
  ENTRY(aclrtPointerGetAttributes);
  REQUIRE_CTX("aclrtPointerGetAttributes");
  memset(out, 0, sizeof *out);
  out->type = fake_memory_find(&memory, (uintptr_t)p, 1, NULL) ? 1 : 0;
  out->id = (uint32_t)tls_ctx->device;
  out->page_size = FAKE_PAGE;
  return ACL_SUCCESS;
}
#endif

/* ---- streams ----------------------------------------------------------------------- */

FAKE_EXPORT aclError aclrtCreateStream(void** stream) {
  ENTRY(aclrtCreateStream);
  REQUIRE_CTX("aclrtCreateStream");
  struct fake_stream* s = fake_stream_new("acl");
  if (s == NULL) return fail(ACL_ERROR_RT_INTERNAL_ERROR, "aclrtCreateStream", "thread creation failed");
  *stream = s;
  fake_trace("acl", "aclrtCreateStream", 0, "stream=%p", (void*)s);
  return ACL_SUCCESS;
}

FAKE_EXPORT aclError aclrtDestroyStream(void* stream) {
  ENTRY(aclrtDestroyStream);
  REQUIRE_CTX("aclrtDestroyStream");
  int pending = fake_stream_pending((struct fake_stream*)stream);
  fake_trace("acl", "aclrtDestroyStream", 0, "stream=%p pending=%d", stream, pending);
  fake_stream_destroy((struct fake_stream*)stream, 0);
  return ACL_SUCCESS;
}

#ifndef FAKE_MINIMAL
FAKE_EXPORT aclError aclrtDestroyStreamForce(void* stream) {
  ENTRY(aclrtDestroyStreamForce);
  REQUIRE_CTX("aclrtDestroyStreamForce");
  fake_trace("acl", "aclrtDestroyStreamForce", 0, "stream=%p", stream);
  fake_stream_destroy((struct fake_stream*)stream, 1);
  return ACL_SUCCESS;
}

FAKE_EXPORT aclError aclrtSynchronizeStreamWithTimeout(void* stream, int32_t timeout) {
  ENTRY(aclrtSynchronizeStreamWithTimeout);
  REQUIRE_CTX("aclrtSynchronizeStreamWithTimeout");
  if (fake_stream_sync((struct fake_stream*)stream, timeout) != 0) {
    return fail(ACL_ERROR_RT_STREAM_SYNC_TIMEOUT, "aclrtSynchronizeStreamWithTimeout", "timed out");
  }
  return ACL_SUCCESS;
}
#endif

#ifndef FAKE_OMIT_REQUIRED
FAKE_EXPORT aclError aclrtMemcpyAsync(void* dst, size_t dmax, const void* src, size_t count, int kind, void* stream) {
  ENTRY(aclrtMemcpyAsync);
  REQUIRE_CTX("aclrtMemcpyAsync");
  aclError rc = check_kind("aclrtMemcpyAsync", dst, dmax, src, count, kind);
  if (rc != ACL_SUCCESS) return rc;
  if (stream == NULL) return fail(ACL_ERROR_INVALID_PARAM, "aclrtMemcpyAsync", "null stream");
  struct fake_task* t = fake_task_new(1);
  t->dst = dst;
  t->src = src;
  t->bytes = count;
  fake_stream_push((struct fake_stream*)stream, t);
  return ACL_SUCCESS;
}
#endif

/* ---- events --------------------------------------------------------------------------- */

FAKE_EXPORT aclError aclrtCreateEvent(void** event) {
  ENTRY(aclrtCreateEvent);
  REQUIRE_CTX("aclrtCreateEvent");
  *event = fake_event_new(ACL_EVENT_SYNC); /* the plain create supports cross-stream waits */
  return ACL_SUCCESS;
}

#ifndef FAKE_MINIMAL
FAKE_EXPORT aclError aclrtCreateEventWithFlag(void** event, uint32_t flag) {
  ENTRY(aclrtCreateEventWithFlag);
  REQUIRE_CTX("aclrtCreateEventWithFlag");
  *event = fake_event_new(flag);
  fake_trace("acl", "aclrtCreateEventWithFlag", 0, "flag=%u", flag);
  return ACL_SUCCESS;
}
#endif

FAKE_EXPORT aclError aclrtDestroyEvent(void* event) {
  ENTRY(aclrtDestroyEvent);
  REQUIRE_CTX("aclrtDestroyEvent");
  /* Freed memory would turn a late record task into a use-after-free: keep it. */
  (void)event;
  return ACL_SUCCESS;
}

FAKE_EXPORT aclError aclrtRecordEvent(void* event, void* stream) {
  ENTRY(aclrtRecordEvent);
  REQUIRE_CTX("aclrtRecordEvent");
  if (event == NULL || stream == NULL) return fail(ACL_ERROR_INVALID_PARAM, "aclrtRecordEvent", "null handle");
  fake_event_record((struct fake_event*)event, (struct fake_stream*)stream);
  return ACL_SUCCESS;
}

FAKE_EXPORT aclError aclrtStreamWaitEvent(void* stream, void* event) {
  ENTRY(aclrtStreamWaitEvent);
  REQUIRE_CTX("aclrtStreamWaitEvent");
  struct fake_event* e = (struct fake_event*)event;
  if (!(e->flags & ACL_EVENT_SYNC)) {
    return fail(ACL_ERROR_INVALID_PARAM, "aclrtStreamWaitEvent", "event was created without ACL_EVENT_SYNC");
  }
  fake_stream_wait_event((struct fake_stream*)stream, e);
  return ACL_SUCCESS;
}

#ifndef FAKE_MINIMAL
FAKE_EXPORT aclError aclrtQueryEventStatus(void* event, int* status) {
  ENTRY(aclrtQueryEventStatus);
  REQUIRE_CTX("aclrtQueryEventStatus");
  *status = fake_event_done((struct fake_event*)event) ? 1 /* COMPLETE */ : 0 /* NOT_READY */;
  return ACL_SUCCESS;
}

FAKE_EXPORT aclError aclrtSynchronizeEventWithTimeout(void* event, int32_t timeout) {
  ENTRY(aclrtSynchronizeEventWithTimeout);
  REQUIRE_CTX("aclrtSynchronizeEventWithTimeout");
  if (fake_event_wait((struct fake_event*)event, timeout) != 0) {
    return fail(ACL_ERROR_RT_EVENT_SYNC_TIMEOUT, "aclrtSynchronizeEventWithTimeout", "timed out");
  }
  return ACL_SUCCESS;
}
#endif

/* Deprecated, with the opposite enum order: COMPLETE = 0, NOT_READY = 1. */
FAKE_EXPORT aclError aclrtQueryEvent(void* event, int* status) {
  ENTRY(aclrtQueryEvent);
  REQUIRE_CTX("aclrtQueryEvent");
  *status = fake_event_done((struct fake_event*)event) ? 0 : 1;
  return ACL_SUCCESS;
}

/* For the HCCL fake: runs fn(arg) in order on an ACL stream. Not an ACL symbol. */
FAKE_EXPORT int epd_fake_acl_enqueue(void* stream, void (*fn)(void*), void* arg) {
  if (stream == NULL) return -1;
  struct fake_task* t = fake_task_new(0);
  t->fn = fn;
  t->arg = arg;
  fake_stream_push((struct fake_stream*)stream, t);
  return 0;
}

/* For the HCCL fake: nonzero when [p, p + n) is fake device memory. */
FAKE_EXPORT int epd_fake_acl_is_device(const void* p, size_t n) {
  return fake_memory_find(&memory, (uintptr_t)p, n, NULL);
}

/* ---- IPC -------------------------------------------------------------------------------- */

#ifndef FAKE_MINIMAL
FAKE_EXPORT aclError aclrtDeviceGetBareTgid(int32_t* pid) {
  ENTRY(aclrtDeviceGetBareTgid);
  REQUIRE_CTX("aclrtDeviceGetBareTgid");
  *pid = (int32_t)(getpid() + fake_control_long("acl.tgid_offset", 0));
  return ACL_SUCCESS;
}

static struct ipc_record* ipc_open(const char* key, int create) {
  char name[80];
  snprintf(name, sizeof name, "/%s-ipc", key);
  if (create) {
    int fd = shm_open(name, O_RDWR | O_CREAT, 0600);
    if (fd < 0) return NULL;
    if (ftruncate(fd, sizeof(struct ipc_record)) != 0) {
      close(fd);
      return NULL;
    }
    close(fd);
  }
  return (struct ipc_record*)fake_shm_attach(name, sizeof(struct ipc_record));
}

FAKE_EXPORT aclError aclrtIpcMemGetExportKey(void* p, size_t size, char* key, size_t len, uint64_t flags) {
  ENTRY(aclrtIpcMemGetExportKey);
  REQUIRE_CTX("aclrtIpcMemGetExportKey");
  if (len != 65) return fail(ACL_ERROR_INVALID_PARAM, "aclrtIpcMemGetExportKey", "len must be 65");
  struct fake_alloc a;
  if (!fake_memory_find(&memory, (uintptr_t)p, size, &a) || a.imported) {
    return fail(ACL_ERROR_INVALID_PARAM, "aclrtIpcMemGetExportKey", "not device memory of this process");
  }
  if (((uintptr_t)p % FAKE_PAGE) != 0 || (size % FAKE_PAGE) != 0) {
    return fail(ACL_ERROR_INVALID_PARAM, "aclrtIpcMemGetExportKey", "range is not page-table aligned");
  }
  if ((uintptr_t)p != a.base) return fail(ACL_ERROR_INVALID_PARAM, "aclrtIpcMemGetExportKey", "not an allocation base");
  const char* k = a.name + 1; /* without the leading '/' */
  struct ipc_record* rec = ipc_open(k, 1);
  if (rec == NULL) return fail(ACL_ERROR_RT_INTERNAL_ERROR, "aclrtIpcMemGetExportKey", "registry");
  rec->size = size;
  rec->exporter = getpid();
  rec->closed = 0;
  munmap(rec, sizeof *rec);
  snprintf(key, len, "%s", k);
  fake_trace("acl", "aclrtIpcMemGetExportKey", 0, "key=%s flags=%llu", k, (unsigned long long)flags);
  return ACL_SUCCESS;
}

FAKE_EXPORT aclError aclrtIpcMemSetImportPid(const char* key, int32_t* pids, size_t num) {
  ENTRY(aclrtIpcMemSetImportPid);
  REQUIRE_CTX("aclrtIpcMemSetImportPid");
  struct ipc_record* rec = ipc_open(key, 0);
  if (rec == NULL) return fail(ACL_ERROR_INVALID_PARAM, "aclrtIpcMemSetImportPid", "unknown key");
  for (size_t i = 0; i < num && rec->npids < 32; ++i) rec->pids[rec->npids++] = pids[i];
  munmap(rec, sizeof *rec);
  fake_trace("acl", "aclrtIpcMemSetImportPid", 0, "key=%s pid=%d", key, num > 0 ? pids[0] : -1);
  return ACL_SUCCESS;
}

FAKE_EXPORT aclError aclrtIpcMemImportByKey(void** p, const char* key, uint64_t flags) {
  ENTRY(aclrtIpcMemImportByKey);
  REQUIRE_CTX("aclrtIpcMemImportByKey");
  struct ipc_record* rec = ipc_open(key, 0);
  if (rec == NULL || rec->closed) return fail(ACL_ERROR_INVALID_PARAM, "aclrtIpcMemImportByKey", "unknown or closed key");
  int32_t me = (int32_t)(getpid() + fake_control_long("acl.tgid_offset", 0));
  int allowed = 0;
  for (int i = 0; i < rec->npids; ++i) allowed |= rec->pids[i] == me;
  if (!allowed) {
    munmap(rec, sizeof *rec);
    return fail(ACL_ERROR_RT_NO_PERMISSION, "aclrtIpcMemImportByKey", "this process is not on the key's pid whitelist");
  }
  size_t size = rec->size;
  char name[80];
  snprintf(name, sizeof name, "/%s", key);
  void* m = fake_shm_attach(name, size);
  if (m == NULL || !fake_memory_add(&memory, m, size, 1, name)) {
    munmap(rec, sizeof *rec);
    return fail(ACL_ERROR_RT_INTERNAL_ERROR, "aclrtIpcMemImportByKey", "cannot map the exported memory");
  }
  __atomic_add_fetch(&rec->imports, 1, __ATOMIC_SEQ_CST);
  munmap(rec, sizeof *rec);
  *p = m;
  fake_trace("acl", "aclrtIpcMemImportByKey", 0, "key=%s flags=%llu", key, (unsigned long long)flags);
  return ACL_SUCCESS;
}

FAKE_EXPORT aclError aclrtIpcMemClose(const char* key) {
  ENTRY(aclrtIpcMemClose);
  REQUIRE_CTX("aclrtIpcMemClose");
  struct ipc_record* rec = ipc_open(key, 0);
  if (rec == NULL) return fail(ACL_ERROR_INVALID_PARAM, "aclrtIpcMemClose", "unknown key");
  char name[80];
  snprintf(name, sizeof name, "/%s", key);
  /* An importer unmaps its view; the exporter closes the key. */
  for (int i = 0; i < FAKE_MAX_ALLOCS; ++i) {
    struct fake_alloc a;
    pthread_mutex_lock(&memory.mu);
    a = memory.allocs[i];
    pthread_mutex_unlock(&memory.mu);
    if (a.base != 0 && a.imported && strcmp(a.name, name) == 0) {
      fake_memory_remove(&memory, a.base, NULL);
      munmap((void*)a.base, a.size);
      __atomic_sub_fetch(&rec->imports, 1, __ATOMIC_SEQ_CST);
      munmap(rec, sizeof *rec);
      fake_trace("acl", "aclrtIpcMemClose", 0, "key=%s role=importer", key);
      return ACL_SUCCESS;
    }
  }
  int importers = __atomic_load_n(&rec->imports, __ATOMIC_SEQ_CST);
  rec->closed = 1;
  munmap(rec, sizeof *rec);
  char ipc_name[96];
  snprintf(ipc_name, sizeof ipc_name, "/%s-ipc", key);
  shm_unlink(ipc_name);
  /* The runtime's behaviour is undefined here ("exceptions may occur"); the trace says so. */
  fake_trace("acl", "aclrtIpcMemClose", 0, "key=%s role=exporter open_importers=%d", key, importers);
  return ACL_SUCCESS;
}
#endif
