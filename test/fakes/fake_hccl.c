/*
 * A conformance fake of HCCL (libhccl.so) for two-rank point-to-point use over host
 * memory. HcclGetRootInfo opens a listening Unix socket (abstract namespace) and
 * writes its name into the 4108-byte root info; HcclCommInitRootInfo joins the ranks
 * over it, blocking until both arrived (or HCCL_E_TIMEOUT). HcclSend / HcclRecv /
 * HcclBatchSendRecv enqueue their work on the fake ACL stream they are given (this
 * library links against the fake libascendcl.so), so they complete in stream order
 * and events recorded after them mean what they mean on hardware.
 * Rules kept: buffers must be device memory; counts of a matched send and recv must
 * agree (the receiver's stream then records an async error).
 * Switches: hccl.hang=1 (transfers stop progressing), hccl.fail=<function>:<rc>,
 * hccl.init_timeout_ms (default 30000). Variant FAKE_OMIT_REQUIRED drops HcclRecv.
 */
#include <sys/socket.h>
#include <stddef.h>
#include <sys/select.h>
#include <sys/un.h>

#include "fake_common.h"

typedef int HcclResult;
#define HCCL_SUCCESS 0
#define HCCL_E_PARA 1
#define HCCL_E_INTERNAL 4
#define HCCL_E_NOT_SUPPORT 5
#define HCCL_E_TIMEOUT 9
#define HCCL_E_REMOTE 21
#define ROOT_INFO_BYTES 4108
#define ROOT_MAGIC "EPDFAKEHCCL:"

typedef struct {
  char internal[ROOT_INFO_BYTES];
} HcclRootInfo;

typedef struct {
  int type; /* 0 send, 1 recv */
  void* buf;
  uint64_t count;
  int dataType;
  uint32_t remoteRank;
} HcclSendRecvItem;

/* From the fake libascendcl.so. */
extern int epd_fake_acl_enqueue(void* stream, void (*fn)(void*), void* arg);
extern int epd_fake_acl_is_device(const void* p, size_t n);

struct comm {
  int fd; /* connected to the other rank */
  uint32_t rank;
  int dead;
  int async_error;
};

struct listener {
  char name[108];
  int fd;
};

static pthread_mutex_t listeners_mu = PTHREAD_MUTEX_INITIALIZER;
static struct listener listeners[64];

static HcclResult fail(HcclResult rc, const char* fn, const char* why) { return fake_fail("hccl", rc, fn, why); }

#define ENTRY(fn) FAKE_RETURN_IF_FORCED("hccl", fn)

static socklen_t abstract_addr(const char* name, struct sockaddr_un* sa) {
  memset(sa, 0, sizeof *sa);
  sa->sun_family = AF_UNIX;
  size_t n = strlen(name);
  memcpy(sa->sun_path + 1, name, n); /* leading NUL: abstract namespace, no file */
  return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + n);
}

FAKE_EXPORT const char* HcclGetErrorString(HcclResult rc) {
  switch (rc) {
    case HCCL_SUCCESS: return "success";
    case HCCL_E_PARA: return "parameter error (fake)";
    case HCCL_E_TIMEOUT: return "timeout (fake)";
    case HCCL_E_REMOTE: return "remote error (fake)";
  }
  return "error (fake)";
}

FAKE_EXPORT HcclResult HcclGetRootInfo(HcclRootInfo* info) {
  ENTRY(HcclGetRootInfo);
  static int seq = 0;
  char name[96];
  snprintf(name, sizeof name, "epdfake-hccl-%d-%d", (int)getpid(), __atomic_add_fetch(&seq, 1, __ATOMIC_SEQ_CST));
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  struct sockaddr_un sa;
  socklen_t len = abstract_addr(name, &sa);
  if (fd < 0 || bind(fd, (struct sockaddr*)&sa, len) != 0 || listen(fd, 8) != 0) {
    if (fd >= 0) close(fd);
    return fail(HCCL_E_INTERNAL, "HcclGetRootInfo", "cannot listen");
  }
  pthread_mutex_lock(&listeners_mu);
  for (int i = 0; i < 64; ++i) {
    if (listeners[i].fd == 0) {
      snprintf(listeners[i].name, sizeof listeners[i].name, "%s", name);
      listeners[i].fd = fd;
      break;
    }
  }
  pthread_mutex_unlock(&listeners_mu);
  memset(info, 0, sizeof *info);
  snprintf(info->internal, sizeof info->internal, "%s%s", ROOT_MAGIC, name);
  fake_trace("hccl", "HcclGetRootInfo", 0, "root=%s", name);
  return HCCL_SUCCESS;
}

FAKE_EXPORT HcclResult HcclCommInitRootInfo(uint32_t nranks, const HcclRootInfo* info, uint32_t rank, void** out) {
  ENTRY(HcclCommInitRootInfo);
  if (nranks != 2 || rank > 1) return fail(HCCL_E_NOT_SUPPORT, "HcclCommInitRootInfo", "the fake supports two ranks");
  if (strncmp(info->internal, ROOT_MAGIC, strlen(ROOT_MAGIC)) != 0) {
    return fail(HCCL_E_PARA, "HcclCommInitRootInfo", "not a root info from HcclGetRootInfo");
  }
  const char* name = info->internal + strlen(ROOT_MAGIC);
  long timeout = fake_control_long("hccl.init_timeout_ms", 30000);
  int fd = -1;
  int listener = -1;
  pthread_mutex_lock(&listeners_mu);
  for (int i = 0; i < 64; ++i) {
    if (listeners[i].fd != 0 && strcmp(listeners[i].name, name) == 0) {
      listener = listeners[i].fd;
      listeners[i].fd = 0;
    }
  }
  pthread_mutex_unlock(&listeners_mu);
  int64_t deadline = fake_now_ms() + timeout;
  if (listener >= 0) {
    /* This process made the root info: wait for the other rank to join. */
    for (;;) {
      struct timeval tv = {0, 50000};
      fd_set set;
      FD_ZERO(&set);
      FD_SET(listener, &set);
      if (select(listener + 1, &set, NULL, NULL, &tv) > 0) {
        fd = accept(listener, NULL, NULL);
        break;
      }
      if (fake_now_ms() >= deadline) break;
    }
    close(listener);
  } else {
    struct sockaddr_un sa;
    socklen_t len = abstract_addr(name, &sa);
    while (fake_now_ms() < deadline) {
      fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
      if (connect(fd, (struct sockaddr*)&sa, len) == 0) break;
      close(fd);
      fd = -1;
      fake_sleep_ms(20);
    }
  }
  if (fd < 0) return fail(HCCL_E_TIMEOUT, "HcclCommInitRootInfo", "the other rank did not join in time");
  uint32_t theirs = 0;
  if (fake_io_all(fd, &rank, sizeof rank, 1) != 0 || fake_io_all(fd, &theirs, sizeof theirs, 0) != 0 || theirs == rank) {
    close(fd);
    return fail(HCCL_E_PARA, "HcclCommInitRootInfo", "rank handshake failed (both ranks the same?)");
  }
  struct comm* c = (struct comm*)calloc(1, sizeof *c);
  c->fd = fd;
  c->rank = rank;
  *out = c;
  fake_trace("hccl", "HcclCommInitRootInfo", 0, "rank=%u", rank);
  return HCCL_SUCCESS;
}

FAKE_EXPORT HcclResult HcclCommDestroy(void* comm) {
  ENTRY(HcclCommDestroy);
  struct comm* c = (struct comm*)comm;
  __atomic_store_n(&c->dead, 1, __ATOMIC_SEQ_CST);
  shutdown(c->fd, SHUT_RDWR); /* unblocks queued transfers; they record an error */
  fake_trace("hccl", "HcclCommDestroy", 0, "rank=%u", c->rank);
  /* The struct stays: stream tasks may still reference it. */
  return HCCL_SUCCESS;
}

FAKE_EXPORT HcclResult HcclGetCommAsyncError(void* comm, HcclResult* err) {
  *err = __atomic_load_n(&((struct comm*)comm)->async_error, __ATOMIC_SEQ_CST);
  return HCCL_SUCCESS;
}

struct op {
  struct comm* c;
  int n;
  HcclSendRecvItem items[];
};

static void run_op(void* arg) {
  struct op* o = (struct op*)arg;
  struct comm* c = o->c;
  while (fake_control_long("hccl.hang", 0) != 0 && !__atomic_load_n(&c->dead, __ATOMIC_SEQ_CST)) fake_sleep_ms(5);
  /* Sends first, then receives: a rank never does both in one call in epd-transfer. */
  for (int pass = 0; pass < 2; ++pass) {
    for (int i = 0; i < o->n; ++i) {
      HcclSendRecvItem* it = &o->items[i];
      if (it->type != pass) continue;
      uint64_t count = it->count;
      int bad = 0;
      if (pass == 0) {
        bad = fake_io_all(c->fd, &count, sizeof count, 1) != 0 || fake_io_all(c->fd, it->buf, it->count, 1) != 0;
      } else {
        bad = fake_io_all(c->fd, &count, sizeof count, 0) != 0;
        if (!bad && count != it->count) {
          /* Mismatched pair: drain the payload, keep the buffer, report asynchronously. */
          char sink[4096];
          for (uint64_t left = count; left > 0 && !bad;) {
            size_t n = left < sizeof sink ? (size_t)left : sizeof sink;
            bad = fake_io_all(c->fd, sink, n, 0) != 0;
            left -= n;
          }
          __atomic_store_n(&c->async_error, HCCL_E_PARA, __ATOMIC_SEQ_CST);
          fake_trace("hccl", "recv", HCCL_E_PARA, "count mismatch: sent %llu, expected %llu", (unsigned long long)count,
                     (unsigned long long)it->count);
          continue;
        }
        if (!bad) bad = fake_io_all(c->fd, it->buf, it->count, 0) != 0;
      }
      if (bad) {
        __atomic_store_n(&c->async_error, HCCL_E_REMOTE, __ATOMIC_SEQ_CST);
        fake_trace("hccl", pass == 0 ? "send" : "recv", HCCL_E_REMOTE, "connection to the other rank failed");
        free(o);
        return;
      }
    }
  }
  free(o);
}

static HcclResult enqueue(const char* fn, HcclSendRecvItem* items, uint32_t n, void* comm, void* stream) {
  struct comm* c = (struct comm*)comm;
  if (c == NULL || stream == NULL) return fail(HCCL_E_PARA, fn, "null comm or stream");
  for (uint32_t i = 0; i < n; ++i) {
    if (items[i].dataType != 0 && items[i].dataType != 7) return fail(HCCL_E_NOT_SUPPORT, fn, "the fake moves int8/uint8 only");
    if (items[i].remoteRank == c->rank || items[i].remoteRank > 1) return fail(HCCL_E_PARA, fn, "bad remote rank");
    if (!epd_fake_acl_is_device(items[i].buf, items[i].count)) return fail(HCCL_E_PARA, fn, "buffer is not device memory");
  }
  struct op* o = (struct op*)malloc(sizeof *o + n * sizeof(HcclSendRecvItem));
  o->c = c;
  o->n = (int)n;
  memcpy(o->items, items, n * sizeof *items);
  if (epd_fake_acl_enqueue(stream, run_op, o) != 0) {
    free(o);
    return fail(HCCL_E_PARA, fn, "not a stream");
  }
  fake_trace("hccl", fn, 0, "items=%u rank=%u", n, c->rank);
  return HCCL_SUCCESS;
}

FAKE_EXPORT HcclResult HcclSend(void* buf, uint64_t count, int dtype, uint32_t dest, void* comm, void* stream) {
  ENTRY(HcclSend);
  HcclSendRecvItem it = {0, buf, count, dtype, dest};
  return enqueue("HcclSend", &it, 1, comm, stream);
}

#ifndef FAKE_OMIT_REQUIRED
FAKE_EXPORT HcclResult HcclRecv(void* buf, uint64_t count, int dtype, uint32_t src, void* comm, void* stream) {
  ENTRY(HcclRecv);
  HcclSendRecvItem it = {1, buf, count, dtype, src};
  return enqueue("HcclRecv", &it, 1, comm, stream);
}
#endif

FAKE_EXPORT HcclResult HcclBatchSendRecv(HcclSendRecvItem* items, uint32_t n, void* comm, void* stream) {
  ENTRY(HcclBatchSendRecv);
  return enqueue("HcclBatchSendRecv", items, n, comm, stream);
}
