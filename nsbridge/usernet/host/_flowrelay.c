/*
 * nsbridge.usernet.host._flowrelay: UDP and ping (IPv4 and IPv6) for user-mode networking, in a
 * thread that never takes the GIL for a packet of a known flow.
 *
 * Why native code: the Python engine's per-packet cost capped UDP below slirp4netns's
 * loss-free rate, and an echo at a few per second wakes the process from idle with
 * every cache cold, where the interpreter's wake-up, dispatch and bytecode cost more
 * than slirp4netns's C loop (figures: docs/history.md, bench/usernet_bench.py).  The
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
#include <netinet/icmp6.h>
#include <netinet/in.h>
#include <netinet/ip.h>
#include <netinet/ip6.h>
#include <netinet/ip_icmp.h>
#include <netinet/udp.h>
#include <pthread.h>
#include <stddef.h>
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
#define REPLY_TTL 64   /* the hop limit of what the relay writes, as the engine's */

/* ---- packet layout ----------------------------------------------------------------
 *
 * Headers are read and written through the <netinet/> structs.  A packet is a byte
 * buffer with no alignment promise (a tun read, a Python buffer), so a header is
 * copied into a local struct (memcpy: one load for the compiler) and never cast in
 * place; where a checksum needs a header's bytes, offsetof() names where they are. */

#define IP4_HLEN sizeof(struct iphdr)   /* without options */
#define IP6_HLEN sizeof(struct ip6_hdr) /* the fixed header; no extension headers */
#define UDP_HLEN sizeof(struct udphdr)
#define ICMP_HLEN sizeof(struct icmphdr) /* the echo part: type, code, sum, id, sequence */
#define IP4_SRC offsetof(struct iphdr, saddr)
#define IP4_DST offsetof(struct iphdr, daddr)
#define IP6_SRC offsetof(struct ip6_hdr, ip6_src)
#define IP6_DST offsetof(struct ip6_hdr, ip6_dst)

/* ICMPv6's echo (RFC 4443 4.1) has ICMP's echo layout, so one struct serves both. */
_Static_assert(sizeof(struct icmp6_hdr) == sizeof(struct icmphdr), "echo header size");
_Static_assert(offsetof(struct icmp6_hdr, icmp6_id) == offsetof(struct icmphdr, un.echo.id),
               "echo id offset");
_Static_assert(offsetof(struct icmp6_hdr, icmp6_cksum) == offsetof(struct icmphdr, checksum),
               "echo checksum offset");

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

/* The two kinds of flow, each with counters of its own. */
enum kind { KIND_ECHO = 0, KIND_UDP, KIND_COUNT };

/* What an epoll event's data.u32 says woke the thread: the stop eventfd, the device,
 * or (from FLOW_TAG on) the socket of the flow in slot tag - FLOW_TAG. */
enum tag { STOP_TAG = 0, DEVICE_TAG = 1, FLOW_TAG = 2 };

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

/* The sum of the pseudo-header (addresses of ``alen`` bytes: 4 or 16) of a UDP
 * datagram or ICMPv6 message of ``length`` bytes. */
static uint32_t pseudo_sum(const uint8_t *src, const uint8_t *dst, size_t alen, uint8_t proto,
                           size_t length)
{
    return ones_add(dst, alen, ones_add(src, alen, 0)) + proto + (uint32_t)(length >> 16) +
           (uint32_t)(length & 0xFFFF);
}

/* A valid checksum makes the ones' complement sum over what it covers all ones. */
static int sums_to_ones(uint32_t sum) { return fold(sum) == 0xFFFF; }

/* The checks of an IPv6 packet (no extension headers but a fragment header, which
 * is refused as the IPv4 fragments are). */
static enum verdict classify6(const uint8_t *p, size_t n, size_t *ihl)
{
    struct ip6_hdr ip;
    if (n < IP6_HLEN + ICMP_HLEN)
        return V_MALFORMED;
    memcpy(&ip, p, sizeof ip);
    const size_t len = n - IP6_HLEN; /* of the UDP datagram or ICMPv6 message */
    if (ntohs(ip.ip6_plen) != len)
        return V_MALFORMED;
    const uint8_t nh = ip.ip6_nxt;
    const uint8_t *l4 = p + IP6_HLEN;
    *ihl = IP6_HLEN;
    if (nh == IPPROTO_FRAGMENT)
        return V_FRAGMENT;
    if (nh != IPPROTO_UDP && nh != IPPROTO_ICMPV6)
        return V_OTHER_PROTO;
    struct udphdr udp;
    memcpy(&udp, l4, sizeof udp);
    if (nh == IPPROTO_UDP && ntohs(udp.len) != len)
        return V_MALFORMED;
    /* Both checksums are mandatory over IPv6 (RFC 8200 8.1). */
    if (!sums_to_ones(ones_add(l4, len, pseudo_sum(p + IP6_SRC, p + IP6_DST, 16, nh, len))) ||
        (nh == IPPROTO_UDP && udp.check == 0))
        return V_BAD_CHECKSUM;
    if (nh == IPPROTO_UDP)
        return V_UDP;
    struct icmp6_hdr icmp;
    memcpy(&icmp, l4, sizeof icmp);
    return icmp.icmp6_type == ICMP6_ECHO_REQUEST && icmp.icmp6_code == 0 ? V_ECHO : V_OTHER_ICMP;
}

/* The checks of an IPv4 packet. */
static enum verdict classify4(const uint8_t *p, size_t n, size_t *ihl)
{
    struct iphdr ip;
    if (n < IP4_HLEN)
        return V_MALFORMED;
    memcpy(&ip, p, sizeof ip);
    const size_t hl = (size_t)ip.ihl * 4;
    /* The UDP header and ICMP's echo header are both eight bytes: the least either holds. */
    if (hl < IP4_HLEN || n < hl + UDP_HLEN || ntohs(ip.tot_len) != n)
        return V_MALFORMED;
    if (ntohs(ip.frag_off) & (IP_MF | IP_OFFMASK))
        return V_FRAGMENT;
    if (ip.protocol != IPPROTO_ICMP && ip.protocol != IPPROTO_UDP)
        return V_OTHER_PROTO;
    if (!sums_to_ones(ones_add(p, hl, 0)))
        return V_BAD_CHECKSUM;
    *ihl = hl;
    const uint8_t *l4 = p + hl;
    const size_t len = n - hl;
    if (ip.protocol == IPPROTO_UDP) {
        struct udphdr udp;
        memcpy(&udp, l4, sizeof udp);
        if (ntohs(udp.len) != len)
            return V_MALFORMED;
        /* A zero checksum means "none" (RFC 768); anything else must add up. */
        if (udp.check &&
            !sums_to_ones(ones_add(l4, len, pseudo_sum(p + IP4_SRC, p + IP4_DST, 4, IPPROTO_UDP,
                                                       len))))
            return V_BAD_CHECKSUM;
        return V_UDP;
    }
    if (!sums_to_ones(ones_add(l4, len, 0)))
        return V_BAD_CHECKSUM;
    struct icmphdr icmp;
    memcpy(&icmp, l4, sizeof icmp);
    return icmp.type == ICMP_ECHO && icmp.code == 0 ? V_ECHO : V_OTHER_ICMP;
}

/* The sans-IO check of one packet; on V_ECHO and V_UDP, *ihl is the IP header length. */
static enum verdict classify_request(const uint8_t *p, size_t n, size_t *ihl)
{
    const unsigned version = n >= 1 ? p[0] >> 4 : 0;
    if (version == 6)
        return classify6(p, n, ihl);
    if (version == IPVERSION)
        return classify4(p, n, ihl);
    return V_NOT_IP;
}

/* What identifies a flow: protocol, both addresses (16 bytes: IPv4 ones are followed
 * by zeros) and both ports (echo: the namespace's id and 0). */
struct flow_key {
    uint8_t src[16], dst[16]; /* the namespace's addresses: the request's */
    uint8_t alen;             /* 4 or 16 */
    uint8_t proto;            /* IPPROTO_ICMP or IPPROTO_ICMPV6 (an echo "session"), IPPROTO_UDP */
    uint16_t sport;           /* UDP: the namespace's port; echo: its id (the ping
                               * socket's is the kernel's) */
    uint16_t dport;           /* UDP: the destination port; echo: 0 */
};

/* The sans-IO reading of one packet: its verdict, and for an echo request or a UDP
 * datagram the key of its flow and where its payload starts (UDP: the data; echo: the
 * ICMP message as is, since the ping socket sets id and checksum). */
static enum verdict read_request(const uint8_t *p, size_t n, struct flow_key *key,
                                 size_t *payload)
{
    size_t ihl = 0;
    enum verdict v = classify_request(p, n, &ihl);
    if (v != V_ECHO && v != V_UDP)
        return v;
    const int v6 = p[0] >> 4 == 6;
    memset(key, 0, sizeof *key);
    key->alen = v6 ? 16 : 4;
    memcpy(key->src, p + (v6 ? IP6_SRC : IP4_SRC), key->alen);
    memcpy(key->dst, p + (v6 ? IP6_DST : IP4_DST), key->alen);
    if (v == V_UDP) {
        struct udphdr udp;
        memcpy(&udp, p + ihl, sizeof udp);
        key->proto = IPPROTO_UDP;
        key->sport = ntohs(udp.source);
        key->dport = ntohs(udp.dest);
        *payload = ihl + UDP_HLEN;
    } else {
        struct icmphdr echo;
        memcpy(&echo, p + ihl, sizeof echo);
        key->proto = v6 ? IPPROTO_ICMPV6 : IPPROTO_ICMP;
        key->sport = ntohs(echo.un.echo.id);
        key->dport = 0;
        *payload = ihl;
    }
    return v;
}

static enum kind kind_of(uint8_t proto) { return proto == IPPROTO_UDP ? KIND_UDP : KIND_ECHO; }

struct flow {
    struct flow_key key;
    int fd;                 /* the host socket, -1 while the slot is free */
    int next;               /* hash chain, -1 ends it */
    double last;            /* CLOCK_MONOTONIC seconds of the latest request or reply */
    uint32_t ip_sum;        /* IPv4: the reply header's sum without length and checksum */
    uint16_t quote_len;
    uint8_t quote[QUOTE_MAX]; /* the latest request, for an ICMP error about it */
};

/* Per-kind counters; stats() names them as the engine names its own (kind_names). */
struct counts {
    unsigned long long out, in, bytes_out, bytes_in;  /* requests/datagrams each way */
    unsigned long long flows_opened, flows_expired, flows_evicted;
    int active;
};

/* The engine's counter names (engine.py's EngineStats), so that network.py adds each
 * of these to the engine's counter of the same name and users read one set of figures
 * whichever path served a packet.  The names no engine counter has are the relay's
 * own: flows_opened (the engine counts each flow it decides in *_flows_total, so the
 * relay's count of the same flows must not be added to it), the echo byte counts and
 * echo evictions (the engine keeps neither). */
static const struct kind_names {
    const char *out, *in, *bytes_out, *bytes_in, *active, *opened, *expired, *evicted;
} kind_names[KIND_COUNT] = {
    [KIND_ECHO] = {"icmp_echo_requests", "icmp_echo_replies", "icmp_bytes_out",
                   "icmp_bytes_in", "icmp_flows_active", "icmp_flows_opened",
                   "icmp_flows_expired", "icmp_flows_evicted"},
    [KIND_UDP] = {"udp_datagrams_out", "udp_datagrams_in", "udp_bytes_out", "udp_bytes_in",
                  "udp_flows_active", "udp_flows_opened", "udp_flows_expired",
                  "udp_flows_evicted"},
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
    struct counts kind[KIND_COUNT];
    unsigned long long frames_in, bytes_in, frames_out, bytes_out;
    unsigned long long rejected[V_COUNT];
    unsigned long long tun_full, send_full, send_errors, callback_errors;
    uint8_t buf[PACKET_MAX + 1];
    uint8_t out[PACKET_MAX + 1];
} Relay;

static double now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static unsigned bucket_of(const Relay *r, const struct flow_key *key)
{
    /* The address length is not hashed: a 16-byte address equal to a zero-padded IPv4
     * one only shares a bucket, find_flow compares it. */
    uint32_t h = ((uint32_t)key->sport << 16 | key->dport) * 3266489917u ^ key->proto;
    for (int k = 0; k < 16; k += 4) {
        uint32_t a, b;
        memcpy(&a, key->src + k, 4);
        memcpy(&b, key->dst + k, 4);
        h = (h ^ a) * 2654435761u;
        h = (h ^ b) * 2246822519u;
    }
    return (h ^ (h >> 15)) & (unsigned)(r->nbuckets - 1);
}

static int same_key(const struct flow_key *a, const struct flow_key *b)
{
    return a->sport == b->sport && a->dport == b->dport && a->proto == b->proto &&
           !memcmp(a->src, b->src, 16) && !memcmp(a->dst, b->dst, 16) && a->alen == b->alen;
}

static int find_flow(const Relay *r, const struct flow_key *key)
{
    int i = r->buckets[bucket_of(r, key)];
    for (; i >= 0; i = r->flows[i].next)
        if (same_key(&r->flows[i].key, key))
            return i;
    return -1;
}

static void remove_flow(Relay *r, int i)
{
    struct flow *f = &r->flows[i];
    int *link = &r->buckets[bucket_of(r, &f->key)];
    while (*link != i)
        link = &r->flows[*link].next;
    *link = f->next;
    epoll_ctl(r->epoll, EPOLL_CTL_DEL, f->fd, NULL);
    close(f->fd);
    f->fd = -1;
    r->active--;
    r->kind[kind_of(f->key.proto)].active--;
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
    r->kind[kind_of(r->flows[oldest].key.proto)].flows_evicted++;
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

/* The IP header of a packet of ``total`` bytes from the flow's destination back to the
 * namespace; IPv4's checksum left zero (reply_header adds it). */
static void reply_header_unsummed(const struct flow *f, uint8_t *out, size_t total)
{
    const struct flow_key *k = &f->key;
    if (k->alen == 16) {
        struct ip6_hdr ip = {0};
        ip.ip6_vfc = 6 << 4;
        ip.ip6_plen = htons((uint16_t)(total - IP6_HLEN));
        ip.ip6_nxt = k->proto;
        ip.ip6_hlim = REPLY_TTL;
        memcpy(&ip.ip6_src, k->dst, 16);
        memcpy(&ip.ip6_dst, k->src, 16);
        memcpy(out, &ip, sizeof ip);
        return;
    }
    struct iphdr ip = {0};
    ip.version = IPVERSION;
    ip.ihl = IP4_HLEN / 4;
    ip.tot_len = htons((uint16_t)total);
    ip.frag_off = htons(IP_DF);
    ip.ttl = REPLY_TTL;
    ip.protocol = k->proto;
    memcpy(&ip.saddr, k->dst, 4);
    memcpy(&ip.daddr, k->src, 4);
    memcpy(out, &ip, sizeof ip);
}

/* The reply's IP header, checksummed: only its length changes from one reply of a
 * flow to the next, so the rest of the IPv4 header's sum is the flow's ip_sum. */
static void reply_header(const struct flow *f, uint8_t *out, size_t total)
{
    reply_header_unsummed(f, out, total);
    if (f->key.alen == 4) {
        uint16_t check = htons((uint16_t)~fold(f->ip_sum + total));
        memcpy(out + offsetof(struct iphdr, check), &check, sizeof check);
    }
}

/* Relay the flow's queued replies (at most a batch) to the tun. */
static void drain_replies(Relay *r, struct flow *f)
{
    uint8_t *out = r->out;
    const struct flow_key *key = &f->key;
    const int udp = key->proto == IPPROTO_UDP;
    const size_t ip = key->alen == 16 ? IP6_HLEN : IP4_HLEN;
    const size_t head = ip + (udp ? UDP_HLEN : 0); /* where the received bytes go */
    uint8_t *l4 = out + ip;
    struct counts *c = &r->kind[kind_of(key->proto)];
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
        size_t sum_at;              /* where its checksum goes */
        if (udp) {
            struct udphdr h = {0};
            h.source = htons(key->dport);
            h.dest = htons(key->sport);
            h.len = htons((uint16_t)length);
            memcpy(l4, &h, sizeof h);
            sum_at = offsetof(struct udphdr, check);
        } else {
            struct icmphdr h;
            const uint8_t reply = key->alen == 16 ? ICMP6_ECHO_REPLY : ICMP_ECHOREPLY;
            if ((size_t)m < ICMP_HLEN)
                continue; /* not an echo reply */
            memcpy(&h, l4, sizeof h);
            if (h.type != reply)
                continue;
            /* The reply carries the kernel's id; the namespace must see its own. */
            h.code = 0;
            h.checksum = 0;
            h.un.echo.id = htons(key->sport);
            memcpy(l4, &h, sizeof h);
            sum_at = offsetof(struct icmphdr, checksum);
        }
        /* UDP and ICMPv6 sum a pseudo-header; ICMP over IPv4 does not. */
        uint32_t pseudo = key->proto == IPPROTO_ICMP
                              ? 0
                              : pseudo_sum(key->dst, key->src, key->alen, key->proto, length);
        uint16_t sum = (uint16_t)~fold(ones_add(l4, length, pseudo));
        if (udp && !sum)
            sum = 0xFFFF; /* UDP: a zero checksum would mean "none" */
        sum = htons(sum);
        memcpy(l4 + sum_at, &sum, sizeof sum);
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
static int open_flow(Relay *r, const uint8_t *p, size_t n, const struct flow_key *key)
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
    f->key = *key;
    f->fd = (int)fd;
    f->ip_sum = 0;
    if (key->alen == 4) {
        /* The reply header without its length and checksum is fixed per flow. */
        uint8_t header[IP4_HLEN];
        reply_header_unsummed(f, header, 0);
        f->ip_sum = ones_add(header, sizeof header, 0);
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = FLOW_TAG + (uint32_t)i};
    if (epoll_ctl(r->epoll, EPOLL_CTL_ADD, f->fd, &ev) < 0) {
        close(f->fd);
        f->fd = -1;
        r->callback_errors++;
        return -1;
    }
    unsigned b = bucket_of(r, &f->key);
    f->next = r->buckets[b];
    r->buckets[b] = i;
    r->active++;
    struct counts *c = &r->kind[kind_of(key->proto)];
    c->active++;
    c->flows_opened++;
    return i;
}

static void handle_request(Relay *r, const uint8_t *p, size_t n)
{
    struct flow_key key;
    size_t payload;
    enum verdict v = read_request(p, n, &key, &payload);
    if (v != V_ECHO && v != V_UDP) {
        r->rejected[v]++;
        return;
    }
    const int udp = v == V_UDP;
    struct counts *c = &r->kind[kind_of(key.proto)];
    if (!udp)
        c->out++; /* every echo request counts (as in the engine); a datagram once sent */
    int i = find_flow(r, &key);
    if (i < 0) {
        i = open_flow(r, p, n, &key);
        if (i < 0)
            return;
    }
    struct flow *f = &r->flows[i];
    f->quote_len = (uint16_t)(n < QUOTE_MAX ? n : QUOTE_MAX);
    memcpy(f->quote, p, f->quote_len);
    f->last = now_seconds();
    const uint8_t *data = p + payload;
    size_t len = n - payload;
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
            r->kind[kind_of(r->flows[i].key.proto)].flows_expired++;
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
            if (tag == STOP_TAG)
                return NULL;
            if (tag == DEVICE_TAG) {
                int err = drain_tun(r);
                if (!err && events[k].events & (EPOLLERR | EPOLLHUP))
                    err = EBADFD;
                if (err) {
                    device_gone(r, err);
                    return NULL;
                }
                continue;
            }
            struct flow *f = &r->flows[tag - FLOW_TAG];
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
    struct epoll_event stop = {.events = EPOLLIN, .data.u32 = STOP_TAG};
    struct epoll_event dev = {.events = EPOLLIN, .data.u32 = DEVICE_TAG};
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

/* Add one kind's counters to the stats dict, under the engine's names (kind_names). */
static int add_kind(PyObject *d, const struct counts *c, const struct kind_names *name)
{
    return add_count(d, name->out, c->out) < 0 || add_count(d, name->in, c->in) < 0 ||
                   add_count(d, name->bytes_out, c->bytes_out) < 0 ||
                   add_count(d, name->bytes_in, c->bytes_in) < 0 ||
                   add_count(d, name->active, (unsigned long long)c->active) < 0 ||
                   add_count(d, name->opened, c->flows_opened) < 0 ||
                   add_count(d, name->expired, c->flows_expired) < 0 ||
                   add_count(d, name->evicted, c->flows_evicted) < 0
               ? -1
               : 0;
}

/* One flat dict: the counters the engine also keeps, by its names (frames_in...,
 * icmp_echo_requests..., udp_datagrams_out...), then the relay's own (see kind_names),
 * and ``rejected``: the packets classify_request refused, by verdict. */
static PyObject *Relay_stats(Relay *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *d = PyDict_New();
    PyObject *rejected = PyDict_New();
    if (d == NULL || rejected == NULL)
        goto fail;
    for (int v = V_NOT_IP; v < V_COUNT; v++)
        if (self->rejected[v] && add_count(rejected, verdict_names[v], self->rejected[v]) < 0)
            goto fail;
    if (add_count(d, "frames_in", self->frames_in) < 0 ||
        add_count(d, "bytes_in", self->bytes_in) < 0 ||
        add_count(d, "frames_out", self->frames_out) < 0 ||
        add_count(d, "bytes_out", self->bytes_out) < 0)
        goto fail;
    for (int k = 0; k < KIND_COUNT; k++)
        if (add_kind(d, &self->kind[k], &kind_names[k]) < 0)
            goto fail;
    if (add_count(d, "tun_full", self->tun_full) < 0 ||
        add_count(d, "send_full", self->send_full) < 0 ||
        add_count(d, "send_errors", self->send_errors) < 0 ||
        add_count(d, "callback_errors", self->callback_errors) < 0 ||
        PyDict_SetItemString(d, "rejected", rejected) < 0)
        goto fail;
    Py_DECREF(rejected);
    return d;
fail:
    Py_XDECREF(d);
    Py_XDECREF(rejected);
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
    .tp_name = "nsbridge.usernet.host._flowrelay.Relay",
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

/* For tests only: the flow handle_request files a packet under, from the very function
 * it uses (read_request), so a differential test can hold the relay's reading of
 * hostile bytes against the engine's parser (packets.parse_frame) field by field.
 * classify() alone says "echo" or "udp", not whose flow it would be. */
static PyObject *flow_key(PyObject *Py_UNUSED(module), PyObject *arg)
{
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    struct flow_key key;
    size_t payload = 0;
    enum verdict v = read_request(view.buf, (size_t)view.len, &key, &payload);
    PyBuffer_Release(&view);
    if (v != V_ECHO && v != V_UDP)
        Py_RETURN_NONE;
    return Py_BuildValue("(iy#y#iin)", key.proto, (const char *)key.src, (Py_ssize_t)key.alen,
                         (const char *)key.dst, (Py_ssize_t)key.alen, key.sport, key.dport,
                         (Py_ssize_t)payload);
}

static PyMethodDef module_methods[] = {
    {"classify", classify, METH_O,
     "What the relay makes of one IP packet: 'echo', 'udp' or why it drops it."},
    {"flow_key", flow_key, METH_O,
     "For tests: (protocol, src, dst, sport or echo id, dport or 0, payload offset) of the "
     "flow the relay files a packet under, or None when it drops it."},
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
