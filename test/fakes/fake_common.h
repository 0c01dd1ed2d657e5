/*
 * Shared by the conformance fakes: small C libraries that export vendor symbols
 * (ACL, HCCL, CUDA driver, Mooncake) over host memory so the vendor code paths of
 * epd-transfer run on a machine without the hardware. They check call sequences,
 * argument handling and error paths, not the hardware. Built by test/vendor/fakes.ts.
 *
 * Switches, read at each call from the file named by EPD_FAKE_CONTROL (one
 * `key=value` per line; tests rewrite it while running):
 *   <lib>.fail=<function>:<code>   that function returns <code> (repeatable line)
 *   <lib>.delay_ms=<n>             each stream operation takes n ms more
 *   <lib>.hang=1                   stream operations and transfers stop progressing
 *   acl.devices=<n>, cuda.devices=<n>       device count (default 1)
 *   acl.tgid_offset=<n>            aclrtDeviceGetBareTgid = getpid() + n (a container)
 * EPD_FAKE_TRACE names a file that receives one line per call:
 *   <lib> <pid> <tid> <function> <details> -> <rc>
 */
#ifndef EPD_FAKE_COMMON_H
#define EPD_FAKE_COMMON_H

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define FAKE_EXPORT __attribute__((visibility("default")))

/* ---- control file ------------------------------------------------------------- */

/* Copies the control file into buf (NUL-terminated); "" when unset or unreadable. */
static void fake_control_text(char* buf, size_t cap) {
  buf[0] = '\0';
  const char* path = getenv("EPD_FAKE_CONTROL");
  if (path == NULL || *path == '\0') return;
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return;
  ssize_t n = read(fd, buf, cap - 1);
  close(fd);
  buf[n > 0 ? n : 0] = '\0';
}

/* The value of `key` (a full "<lib>.<name>" key) as a long, or `def`. */
static long fake_control_long(const char* key, long def) {
  char text[4096];
  fake_control_text(text, sizeof text);
  size_t klen = strlen(key);
  for (char* line = text; line != NULL && *line != '\0';) {
    char* next = strchr(line, '\n');
    if (next != NULL) *next++ = '\0';
    if (strncmp(line, key, klen) == 0 && line[klen] == '=') return strtol(line + klen + 1, NULL, 10);
    line = next;
  }
  return def;
}

/* The failure code configured for `lib`'s function `fn` ("<lib>.fail=<fn>:<code>"), or 0. */
static long fake_forced_failure(const char* lib, const char* fn) {
  char text[4096];
  char key[64];
  fake_control_text(text, sizeof text);
  snprintf(key, sizeof key, "%s.fail=", lib);
  size_t klen = strlen(key), flen = strlen(fn);
  for (char* line = text; line != NULL && *line != '\0';) {
    char* next = strchr(line, '\n');
    if (next != NULL) *next++ = '\0';
    if (strncmp(line, key, klen) == 0 && strncmp(line + klen, fn, flen) == 0 && line[klen + flen] == ':') {
      return strtol(line + klen + flen + 1, NULL, 10);
    }
    line = next;
  }
  return 0;
}

/* ---- trace ------------------------------------------------------------------- */

static void fake_trace(const char* lib, const char* fn, long rc, const char* fmt, ...) {
  const char* path = getenv("EPD_FAKE_TRACE");
  if (path == NULL || *path == '\0') return;
  char details[512] = "";
  if (fmt != NULL) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(details, sizeof details, fmt, ap);
    va_end(ap);
  }
  char line[768];
  int n = snprintf(line, sizeof line, "%s %d %ld %s %s -> %ld\n", lib, (int)getpid(), (long)syscall(SYS_gettid), fn,
                   details, rc);
  int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) return;
  /* One write per line: O_APPEND keeps lines of concurrent processes whole. */
  if (write(fd, line, (size_t)(n < (int)sizeof line ? n : (int)sizeof line - 1)) < 0) {
  }
  close(fd);
}

/* ---- failures ---------------------------------------------------------------- */

/* Traces a failing call of `lib`'s function `fn` and returns its code. */
static int fake_fail(const char* lib, int rc, const char* fn, const char* why) {
  fake_trace(lib, fn, rc, "%s", why);
  return rc;
}

/* First thing in an exported function `fn`: returns the code a test switched on for it
 * ("<lib>.fail=<fn>:<code>") through the including file's own fail(rc, fn, why). */
#define FAKE_RETURN_IF_FORCED(lib, fn)                                                   \
  do {                                                                                   \
    long forced_ = fake_forced_failure(lib, #fn);                                        \
    if (forced_ != 0) return fail((int)forced_, #fn, "failure switched on by the test"); \
  } while (0)

/* ---- sockets ------------------------------------------------------------------ */

/* Sends (writing) or receives all n bytes; 0 on success, -1 when the connection failed. */
static int fake_io_all(int fd, void* buf, size_t n, int writing) {
  char* p = (char*)buf;
  while (n > 0) {
    ssize_t k = writing ? send(fd, p, n, MSG_NOSIGNAL) : recv(fd, p, n, 0);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) return -1;
    p += k;
    n -= (size_t)k;
  }
  return 0;
}

/* ---- time -------------------------------------------------------------------- */

static int64_t fake_now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void fake_sleep_ms(long ms) {
  if (ms <= 0) return;
  struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
  while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
  }
}

/* The CLOCK_REALTIME time `ms` from now, for pthread_cond_timedwait. */
static struct timespec fake_abstime_in(long ms) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  ts.tv_nsec += ms * 1000000L;
  if (ts.tv_nsec >= 1000000000L) {
    ts.tv_sec += 1;
    ts.tv_nsec -= 1000000000L;
  }
  return ts;
}

/* ---- "device memory": shared memory, so IPC works across processes -------------- */

#define FAKE_MAX_ALLOCS 1024

struct fake_alloc {
  uintptr_t base;
  size_t size;
  int imported;
  char name[64]; /* the shm object behind it */
};

struct fake_memory {
  pthread_mutex_t mu;
  struct fake_alloc allocs[FAKE_MAX_ALLOCS];
};

/* Creates a shm object of `size` and maps it. Returns the address or NULL. */
static void* fake_shm_create(const char* prefix, size_t size, char name[64]) {
  static int seq = 0;
  snprintf(name, 64, "/%s-%d-%d", prefix, (int)getpid(), __atomic_add_fetch(&seq, 1, __ATOMIC_SEQ_CST));
  int fd = shm_open(name, O_RDWR | O_CREAT | O_EXCL, 0600);
  if (fd < 0) return NULL;
  if (ftruncate(fd, (off_t)size) != 0) {
    close(fd);
    shm_unlink(name);
    return NULL;
  }
  void* p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (p == MAP_FAILED) {
    shm_unlink(name);
    return NULL;
  }
  return p;
}

static void* fake_shm_attach(const char* name, size_t size) {
  int fd = shm_open(name, O_RDWR, 0600);
  if (fd < 0) return NULL;
  void* p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  return p == MAP_FAILED ? NULL : p;
}

/* Records an allocation; returns 0 when the table is full. */
static int fake_memory_add(struct fake_memory* m, void* p, size_t size, int imported, const char* name) {
  pthread_mutex_lock(&m->mu);
  for (int i = 0; i < FAKE_MAX_ALLOCS; ++i) {
    if (m->allocs[i].base == 0) {
      m->allocs[i].base = (uintptr_t)p;
      m->allocs[i].size = size;
      m->allocs[i].imported = imported;
      snprintf(m->allocs[i].name, sizeof m->allocs[i].name, "%s", name);
      pthread_mutex_unlock(&m->mu);
      return 1;
    }
  }
  pthread_mutex_unlock(&m->mu);
  return 0;
}

/* The allocation holding [p, p + n), copied into *out; 0 when none. */
static int fake_memory_find(struct fake_memory* m, uintptr_t p, size_t n, struct fake_alloc* out) {
  int found = 0;
  pthread_mutex_lock(&m->mu);
  for (int i = 0; i < FAKE_MAX_ALLOCS; ++i) {
    struct fake_alloc* a = &m->allocs[i];
    if (a->base != 0 && p >= a->base && p - a->base <= a->size && n <= a->size - (p - a->base)) {
      if (out != NULL) *out = *a;
      found = 1;
      break;
    }
  }
  pthread_mutex_unlock(&m->mu);
  return found;
}

/* Removes the allocation that starts at `base`; 0 when none. */
static int fake_memory_remove(struct fake_memory* m, uintptr_t base, struct fake_alloc* out) {
  int found = 0;
  pthread_mutex_lock(&m->mu);
  for (int i = 0; i < FAKE_MAX_ALLOCS; ++i) {
    if (m->allocs[i].base == base) {
      if (out != NULL) *out = m->allocs[i];
      memset(&m->allocs[i], 0, sizeof m->allocs[i]);
      found = 1;
      break;
    }
  }
  pthread_mutex_unlock(&m->mu);
  return found;
}

/* ---- streams: one worker thread each, tasks run in order -------------------------- */

struct fake_event {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  uint64_t recorded;  /* generation of the last record */
  uint64_t completed; /* highest generation whose work has run */
  unsigned flags;
};

typedef void (*fake_task_fn)(void* arg);

struct fake_task {
  struct fake_task* next;
  fake_task_fn fn;
  void* arg;
  /* built-in kinds */
  int kind; /* 0 = fn, 1 = copy, 2 = record, 3 = wait */
  void* dst;
  const void* src;
  size_t bytes;
  struct fake_event* event;
  uint64_t generation;
};

struct fake_stream {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  pthread_t thread;
  struct fake_task* head;
  struct fake_task* tail;
  int stopping;
  int busy;
  const char* lib; /* control prefix: delay and hang switches */
};

static void fake_event_complete(struct fake_event* e, uint64_t gen) {
  pthread_mutex_lock(&e->mu);
  if (gen > e->completed) e->completed = gen;
  pthread_cond_broadcast(&e->cv);
  pthread_mutex_unlock(&e->mu);
}

static int fake_stream_cancelled(struct fake_stream* s) {
  pthread_mutex_lock(&s->mu);
  int stop = s->stopping == 2;
  pthread_mutex_unlock(&s->mu);
  return stop;
}

/* Honours <lib>.hang and <lib>.delay_ms before a task runs. */
static void fake_stream_throttle(struct fake_stream* s) {
  char key[64];
  snprintf(key, sizeof key, "%s.hang", s->lib);
  while (fake_control_long(key, 0) != 0 && !fake_stream_cancelled(s)) fake_sleep_ms(5);
  snprintf(key, sizeof key, "%s.delay_ms", s->lib);
  fake_sleep_ms(fake_control_long(key, 0));
}

static void* fake_stream_main(void* arg) {
  struct fake_stream* s = (struct fake_stream*)arg;
  for (;;) {
    pthread_mutex_lock(&s->mu);
    while (s->head == NULL && !s->stopping) pthread_cond_wait(&s->cv, &s->mu);
    struct fake_task* t = s->head;
    if (t == NULL) {
      pthread_mutex_unlock(&s->mu);
      return NULL;
    }
    s->head = t->next;
    if (s->head == NULL) s->tail = NULL;
    s->busy = 1;
    pthread_mutex_unlock(&s->mu);

    fake_stream_throttle(s);  /* every operation, records and waits included */
    switch (t->kind) {
      case 0:
        t->fn(t->arg);
        break;
      case 1:
        memmove(t->dst, t->src, t->bytes);
        break;
      case 2:
        fake_event_complete(t->event, t->generation);
        break;
      case 3:
        pthread_mutex_lock(&t->event->mu);
        while (t->event->completed < t->generation && !fake_stream_cancelled(s)) {
          struct timespec ts = fake_abstime_in(20);
          pthread_cond_timedwait(&t->event->cv, &t->event->mu, &ts);
        }
        pthread_mutex_unlock(&t->event->mu);
        break;
    }
    free(t);
    pthread_mutex_lock(&s->mu);
    s->busy = 0;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
  }
}

static struct fake_stream* fake_stream_new(const char* lib) {
  struct fake_stream* s = (struct fake_stream*)calloc(1, sizeof *s);
  if (s == NULL) return NULL;
  pthread_mutex_init(&s->mu, NULL);
  pthread_cond_init(&s->cv, NULL);
  s->lib = lib;
  if (pthread_create(&s->thread, NULL, fake_stream_main, s) != 0) {
    free(s);
    return NULL;
  }
  return s;
}

static void fake_stream_push(struct fake_stream* s, struct fake_task* t) {
  t->next = NULL;
  pthread_mutex_lock(&s->mu);
  if (s->tail != NULL) s->tail->next = t; else s->head = t;
  s->tail = t;
  pthread_cond_broadcast(&s->cv);
  pthread_mutex_unlock(&s->mu);
}

static struct fake_task* fake_task_new(int kind) {
  struct fake_task* t = (struct fake_task*)calloc(1, sizeof *t);
  if (t != NULL) t->kind = kind;
  return t;
}

/* Nonzero when the stream has queued or running work. */
static int fake_stream_pending(struct fake_stream* s) {
  pthread_mutex_lock(&s->mu);
  int pending = s->head != NULL || s->busy;
  pthread_mutex_unlock(&s->mu);
  return pending;
}

/* Runs what is queued (or, with `cancel`, abandons waits and hangs), then joins. */
static void fake_stream_destroy(struct fake_stream* s, int cancel) {
  pthread_mutex_lock(&s->mu);
  s->stopping = cancel ? 2 : 1;
  pthread_cond_broadcast(&s->cv);
  pthread_mutex_unlock(&s->mu);
  pthread_join(s->thread, NULL);
  pthread_mutex_destroy(&s->mu);
  pthread_cond_destroy(&s->cv);
  free(s);
}

static struct fake_event* fake_event_new(unsigned flags) {
  struct fake_event* e = (struct fake_event*)calloc(1, sizeof *e);
  if (e == NULL) return NULL;
  pthread_mutex_init(&e->mu, NULL);
  pthread_cond_init(&e->cv, NULL);
  e->flags = flags;
  return e;
}

/* Queues an event task: a record (kind 2) of a new generation, or a wait (kind 3) for
 * the event's current one. */
static void fake_stream_push_event(struct fake_stream* s, struct fake_event* e, int kind) {
  struct fake_task* t = fake_task_new(kind);
  pthread_mutex_lock(&e->mu);
  t->generation = kind == 2 ? ++e->recorded : e->recorded;
  pthread_mutex_unlock(&e->mu);
  t->event = e;
  fake_stream_push(s, t);
}

static void fake_event_record(struct fake_event* e, struct fake_stream* s) { fake_stream_push_event(s, e, 2); }

static int fake_event_done(struct fake_event* e) {
  pthread_mutex_lock(&e->mu);
  int done = e->completed >= e->recorded;
  pthread_mutex_unlock(&e->mu);
  return done;
}

/* Waits for the event's last record; returns 0 on time, -1 after timeout_ms (< 0: forever). */
static int fake_event_wait(struct fake_event* e, long timeout_ms) {
  int64_t deadline = fake_now_ms() + timeout_ms;
  pthread_mutex_lock(&e->mu);
  uint64_t target = e->recorded;
  while (e->completed < target) {
    if (timeout_ms >= 0 && fake_now_ms() >= deadline) {
      pthread_mutex_unlock(&e->mu);
      return -1;
    }
    struct timespec ts = fake_abstime_in(5);
    pthread_cond_timedwait(&e->cv, &e->mu, &ts);
  }
  pthread_mutex_unlock(&e->mu);
  return 0;
}

/* Queues "wait for the event's current generation" on a stream. */
static void fake_stream_wait_event(struct fake_stream* s, struct fake_event* e) { fake_stream_push_event(s, e, 3); }

/* Marks the stream's current end and waits for it: 0 on time, -1 on timeout. */
static int fake_stream_sync(struct fake_stream* s, long timeout_ms) {
  struct fake_event* e = fake_event_new(0);
  fake_event_record(e, s);
  int rc = fake_event_wait(e, timeout_ms);
  if (rc == 0) {
    pthread_mutex_destroy(&e->mu);
    pthread_cond_destroy(&e->cv);
    free(e);
  }
  /* On timeout the record task still points at e: leak it rather than race. */
  return rc;
}

#endif /* EPD_FAKE_COMMON_H */
