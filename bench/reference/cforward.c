/*
 * cforward: the smallest fast TCP forwarder between two network namespaces, in C.
 *
 * Why it exists: issue 3 sets targets (one stream >= 0.85x direct, keep-alive >= 0.76x)
 * that nsbridge misses, and the profiles say the kernel's second loopback TCP hop is the
 * limit, not Python.  This program is the measurement behind that claim: the same data
 * path with no interpreter at all (epoll, edge-triggered; reads up to 64 KiB copied,
 * bulk spliced through a pipe; N worker processes sharing one listener).  If it lands
 * where nsbridge lands, the gap to the target is the kernel's, not ours.
 *
 * It is a benchmark reference only (bench/forward_bench.py --reference builds it with
 * gcc): half-close is carried, errors reset both sides, and nothing else is offered.
 *
 * usage: cforward LISTEN_IP:PORT NETNS_PATH CONNECT_IP:PORT [WORKERS [MODE]]
 *        MODE: hybrid (default), copy, splice
 *
 * The listener is made in the caller's namespace; then every worker enters NETNS_PATH
 * for good, so each socket() it makes for a target is born there: no setns() per
 * connection.  Accepted sockets stay in the listener's namespace.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#define SMALL (64 * 1024)
#define PIPE_SIZE (1024 * 1024)
#define BATCH 512  /* events per epoll_wait; at most this many conns close per batch */

enum { HYBRID, COPY, SPLICE };
static int mode = HYBRID;

struct dir {
	int src, dst;
	int pipe[2];          /* spliced bytes wait here; -1 when none */
	size_t pending;       /* read from src, not yet written to dst */
	char *buf;            /* copied bytes wait here */
	size_t off;
	int eof, done, bulk;
};

struct conn;
struct side {
	struct conn *conn;
	int which;            /* 0: client, 1: server */
};

struct conn {
	int fd[2];
	struct dir up, down;  /* up: client -> server */
	struct side side[2];
	int connecting, closed;
};

static int epfd;

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

static void dir_free(struct dir *d)
{
	if (d->pipe[0] >= 0) {
		close(d->pipe[0]);
		close(d->pipe[1]);
		d->pipe[0] = d->pipe[1] = -1;
	}
	free(d->buf);
	d->buf = NULL;
}

static void conn_close(struct conn *c, int reset)
{
	struct linger lg = { 1, 0 };
	if (c->closed)
		return;
	c->closed = 1;
	for (int i = 0; i < 2; i++) {
		if (reset)
			setsockopt(c->fd[i], SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
		close(c->fd[i]);
	}
	dir_free(&c->up);
	dir_free(&c->down);
	/* Freed at the end of the event batch (events of this batch may still point here). */
}

/* Write what is pending; 1 when all is written, 0 when dst is full, -1 on error. */
static int flush(struct dir *d)
{
	while (d->pending) {
		ssize_t n;
		if (d->pipe[0] >= 0 && !d->buf)
			n = splice(d->pipe[0], NULL, d->dst, NULL, d->pending,
				   SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
		else
			n = write(d->dst, d->buf + d->off, d->pending);
		if (n < 0)
			return errno == EAGAIN ? 0 : -1;
		d->pending -= n;
		d->off += n;
	}
	d->off = 0;
	free(d->buf);  /* an idle connection holds no buffer (malloc keeps it cheap) */
	d->buf = NULL;
	return 1;
}

/* Read once into the direction; returns bytes, 0 on EOF, -1 EAGAIN, -2 error. */
static ssize_t fill(struct dir *d, int *drained)
{
	ssize_t n;
	*drained = 0;
	if (mode == COPY || (mode == HYBRID && !d->bulk)) {
		if (!d->buf && !(d->buf = malloc(SMALL)))
			die("malloc");
		n = read(d->src, d->buf, SMALL);
		if (n <= 0) {
			int failed = n < 0 && errno != EAGAIN;
			free(d->buf);
			d->buf = NULL;
			return n == 0 ? 0 : failed ? -2 : -1;
		}
		*drained = n < SMALL;
		if (mode == HYBRID)
			d->bulk = !*drained;
		d->pending = n;
		return n;
	}
	free(d->buf);
	d->buf = NULL;
	if (d->pipe[0] < 0) {
		if (pipe2(d->pipe, O_NONBLOCK | O_CLOEXEC))
			die("pipe2");
		fcntl(d->pipe[1], F_SETPIPE_SZ, PIPE_SIZE);
	}
	n = splice(d->src, NULL, d->pipe[1], NULL, PIPE_SIZE, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
	if (n < 0)
		return errno == EAGAIN ? -1 : -2;
	if (mode == HYBRID && n < SMALL / 4)
		d->bulk = 0;
	d->pending = n;
	return n;
}

static void finish(struct conn *c, struct dir *d)
{
	struct dir *other = d == &c->up ? &c->down : &c->up;
	if (d->done)
		return;
	d->done = 1;
	if (other->done) {
		conn_close(c, 0);
		return;
	}
	if (shutdown(d->dst, SHUT_WR))
		conn_close(c, 1);
}

static void pump(struct conn *c, struct dir *d, int edge)
{
	for (;;) {
		int drained, r;
		ssize_t n;
		if (d->pending) {
			r = flush(d);
			if (r < 0) {
				conn_close(c, 1);
				return;
			}
			if (r == 0)
				return;
		}
		if (d->eof) {
			finish(c, d);
			return;
		}
		n = fill(d, &drained);
		if (n == -1)
			return;
		if (n == -2) {
			conn_close(c, 1);
			return;
		}
		if (n == 0) {
			d->eof = 1;
		} else if (edge && drained) {
			if (flush(d) < 0)
				conn_close(c, 1);
			return;
		}
	}
}

static void on_event(struct side *s, uint32_t ev)
{
	struct conn *c = s->conn;
	struct dir *in = s->which ? &c->down : &c->up;   /* read from this side */
	struct dir *out = s->which ? &c->up : &c->down;  /* written to this side */
	if (c->closed)
		return;
	if (c->connecting && s->which == 1) {
		int err = 0;
		socklen_t len = sizeof err;
		getsockopt(c->fd[1], SOL_SOCKET, SO_ERROR, &err, &len);
		if (err) {
			conn_close(c, 1);
			return;
		}
		if (!(ev & (EPOLLOUT | EPOLLERR | EPOLLHUP)))
			return;
		c->connecting = 0;
		pump(c, &c->up, 0);
		if (!c->closed)
			pump(c, &c->down, 0);
		return;
	}
	if (c->connecting)
		return;
	if (ev & EPOLLERR) {
		int err = 0;
		socklen_t len = sizeof err;
		getsockopt(c->fd[s->which], SOL_SOCKET, SO_ERROR, &err, &len);
		if (err) {
			conn_close(c, 1);
			return;
		}
	}
	if ((ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP)) && !in->pending)
		pump(c, in, !(ev & (EPOLLRDHUP | EPOLLHUP)));
	if ((ev & EPOLLOUT) && out->pending && !c->closed)
		pump(c, out, 0);
}

static struct conn *graveyard[BATCH];  /* closed this batch, freed after it */
static int buried;

static void accept_all(int listener, const struct sockaddr_in *target)
{
	for (;;) {
		int one = 1, client, server, r;
		struct conn *c;
		struct epoll_event ev;
		client = accept4(listener, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (client < 0)
			return;
		server = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
		if (server < 0) {
			close(client);
			return;
		}
		setsockopt(client, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
		setsockopt(server, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
		c = calloc(1, sizeof *c);
		if (!c)
			die("calloc");
		c->fd[0] = client;
		c->fd[1] = server;
		c->up = (struct dir){ .src = client, .dst = server, .pipe = { -1, -1 } };
		c->down = (struct dir){ .src = server, .dst = client, .pipe = { -1, -1 } };
		for (int i = 0; i < 2; i++) {
			c->side[i] = (struct side){ c, i };
			ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
			ev.data.ptr = &c->side[i];
			epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd[i], &ev);
		}
		r = connect(server, (const struct sockaddr *)target, sizeof *target);
		c->connecting = r < 0 && errno == EINPROGRESS;
		if (r < 0 && errno != EINPROGRESS) {
			conn_close(c, 1);
			free(c);
		}
	}
}

int main(int argc, char **argv)
{
	struct sockaddr_in listen_at, target;
	int listener, nsfd, one = 1, workers = 1;
	struct epoll_event lev;
	pid_t children[64];

	if (argc < 4) {
		fprintf(stderr, "usage: %s LISTEN_IP:PORT NETNS_PATH CONNECT_IP:PORT "
			"[WORKERS [hybrid|copy|splice]]\n", argv[0]);
		return 2;
	}
	parse(argv[1], &listen_at);
	parse(argv[3], &target);
	if (argc > 4)
		workers = atoi(argv[4]);
	if (argc > 5)
		mode = !strcmp(argv[5], "copy") ? COPY : !strcmp(argv[5], "splice") ? SPLICE : HYBRID;
	signal(SIGPIPE, SIG_IGN);

	listener = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (listener < 0)
		die("socket");
	setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	if (bind(listener, (struct sockaddr *)&listen_at, sizeof listen_at) || listen(listener, 4096))
		die(argv[1]);
	nsfd = open(argv[2], O_RDONLY | O_CLOEXEC);
	if (nsfd < 0 || setns(nsfd, CLONE_NEWNET))
		die(argv[2]);
	close(nsfd);

	/* The parent only supervises: on SIGTERM it ends its workers and reaps them, so
	 * nothing outlives it and no zombie is left. */
	if (workers < 1 || workers > 64)
		fprintf(stderr, "WORKERS must be 1..64\n"), exit(2);
	for (int i = 0; i < workers; i++) {
		pid_t pid = fork();
		children[i] = pid;
		if (pid < 0)
			die("fork");
		if (pid == 0) {
			prctl(PR_SET_PDEATHSIG, SIGKILL);
			goto serve;
		}
	}
	{
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
serve:
	epfd = epoll_create1(EPOLL_CLOEXEC);
	lev.events = EPOLLIN | EPOLLEXCLUSIVE;
	lev.data.ptr = NULL;
	if (epoll_ctl(epfd, EPOLL_CTL_ADD, listener, &lev))
		die("epoll_ctl");
	for (;;) {
		struct epoll_event events[BATCH];
		int n = epoll_wait(epfd, events, BATCH, -1);
		for (int i = 0; i < n; i++) {
			struct side *s = events[i].data.ptr;
			if (!s) {
				accept_all(listener, &target);
				continue;
			}
			if (s->conn->closed)
				continue;
			on_event(s, events[i].events);
			if (s->conn->closed)  /* once: its later events are skipped */
				graveyard[buried++] = s->conn;
		}
		while (buried)
			free(graveyard[--buried]);
	}
}
