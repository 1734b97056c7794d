/*
 * nsbridge.usernet._flowrelay: UDP and ping (IPv4 and IPv6) for user-mode networking, in a thread
 * that never takes the GIL for a packet of a known flow.
 *
 * Why native code: the Python engine's per-packet cost capped UDP below slirp4netns's
 * loss-free rate (~65k datagrams/s), and an echo at a few per second wakes the process
 * from idle with every cache cold, where the interpreter's wake-up, dispatch and
 * bytecode cost ~100 us more than slirp4netns's C loop (bench/usernet_bench.py).  The
 * sandbox routes ICMP and UDP (DNS excepted) to a second, dedicated tun device
 * (policy-routing rules, see flowrelay.py); this module serves that device:
 *
 *   packet of a known flow:   tun read -> checks -> send() on the flow's host socket
 *                             (a ping socket for echo, a connected UDP socket)
 *   a reply on that socket:   -> ports/id, checksums, IPv4 header -> tun write
 *                             (an echo reply from a local destination is queued inside
 *                             send(), so it is taken at once: no second wake-up)
 *   the first packet of a flow: the Python callback ``new_flow(packet)`` decides (the
 *                             policy, anti-spoofing, the gateway's own answer, the
 *                             socket) and returns the socket's fd or -1;
 *   a host error for a flow:  the Python callback ``on_error(quote, errno)`` writes the
 *                             ICMP unreachable the namespace should see.
 *
 * So the policy still decides every new flow, and the relay itself only builds echo
 * replies and UDP datagrams.  Packet checks live in one sans-IO function,
 * ``classify_request``, exposed as ``classify(packet)`` so tests can feed it crafted
 * bytes without a device.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PACKET_MAX 65535
#define QUOTE_MAX 1280 /* an ICMP error quotes no more than the IPv6 minimum MTU */
#define BATCH 64       /* packets per readiness event, for fairness */
#define EVENTS 64

/* What classify_request says of a packet read from the device. */
enum verdict {
    V_ECHO = 0,    /* a well-formed echo request (ICMP or ICMPv6) */
    V_UDP,         /* a well-formed UDP datagram */
    V_NOT_IP,      /* garbage in the version field */
    V_MALFORMED,   /* too short, bad header length, lengths disagree */
    V_FRAGMENT,    /* a fragment: the engine does not reassemble (neither path does) */
    V_OTHER_PROTO, /* neither ICMP nor UDP (the routing rules make this impossible) */
    V_BAD_CHECKSUM,
    V_OTHER_ICMP,  /* an ICMP error or reply the namespace sent: counted, dropped */
    V_COUNT
};

static const char *const verdict_names[V_COUNT] = {
    "echo", "udp", "not ip", "malformed", "fragment", "other protocol", "bad checksum",
    "other icmp",
};

#define PROTO_ICMP 1
#define PROTO_UDP 17
#define PROTO_ICMPV6 58
#define PROTO_FRAGMENT6 44

static uint32_t ones_add(const uint8_t *p, size_t n, uint32_t sum)
{
    for (; n > 1; p += 2, n -= 2)
        sum += (uint32_t)p[0] << 8 | p[1];
    if (n)
        sum += (uint32_t)p[0] << 8;
    return sum;
}

static uint16_t fold(uint32_t sum)
{
    while (sum >> 16)
        sum = (sum & 0xFFFF) + (sum >> 16);
    return (uint16_t)sum;
}

static uint16_t be16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }

static void put16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

/* The sum of the pseudo-header (addresses of ``alen`` bytes: 4 or 16) of a UDP
 * datagram or ICMPv6 message of ``length`` bytes. */
static uint32_t pseudo_sum(const uint8_t *src, const uint8_t *dst, size_t alen, uint8_t proto,
                           size_t length)
{
    return ones_add(dst, alen, ones_add(src, alen, 0)) + proto + (uint32_t)(length >> 16) +
           (uint32_t)(length & 0xFFFF);
}

/* The checks of an IPv6 packet (no extension headers but a fragment header, which
 * is refused as the IPv4 fragments are). */
static enum verdict classify6(const uint8_t *p, size_t n, size_t *ihl)
{
    if (n < 48 || be16(p + 4) != n - 40)
        return V_MALFORMED;
    const uint8_t nh = p[6];
    const size_t len = n - 40;
    *ihl = 40;
    if (nh == PROTO_FRAGMENT6)
        return V_FRAGMENT;
    if (nh != PROTO_UDP && nh != PROTO_ICMPV6)
        return V_OTHER_PROTO;
    if (nh == PROTO_UDP && be16(p + 44) != len)
        return V_MALFORMED;
    /* Both checksums are mandatory over IPv6 (RFC 8200 8.1). */
    if (fold(ones_add(p + 40, len, pseudo_sum(p + 8, p + 24, 16, nh, len))) != 0xFFFF ||
        (nh == PROTO_UDP && be16(p + 46) == 0))
        return V_BAD_CHECKSUM;
    if (nh == PROTO_UDP)
        return V_UDP;
    return p[40] == 128 && p[41] == 0 ? V_ECHO : V_OTHER_ICMP;
}

/* The sans-IO check of one packet; on V_ECHO and V_UDP, *ihl is the IP header length. */
static enum verdict classify_request(const uint8_t *p, size_t n, size_t *ihl)
{
    if (n >= 1 && p[0] >> 4 == 6)
        return classify6(p, n, ihl);
    if (n < 1 || p[0] >> 4 != 4)
        return V_NOT_IP;
    size_t hl = (size_t)(p[0] & 0x0F) * 4;
    if (hl < 20 || n < hl + 8 || be16(p + 2) != n)
        return V_MALFORMED;
    if (be16(p + 6) & 0x3FFF)
        return V_FRAGMENT;
    if (p[9] != PROTO_ICMP && p[9] != PROTO_UDP)
        return V_OTHER_PROTO;
    if (fold(ones_add(p, hl, 0)) != 0xFFFF)
        return V_BAD_CHECKSUM;
    *ihl = hl;
    if (p[9] == PROTO_UDP) {
        if (be16(p + hl + 4) != n - hl)
            return V_MALFORMED;
        /* A zero checksum means "none" (RFC 768); anything else must add up. */
        if (be16(p + hl + 6) &&
            fold(ones_add(p + hl, n - hl, pseudo_sum(p + 12, p + 16, 4, PROTO_UDP, n - hl))) !=
                0xFFFF)
            return V_BAD_CHECKSUM;
        return V_UDP;
    }
    if (fold(ones_add(p + hl, n - hl, 0)) != 0xFFFF)
        return V_BAD_CHECKSUM;
    if (p[hl] != 8 || p[hl + 1] != 0)
        return V_OTHER_ICMP;
    return V_ECHO;
}

struct flow {
    uint8_t src[16], dst[16]; /* the namespace's addresses: the request's (IPv4: 4 bytes,
                               * then zeros) */
    uint8_t alen;           /* 4 or 16 */
    uint8_t proto;          /* PROTO_ICMP or PROTO_ICMPV6 (an echo "session"), PROTO_UDP */
    uint16_t sport;         /* UDP: the namespace's port; echo: its id (the ping
                             * socket's is the kernel's) */
    uint16_t dport;         /* UDP: the destination port; echo: 0 */
    int fd;                 /* the host ping socket, -1 while the slot is free */
    int next;               /* hash chain, -1 ends it */
    double last;            /* CLOCK_MONOTONIC seconds of the latest request or reply */
    uint32_t ip_sum;        /* the reply header's sum without length and checksum */
    uint16_t quote_len;
    uint8_t quote[QUOTE_MAX]; /* the latest request, for an ICMP error about it */
};

/* Per-protocol counters (index 0: echo, 1: UDP). */
struct counts {
    unsigned long long out, in, bytes_out, bytes_in;  /* requests/datagrams each way */
    unsigned long long flows_total, flows_expired, flows_evicted;
    int active;
};

typedef struct {
    PyObject_HEAD
    int tun;
    int epoll;
    int stop_fd;
    PyObject *new_flow;
    PyObject *on_error;
    double idle_timeout;
    int max_flows;
    int nbuckets;
    int *buckets;
    struct flow *flows;
    int active;
    pthread_t thread;
    int running;
    /* Counters: written by the relay thread only and read without a lock (a torn read
     * of a growing 64-bit counter does not happen on the supported architectures). */
    struct counts kind[2];
    unsigned long long frames_in, bytes_in, frames_out, bytes_out;
    unsigned long long rejected[V_COUNT];
    unsigned long long tun_full, send_full, send_errors, callback_errors;
    uint8_t buf[PACKET_MAX + 1];
    uint8_t out[PACKET_MAX + 1];
} Relay;

static int kind_of(uint8_t proto) { return proto == PROTO_UDP; }

static double now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Flows are keyed by protocol, address length, both 16-byte (zero-padded) addresses
 * and both ports (echo: the id and 0). */
static unsigned bucket_of(const Relay *r, uint8_t proto, const uint8_t *src, const uint8_t *dst,
                          uint16_t sport, uint16_t dport)
{
    /* The address length is not hashed: a 16-byte address equal to a zero-padded IPv4
     * one only shares a bucket, find_flow compares it. */
    uint32_t h = ((uint32_t)sport << 16 | dport) * 3266489917u ^ proto;
    for (int k = 0; k < 16; k += 4) {
        uint32_t a, b;
        memcpy(&a, src + k, 4);
        memcpy(&b, dst + k, 4);
        h = (h ^ a) * 2654435761u;
        h = (h ^ b) * 2246822519u;
    }
    return (h ^ (h >> 15)) & (unsigned)(r->nbuckets - 1);
}

static int find_flow(const Relay *r, uint8_t proto, uint8_t alen, const uint8_t *src,
                     const uint8_t *dst, uint16_t sport, uint16_t dport)
{
    int i = r->buckets[bucket_of(r, proto, src, dst, sport, dport)];
    for (; i >= 0; i = r->flows[i].next) {
        const struct flow *f = &r->flows[i];
        if (f->sport == sport && f->dport == dport && f->proto == proto &&
            !memcmp(f->src, src, 16) && !memcmp(f->dst, dst, 16) && f->alen == alen)
            return i;
    }
    return -1;
}

static void remove_flow(Relay *r, int i)
{
    struct flow *f = &r->flows[i];
    int *link = &r->buckets[bucket_of(r, f->proto, f->src, f->dst, f->sport, f->dport)];
    while (*link != i)
        link = &r->flows[*link].next;
    *link = f->next;
    epoll_ctl(r->epoll, EPOLL_CTL_DEL, f->fd, NULL);
    close(f->fd);
    f->fd = -1;
    r->active--;
    r->kind[kind_of(f->proto)].active--;
}

/* A free slot; when all are taken, the least recently used flow gives its up (as the
 * Python engine's FlowTable evicts its oldest). */
static int free_slot(Relay *r)
{
    int oldest = -1;
    for (int i = 0; i < r->max_flows; i++) {
        if (r->flows[i].fd < 0)
            return i;
        if (oldest < 0 || r->flows[i].last < r->flows[oldest].last)
            oldest = i;
    }
    r->kind[kind_of(r->flows[oldest].proto)].flows_evicted++;
    remove_flow(r, oldest);
    return oldest;
}

static void write_tun(Relay *r, const uint8_t *p, size_t n)
{
    if (write(r->tun, p, n) < 0) {
        r->tun_full++; /* EAGAIN (the namespace is not reading) or the device is gone */
        return;
    }
    r->frames_out++;
    r->bytes_out += n;
}

/* Call Python's on_error(quote, errno), taking the GIL for it. */
static void call_on_error(Relay *r, const uint8_t *quote, size_t len, int err)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *res = PyObject_CallFunction(r->on_error, "y#i", (const char *)quote,
                                          (Py_ssize_t)len, err);
    if (res == NULL) {
        r->callback_errors++;
        PyErr_WriteUnraisable(r->on_error);
    }
    Py_XDECREF(res);
    PyGILState_Release(gil);
}

/* Hand an error the host reported for a flow to Python, which answers the namespace. */
static void report_error(Relay *r, struct flow *f, int err)
{
    call_on_error(r, f->quote, f->quote_len, err);
}

/* The IP header of a packet from the flow's destination back to the namespace. */
static void reply_header(const struct flow *f, uint8_t *out, size_t total)
{
    if (f->alen == 16) {
        out[0] = 0x60;
        out[1] = out[2] = out[3] = 0;
        put16(out + 4, (uint16_t)(total - 40));
        out[6] = f->proto;
        out[7] = 64;
        memcpy(out + 8, f->dst, 16);
        memcpy(out + 24, f->src, 16);
        return;
    }
    out[0] = 0x45;
    out[1] = 0;
    put16(out + 2, (uint16_t)total);
    put16(out + 4, 0);
    put16(out + 6, 0x4000);
    out[8] = 64;
    out[9] = f->proto;
    memcpy(out + 12, f->dst, 4);
    memcpy(out + 16, f->src, 4);
    put16(out + 10, (uint16_t)~fold(f->ip_sum + total));
}

/* Relay the flow's queued replies (at most a batch) to the tun. */
static void drain_replies(Relay *r, struct flow *f)
{
    uint8_t *out = r->out;
    const int udp = f->proto == PROTO_UDP;
    const size_t ip = f->alen == 16 ? 40 : 20;  /* the IP header's length */
    const size_t head = ip + (udp ? 8 : 0);      /* where the received bytes go */
    uint8_t *l4 = out + ip;
    struct counts *c = &r->kind[udp];
    int got = 0;
    for (int k = 0; k < BATCH; k++) {
        ssize_t m = recv(f->fd, out + head, PACKET_MAX - head, MSG_DONTWAIT | MSG_TRUNC);
        if (m < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                break;
            if (errno != EINTR)
                report_error(r, f, errno);
            continue;
        }
        if ((size_t)m > PACKET_MAX - head) {
            r->rejected[V_MALFORMED]++; /* more than an IP packet holds: dropped */
            continue;
        }
        size_t total = head + (size_t)m;
        size_t length = total - ip; /* of the UDP datagram or ICMP message */
        if (udp) {
            put16(l4, f->dport);
            put16(l4 + 2, f->sport);
            put16(l4 + 4, (uint16_t)length);
            put16(l4 + 6, 0);
        } else {
            uint8_t reply = f->alen == 16 ? 129 : 0;
            if (m < 8 || l4[0] != reply) /* not an echo reply */
                continue;
            /* The reply carries the kernel's id; the namespace must see its own. */
            l4[1] = 0;
            put16(l4 + 2, 0);
            put16(l4 + 4, f->sport);
        }
        /* UDP and ICMPv6 sum a pseudo-header; ICMP over IPv4 does not. */
        uint32_t pseudo = f->proto == PROTO_ICMP
                              ? 0
                              : pseudo_sum(f->dst, f->src, f->alen, f->proto, length);
        uint16_t sum = (uint16_t)~fold(ones_add(l4, length, pseudo));
        put16(l4 + (udp ? 6 : 2), udp && !sum ? 0xFFFF : sum); /* UDP: 0 means "none" */
        reply_header(f, out, total);
        c->in++; /* counted before the write, so a reader of the reply sees it counted */
        c->bytes_in += (size_t)m;
        got++;
        write_tun(r, out, total);
    }
    if (got)
        f->last = now_seconds();
}

/* Ask Python about a packet with no flow; the new flow's slot, or -1. */
static int open_flow(Relay *r, const uint8_t *p, size_t n, uint8_t proto, uint8_t alen,
                     const uint8_t *src, const uint8_t *dst, uint16_t sport, uint16_t dport)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    long fd = -1;
    PyObject *res = PyObject_CallFunction(r->new_flow, "y#", (const char *)p, (Py_ssize_t)n);
    if (res != NULL) {
        fd = PyLong_AsLong(res);
        Py_DECREF(res);
    }
    if (PyErr_Occurred()) {
        r->callback_errors++;
        PyErr_WriteUnraisable(r->new_flow);
        fd = -1;
    }
    PyGILState_Release(gil);
    if (fd < 0)
        return -1;
    int i = free_slot(r);
    struct flow *f = &r->flows[i];
    memcpy(f->src, src, 16);
    memcpy(f->dst, dst, 16);
    f->alen = alen;
    f->proto = proto;
    f->sport = sport;
    f->dport = dport;
    f->fd = (int)fd;
    /* IPv4: version/IHL, DF, TTL 64 + protocol, the reply's addresses: fixed per flow. */
    f->ip_sum = ones_add(f->dst, 4, ones_add(f->src, 4, 0x4500 + 0x4000 + (64 << 8 | proto)));
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i + 2};
    if (epoll_ctl(r->epoll, EPOLL_CTL_ADD, f->fd, &ev) < 0) {
        close(f->fd);
        f->fd = -1;
        r->callback_errors++;
        return -1;
    }
    unsigned b = bucket_of(r, proto, f->src, f->dst, sport, dport);
    f->next = r->buckets[b];
    r->buckets[b] = i;
    r->active++;
    r->kind[kind_of(proto)].active++;
    r->kind[kind_of(proto)].flows_total++;
    return i;
}

static void handle_request(Relay *r, const uint8_t *p, size_t n)
{
    size_t ihl;
    enum verdict v = classify_request(p, n, &ihl);
    if (v != V_ECHO && v != V_UDP) {
        r->rejected[v]++;
        return;
    }
    const int udp = v == V_UDP;
    const int v6 = p[0] >> 4 == 6;
    const uint8_t alen = v6 ? 16 : 4;
    const uint8_t proto = udp ? PROTO_UDP : v6 ? PROTO_ICMPV6 : PROTO_ICMP;
    const uint16_t sport = be16(p + ihl + (udp ? 0 : 4)); /* UDP source port, echo id */
    const uint16_t dport = udp ? be16(p + ihl + 2) : 0;
    uint8_t src[16] = {0}, dst[16] = {0};
    memcpy(src, p + (v6 ? 8 : 12), alen);
    memcpy(dst, p + (v6 ? 24 : 16), alen);
    struct counts *c = &r->kind[udp];
    if (!udp)
        c->out++; /* every echo request counts (as in the engine); a datagram once sent */
    int i = find_flow(r, proto, alen, src, dst, sport, dport);
    if (i < 0) {
        i = open_flow(r, p, n, proto, alen, src, dst, sport, dport);
        if (i < 0)
            return;
    }
    struct flow *f = &r->flows[i];
    f->quote_len = (uint16_t)(n < QUOTE_MAX ? n : QUOTE_MAX);
    memcpy(f->quote, p, f->quote_len);
    f->last = now_seconds();
    /* UDP: the payload; echo: the ICMP message as is (the kernel sets id and checksum). */
    const uint8_t *data = p + ihl + (udp ? 8 : 0);
    size_t len = n - ihl - (udp ? 8 : 0);
    for (int attempt = 0;; attempt++) {
        if (send(f->fd, data, len, MSG_DONTWAIT) >= 0)
            break;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            r->send_full++;
            return;
        }
        /* An error about an earlier packet was only collected by this send: report it
         * and send once more, as the engine does. */
        report_error(r, f, errno);
        if (attempt) {
            r->send_errors++;
            return;
        }
    }
    if (udp)
        c->out++;
    c->bytes_out += len;
    /* A destination on this host answers an echo inside send(): take the reply now and
     * save the thread a second wake-up.  A far one costs one EAGAIN here. */
    if (!udp)
        drain_replies(r, f);
}

/* Read a batch from the device; 0, or the errno that says the device is gone. */
static int drain_tun(Relay *r)
{
    for (int k = 0; k < BATCH; k++) {
        ssize_t n = read(r->tun, r->buf, sizeof r->buf);
        if (n < 0)
            return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR ? 0 : errno;
        if (n == 0)
            return 0;
        r->frames_in++;
        r->bytes_in += (size_t)n;
        handle_request(r, r->buf, (size_t)n);
    }
    return 0;
}

/* The device is gone (the command deleted it, or its namespace ended): tell Python
 * once, with an empty quote, and end the thread (a level-triggered error would spin).
 * The namespace's routes through the device went with it, so its UDP and ping fall
 * back to the main device, and the engine. */
static void device_gone(Relay *r, int err)
{
    call_on_error(r, (const uint8_t *)"", 0, err);
}

static void sweep(Relay *r, double now)
{
    for (int i = 0; i < r->max_flows; i++) {
        if (r->flows[i].fd >= 0 && now - r->flows[i].last > r->idle_timeout) {
            r->kind[kind_of(r->flows[i].proto)].flows_expired++;
            remove_flow(r, i);
        }
    }
}

static void *relay_main(void *arg)
{
    Relay *r = arg;
    struct epoll_event events[EVENTS];
    double interval = r->idle_timeout / 4 < 1.0 ? r->idle_timeout / 4 : 1.0;
    double next_sweep = now_seconds() + interval;
    for (;;) {
        int timeout = -1;
        if (r->active) {
            double wait = next_sweep - now_seconds();
            timeout = wait > 0 ? (int)(wait * 1000) + 1 : 0;
        }
        int n = epoll_wait(r->epoll, events, EVENTS, timeout);
        if (n < 0 && errno != EINTR)
            break;
        for (int k = 0; k < n; k++) {
            uint32_t tag = events[k].data.u32;
            if (tag == 0)
                return NULL; /* stop */
            if (tag == 1) {
                int err = drain_tun(r);
                if (!err && events[k].events & (EPOLLERR | EPOLLHUP))
                    err = EBADFD;
                if (err) {
                    device_gone(r, err);
                    return NULL;
                }
                continue;
            }
            struct flow *f = &r->flows[tag - 2];
            if (f->fd >= 0)
                drain_replies(r, f);
        }
        double now = now_seconds();
        if (now >= next_sweep) {
            sweep(r, now);
            next_sweep = now + interval;
        }
    }
    return NULL;
}

/* ---- the Python type --------------------------------------------------------------- */

static int Relay_init(Relay *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"tun_fd", "new_flow", "on_error", "idle_timeout", "max_flows",
                             NULL};
    int tun;
    PyObject *new_flow, *on_error;
    double idle = 60.0;
    int max_flows = 4096;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iOO|di", kwlist, &tun, &new_flow,
                                     &on_error, &idle, &max_flows))
        return -1;
    if (self->flows != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Relay.__init__ called twice");
        return -1;
    }
    if (!PyCallable_Check(new_flow) || !PyCallable_Check(on_error)) {
        PyErr_SetString(PyExc_TypeError, "new_flow and on_error must be callable");
        return -1;
    }
    if (max_flows < 1 || max_flows > (1 << 20) || !(idle > 0)) {
        PyErr_SetString(PyExc_ValueError, "max_flows must be 1..1048576, idle_timeout > 0");
        return -1;
    }
    self->tun = tun;
    self->idle_timeout = idle;
    self->max_flows = max_flows;
    self->nbuckets = 1;
    while (self->nbuckets < max_flows)
        self->nbuckets <<= 1;
    self->flows = PyMem_RawCalloc((size_t)max_flows, sizeof *self->flows);
    if (self->flows == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (int i = 0; i < max_flows; i++)
        self->flows[i].fd = -1;
    self->buckets = PyMem_RawMalloc((size_t)self->nbuckets * sizeof *self->buckets);
    if (self->buckets == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (int b = 0; b < self->nbuckets; b++)
        self->buckets[b] = -1;
    Py_INCREF(new_flow);
    Py_INCREF(on_error);
    self->new_flow = new_flow;
    self->on_error = on_error;
    self->epoll = epoll_create1(EPOLL_CLOEXEC);
    self->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (self->epoll < 0 || self->stop_fd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    struct epoll_event stop = {.events = EPOLLIN, .data.u32 = 0};
    struct epoll_event dev = {.events = EPOLLIN, .data.u32 = 1};
    if (epoll_ctl(self->epoll, EPOLL_CTL_ADD, self->stop_fd, &stop) < 0 ||
        epoll_ctl(self->epoll, EPOLL_CTL_ADD, tun, &dev) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return 0;
}

static PyObject *Relay_start(Relay *self, PyObject *Py_UNUSED(ignored))
{
    if (self->flows == NULL || self->running || self->epoll < 0) {
        PyErr_SetString(PyExc_RuntimeError, "Relay.start(): not initialised, running or stopped");
        return NULL;
    }
    int err = pthread_create(&self->thread, NULL, relay_main, self);
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    self->running = 1;
    Py_RETURN_NONE;
}

/* Stop the thread and close every flow's socket (idempotent; the tun fd stays the
 * caller's).  The GIL is released while joining: the thread may be waiting for it. */
static void relay_stop(Relay *self)
{
    if (self->running) {
        uint64_t one = 1;
        if (write(self->stop_fd, &one, sizeof one) < 0) {
            /* cannot happen for a fresh eventfd; the join below would hang, so: */
            pthread_cancel(self->thread);
        }
        Py_BEGIN_ALLOW_THREADS
        pthread_join(self->thread, NULL);
        Py_END_ALLOW_THREADS
        self->running = 0;
    }
    if (self->flows != NULL) {
        for (int i = 0; i < self->max_flows; i++)
            if (self->flows[i].fd >= 0)
                remove_flow(self, i);
    }
    if (self->epoll >= 0)
        close(self->epoll);
    if (self->stop_fd >= 0)
        close(self->stop_fd);
    self->epoll = self->stop_fd = -1;
}

static PyObject *Relay_stop(Relay *self, PyObject *Py_UNUSED(ignored))
{
    relay_stop(self);
    Py_RETURN_NONE;
}

static int add_count(PyObject *dict, const char *name, unsigned long long value)
{
    PyObject *v = PyLong_FromUnsignedLongLong(value);
    if (v == NULL)
        return -1;
    int rc = PyDict_SetItemString(dict, name, v);
    Py_DECREF(v);
    return rc;
}

static PyObject *counts_dict(const struct counts *c, const char *out, const char *in)
{
    PyObject *d = PyDict_New();
    if (d == NULL)
        return NULL;
    if (add_count(d, out, c->out) < 0 || add_count(d, in, c->in) < 0 ||
        add_count(d, "bytes_out", c->bytes_out) < 0 || add_count(d, "bytes_in", c->bytes_in) < 0 ||
        add_count(d, "flows_active", (unsigned long long)c->active) < 0 ||
        add_count(d, "flows_total", c->flows_total) < 0 ||
        add_count(d, "flows_expired", c->flows_expired) < 0 ||
        add_count(d, "flows_evicted", c->flows_evicted) < 0) {
        Py_DECREF(d);
        return NULL;
    }
    return d;
}

static PyObject *Relay_stats(Relay *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *d = PyDict_New();
    PyObject *rejected = PyDict_New();
    PyObject *icmp = counts_dict(&self->kind[0], "requests", "replies");
    PyObject *udp = counts_dict(&self->kind[1], "datagrams_out", "datagrams_in");
    if (d == NULL || rejected == NULL || icmp == NULL || udp == NULL)
        goto fail;
    for (int v = V_NOT_IP; v < V_COUNT; v++)
        if (self->rejected[v] && add_count(rejected, verdict_names[v], self->rejected[v]) < 0)
            goto fail;
    if (add_count(d, "frames_in", self->frames_in) < 0 ||
        add_count(d, "bytes_in", self->bytes_in) < 0 ||
        add_count(d, "frames_out", self->frames_out) < 0 ||
        add_count(d, "bytes_out", self->bytes_out) < 0 ||
        add_count(d, "tun_full", self->tun_full) < 0 ||
        add_count(d, "send_full", self->send_full) < 0 ||
        add_count(d, "send_errors", self->send_errors) < 0 ||
        add_count(d, "callback_errors", self->callback_errors) < 0 ||
        PyDict_SetItemString(d, "icmp", icmp) < 0 || PyDict_SetItemString(d, "udp", udp) < 0 ||
        PyDict_SetItemString(d, "rejected", rejected) < 0)
        goto fail;
    Py_DECREF(rejected);
    Py_DECREF(icmp);
    Py_DECREF(udp);
    return d;
fail:
    Py_XDECREF(d);
    Py_XDECREF(rejected);
    Py_XDECREF(icmp);
    Py_XDECREF(udp);
    return NULL;
}

static void Relay_dealloc(Relay *self)
{
    relay_stop(self);
    Py_XDECREF(self->new_flow);
    Py_XDECREF(self->on_error);
    PyMem_RawFree(self->flows);
    PyMem_RawFree(self->buckets);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Relay_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    Relay *self = (Relay *)type->tp_alloc(type, 0);
    if (self != NULL) {
        self->tun = self->epoll = self->stop_fd = -1;
    }
    return (PyObject *)self;
}

static PyMethodDef Relay_methods[] = {
    {"start", (PyCFunction)Relay_start, METH_NOARGS, "Start the relay thread."},
    {"stop", (PyCFunction)Relay_stop, METH_NOARGS,
     "Stop the thread and close every flow's socket (idempotent)."},
    {"stats", (PyCFunction)Relay_stats, METH_NOARGS, "The counters, as a dict."},
    {NULL},
};

static PyTypeObject RelayType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "nsbridge.usernet._flowrelay.Relay",
    .tp_doc = PyDoc_STR("Relay(tun_fd, new_flow, on_error, idle_timeout=60.0, max_flows=4096)"),
    .tp_basicsize = sizeof(Relay),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Relay_new,
    .tp_init = (initproc)Relay_init,
    .tp_dealloc = (destructor)Relay_dealloc,
    .tp_methods = Relay_methods,
};

static PyObject *classify(PyObject *Py_UNUSED(module), PyObject *arg)
{
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    size_t ihl = 0;
    enum verdict v = classify_request(view.buf, (size_t)view.len, &ihl);
    PyBuffer_Release(&view);
    return PyUnicode_FromString(verdict_names[v]);
}

static PyMethodDef module_methods[] = {
    {"classify", classify, METH_O,
     "What the relay makes of one IPv4 packet: 'echo', 'udp' or why it drops it."},
    {NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_flowrelay",
    "UDP and ping for user-mode networking, in native code (see flowrelay.py).", -1,
    module_methods,
};

PyMODINIT_FUNC PyInit__flowrelay(void)
{
    if (PyType_Ready(&RelayType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&RelayType);
    if (PyModule_AddObject(m, "Relay", (PyObject *)&RelayType) < 0) {
        Py_DECREF(&RelayType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
