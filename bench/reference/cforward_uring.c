/*
 * cforward_uring: cforward.c's forwarder with io_uring in place of epoll.
 *
 * Why it exists: issue 19 asks whether io_uring would serve the request path (keep-alive
 * and new connections) faster than nsbridge's epoll core, and to keep it only if it wins
 * here.  This is the measurement: the same forwarder as the c-epoll yardstick -- two
 * worker processes sharing one listener, each entering the target's namespace for good,
 * reads up to 64 KiB copied and bulk spliced through a 1 MiB pipe -- with every accept,
 * read and write going through one ring per worker instead of readiness events and
 * system calls.  bench/forward_bench.py --reference runs it as the `c-uring` row.
 *
 * The ring: raw io_uring_setup/io_uring_enter and mmap (no liburing), SINGLE_ISSUER and
 * DEFER_TASKRUN (completions are run only when this worker asks, in its own
 * io_uring_enter: the cheapest mode for one thread owning its ring).  One enter per loop
 * turn submits everything queued and waits for at least one completion.
 *
 *   accept   one multishot IORING_OP_ACCEPT on the shared listener per worker; the
 *            target socket is made and connected synchronously (a local target finishes
 *            the handshake inside connect()), as in cforward.c;
 *   copy     IORING_OP_RECV into the direction's 64 KiB buffer, then IORING_OP_SEND of
 *            what came, then the next receive: at most one operation in flight per
 *            direction, which is the backpressure;
 *   bulk     a receive that filled the buffer makes the direction bulk: IORING_OP_SPLICE
 *            socket -> pipe, then pipe -> socket (the kernel runs these in its io-wq
 *            threads: splice has no non-blocking path in io_uring); a splice under
 *            16 KiB makes it copy again;
 *   ends     EOF becomes shutdown(SHUT_WR) of the other side, both EOFs close the pair;
 *            an error resets both (SO_LINGER {1, 0}) and cancels what is in flight, the
 *            pair's memory freed when its last operation completed.
 *
 * A benchmark reference only, like cforward.c.
 *
 * usage: cforward_uring LISTEN_IP:PORT NETNS_PATH CONNECT_IP:PORT [WORKERS [hybrid|copy]]
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/io_uring.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define SMALL (64 * 1024)
#define PIPE_SIZE (1024 * 1024)
#define RING_ENTRIES 4096

enum op { OP_RECV = 1, OP_SEND, OP_SPLICE_IN, OP_SPLICE_OUT, OP_CANCEL, OP_ACCEPT };
#define OP_MASK 7u

struct conn;
struct dir {
	struct conn *conn;   /* 8-aligned: user_data is this pointer | enum op */
	int src, dst;
	int pipe[2];         /* -1 until the direction first goes bulk */
	char *buf;
	uint32_t len, off;   /* copied bytes in buf not yet sent: buf[off..len) */
	uint32_t pending;    /* spliced bytes in the pipe not yet sent */
	int bulk, done;
	uint64_t inflight;   /* the user_data of the operation in flight, 0: none */
};

struct conn {
	int fd[2];
	struct dir d[2];     /* 0: client -> server, 1: server -> client */
	int closed;
};

static int hybrid = 1;
static int ring_fd, listener;
static struct sockaddr_in target;

/* The mapped ring. */
static unsigned *sq_head, *sq_tail, *sq_mask, *sq_array;
static unsigned *cq_head, *cq_tail, *cq_mask;
static struct io_uring_sqe *sqes;
static struct io_uring_cqe *cqes;
static unsigned queued;     /* SQEs written since the last enter */

static void die(const char *what)
{
	perror(what);
	exit(2);
}

static void parse(const char *text, struct sockaddr_in *sa)
{
	char host[64];
	const char *colon = strrchr(text, ':');
	if (!colon || (size_t)(colon - text) >= sizeof host)
		fprintf(stderr, "bad address %s (want IP:PORT)\n", text), exit(2);
	memcpy(host, text, colon - text);
	host[colon - text] = 0;
	memset(sa, 0, sizeof *sa);
	sa->sin_family = AF_INET;
	sa->sin_port = htons(atoi(colon + 1));
	if (inet_pton(AF_INET, host, &sa->sin_addr) != 1)
		fprintf(stderr, "bad address %s (want IP:PORT)\n", text), exit(2);
}

static int enter(unsigned submit, unsigned wait, unsigned flags)
{
	return (int)syscall(__NR_io_uring_enter, ring_fd, submit, wait, flags, NULL, 0);
}

static void ring_setup(void)
{
	struct io_uring_params p;
	memset(&p, 0, sizeof p);
	p.flags = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN |
		  IORING_SETUP_SUBMIT_ALL;
	ring_fd = (int)syscall(__NR_io_uring_setup, RING_ENTRIES, &p);
	if (ring_fd < 0 && errno == EINVAL) {
		/* A kernel before 6.1 has no DEFER_TASKRUN: plain completions, slower. */
		memset(&p, 0, sizeof p);
		ring_fd = (int)syscall(__NR_io_uring_setup, RING_ENTRIES, &p);
	}
	if (ring_fd < 0)
		die("io_uring_setup");
	if (!(p.features & IORING_FEAT_SINGLE_MMAP) || !(p.features & IORING_FEAT_NODROP))
		fprintf(stderr, "io_uring: kernel too old (need SINGLE_MMAP, NODROP)\n"), exit(2);
	size_t sq_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
	size_t cq_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
	size_t len = sq_len > cq_len ? sq_len : cq_len;
	char *rings = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
			   ring_fd, IORING_OFF_SQ_RING);
	if (rings == MAP_FAILED)
		die("mmap ring");
	sqes = mmap(NULL, p.sq_entries * sizeof(struct io_uring_sqe), PROT_READ | PROT_WRITE,
		    MAP_SHARED | MAP_POPULATE, ring_fd, IORING_OFF_SQES);
	if (sqes == MAP_FAILED)
		die("mmap sqes");
	sq_head = (unsigned *)(rings + p.sq_off.head);
	sq_tail = (unsigned *)(rings + p.sq_off.tail);
	sq_mask = (unsigned *)(rings + p.sq_off.ring_mask);
	sq_array = (unsigned *)(rings + p.sq_off.array);
	cq_head = (unsigned *)(rings + p.cq_off.head);
	cq_tail = (unsigned *)(rings + p.cq_off.tail);
	cq_mask = (unsigned *)(rings + p.cq_off.ring_mask);
	cqes = (struct io_uring_cqe *)(rings + p.cq_off.cqes);
}

/* A zeroed SQE at the tail; the SQ is flushed to the kernel first when full. */
static struct io_uring_sqe *sqe_get(void)
{
	unsigned tail = *sq_tail;
	if (tail - __atomic_load_n(sq_head, __ATOMIC_ACQUIRE) > *sq_mask) {
		if (enter(queued, 0, 0) < 0)
			die("io_uring_enter");
		queued = 0;
	}
	unsigned idx = tail & *sq_mask;
	struct io_uring_sqe *sqe = &sqes[idx];
	memset(sqe, 0, sizeof *sqe);
	sq_array[idx] = idx;
	__atomic_store_n(sq_tail, tail + 1, __ATOMIC_RELEASE);
	queued++;
	return sqe;
}

static void queue_op(struct dir *d, enum op op)
{
	struct io_uring_sqe *sqe = sqe_get();
	sqe->user_data = (uint64_t)(uintptr_t)d | op;
	switch (op) {
	case OP_RECV:
		sqe->opcode = IORING_OP_RECV;
		sqe->fd = d->src;
		sqe->addr = (uint64_t)(uintptr_t)d->buf;
		sqe->len = SMALL;
		break;
	case OP_SEND:
		sqe->opcode = IORING_OP_SEND;
		sqe->fd = d->dst;
		sqe->addr = (uint64_t)(uintptr_t)(d->buf + d->off);
		sqe->len = d->len - d->off;
		sqe->msg_flags = MSG_NOSIGNAL;
		break;
	case OP_SPLICE_IN:
		sqe->opcode = IORING_OP_SPLICE;
		sqe->splice_fd_in = d->src;
		sqe->splice_off_in = (uint64_t)-1;
		sqe->fd = d->pipe[1];
		sqe->off = (uint64_t)-1;
		sqe->len = PIPE_SIZE;
		sqe->splice_flags = SPLICE_F_MOVE;
		break;
	case OP_SPLICE_OUT:
		sqe->opcode = IORING_OP_SPLICE;
		sqe->splice_fd_in = d->pipe[0];
		sqe->splice_off_in = (uint64_t)-1;
		sqe->fd = d->dst;
		sqe->off = (uint64_t)-1;
		sqe->len = d->pending;
		sqe->splice_flags = SPLICE_F_MOVE;
		break;
	default:
		abort();
	}
	d->inflight = sqe->user_data;
}

static void queue_accept(void)
{
	struct io_uring_sqe *sqe = sqe_get();
	sqe->opcode = IORING_OP_ACCEPT;
	sqe->fd = listener;
	sqe->ioprio = IORING_ACCEPT_MULTISHOT;
	sqe->accept_flags = SOCK_CLOEXEC;
	sqe->user_data = OP_ACCEPT;
}

static void conn_free_if_idle(struct conn *c)
{
	if (c->closed && !c->d[0].inflight && !c->d[1].inflight) {
		for (int i = 0; i < 2; i++) {
			struct dir *d = &c->d[i];
			if (d->pipe[0] >= 0) {
				close(d->pipe[0]);
				close(d->pipe[1]);
			}
			free(d->buf);
		}
		free(c);
	}
}

/* Close the pair: a reset cancels what is still in flight (its completion frees). */
static void conn_close(struct conn *c, int reset)
{
	struct linger lg = { 1, 0 };
	if (c->closed)
		return;
	c->closed = 1;
	for (int i = 0; i < 2; i++) {
		if (reset)
			setsockopt(c->fd[i], SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
		if (c->d[i].inflight) {
			struct io_uring_sqe *sqe = sqe_get();
			sqe->opcode = IORING_OP_ASYNC_CANCEL;
			sqe->addr = c->d[i].inflight;  /* cancel by user_data */
			sqe->user_data = OP_CANCEL;
		}
	}
	for (int i = 0; i < 2; i++)
		close(c->fd[i]);  /* an operation in flight holds the file until it completes */
	conn_free_if_idle(c);
}

static void start_read(struct dir *d)
{
	if (d->bulk) {
		if (d->pipe[0] < 0) {
			if (pipe2(d->pipe, O_CLOEXEC))
				die("pipe2");
			fcntl(d->pipe[1], F_SETPIPE_SZ, PIPE_SIZE);
		}
		queue_op(d, OP_SPLICE_IN);
	} else {
		queue_op(d, OP_RECV);
	}
}

static void got_eof(struct conn *c, struct dir *d)
{
	d->done = 1;
	if (c->d[0].done && c->d[1].done)
		conn_close(c, 0);
	else if (shutdown(d->dst, SHUT_WR))
		conn_close(c, 1);
}

static void on_completion(struct dir *d, enum op op, int res)
{
	struct conn *c = d->conn;
	d->inflight = 0;
	if (c->closed) {
		conn_free_if_idle(c);
		return;
	}
	if (res < 0) {
		conn_close(c, 1);
		return;
	}
	switch (op) {
	case OP_RECV:
		if (res == 0) {
			got_eof(c, d);
			return;
		}
		d->len = (uint32_t)res;
		d->off = 0;
		if (hybrid && res == SMALL)
			d->bulk = 1;  /* the next read splices */
		queue_op(d, OP_SEND);
		return;
	case OP_SEND:
		d->off += (uint32_t)res;
		if (d->off < d->len)
			queue_op(d, OP_SEND);
		else
			start_read(d);
		return;
	case OP_SPLICE_IN:
		if (res == 0) {
			got_eof(c, d);
			return;
		}
		d->pending = (uint32_t)res;
		if (res < SMALL / 4)
			d->bulk = 0;
		queue_op(d, OP_SPLICE_OUT);
		return;
	case OP_SPLICE_OUT:
		d->pending -= (uint32_t)res;
		if (res == 0) {
			conn_close(c, 1);  /* the pipe still holds bytes nobody can take */
			return;
		}
		if (d->pending)
			queue_op(d, OP_SPLICE_OUT);
		else
			start_read(d);
		return;
	default:
		abort();
	}
}

static void on_accept(int client)
{
	int one = 1;
	int server = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (server < 0) {
		close(client);
		return;
	}
	setsockopt(client, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
	setsockopt(server, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
	if (connect(server, (const struct sockaddr *)&target, sizeof target)) {
		struct linger lg = { 1, 0 };
		setsockopt(client, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
		close(client);
		close(server);
		return;
	}
	struct conn *c = calloc(1, sizeof *c);
	if (!c)
		die("calloc");
	c->fd[0] = client;
	c->fd[1] = server;
	for (int i = 0; i < 2; i++) {
		struct dir *d = &c->d[i];
		d->conn = c;
		d->src = c->fd[i];
		d->dst = c->fd[1 - i];
		d->pipe[0] = d->pipe[1] = -1;
		if (!(d->buf = malloc(SMALL)))
			die("malloc");
		start_read(d);
	}
}

static void serve(void)
{
	ring_setup();
	queue_accept();
	for (;;) {
		int r = enter(queued, 1, IORING_ENTER_GETEVENTS);
		if (r < 0 && errno != EINTR && errno != EBUSY)
			die("io_uring_enter");
		if (r >= 0)
			queued = 0;
		unsigned head = *cq_head;
		unsigned tail = __atomic_load_n(cq_tail, __ATOMIC_ACQUIRE);
		for (; head != tail; head++) {
			struct io_uring_cqe *cqe = &cqes[head & *cq_mask];
			uint64_t data = cqe->user_data;
			int res = cqe->res;
			uint32_t flags = cqe->flags;
			/* Handlers may queue SQEs but never touch the CQ: free this slot first. */
			__atomic_store_n(cq_head, head + 1, __ATOMIC_RELEASE);
			if (data == OP_ACCEPT) {
				if (res >= 0)
					on_accept(res);
				if (!(flags & IORING_CQE_F_MORE))
					queue_accept();  /* the multishot ended (an error): re-arm */
				continue;
			}
			if (data == OP_CANCEL)
				continue;
			on_completion((struct dir *)(uintptr_t)(data & ~(uint64_t)OP_MASK),
				      (enum op)(data & OP_MASK), res);
		}
	}
}

int main(int argc, char **argv)
{
	struct sockaddr_in listen_at;
	int nsfd, one = 1, workers = 1;
	pid_t children[64];

	if (argc < 4) {
		fprintf(stderr, "usage: %s LISTEN_IP:PORT NETNS_PATH CONNECT_IP:PORT "
			"[WORKERS [hybrid|copy]]\n", argv[0]);
		return 2;
	}
	parse(argv[1], &listen_at);
	parse(argv[3], &target);
	if (argc > 4)
		workers = atoi(argv[4]);
	if (argc > 5)
		hybrid = strcmp(argv[5], "copy") != 0;
	signal(SIGPIPE, SIG_IGN);

	listener = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (listener < 0)
		die("socket");
	setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	if (bind(listener, (struct sockaddr *)&listen_at, sizeof listen_at) || listen(listener, 4096))
		die(argv[1]);
	nsfd = open(argv[2], O_RDONLY | O_CLOEXEC);
	if (nsfd < 0 || setns(nsfd, CLONE_NEWNET))
		die(argv[2]);
	close(nsfd);

	if (workers < 1 || workers > 64)
		fprintf(stderr, "WORKERS must be 1..64\n"), exit(2);
	for (int i = 0; i < workers; i++) {
		pid_t pid = fork();
		children[i] = pid;
		if (pid < 0)
			die("fork");
		if (pid == 0) {
			prctl(PR_SET_PDEATHSIG, SIGKILL);
			serve();
		}
	}
	/* The parent only supervises, as in cforward.c. */
	sigset_t set;
	int sig;
	sigemptyset(&set);
	sigaddset(&set, SIGTERM);
	sigaddset(&set, SIGINT);
	sigprocmask(SIG_BLOCK, &set, NULL);
	sigwait(&set, &sig);
	signal(SIGTERM, SIG_IGN);
	for (int i = 0; i < workers; i++)
		kill(children[i], SIGTERM);  /* by PID: never the caller's group */
	while (wait(NULL) > 0)
		;
	return 0;
}
