/*
 * A conformance fake of Mooncake's transfer engine C API (libtransfer_engine.so).
 * Two engines in two processes really exchange bytes: each listens on a loopback TCP
 * port (its segment name is "127.0.0.1:<port>", as in P2PHANDSHAKE mode) and serves
 * one-sided reads and writes into its registered memory, refusing any range that is
 * not inside a registered buffer (like Mooncake's TCP transport). Transfers run on a
 * worker thread per engine; their status is polled with getTransferStatus.
 * Rules kept: sources must be registered (ERR_ADDRESS_NOT_REGISTERED), a batch
 * cannot take more requests than it was allocated for (ERR_TOO_MANY_REQUESTS), a
 * batch with unfinished tasks cannot be freed (ERR_BATCH_BUSY), and unregistering
 * memory fences it: tasks that still need it fail, none touches it afterwards.
 * Switches: mooncake.hang=1 (tasks stay PENDING), mooncake.task_fail=1 (tasks end
 * FAILED), mooncake.delay_ms, mooncake.fail=<function>:<rc>.
 * Variant FAKE_OMIT_REQUIRED drops getTransferStatus.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include "fake_common.h"

#define ERR_INVALID_ARGUMENT (-1)
#define ERR_TOO_MANY_REQUESTS (-2)
#define ERR_ADDRESS_NOT_REGISTERED (-3)
#define ERR_BATCH_BUSY (-4)
#define ERR_ADDRESS_OVERLAPPED (-7)

enum { WAITING = 0, PENDING = 1, COMPLETED = 4, FAILED = 6 };
#define OPCODE_READ 0
#define OPCODE_WRITE 1

struct transfer_request {
  int opcode;
  void* source;
  int32_t target_id;
  uint64_t target_offset;
  uint64_t length;
};
struct transfer_status {
  int status;
  uint64_t transferred_bytes;
};

#define MAX_BUFFERS 256
#define MAX_SEGMENTS 64
#define MAX_BATCHES 4096

struct buffer {
  uintptr_t addr;
  size_t length;
};

struct task {
  struct transfer_request req;
  int status;
  uint64_t transferred;
};

struct batch {
  int used;
  size_t capacity;
  size_t count;
  struct task* tasks;
};

struct segment {
  int used;
  int fd;
  char name[64];
  pthread_mutex_t mu;
};

struct engine {
  pthread_mutex_t mu; /* buffers, batches, segments */
  pthread_cond_t cv;
  struct buffer buffers[MAX_BUFFERS];
  struct segment segments[MAX_SEGMENTS];
  struct batch batches[MAX_BATCHES];
  int listen_fd;
  int port;
  int stopping;
  pthread_t server;
  pthread_t worker;
  /* Work queue: (batch, task) pairs in submission order. */
  uint64_t* queue;
  size_t queue_len, queue_cap;
  int worker_busy;
  uintptr_t busy_lo, busy_hi; /* the local range the worker is touching */
};

struct wire {
  uint32_t op;
  uint32_t status; /* reply: 0 = ok */
  uint64_t addr;
  uint64_t length;
};

static int fail(int rc, const char* fn, const char* why) { return fake_fail("mooncake", rc, fn, why); }

#define ENTRY(fn) FAKE_RETURN_IF_FORCED("mooncake", fn)

/* Caller holds e->mu. Nonzero when [addr, addr + len) is inside one registered buffer. */
static int registered(struct engine* e, uintptr_t addr, uint64_t len) {
  for (int i = 0; i < MAX_BUFFERS; ++i) {
    struct buffer* b = &e->buffers[i];
    if (b->length != 0 && addr >= b->addr && addr - b->addr <= b->length && len <= b->length - (addr - b->addr)) return 1;
  }
  return 0;
}

/* ---- the serving side: one thread per connection ------------------------------------ */

struct conn {
  struct engine* e;
  int fd;
};

static void* serve_conn(void* arg) {
  struct conn c = *(struct conn*)arg;
  free(arg);
  for (;;) {
    struct wire w;
    if (fake_io_all(c.fd, &w, sizeof w, 0) != 0) break;
    pthread_mutex_lock(&c.e->mu);
    int ok = registered(c.e, (uintptr_t)w.addr, w.length);
    pthread_mutex_unlock(&c.e->mu);
    if (w.op == OPCODE_WRITE) {
      /* Read the payload even when refusing it, to keep the stream in step. */
      char* tmp = (char*)malloc(w.length ? w.length : 1);
      if (tmp == NULL || fake_io_all(c.fd, tmp, w.length, 0) != 0) {
        free(tmp);
        break;
      }
      if (ok) {
        pthread_mutex_lock(&c.e->mu);
        if (registered(c.e, (uintptr_t)w.addr, w.length)) memcpy((void*)(uintptr_t)w.addr, tmp, w.length);
        else ok = 0;
        pthread_mutex_unlock(&c.e->mu);
      }
      free(tmp);
      w.status = ok ? 0 : 1;
      if (fake_io_all(c.fd, &w, sizeof w, 1) != 0) break;
    } else {
      w.status = ok ? 0 : 1;
      if (fake_io_all(c.fd, &w, sizeof w, 1) != 0) break;
      if (ok) {
        pthread_mutex_lock(&c.e->mu);
        int still = registered(c.e, (uintptr_t)w.addr, w.length);
        char* tmp = (char*)malloc(w.length ? w.length : 1);
        if (tmp != NULL) memset(tmp, 0, w.length);
        if (still && tmp != NULL) memcpy(tmp, (void*)(uintptr_t)w.addr, w.length);
        pthread_mutex_unlock(&c.e->mu);
        int rc = tmp == NULL ? -1 : fake_io_all(c.fd, tmp, w.length, 1);
        free(tmp);
        if (rc != 0) break;
      }
    }
  }
  close(c.fd);
  return NULL;
}

static void* server_main(void* arg) {
  struct engine* e = (struct engine*)arg;
  for (;;) {
    int fd = accept(e->listen_fd, NULL, NULL);
    if (fd < 0) {
      if (errno == EINTR) continue;
      return NULL; /* listener shut down */
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct conn* c = (struct conn*)malloc(sizeof *c);
    c->e = e;
    c->fd = fd;
    pthread_t t;
    if (pthread_create(&t, NULL, serve_conn, c) == 0) pthread_detach(t);
    else {
      close(fd);
      free(c);
    }
  }
}

/* ---- the initiating side: one worker runs queued tasks in order ------------------------- */

static int run_task(struct engine* e, struct task* t) {
  struct segment* s = &e->segments[t->req.target_id];
  struct wire w = {(uint32_t)t->req.opcode, 0, t->req.target_offset, t->req.length};
  char* tmp = (char*)malloc(t->req.length ? t->req.length : 1);
  if (tmp == NULL) return FAILED;
  int result = FAILED;
  /* Local memory is read or written under e->mu, and only while still registered:
   * unregisterLocalMemory (which takes e->mu) fences it. */
  if (t->req.opcode == OPCODE_WRITE) {
    pthread_mutex_lock(&e->mu);
    int ok = registered(e, (uintptr_t)t->req.source, t->req.length);
    if (ok) memcpy(tmp, t->req.source, t->req.length);
    pthread_mutex_unlock(&e->mu);
    if (!ok) goto out;
  }
  pthread_mutex_lock(&s->mu);
  int io = fake_io_all(s->fd, &w, sizeof w, 1);
  if (io == 0 && t->req.opcode == OPCODE_WRITE) io = fake_io_all(s->fd, tmp, t->req.length, 1);
  if (io == 0) io = fake_io_all(s->fd, &w, sizeof w, 0);
  if (io == 0 && w.status == 0 && t->req.opcode == OPCODE_READ) io = fake_io_all(s->fd, tmp, t->req.length, 0);
  pthread_mutex_unlock(&s->mu);
  if (io != 0 || w.status != 0) goto out;
  if (t->req.opcode == OPCODE_READ) {
    pthread_mutex_lock(&e->mu);
    int ok = registered(e, (uintptr_t)t->req.source, t->req.length);
    if (ok) memcpy(t->req.source, tmp, t->req.length);
    pthread_mutex_unlock(&e->mu);
    if (!ok) goto out;
  }
  result = COMPLETED;
out:
  free(tmp);
  return result;
}

static void* worker_main(void* arg) {
  struct engine* e = (struct engine*)arg;
  pthread_mutex_lock(&e->mu);
  for (;;) {
    while (e->queue_len == 0 && !e->stopping) pthread_cond_wait(&e->cv, &e->mu);
    if (e->stopping) break;
    uint64_t item = e->queue[0];
    memmove(e->queue, e->queue + 1, (e->queue_len - 1) * sizeof *e->queue);
    e->queue_len--;
    struct batch* b = &e->batches[item >> 32];
    struct task* t = &b->tasks[item & 0xffffffffu];
    t->status = PENDING;
    pthread_mutex_unlock(&e->mu);

    while (fake_control_long("mooncake.hang", 0) != 0 && !e->stopping) fake_sleep_ms(5);
    fake_sleep_ms(fake_control_long("mooncake.delay_ms", 0));
    int result = e->stopping ? FAILED : fake_control_long("mooncake.task_fail", 0) != 0 ? FAILED : run_task(e, t);

    pthread_mutex_lock(&e->mu);
    t->status = result;
    t->transferred = result == COMPLETED ? t->req.length : 0;
  }
  pthread_mutex_unlock(&e->mu);
  return NULL;
}

/* ---- the C API ------------------------------------------------------------------------- */

FAKE_EXPORT void* createTransferEngine(const char* metadata, const char* local_server_name, const char* ip,
                                       uint64_t rpc_port, int auto_discover) {
  if (fake_forced_failure("mooncake", "createTransferEngine") != 0 || metadata == NULL ||
      strcmp(metadata, "P2PHANDSHAKE") != 0) {
    fake_trace("mooncake", "createTransferEngine", 0, "refused metadata=%s", metadata ? metadata : "(null)");
    return NULL;
  }
  struct engine* e = (struct engine*)calloc(1, sizeof *e);
  pthread_mutex_init(&e->mu, NULL);
  pthread_cond_init(&e->cv, NULL);
  for (int i = 0; i < MAX_SEGMENTS; ++i) pthread_mutex_init(&e->segments[i].mu, NULL);
  e->listen_fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  struct sockaddr_in sa;
  memset(&sa, 0, sizeof sa);
  sa.sin_family = AF_INET;
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof sa;
  if (e->listen_fd < 0 || bind(e->listen_fd, (struct sockaddr*)&sa, sizeof sa) != 0 || listen(e->listen_fd, 64) != 0 ||
      getsockname(e->listen_fd, (struct sockaddr*)&sa, &len) != 0) {
    if (e->listen_fd >= 0) close(e->listen_fd);
    free(e);
    return NULL;
  }
  e->port = ntohs(sa.sin_port);
  e->queue_cap = 1024;
  e->queue = (uint64_t*)malloc(e->queue_cap * sizeof *e->queue);
  pthread_create(&e->server, NULL, server_main, e);
  pthread_create(&e->worker, NULL, worker_main, e);
  fake_trace("mooncake", "createTransferEngine", 0, "metadata=%s name=%s port=%d auto=%d", metadata,
             local_server_name ? local_server_name : "", e->port, auto_discover);
  return e;
}

FAKE_EXPORT void destroyTransferEngine(void* engine) {
  struct engine* e = (struct engine*)engine;
  pthread_mutex_lock(&e->mu);
  e->stopping = 1;
  pthread_cond_broadcast(&e->cv);
  pthread_mutex_unlock(&e->mu);
  shutdown(e->listen_fd, SHUT_RDWR);
  close(e->listen_fd);
  for (int i = 0; i < MAX_SEGMENTS; ++i) {
    if (e->segments[i].used) shutdown(e->segments[i].fd, SHUT_RDWR);
  }
  pthread_join(e->worker, NULL);
  pthread_join(e->server, NULL);
  for (int i = 0; i < MAX_SEGMENTS; ++i) {
    if (e->segments[i].used) close(e->segments[i].fd);
  }
  fake_trace("mooncake", "destroyTransferEngine", 0, "port=%d", e->port);
  /* The engine memory is left allocated: connection threads may still be draining. */
}

FAKE_EXPORT void* installTransport(void* engine, const char* proto, void** args) {
  if (fake_forced_failure("mooncake", "installTransport") != 0) return NULL;
  if (strcmp(proto, "tcp") != 0 && strcmp(proto, "rdma") != 0 && strcmp(proto, "ascend") != 0) {
    fake_trace("mooncake", "installTransport", -1, "unknown proto=%s", proto);
    return NULL;
  }
  fake_trace("mooncake", "installTransport", 0, "proto=%s args=%s", proto, args && args[0] ? "set" : "null");
  return engine;
}

FAKE_EXPORT int getLocalIpAndPort(void* engine, char* buf, size_t len) {
  snprintf(buf, len, "127.0.0.1:%d", ((struct engine*)engine)->port);
  return 0;
}

FAKE_EXPORT int32_t openSegment(void* engine, const char* name) {
  ENTRY(openSegment);
  struct engine* e = (struct engine*)engine;
  char host[64];
  int port = 0;
  if (sscanf(name, "%63[^:]:%d", host, &port) != 2) return fail(ERR_INVALID_ARGUMENT, "openSegment", "segment name is not host:port");
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  struct sockaddr_in sa;
  memset(&sa, 0, sizeof sa);
  sa.sin_family = AF_INET;
  sa.sin_port = htons((uint16_t)port);
  if (fd < 0 || inet_pton(AF_INET, host, &sa.sin_addr) != 1 || connect(fd, (struct sockaddr*)&sa, sizeof sa) != 0) {
    if (fd >= 0) close(fd);
    return fail(ERR_INVALID_ARGUMENT, "openSegment", "cannot reach the segment");
  }
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  pthread_mutex_lock(&e->mu);
  for (int i = 1; i < MAX_SEGMENTS; ++i) { /* 0 is LOCAL_SEGMENT */
    if (!e->segments[i].used) {
      e->segments[i].used = 1;
      e->segments[i].fd = fd;
      snprintf(e->segments[i].name, sizeof e->segments[i].name, "%s", name);
      pthread_mutex_unlock(&e->mu);
      fake_trace("mooncake", "openSegment", i, "name=%s", name);
      return i;
    }
  }
  pthread_mutex_unlock(&e->mu);
  close(fd);
  return fail(ERR_INVALID_ARGUMENT, "openSegment", "too many segments");
}

FAKE_EXPORT int closeSegment(void* engine, int32_t id) {
  struct engine* e = (struct engine*)engine;
  if (id <= 0 || id >= MAX_SEGMENTS || !e->segments[id].used) return fail(ERR_INVALID_ARGUMENT, "closeSegment", "unknown segment");
  /* Tasks still queued for it fail when they find the socket shut. */
  shutdown(e->segments[id].fd, SHUT_RDWR);
  fake_trace("mooncake", "closeSegment", 0, "id=%d", id);
  return 0;
}

FAKE_EXPORT int registerLocalMemory(void* engine, void* addr, size_t length, const char* location, int remote) {
  ENTRY(registerLocalMemory);
  struct engine* e = (struct engine*)engine;
  uintptr_t a = (uintptr_t)addr;
  pthread_mutex_lock(&e->mu);
  int free_slot = -1;
  for (int i = 0; i < MAX_BUFFERS; ++i) {
    struct buffer* b = &e->buffers[i];
    if (b->length == 0) {
      if (free_slot < 0) free_slot = i;
      continue;
    }
    if (a < b->addr + b->length && b->addr < a + length) {
      pthread_mutex_unlock(&e->mu);
      return fail(ERR_ADDRESS_OVERLAPPED, "registerLocalMemory", "overlaps a registered buffer");
    }
  }
  if (free_slot < 0 || length == 0) {
    pthread_mutex_unlock(&e->mu);
    return fail(ERR_INVALID_ARGUMENT, "registerLocalMemory", "table full or empty range");
  }
  e->buffers[free_slot].addr = a;
  e->buffers[free_slot].length = length;
  pthread_mutex_unlock(&e->mu);
  fake_trace("mooncake", "registerLocalMemory", 0, "addr=%p length=%zu location=%s remote=%d", addr, length, location,
             remote);
  return 0;
}

FAKE_EXPORT int unregisterLocalMemory(void* engine, void* addr) {
  ENTRY(unregisterLocalMemory);
  struct engine* e = (struct engine*)engine;
  pthread_mutex_lock(&e->mu);
  for (int i = 0; i < MAX_BUFFERS; ++i) {
    if (e->buffers[i].length != 0 && e->buffers[i].addr == (uintptr_t)addr) {
      e->buffers[i].length = 0;
      e->buffers[i].addr = 0;
      pthread_mutex_unlock(&e->mu);
      fake_trace("mooncake", "unregisterLocalMemory", 0, "addr=%p", addr);
      return 0;
    }
  }
  pthread_mutex_unlock(&e->mu);
  return fail(ERR_INVALID_ARGUMENT, "unregisterLocalMemory", "not a registered base address");
}

FAKE_EXPORT uint64_t allocateBatchID(void* engine, size_t size) {
  struct engine* e = (struct engine*)engine;
  if (fake_forced_failure("mooncake", "allocateBatchID") != 0 || size == 0) return UINT64_MAX;
  pthread_mutex_lock(&e->mu);
  for (int i = 1; i < MAX_BATCHES; ++i) {
    if (!e->batches[i].used) {
      e->batches[i].used = 1;
      e->batches[i].capacity = size;
      e->batches[i].count = 0;
      e->batches[i].tasks = (struct task*)calloc(size, sizeof(struct task));
      pthread_mutex_unlock(&e->mu);
      return (uint64_t)i;
    }
  }
  pthread_mutex_unlock(&e->mu);
  return UINT64_MAX;
}

FAKE_EXPORT int submitTransfer(void* engine, uint64_t batch_id, struct transfer_request* entries, size_t count) {
  ENTRY(submitTransfer);
  struct engine* e = (struct engine*)engine;
  pthread_mutex_lock(&e->mu);
  if (batch_id == 0 || batch_id >= MAX_BATCHES || !e->batches[batch_id].used) {
    pthread_mutex_unlock(&e->mu);
    return fail(ERR_INVALID_ARGUMENT, "submitTransfer", "unknown batch");
  }
  struct batch* b = &e->batches[batch_id];
  if (b->count + count > b->capacity) {
    pthread_mutex_unlock(&e->mu);
    return fail(ERR_TOO_MANY_REQUESTS, "submitTransfer", "more requests than the batch was allocated for");
  }
  for (size_t i = 0; i < count; ++i) {
    struct transfer_request* r = &entries[i];
    if (!registered(e, (uintptr_t)r->source, r->length)) {
      pthread_mutex_unlock(&e->mu);
      return fail(ERR_ADDRESS_NOT_REGISTERED, "submitTransfer", "source is not registered memory");
    }
    if (r->target_id <= 0 || r->target_id >= MAX_SEGMENTS || !e->segments[r->target_id].used ||
        (r->opcode != OPCODE_READ && r->opcode != OPCODE_WRITE)) {
      pthread_mutex_unlock(&e->mu);
      return fail(ERR_INVALID_ARGUMENT, "submitTransfer", "bad target segment or opcode");
    }
  }
  for (size_t i = 0; i < count; ++i) {
    struct task* t = &b->tasks[b->count];
    t->req = entries[i];
    t->status = WAITING;
    if (e->queue_len == e->queue_cap) {
      e->queue_cap *= 2;
      e->queue = (uint64_t*)realloc(e->queue, e->queue_cap * sizeof *e->queue);
    }
    e->queue[e->queue_len++] = (batch_id << 32) | b->count;
    b->count++;
  }
  pthread_cond_broadcast(&e->cv);
  pthread_mutex_unlock(&e->mu);
  fake_trace("mooncake", "submitTransfer", 0, "batch=%llu count=%zu", (unsigned long long)batch_id, count);
  return 0;
}

#ifndef FAKE_OMIT_REQUIRED
FAKE_EXPORT int getTransferStatus(void* engine, uint64_t batch_id, size_t task_id, struct transfer_status* st) {
  ENTRY(getTransferStatus);
  struct engine* e = (struct engine*)engine;
  pthread_mutex_lock(&e->mu);
  if (batch_id == 0 || batch_id >= MAX_BATCHES || !e->batches[batch_id].used || task_id >= e->batches[batch_id].count) {
    pthread_mutex_unlock(&e->mu);
    return fail(ERR_INVALID_ARGUMENT, "getTransferStatus", "unknown batch or task");
  }
  st->status = e->batches[batch_id].tasks[task_id].status;
  st->transferred_bytes = e->batches[batch_id].tasks[task_id].transferred;
  pthread_mutex_unlock(&e->mu);
  return 0;
}
#endif

FAKE_EXPORT int freeBatchID(void* engine, uint64_t batch_id) {
  struct engine* e = (struct engine*)engine;
  pthread_mutex_lock(&e->mu);
  if (batch_id == 0 || batch_id >= MAX_BATCHES || !e->batches[batch_id].used) {
    pthread_mutex_unlock(&e->mu);
    return fail(ERR_INVALID_ARGUMENT, "freeBatchID", "unknown batch");
  }
  struct batch* b = &e->batches[batch_id];
  for (size_t i = 0; i < b->count; ++i) {
    if (b->tasks[i].status == WAITING || b->tasks[i].status == PENDING) {
      pthread_mutex_unlock(&e->mu);
      return fail(ERR_BATCH_BUSY, "freeBatchID", "tasks still running");
    }
  }
  free(b->tasks);
  memset(b, 0, sizeof *b);
  pthread_mutex_unlock(&e->mu);
  fake_trace("mooncake", "freeBatchID", 0, "batch=%llu", (unsigned long long)batch_id);
  return 0;
}
