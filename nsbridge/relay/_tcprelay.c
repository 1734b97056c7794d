/*
 * nsbridge.relay._tcprelay: the per-connection hot path of the TCP relay, in C.
 *
 * Why native code: every event of a relayed connection costs the Python relay
 * (relay/tcp.py) an interpreter dispatch around its two syscalls, which on request/
 * response traffic is most of a forwarder's CPU (issue 19; docs/performance.md).  Here
 * an established pair -- the client socket and the target socket, both connected, the
 * PROXY header (if any) sent -- is handed to a Core, which relays it to the end with
 * no Python at all.  Python keeps everything that decides: accepting, the ACL, the
 * connect and its timeout, -v logging and the statistics (from close records this
 * module queues).
 *
 * The semantics are relay/tcp.py's, line for line (its tests run against both):
 *
 *   half-close   EOF from one side becomes shutdown(SHUT_WR) on the other once every
 *                byte before it was written; the other direction keeps flowing;
 *   resets       a failed read or write, or EPOLLERR with a pending SO_ERROR, aborts
 *                the pair with SO_LINGER {1, 0} on both sockets: the peers see resets;
 *   backpressure a direction reads nothing more until what it read was written;
 *   movers       "splice": reads up to small_read bytes are copied through one shared
 *                buffer; a read that fills it makes the direction bulk, which then
 *                splices through a pooled pipe (held only while bytes wait in it),
 *                and a splice read under small_read / 4 makes it copy again.
 *                "copy": one shared buffer of 1 MiB, never a pipe;
 *   edges        both sockets registered once, edge-triggered, IN|OUT|RDHUP; an IN
 *                edge without RDHUP/HUP whose read was short ends after its write,
 *                without the read that would only say EAGAIN.
 *
 * Integration with the Python event loop (relay/loop.py): the Core's epoll set holds
 * the Python loop's own epoll fd, level-triggered.  The loop calls Core.wait(timeout)
 * instead of its own epoll_wait: connection events are served here, and wait()
 * returns when the Python side has something to do (its epoll fd is readable), its
 * timer is due, or connections ended (their records are waiting).  wait() serves with
 * the GIL released (it touches no Python object); every other method runs with it held
 * and refuses to run while a wait is in progress in another thread, so the Core's state
 * needs no lock of its own.
 *
 * Accepting in C (issue 19 step 2): Core.listen() hands the core a forward's listener
 * whose per-connection work needs no Python (no ACL, no PROXY header, TCP both sides,
 * no -v line).  The core then accepts (accept4, batches until EAGAIN), takes a target
 * socket from the listener's pool (made by Python's socket factory in the target's
 * namespace and put in with pool_put()), connects it, and relays the pair when the
 * connect completed at once -- a local target's usual case.  Everything else is handed
 * back to Python, which runs its own path for it (same -v lines, same counters):
 *   - a connect that did not complete at once (slow, refused, unreachable): the client,
 *     the target socket and connect's errno go back, and Python's session finishes the
 *     connect (its timeout, its outcome words);
 *   - the pool is empty (a burst outran the refill): the client goes back alone, and
 *     Python makes its target socket -- a client is never dropped for want of one;
 *   - accept() failed other than EAGAIN / a client gone (EMFILE, EINVAL of a listener
 *     shut down...): the core stops watching the listener and reports the errno; Python's
 *     Acceptor takes the listener over and applies its rules (back-off, stop listening).
 * wait() returns (bit 2) when hand-backs wait or a pool fell under its low-water mark.
 *
 * Memory: a connection is one struct conn (well under 200 bytes); copied bytes that the
 * destination could not take yet get a private malloc'd copy until written; pipes only
 * while spliced bytes wait.  So idle connections cost their struct and their sockets.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define EVENTS 512
#define COPY_BUFFER (1 << 20)      /* the copy mover's buffer, as relay/tcp.py's _CHUNK */
#define DEFAULT_PIPE_SIZE (1 << 20)
#define MAX_IDLE_PIPES 64
#define REGISTER_MASK (EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET)
#define SPLICE_FLAGS (SPLICE_F_MOVE | SPLICE_F_NONBLOCK)

/* How a connection ended (close records carry it, Python words it). */
enum outcome {
    OUT_CLOSED = 0,       /* "closed" */
    OUT_CLIENT_RESET = 1, /* "client reset (ERRNO)" */
    OUT_SERVER_RESET = 2, /* "server reset (ERRNO)" */
    OUT_ABORTED = 3,      /* reset on Python's request (its words) */
    OUT_NO_PREAMBLE = 4,  /* "server did not take the PROXY header" */
};

struct dir {
    char *data;        /* pending copied bytes: a private copy, or the shared buffer */
    int pipe_r, pipe_w; /* spliced: where pending bytes wait (-1: no pipe) */
    uint32_t pending;  /* bytes read from src and not yet written to dst */
    uint8_t eof;       /* src said EOF */
    uint8_t done;      /* EOF passed on to dst */
    uint8_t bulk;      /* splice from now on */
    uint8_t drained;   /* the last read was short: src had nothing more queued */
    uint8_t owned;     /* data is a private malloc'd copy */
    uint64_t total;    /* bytes written to dst */
};

struct conn {
    struct conn *prev, *next; /* the Core's list of live connections */
    int fd[2];                /* 0: client, 1: server */
    uint32_t slot;            /* the forward's counters */
    uint8_t ended;
    uint8_t exclusive;        /* no other reference to either file: close() leaves epoll */
    uint8_t c_accepted;       /* accepted by the core itself: Python has not counted it */
    uint8_t code;             /* enum outcome, once ended */
    int err;                  /* the errno behind a reset */
    int64_t token;            /* Python's name for the connection (records carry it) */
    struct peer *peer;        /* accepted by the core at -v: who the client is */
    uint64_t started_ns;
    struct dir up;            /* client -> server */
    struct dir down;          /* server -> client */
};

struct slot_counters {
    uint64_t active;
    uint64_t c_open;             /* of active: accepted by the core (Python counts them
                                    from their records) */
    uint64_t live_up, live_down; /* bytes moved by connections still open */
};

/* The client's address, kept only for the -v line of a pair the core accepted. */
struct peer {
    socklen_t len;
    struct sockaddr_in6 addr; /* room for either family */
};

struct record {
    struct peer *peer;
    uint32_t slot;
    uint8_t code;
    int err;
    int64_t token;
    uint64_t up, down;
    double duration;
};

/* A listener the core accepts from (Core.listen). */
struct listener {
    int fd;                  /* Python's: the core never closes it */
    uint32_t slot;
    int armed;               /* in the core's epoll set */
    int want_peer;           /* records name the client (-v) */
    int low;                 /* refill wanted below this many pooled sockets */
    int cap;
    int n_pool;
    int *pool;               /* pre-made target sockets, non-blocking */
    socklen_t target_len;
    struct sockaddr_storage target;
    uint64_t aborted;        /* clients gone before accept (ECONNABORTED, EPROTO) */
    uint64_t empty;          /* clients handed back because the pool was empty */
    uint64_t slow;           /* connects handed back (not completed at once) */
};

/* Something the core hands back to Python (take_handbacks). */
struct handback {
    int lid;
    int client;              /* -1: an accept error (code is its errno) */
    int server;              /* -1: the pool was empty */
    int code;                /* connect's (or accept's) errno */
};

/* A socket option set on each relayed socket as its pair starts (Core(sockopts=...)):
 * the tuning knobs of issue 19 (buffer sizes, TCP_NOTSENT_LOWAT, SO_BUSY_POLL), given by
 * Python so the C side needs no knowledge of which one won. */
struct sockopt {
    int sides;               /* bit 0: the client socket, bit 1: the server socket */
    int level, name, value;
};
#define MAX_SOCKOPTS 8

#define LISTENER_TAG 2u      /* epoll data: a struct listener index << 2 | LISTENER_TAG */
#define MAX_LISTENERS 4096

typedef struct {
    PyObject_HEAD
    int epfd;
    int outer_fd;            /* the Python loop's epoll fd, nested in ours */
    int copy_only;           /* the copy mover */
    int always_splice;       /* small_read 0: every read splices */
    uint32_t buf_size;       /* the shared copy buffer's size */
    uint32_t back_to_copy;
    int pipe_size;
    char *buf;
    int idle_pipes[MAX_IDLE_PIPES][2];
    int n_idle_pipes;
    int pipes_open;          /* every pipe we hold, idle or in use (tests read it) */
    struct conn live;        /* list head */
    uint64_t n_live;
    struct conn *dead;       /* ended this batch, freed after it (epoll may still name them) */
    struct slot_counters *slots;
    uint32_t n_slots;
    struct record *records;
    size_t n_records, cap_records;
    int record_failed;       /* a record could not be queued (out of memory) */
    struct listener **listeners; /* by id; NULL: free */
    int n_listeners;
    struct handback *handbacks;
    size_t n_handbacks, cap_handbacks;
    int pool_low;            /* some listener's pool is under its low-water mark */
    int waiting;             /* a wait() serves without the GIL: other calls must not run */
    struct sockopt sockopts[MAX_SOCKOPTS];
    int n_sockopts;
    uint64_t sockopt_failed; /* setsockopt calls the kernel refused (EPERM without
                                CAP_NET_ADMIN, say): the pair relays untuned */
} Core;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void dir_init(struct dir *d)
{
    memset(d, 0, sizeof(*d));
    d->pipe_r = d->pipe_w = -1;
}

/* ---- the pipe pool --------------------------------------------------------------- */

static int pipe_acquire(Core *core, struct dir *d)
{
    if (core->n_idle_pipes) {
        core->n_idle_pipes--;
        d->pipe_r = core->idle_pipes[core->n_idle_pipes][0];
        d->pipe_w = core->idle_pipes[core->n_idle_pipes][1];
        return 0;
    }
    int p[2];
    if (pipe2(p, O_NONBLOCK | O_CLOEXEC) < 0)
        return -1;
    /* Bigger pipes move more per splice; the kernel may cap it: keep what we got. */
    int got = fcntl(p[1], F_SETPIPE_SZ, core->pipe_size);
    if (got > 0)
        core->pipe_size = got;
    core->pipes_open++;
    d->pipe_r = p[0];
    d->pipe_w = p[1];
    return 0;
}

static void pipe_discard(Core *core, struct dir *d)
{
    close(d->pipe_r);
    close(d->pipe_w);
    core->pipes_open--;
    d->pipe_r = d->pipe_w = -1;
}

static void pipe_release(Core *core, struct dir *d)
{
    if (core->n_idle_pipes < MAX_IDLE_PIPES) {
        core->idle_pipes[core->n_idle_pipes][0] = d->pipe_r;
        core->idle_pipes[core->n_idle_pipes][1] = d->pipe_w;
        core->n_idle_pipes++;
        d->pipe_r = d->pipe_w = -1;
    } else {
        pipe_discard(core, d);
    }
}

/* Forget what a direction holds (its pipe back to the pool, or discarded if full). */
static void dir_drop(Core *core, struct dir *d)
{
    if (d->pipe_r >= 0) {
        if (d->pending)
            pipe_discard(core, d);
        else
            pipe_release(core, d);
    }
    if (d->owned)
        free(d->data);
    d->owned = 0;
    d->data = NULL;
    d->pending = 0;
}

/* ---- ending ---------------------------------------------------------------------- */

static void queue_record(Core *core, struct conn *c)
{
    if (core->n_records == core->cap_records) {
        size_t cap = core->cap_records ? core->cap_records * 2 : 64;
        struct record *grown = realloc(core->records, cap * sizeof(*grown));
        if (!grown) {
            core->record_failed = 1;
            free(c->peer);
            c->peer = NULL;
            return;
        }
        core->records = grown;
        core->cap_records = cap;
    }
    struct record *r = &core->records[core->n_records++];
    r->peer = c->peer;
    c->peer = NULL;
    r->slot = c->slot;
    r->code = c->code;
    r->err = c->err;
    r->token = c->token;
    r->up = c->up.total;
    r->down = c->down.total;
    r->duration = (double)(now_ns() - c->started_ns) / 1e9;
}

static void conn_close(Core *core, struct conn *c, int code, int err)
{
    if (c->ended)
        return;
    c->ended = 1;
    c->code = (uint8_t)code;
    c->err = err;
    dir_drop(core, &c->up);
    dir_drop(core, &c->down);
    for (int i = 0; i < 2; i++) {
        if (!c->exclusive)
            epoll_ctl(core->epfd, EPOLL_CTL_DEL, c->fd[i], NULL);
        close(c->fd[i]);
    }
    struct slot_counters *s = &core->slots[c->slot];
    s->active--;
    if (c->c_accepted)
        s->c_open--;
    s->live_up -= c->up.total;
    s->live_down -= c->down.total;
    queue_record(core, c);
    c->prev->next = c->next;
    c->next->prev = c->prev;
    core->n_live--;
    c->next = core->dead; /* freed after the batch: its events may still be in it */
    core->dead = c;
}

static void conn_abort(Core *core, struct conn *c, int code, int err)
{
    static const struct linger reset = {1, 0};
    if (c->ended)
        return;
    for (int i = 0; i < 2; i++)
        setsockopt(c->fd[i], SOL_SOCKET, SO_LINGER, &reset, sizeof(reset));
    conn_close(core, c, code, err);
}

/* A reset because the socket fd[side] failed with err. */
static void abort_from(Core *core, struct conn *c, int side, int err)
{
    conn_abort(core, c, side == 0 ? OUT_CLIENT_RESET : OUT_SERVER_RESET, err);
}

static void free_dead(Core *core)
{
    while (core->dead) {
        struct conn *c = core->dead;
        core->dead = c->next;
        free(c);
    }
}

/* ---- moving bytes ---------------------------------------------------------------- */

/* Results of fill/flush, as relay/tcp.py's exceptions. */
#define MOVED 0
#define WOULD_BLOCK (-1)
#define SRC_FAILED (-2)
#define DST_FAILED (-3)

static inline int side_of(struct conn *c, struct dir *d) { return d == &c->up ? 0 : 1; }
static inline int src_fd(struct conn *c, struct dir *d) { return c->fd[side_of(c, d)]; }
static inline int dst_fd(struct conn *c, struct dir *d) { return c->fd[1 - side_of(c, d)]; }

static inline void count(Core *core, struct conn *c, struct dir *d, uint64_t n)
{
    d->total += n;
    if (d == &c->up)
        core->slots[c->slot].live_up += n;
    else
        core->slots[c->slot].live_down += n;
}

/* Read into the source side: *n the bytes read (0: EOF). */
static int fill(Core *core, struct conn *c, struct dir *d, ssize_t *n)
{
    if (!d->bulk && !core->always_splice) {
        ssize_t got = read(src_fd(c, d), core->buf, core->buf_size);
        if (got < 0)
            return errno == EAGAIN ? WOULD_BLOCK : SRC_FAILED;
        d->pending = (uint32_t)got;
        d->data = core->buf;
        d->drained = (uint32_t)got < core->buf_size;
        if (!core->copy_only)
            d->bulk = !d->drained;
        *n = got;
        return MOVED;
    }
    if (d->pipe_r < 0 && pipe_acquire(core, d) < 0)
        return SRC_FAILED; /* out of fds or pipe quota: as a failed read, a reset */
    d->drained = 0;
    ssize_t got = splice(src_fd(c, d), NULL, d->pipe_w, NULL, (size_t)core->pipe_size,
                         SPLICE_FLAGS);
    if (got < 0) {
        if (errno == EAGAIN) {
            pipe_release(core, d); /* idle connections hold no pipe */
            return WOULD_BLOCK;
        }
        return SRC_FAILED;
    }
    d->pending = (uint32_t)got;
    if ((uint32_t)got < core->back_to_copy)
        d->bulk = 0;
    *n = got;
    return MOVED;
}

/* Write pending bytes: MOVED when all are written. */
static int flush(Core *core, struct conn *c, struct dir *d)
{
    int dst = dst_fd(c, d);
    if (d->pipe_r >= 0) {
        while (d->pending) {
            ssize_t n = splice(d->pipe_r, NULL, dst, NULL, d->pending, SPLICE_FLAGS);
            if (n < 0)
                return errno == EAGAIN ? WOULD_BLOCK : DST_FAILED;
            d->pending -= (uint32_t)n;
            count(core, c, d, (uint64_t)n);
        }
        pipe_release(core, d);
        return MOVED;
    }
    while (d->pending) {
        ssize_t n = write(dst, d->data, d->pending);
        if (n < 0) {
            if (errno != EAGAIN)
                return DST_FAILED;
            if (!d->owned) {
                /* The shared buffer is reused by the next read: keep a private copy. */
                char *copy = malloc(d->pending);
                if (!copy) {
                    errno = ENOMEM;
                    return DST_FAILED;
                }
                memcpy(copy, d->data, d->pending);
                d->data = copy;
                d->owned = 1;
            }
            return WOULD_BLOCK;
        }
        d->pending -= (uint32_t)n;
        count(core, c, d, (uint64_t)n);
        if (!d->owned)
            d->data += n;
        else if (d->pending)
            memmove(d->data, d->data + n, d->pending);
    }
    if (d->owned)
        free(d->data);
    d->owned = 0;
    d->data = NULL;
    return MOVED;
}

static void finish(Core *core, struct conn *c, struct dir *d)
{
    if (d->done)
        return;
    d->done = 1;
    dir_drop(core, d);
    struct dir *other = d == &c->up ? &c->down : &c->up;
    if (other->done) {
        /* dst already sent its FIN and we read it: close() sends ours. */
        conn_close(core, c, OUT_CLOSED, 0);
        return;
    }
    if (shutdown(dst_fd(c, d), SHUT_WR) < 0)
        abort_from(core, c, 1 - side_of(c, d), errno);
}

/* Move src -> dst until src is empty, dst full, or src ends (relay/tcp.py _pump). */
static void pump(Core *core, struct conn *c, struct dir *d, int edge)
{
    for (;;) {
        if (d->pending) {
            int r = flush(core, c, d);
            if (r == WOULD_BLOCK)
                return;
            if (r == DST_FAILED) {
                abort_from(core, c, 1 - side_of(c, d), errno);
                return;
            }
        }
        if (d->eof) {
            finish(core, c, d);
            return;
        }
        ssize_t n = 0;
        int r = fill(core, c, d, &n);
        if (r == WOULD_BLOCK)
            return;
        if (r == SRC_FAILED) {
            abort_from(core, c, side_of(c, d), errno);
            return;
        }
        if (n == 0) {
            d->eof = 1;
        } else if (edge && d->drained) {
            r = flush(core, c, d); /* written or not, the next edge resumes us */
            if (r == DST_FAILED)
                abort_from(core, c, 1 - side_of(c, d), errno);
            return;
        }
    }
}

/* An IN edge of request/response traffic: one copied read and, when it was short, its
 * write.  1: served; 0: the caller pumps on (EOF, a full buffer, or a bulk direction). */
static int serve_edge(Core *core, struct conn *c, struct dir *d)
{
    if (d->bulk || core->always_splice)
        return 0;
    ssize_t n = read(src_fd(c, d), core->buf, core->buf_size);
    if (n < 0) {
        if (errno == EAGAIN)
            return 1;
        abort_from(core, c, side_of(c, d), errno);
        return 1;
    }
    if (n == 0) {
        d->eof = 1;
        return 0;
    }
    if ((uint32_t)n == core->buf_size) {
        d->pending = (uint32_t)n;
        d->data = core->buf;
        d->drained = 0;
        if (!core->copy_only)
            d->bulk = 1;
        return 0;
    }
    ssize_t written = write(dst_fd(c, d), core->buf, (size_t)n);
    if (written < 0) {
        if (errno != EAGAIN) {
            abort_from(core, c, 1 - side_of(c, d), errno);
            return 1;
        }
        written = 0;
    }
    count(core, c, d, (uint64_t)written);
    if (written < n) {
        uint32_t rest = (uint32_t)(n - written);
        char *copy = malloc(rest);
        if (!copy) {
            abort_from(core, c, 1 - side_of(c, d), ENOMEM);
            return 1;
        }
        memcpy(copy, core->buf + written, rest);
        d->data = copy;
        d->owned = 1;
        d->pending = rest;
    }
    return 1;
}

static void on_readable(Core *core, struct conn *c, struct dir *d, uint32_t events)
{
    if (events & (EPOLLRDHUP | EPOLLHUP)) {
        pump(core, c, d, 0);
        return;
    }
    if (serve_edge(core, c, d))
        return;
    if (!c->ended)
        pump(core, c, d, 1);
}

/* An event on c->fd[side] (relay/tcp.py _on_client / _on_server). */
static void on_event(Core *core, struct conn *c, int side, uint32_t events)
{
    struct dir *reading = side == 0 ? &c->up : &c->down;
    struct dir *writing = side == 0 ? &c->down : &c->up;
    if (events & EPOLLERR) {
        int code = 0;
        socklen_t len = sizeof(code);
        if (getsockopt(c->fd[side], SOL_SOCKET, SO_ERROR, &code, &len) == 0 && code) {
            abort_from(core, c, side, code);
            return;
        }
    }
    if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP) && !reading->pending)
        on_readable(core, c, reading, events);
    if (events & EPOLLOUT && writing->pending && !c->ended)
        pump(core, c, writing, 0);
}

/* ---- starting a pair ------------------------------------------------------------- */

/* Relay an established pair from now on (Core.add, and the core's own accepts).  -1:
 * out of memory, both fds closed (the client with a reset); a pair that fails at once
 * (the header refused, epoll full) ends with a record like any other. */
static int conn_start(Core *self, int client_fd, int server_fd, uint32_t slot, int64_t token,
                      const void *preamble, Py_ssize_t preamble_len, int exclusive,
                      int nodelay, int c_accepted, struct peer *peer)
{
    struct conn *c = calloc(1, sizeof(*c));
    if (!c) {
        free(peer);
        static const struct linger reset = {1, 0};
        setsockopt(client_fd, SOL_SOCKET, SO_LINGER, &reset, sizeof(reset));
        close(client_fd);
        close(server_fd);
        return -1;
    }
    c->fd[0] = client_fd;
    c->fd[1] = server_fd;
    c->slot = slot;
    c->token = token;
    c->exclusive = (uint8_t)exclusive;
    c->c_accepted = (uint8_t)c_accepted;
    c->peer = peer;
    c->started_ns = now_ns();
    dir_init(&c->up);
    dir_init(&c->down);
    static const int one = 1;
    for (int i = 0; i < 2; i++)
        if (nodelay & (1 << i))
            setsockopt(c->fd[i], IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    for (int k = 0; k < self->n_sockopts; k++) {
        const struct sockopt *o = &self->sockopts[k];
        for (int i = 0; i < 2; i++)
            if ((o->sides & (1 << i)) &&
                setsockopt(c->fd[i], o->level, o->name, &o->value, sizeof(o->value)) < 0)
                self->sockopt_failed++;
    }
    /* Counted live from here: conn_close undoes it, whichever way the pair ends. */
    self->slots[slot].active++;
    if (c_accepted)
        self->slots[slot].c_open++;
    c->next = self->live.next;
    c->prev = &self->live;
    self->live.next->prev = c;
    self->live.next = c;
    self->n_live++;
    if (preamble_len) {
        /* A fresh connection's send buffer always has room for a ~100-byte header. */
        ssize_t sent = send(server_fd, preamble, (size_t)preamble_len, MSG_NOSIGNAL);
        if (sent < 0) {
            conn_abort(self, c, OUT_SERVER_RESET, errno);
            return 0;
        }
        if (sent != preamble_len) {
            conn_abort(self, c, OUT_NO_PREAMBLE, 0);
            return 0;
        }
    }
    /* Registered only now: adding an fd to epoll reports what is already pending (a
     * request, even a FIN), so nothing has to be pumped by hand. */
    for (int i = 0; i < 2; i++) {
        struct epoll_event ev = {.events = REGISTER_MASK,
                                 .data.u64 = (uint64_t)(uintptr_t)c | (uint64_t)i};
        if (epoll_ctl(self->epfd, EPOLL_CTL_ADD, c->fd[i], &ev) < 0) {
            /* Out of memory for epoll, or a socket epoll refuses: a reset, counted. */
            conn_abort(self, c, i == 0 ? OUT_CLIENT_RESET : OUT_SERVER_RESET, errno);
            break;
        }
    }
    return 0;
}

/* ---- accepting ------------------------------------------------------------------- */

#define ACCEPT_BATCH 64 /* as relay/accept.py: a burst in few wake-ups, others get turns */

static void hand_back(Core *core, int lid, int client, int server, int code)
{
    if (core->n_handbacks == core->cap_handbacks) {
        size_t cap = core->cap_handbacks ? core->cap_handbacks * 2 : 16;
        struct handback *grown = realloc(core->handbacks, cap * sizeof(*grown));
        if (!grown) {
            /* Nowhere to put it: the client gets a reset rather than silence. */
            static const struct linger reset = {1, 0};
            if (client >= 0) {
                setsockopt(client, SOL_SOCKET, SO_LINGER, &reset, sizeof(reset));
                close(client);
            }
            if (server >= 0)
                close(server);
            core->record_failed = 1;
            return;
        }
        core->handbacks = grown;
        core->cap_handbacks = cap;
    }
    struct handback *h = &core->handbacks[core->n_handbacks++];
    h->lid = lid;
    h->client = client;
    h->server = server;
    h->code = code;
}

static void listener_disarm(Core *core, struct listener *l)
{
    if (l->armed) {
        epoll_ctl(core->epfd, EPOLL_CTL_DEL, l->fd, NULL);
        l->armed = 0;
    }
}

/* Connect a pooled socket to the target: 0 when connected, else connect's errno. */
static int connect_now(int fd, const struct sockaddr *to, socklen_t len)
{
    if (connect(fd, to, len) == 0)
        return 0;
    if (errno != EINPROGRESS)
        return errno;
    /* As relay/tcp.py: to a local target the handshake is done by the time connect()
     * returns, and a second connect() says so -- no OUT event, no SO_ERROR read. */
    if (connect(fd, to, len) == 0 || errno == EISCONN)
        return 0;
    return errno == EALREADY ? EINPROGRESS : errno;
}

static void on_listener(Core *core, int lid)
{
    struct listener *l = core->listeners[lid];
    if (!l || !l->armed)
        return;
    for (int i = 0; i < ACCEPT_BATCH; i++) {
        struct sockaddr_in6 addr;
        socklen_t addr_len = sizeof(addr);
        int client = accept4(l->fd, l->want_peer ? (struct sockaddr *)&addr : NULL,
                             l->want_peer ? &addr_len : NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (client < 0) {
            int err = errno;
            if (err == EAGAIN)
                return;
            if (err == ECONNABORTED || err == EPROTO) {
                l->aborted++;
                continue;
            }
            /* Out of fds or memory, the listener shut down, or worse: Python's Acceptor
             * takes the listener over and applies its rules. */
            listener_disarm(core, l);
            hand_back(core, lid, -1, -1, err);
            return;
        }
        if (!l->n_pool) {
            l->empty++;
            hand_back(core, lid, client, -1, 0);
            continue;
        }
        int server = l->pool[--l->n_pool];
        if (l->n_pool < l->low)
            core->pool_low = 1;
        int code = connect_now(server, (struct sockaddr *)&l->target, l->target_len);
        if (code) {
            l->slow++;
            hand_back(core, lid, client, server, code);
            continue;
        }
        struct peer *peer = NULL;
        if (l->want_peer && (peer = malloc(sizeof(*peer))) != NULL) {
            peer->len = addr_len < sizeof(addr) ? addr_len : sizeof(addr);
            memcpy(&peer->addr, &addr, peer->len);
        }
        conn_start(core, client, server, l->slot, -1, NULL, 0, 1, 3, 1, peer);
    }
}

static void listener_free(Core *core, int lid)
{
    struct listener *l = core->listeners[lid];
    if (!l)
        return;
    listener_disarm(core, l);
    for (int i = 0; i < l->n_pool; i++)
        close(l->pool[i]);
    free(l->pool);
    free(l);
    core->listeners[lid] = NULL;
}

/* ---- the Python type ------------------------------------------------------------- */

static int Core_init(Core *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"outer_fd", "copy", "small_read", "pipe_size", "sockopts",
                             NULL};
    int outer_fd, copy = 0, small_read = 64 << 10, pipe_size = DEFAULT_PIPE_SIZE;
    PyObject *sockopts = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "i|piiO", kwlist, &outer_fd, &copy,
                                     &small_read, &pipe_size, &sockopts))
        return -1;
    if (sockopts && sockopts != Py_None) {
        PyObject *seq = PySequence_Fast(sockopts, "sockopts must be a sequence");
        if (!seq)
            return -1;
        Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
        if (n > MAX_SOCKOPTS) {
            Py_DECREF(seq);
            PyErr_Format(PyExc_ValueError, "at most %d sockopts", MAX_SOCKOPTS);
            return -1;
        }
        for (Py_ssize_t i = 0; i < n; i++) {
            struct sockopt *o = &self->sockopts[i];
            if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i),
                                  "iiii;a sockopt is (sides, level, name, value)", &o->sides,
                                  &o->level, &o->name, &o->value)) {
                Py_DECREF(seq);
                return -1;
            }
            if (o->sides < 1 || o->sides > 3) {
                Py_DECREF(seq);
                PyErr_SetString(PyExc_ValueError,
                                "a sockopt's sides is 1 (client), 2 (server) or 3 (both)");
                return -1;
            }
        }
        self->n_sockopts = (int)n;
        Py_DECREF(seq);
    }
    if (self->epfd >= 0) {
        PyErr_SetString(PyExc_RuntimeError, "Core is already initialised");
        return -1;
    }
    if (small_read < 0 || pipe_size <= 0) {
        PyErr_SetString(PyExc_ValueError, "small_read must be >= 0 and pipe_size > 0");
        return -1;
    }
    self->copy_only = copy;
    self->always_splice = !copy && small_read == 0;
    self->buf_size = copy ? COPY_BUFFER : (uint32_t)(small_read ? small_read : 1);
    self->back_to_copy = (uint32_t)small_read / 4;
    self->pipe_size = pipe_size;
    self->buf = malloc(self->buf_size);
    if (!self->buf) {
        PyErr_NoMemory();
        return -1;
    }
    self->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (self->epfd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    if (epoll_ctl(self->epfd, EPOLL_CTL_ADD, outer_fd, &ev) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    self->outer_fd = outer_fd;
    return 0;
}

static PyObject *Core_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    Core *self = (Core *)type->tp_alloc(type, 0);
    if (!self)
        return NULL;
    self->epfd = -1;
    self->outer_fd = -1;
    self->live.next = self->live.prev = &self->live;
    return (PyObject *)self;
}

static void abort_all(Core *self, int code)
{
    while (self->live.next != &self->live)
        conn_abort(self, self->live.next, code, 0);
    free_dead(self);
}

static void release_listeners(Core *self)
{
    for (int i = 0; i < self->n_listeners; i++)
        listener_free(self, i);
    free(self->listeners);
    self->listeners = NULL;
    self->n_listeners = 0;
    static const struct linger reset = {1, 0};
    for (size_t i = 0; i < self->n_handbacks; i++) {
        struct handback *h = &self->handbacks[i];
        if (h->client >= 0) {
            setsockopt(h->client, SOL_SOCKET, SO_LINGER, &reset, sizeof(reset));
            close(h->client);
        }
        if (h->server >= 0)
            close(h->server);
    }
    free(self->handbacks);
    self->handbacks = NULL;
    self->n_handbacks = self->cap_handbacks = 0;
    self->pool_low = 0;
}

static void Core_dealloc(Core *self)
{
    if (self->epfd >= 0) {
        release_listeners(self);
        abort_all(self, OUT_ABORTED);
        close(self->epfd);
    }
    while (self->n_idle_pipes) {
        self->n_idle_pipes--;
        close(self->idle_pipes[self->n_idle_pipes][0]);
        close(self->idle_pipes[self->n_idle_pipes][1]);
    }
    free(self->buf);
    free(self->slots);
    for (size_t i = 0; i < self->n_records; i++)
        free(self->records[i].peer);
    free(self->records);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Another thread's call while wait() serves without the GIL would race with it. */
static int busy(Core *self)
{
    if (self->waiting) {
        PyErr_SetString(PyExc_RuntimeError, "the Core is waiting in another thread");
        return 1;
    }
    return 0;
}

static int check_open(Core *self)
{
    if (busy(self))
        return -1;
    if (self->epfd < 0) {
        PyErr_SetString(PyExc_ValueError, "the Core is closed");
        return -1;
    }
    return 0;
}

static PyObject *Core_new_slot(Core *self, PyObject *noargs)
{
    if (check_open(self) < 0)
        return NULL;
    struct slot_counters *grown = realloc(self->slots, (self->n_slots + 1) * sizeof(*grown));
    if (!grown)
        return PyErr_NoMemory();
    self->slots = grown;
    memset(&grown[self->n_slots], 0, sizeof(*grown));
    return PyLong_FromUnsignedLong(self->n_slots++);
}

PyDoc_STRVAR(Core_add_doc,
"add(client_fd, server_fd, slot, token, preamble=b'', exclusive=True, nodelay=3)\n"
"Relay an established pair to its end; the Core owns (and closes) both fds from now\n"
"on, even when this raises (bad arguments only).  ``preamble`` is sent to the server first (a PROXY\n"
"header); ``exclusive``: nothing else holds either file, so closing it is enough to\n"
"leave epoll; ``nodelay``: bit 0 sets TCP_NODELAY on the client, bit 1 on the server.\n"
"A pair that fails at once (the header refused) ends with a record like any other.");

static PyObject *Core_add(Core *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"client_fd", "server_fd", "slot", "token", "preamble",
                             "exclusive", "nodelay", NULL};
    int client_fd, server_fd, exclusive = 1, nodelay = 3;
    unsigned int slot;
    long long token;
    Py_buffer preamble = {0};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iiIL|y*pi", kwlist, &client_fd, &server_fd,
                                     &slot, &token, &preamble, &exclusive, &nodelay))
        return NULL;
    PyObject *result = NULL;
    if (check_open(self) < 0 || client_fd < 0 || server_fd < 0 || client_fd == server_fd ||
        slot >= self->n_slots) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "bad fds or unknown slot");
        goto fail;
    }
    if (conn_start(self, client_fd, server_fd, slot, token, preamble.buf, preamble.len,
                   exclusive, nodelay, 0, NULL) < 0) {
        PyErr_NoMemory();
        client_fd = server_fd = -1; /* closed by conn_start */
        goto fail;
    }
    free_dead(self);
    result = Py_None;
    Py_INCREF(result);
    PyBuffer_Release(&preamble);
    return result;
fail:
    if (client_fd >= 0)
        close(client_fd);
    if (server_fd >= 0 && server_fd != client_fd)
        close(server_fd);
    PyBuffer_Release(&preamble);
    return NULL;
}

PyDoc_STRVAR(Core_wait_doc,
"wait(timeout_ms) -> int\n"
"Serve connection events until the Python loop's epoll fd is readable (bit 0 of the\n"
"result), connections ended (bit 1: take_records() has them), a listener handed work\n"
"back or a pool wants refilling (bit 2: take_handbacks(), pool_wants()), or the\n"
"timeout passes.\n"
"-1 waits without a timeout.  The GIL is released while waiting.");

static PyObject *Core_wait(Core *self, PyObject *arg)
{
    int timeout = (int)PyLong_AsLong(arg);
    if (timeout == -1 && PyErr_Occurred())
        return NULL;
    if (check_open(self) < 0)
        return NULL;
    struct epoll_event events[EVENTS];
    int outer_ready = 0;
    if (self->n_records || self->n_handbacks || self->pool_low)
        timeout = 0; /* queued outside a wait (add, abort_slot) or left: out first */
    uint64_t deadline = timeout > 0 ? now_ns() + (uint64_t)timeout * 1000000u : 0;
    /* The GIL is released once for the whole serving loop, not around each epoll_wait:
     * under load the loop turns thousands of times a second without returning, and a
     * release and re-take per turn was most of the core's own user time (the profile in
     * docs/performance.md).  Nothing below touches a Python object; the other methods
     * refuse to run while a wait is in progress (self->waiting), so the core's state
     * still needs no lock of its own. */
    int n = 0, err = 0;
    self->waiting = 1;
    Py_BEGIN_ALLOW_THREADS
    for (;;) {
        n = epoll_wait(self->epfd, events, EVENTS, timeout);
        if (n < 0) {
            err = errno;
            break;
        }
        for (int i = 0; i < n; i++) {
            uint64_t data = events[i].data.u64;
            if (data == 0) {
                outer_ready = 1;
                continue;
            }
            if ((data & 3) == LISTENER_TAG) {
                on_listener(self, (int)(data >> 2));
                continue;
            }
            struct conn *c = (struct conn *)(uintptr_t)(data & ~(uint64_t)1);
            if (!c->ended)
                on_event(self, c, (int)(data & 1), events[i].events);
        }
        free_dead(self);
        /* Only connection events, all served: wait on here, without a round trip
         * through the interpreter, until the Python side has work or its timer is due. */
        if (outer_ready || self->n_records || self->n_handbacks || self->pool_low || n == 0 ||
            timeout == 0)
            break;
        if (timeout > 0) {
            uint64_t now = now_ns();
            if (now >= deadline)
                break;
            timeout = (int)((deadline - now + 999999u) / 1000000u);
        }
    }
    Py_END_ALLOW_THREADS
    self->waiting = 0;
    if (n < 0) {
        if (err != EINTR) {
            errno = err;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        if (PyErr_CheckSignals() < 0)
            return NULL;
        /* else: let the loop look at its signals and timers */
    }
    return PyLong_FromLong(outer_ready | (self->n_records ? 2 : 0) |
                           (self->n_handbacks || self->pool_low ? 4 : 0));
}

PyDoc_STRVAR(Core_take_records_doc,
"take_records() -> list of (slot, token, bytes_up, bytes_down, duration, code, errno,\n"
"peer)\n"
"The connections that ended since the last call.  code: 0 closed, 1 client reset,\n"
"2 server reset, 3 aborted on request, 4 the server did not take the PROXY header.\n"
"peer: the client's raw sockaddr when the core accepted it for a listener with\n"
"peer=True, else None.");

static PyObject *Core_take_records(Core *self, PyObject *noargs)
{
    if (busy(self))
        return NULL;
    PyObject *list = PyList_New((Py_ssize_t)self->n_records);
    if (!list)
        return NULL;
    for (size_t i = 0; i < self->n_records; i++) {
        struct record *r = &self->records[i];
        PyObject *peer;
        if (r->peer)
            peer = PyBytes_FromStringAndSize((const char *)&r->peer->addr,
                                             (Py_ssize_t)r->peer->len);
        else
            peer = Py_NewRef(Py_None);
        PyObject *item = peer ? Py_BuildValue("(ILKKdiiN)", r->slot, r->token,
                                              (unsigned long long)r->up,
                                              (unsigned long long)r->down, r->duration,
                                              (int)r->code, r->err, peer)
                              : NULL;
        if (!item) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)i, item);
    }
    for (size_t i = 0; i < self->n_records; i++) {
        free(self->records[i].peer);
        self->records[i].peer = NULL;
    }
    self->n_records = 0;
    if (self->cap_records > 4096) { /* give a burst's memory back */
        free(self->records);
        self->records = NULL;
        self->cap_records = 0;
    }
    return list;
}

PyDoc_STRVAR(Core_abort_slot_doc,
"abort_slot(slot)\n"
"Reset every open connection of the forward ``slot`` now (records with code 3).");

static PyObject *Core_abort_slot(Core *self, PyObject *arg)
{
    unsigned long slot = PyLong_AsUnsignedLong(arg);
    if (slot == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    if (check_open(self) < 0)
        return NULL;
    struct conn *c = self->live.next;
    while (c != &self->live) {
        struct conn *next = c->next;
        if (c->slot == slot)
            conn_abort(self, c, OUT_ABORTED, 0);
        c = next;
    }
    free_dead(self);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(Core_slot_doc,
"slot(slot) -> (active, bytes_up, bytes_down, c_open)\n"
"The forward's open connections, the bytes they moved so far, and how many of the\n"
"open ones the core accepted itself (Python has not counted those yet).");

static PyObject *Core_slot(Core *self, PyObject *arg)
{
    if (busy(self))
        return NULL;
    unsigned long slot = PyLong_AsUnsignedLong(arg);
    if (slot == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    if (slot >= self->n_slots) {
        PyErr_SetString(PyExc_ValueError, "unknown slot");
        return NULL;
    }
    struct slot_counters *s = &self->slots[slot];
    return Py_BuildValue("(KKKK)", (unsigned long long)s->active,
                         (unsigned long long)s->live_up, (unsigned long long)s->live_down,
                         (unsigned long long)s->c_open);
}

static PyObject *Core_info(Core *self, PyObject *noargs)
{
    if (busy(self))
        return NULL;
    return Py_BuildValue("{sKsisisisnsK}", "connections", (unsigned long long)self->n_live,
                         "pipes_open", self->pipes_open, "idle_pipes", self->n_idle_pipes,
                         "record_failed", self->record_failed, "conn_size",
                         (Py_ssize_t)sizeof(struct conn), "sockopt_failed",
                         (unsigned long long)self->sockopt_failed);
}

PyDoc_STRVAR(Core_close_doc,
"close()\n"
"Reset every open connection (records with code 3) and release the epoll set and\n"
"the pipes.  The records stay readable with take_records().");

static PyObject *Core_close(Core *self, PyObject *noargs)
{
    if (busy(self))
        return NULL;
    if (self->epfd < 0)
        Py_RETURN_NONE;
    release_listeners(self);
    abort_all(self, OUT_ABORTED);
    close(self->epfd);
    self->epfd = -1;
    while (self->n_idle_pipes) {
        self->n_idle_pipes--;
        close(self->idle_pipes[self->n_idle_pipes][0]);
        close(self->idle_pipes[self->n_idle_pipes][1]);
        self->pipes_open--;
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(Core_listen_doc,
"listen(listener_fd, slot, family, host, port, scope_id=0, low=8, cap=32, peer=False)\n"
"-> int\n"
"Accept from the listening socket ``listener_fd`` in the core (it stays the caller's:\n"
"unlisten() before closing it) and relay each client to host:port with a socket from\n"
"this listener's pool (pool_put()); refill wanted below ``low``, ``cap`` at most.\n"
"``peer``: records carry each client's address (for -v lines; a small malloc per\n"
"connection).  Returns the listener's id.  What the core cannot finish is handed back.");

static PyObject *Core_listen(Core *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"listener_fd", "slot", "family", "host", "port", "scope_id",
                             "low", "cap", "peer", NULL};
    int fd, family, port, low = 8, cap = 32, want_peer = 0;
    unsigned int slot, scope_id = 0;
    const char *host;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iIisi|Iiip", kwlist, &fd, &slot, &family,
                                     &host, &port, &scope_id, &low, &cap, &want_peer))
        return NULL;
    if (check_open(self) < 0)
        return NULL;
    if (fd < 0 || slot >= self->n_slots || port < 0 || port > 65535 || low < 0 || cap < 1 ||
        low > cap || (family != AF_INET && family != AF_INET6)) {
        PyErr_SetString(PyExc_ValueError, "bad listener fd, slot, family, port or pool size");
        return NULL;
    }
    struct listener *l = calloc(1, sizeof(*l));
    if (!l)
        return PyErr_NoMemory();
    l->pool = malloc((size_t)cap * sizeof(int));
    if (!l->pool) {
        free(l);
        return PyErr_NoMemory();
    }
    l->fd = fd;
    l->slot = slot;
    l->low = low;
    l->cap = cap;
    l->want_peer = want_peer;
    int ok;
    if (family == AF_INET) {
        struct sockaddr_in *a = (struct sockaddr_in *)&l->target;
        a->sin_family = AF_INET;
        a->sin_port = htons((uint16_t)port);
        ok = inet_pton(AF_INET, host, &a->sin_addr);
        l->target_len = sizeof(*a);
    } else {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)&l->target;
        a->sin6_family = AF_INET6;
        a->sin6_port = htons((uint16_t)port);
        a->sin6_scope_id = scope_id;
        ok = inet_pton(AF_INET6, host, &a->sin6_addr);
        l->target_len = sizeof(*a);
    }
    if (ok != 1) {
        free(l->pool);
        free(l);
        PyErr_Format(PyExc_ValueError, "not a numeric address: %s", host);
        return NULL;
    }
    int lid = -1;
    for (int i = 0; i < self->n_listeners; i++)
        if (!self->listeners[i]) {
            lid = i;
            break;
        }
    if (lid < 0) {
        if (self->n_listeners >= MAX_LISTENERS) {
            free(l->pool);
            free(l);
            PyErr_SetString(PyExc_ValueError, "too many listeners in one core");
            return NULL;
        }
        struct listener **grown = realloc(self->listeners,
                                          (size_t)(self->n_listeners + 1) * sizeof(*grown));
        if (!grown) {
            free(l->pool);
            free(l);
            return PyErr_NoMemory();
        }
        self->listeners = grown;
        lid = self->n_listeners++;
    }
    struct epoll_event ev = {.events = EPOLLIN,
                             .data.u64 = ((uint64_t)lid << 2) | LISTENER_TAG};
    if (epoll_ctl(self->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
        free(l->pool);
        free(l);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    l->armed = 1;
    self->listeners[lid] = l;
    self->pool_low = self->pool_low || low > 0;
    return PyLong_FromLong(lid);
}

static struct listener *listener_arg(Core *self, int lid)
{
    if (lid < 0 || lid >= self->n_listeners || !self->listeners[lid]) {
        PyErr_SetString(PyExc_ValueError, "unknown listener");
        return NULL;
    }
    return self->listeners[lid];
}

PyDoc_STRVAR(Core_unlisten_doc,
"unlisten(lid)\n"
"Stop accepting from the listener and close its pooled sockets (not the listener).\n"
"Hand-backs already queued for it stay queued.");

static PyObject *Core_unlisten(Core *self, PyObject *arg)
{
    if (busy(self))
        return NULL;
    int lid = (int)PyLong_AsLong(arg);
    if (lid == -1 && PyErr_Occurred())
        return NULL;
    if (!listener_arg(self, lid))
        return NULL;
    listener_free(self, lid);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(Core_pool_put_doc,
"pool_put(lid, fd) -> bool\n"
"Give the listener's pool one unconnected TCP socket of the target's family (made\n"
"non-blocking here); the core owns it from the call on.  False: the pool was full and\n"
"the socket was closed.");

static PyObject *Core_pool_put(Core *self, PyObject *args)
{
    int lid, fd;
    if (!PyArg_ParseTuple(args, "ii", &lid, &fd))
        return NULL;
    struct listener *l = busy(self) ? NULL : listener_arg(self, lid);
    if (!l || fd < 0) {
        if (fd >= 0)
            close(fd);
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "bad fd");
        return NULL;
    }
    if (l->n_pool >= l->cap) {
        close(fd);
        Py_RETURN_FALSE;
    }
    int flags = fcntl(fd, F_GETFL);
    if (flags >= 0 && !(flags & O_NONBLOCK))
        fcntl(fd, F_SETFL, flags | O_NONBLOCK);
    l->pool[l->n_pool++] = fd;
    Py_RETURN_TRUE;
}

PyDoc_STRVAR(Core_pool_wants_doc,
"pool_wants() -> list of (lid, count)\n"
"Listeners whose pool is under its low-water mark, and how many sockets fill it.");

static PyObject *Core_pool_wants(Core *self, PyObject *noargs)
{
    if (busy(self))
        return NULL;
    PyObject *list = PyList_New(0);
    if (!list)
        return NULL;
    for (int i = 0; i < self->n_listeners; i++) {
        struct listener *l = self->listeners[i];
        if (!l || l->n_pool >= l->low)
            continue;
        PyObject *item = Py_BuildValue("(ii)", i, l->cap - l->n_pool);
        if (!item || PyList_Append(list, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(list);
            return NULL;
        }
        Py_DECREF(item);
    }
    self->pool_low = 0;
    return list;
}

PyDoc_STRVAR(Core_take_handbacks_doc,
"take_handbacks() -> list of (lid, client_fd, server_fd, code)\n"
"What the core's listeners handed back since the last call; the caller owns the fds.\n"
"client_fd -1: accept() failed with errno ``code`` and the core stopped watching the\n"
"listener.  server_fd -1: the pool was empty.  Otherwise connect() did not complete at\n"
"once and ``code`` is its errno (EINPROGRESS: still connecting).");

static PyObject *Core_take_handbacks(Core *self, PyObject *noargs)
{
    if (busy(self))
        return NULL;
    PyObject *list = PyList_New((Py_ssize_t)self->n_handbacks);
    if (!list)
        return NULL;
    for (size_t i = 0; i < self->n_handbacks; i++) {
        struct handback *h = &self->handbacks[i];
        PyObject *item = Py_BuildValue("(iiii)", h->lid, h->client, h->server, h->code);
        if (!item) {
            /* The fds of the items not built yet stay queued for the next call. */
            memmove(self->handbacks, self->handbacks + i,
                    (self->n_handbacks - i) * sizeof(*h));
            self->n_handbacks -= i;
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)i, item);
    }
    self->n_handbacks = 0;
    return list;
}

PyDoc_STRVAR(Core_listener_info_doc,
"listener_info(lid) -> dict: pooled, armed, aborted, empty, slow");

static PyObject *Core_listener_info(Core *self, PyObject *arg)
{
    if (busy(self))
        return NULL;
    int lid = (int)PyLong_AsLong(arg);
    if (lid == -1 && PyErr_Occurred())
        return NULL;
    struct listener *l = listener_arg(self, lid);
    if (!l)
        return NULL;
    return Py_BuildValue("{sisisKsKsK}", "pooled", l->n_pool, "armed", l->armed, "aborted",
                         (unsigned long long)l->aborted, "empty", (unsigned long long)l->empty,
                         "slow", (unsigned long long)l->slow);
}

static PyMethodDef Core_methods[] = {
    {"listen", (PyCFunction)(void (*)(void))Core_listen, METH_VARARGS | METH_KEYWORDS,
     Core_listen_doc},
    {"unlisten", (PyCFunction)Core_unlisten, METH_O, Core_unlisten_doc},
    {"pool_put", (PyCFunction)Core_pool_put, METH_VARARGS, Core_pool_put_doc},
    {"pool_wants", (PyCFunction)Core_pool_wants, METH_NOARGS, Core_pool_wants_doc},
    {"take_handbacks", (PyCFunction)Core_take_handbacks, METH_NOARGS, Core_take_handbacks_doc},
    {"listener_info", (PyCFunction)Core_listener_info, METH_O, Core_listener_info_doc},
    {"new_slot", (PyCFunction)Core_new_slot, METH_NOARGS,
     PyDoc_STR("new_slot() -> int: counters for one more forward")},
    {"add", (PyCFunction)(void (*)(void))Core_add, METH_VARARGS | METH_KEYWORDS, Core_add_doc},
    {"wait", (PyCFunction)Core_wait, METH_O, Core_wait_doc},
    {"take_records", (PyCFunction)Core_take_records, METH_NOARGS, Core_take_records_doc},
    {"abort_slot", (PyCFunction)Core_abort_slot, METH_O, Core_abort_slot_doc},
    {"slot", (PyCFunction)Core_slot, METH_O, Core_slot_doc},
    {"info", (PyCFunction)Core_info, METH_NOARGS,
     PyDoc_STR("info() -> dict: connections, pipes_open, idle_pipes, record_failed, "
               "conn_size, sockopt_failed")},
    {"close", (PyCFunction)Core_close, METH_NOARGS, Core_close_doc},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject CoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "nsbridge.relay._tcprelay.Core",
    .tp_doc = PyDoc_STR("Core(outer_fd, copy=False, small_read=65536, pipe_size=1048576, "
                        "sockopts=())\n"
                        "sockopts: (sides, level, name, int value) tuples set on each "
                        "relayed socket as its pair starts; sides bit 0 the client, bit 1 "
                        "the server."),
    .tp_basicsize = sizeof(Core),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Core_new,
    .tp_init = (initproc)Core_init,
    .tp_dealloc = (destructor)Core_dealloc,
    .tp_methods = Core_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_tcprelay",
    "The TCP relay's per-connection hot path in C (see relay/native.py).", -1, NULL,
};

PyMODINIT_FUNC PyInit__tcprelay(void)
{
    if (PyType_Ready(&CoreType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    Py_INCREF(&CoreType);
    if (PyModule_AddObject(m, "Core", (PyObject *)&CoreType) < 0) {
        Py_DECREF(&CoreType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
