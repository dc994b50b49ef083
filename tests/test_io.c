/*
 * test_io.c: cancellable fd I/O and keel_spawn_fd().
 *
 * Each call over a socketpair, a pipe or loopback TCP: success, deadline,
 * cancellation while blocked (another task cancels the scope once the
 * blocked task is seen parked in its fd wait), end of file. keel_spawn_fd
 * is checked for leaks on every failure path by counting /proc/self/fd.
 */
#include <dirent.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include "harness.h"
#include "internal.h"

/* ---- Helpers ---- */

static int count_fds(void)
{
	DIR *d = opendir("/proc/self/fd");
	struct dirent *e;
	int n = 0;

	if (!d)
		harness_skip("no /proc/self/fd");
	while ((e = readdir(d)) != NULL)
		if (e->d_name[0] != '.')
			n++;
	closedir(d);
	return n - 1; /* the directory's own fd */
}

static int is_open(int fd)
{
	return fcntl(fd, F_GETFD) >= 0;
}

/* Wait until task t is parked in a wait of keel's ("fd_wait" here). */
static void wait_blocked(keel_task_t t, const char *what)
{
	struct keel__task *slot = keel__task_slot(t);
	const char *b;

	while (!(b = load_relaxed(&slot->blocked_in)) || strcmp(b, what) != 0)
		sched_yield();
}

static void pair(int sv[2])
{
	HARNESS_NEED(SOCKETS);
	CHECK_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
}

static int listener(struct sockaddr_in *sa, int backlog, int nonblock)
{
	socklen_t sl = sizeof *sa;
	int fd;

	HARNESS_NEED(SOCKETS);
	fd = socket(AF_INET,
		    SOCK_STREAM | SOCK_CLOEXEC | (nonblock ? SOCK_NONBLOCK : 0),
		    0);
	CHECK(fd >= 0);
	memset(sa, 0, sizeof *sa);
	sa->sin_family = AF_INET;
	sa->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	CHECK_EQ(bind(fd, (struct sockaddr *)sa, sizeof *sa), 0);
	CHECK_EQ(getsockname(fd, (struct sockaddr *)sa, &sl), 0);
	if (backlog >= 0)
		CHECK_EQ(listen(fd, backlog), 0);
	return fd;
}

static int tcp_socket(void)
{
	int fd;

	HARNESS_NEED(SOCKETS);
	fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);

	CHECK(fd >= 0);
	return fd;
}

/* What a child task did: its call's result and how much it moved. */
struct op {
	int fd;
	char buf[64];
	size_t len;
	size_t written;
	long rc;
	const struct sockaddr_in *sa;
};

static int do_read(void *p)
{
	struct op *op = p;

	op->rc = keel_read(op->fd, op->buf, sizeof op->buf, KEEL_FOREVER);
	return 0;
}

static int do_accept(void *p)
{
	struct op *op = p;

	op->rc = keel_accept(op->fd, NULL, KEEL_FOREVER);
	return 0;
}

static int do_connect(void *p)
{
	struct op *op = p;

	op->rc = keel_connect(op->fd, (const struct sockaddr *)op->sa,
			      sizeof *op->sa, KEEL_FOREVER);
	return 0;
}

static char big[1 << 20];

static int do_write_big(void *p)
{
	struct op *op = p;

	op->rc = keel_write_all(op->fd, big, sizeof big, &op->written,
				KEEL_FOREVER);
	return 0;
}

/* Run fn(op) in a child task, wait until it blocks in its fd wait, cancel
 * its scope from this task, and close the scope. */
static void cancel_while_blocked(keel_fn fn, struct op *op)
{
	keel_scope_t *s;
	keel_task_t c;

	op->rc = 1;
	CHECK_OK(keel_scope_open(&s, NULL));
	CHECK_OK(keel_spawn(s, fn, op, NULL, &c));
	wait_blocked(c, "fd_wait");
	CHECK_OK(keel_scope_cancel(s));
	CHECK_RC(keel_scope_close(s), -ECANCELED);
}

static void fill_pattern(void)
{
	for (size_t i = 0; i < sizeof big; i++)
		big[i] = (char)(i * 7 + i / 251);
}

/* ---- keel_read ---- */

TEST(read_returns_what_is_there)
{
	char buf[16];
	int sv[2];

	pair(sv);
	CHECK_EQ(write(sv[1], "hello", 5), 5);
	CHECK_EQ(keel_read(sv[0], buf, sizeof buf, KEEL_FOREVER), 5);
	CHECK(memcmp(buf, "hello", 5) == 0);
	CHECK_EQ(keel_read(sv[0], buf, 0, KEEL_FOREVER), 0);
	CHECK_RC(keel_read(-1, buf, 1, KEEL_FOREVER), -EBADF);
	CHECK_RC(keel_read(sv[0], NULL, 1, KEEL_FOREVER), -EINVAL);
	close(sv[0]);
	close(sv[1]);
}

TEST(read_waits_for_a_byte)
{
	struct op op = {0};
	keel_scope_t *s;
	keel_task_t c;
	int sv[2];

	pair(sv);
	op.fd = sv[0];
	CHECK_OK(keel_scope_open(&s, NULL));
	CHECK_OK(keel_spawn(s, do_read, &op, NULL, &c));
	wait_blocked(c, "fd_wait");
	CHECK_EQ(write(sv[1], "x", 1), 1);
	CHECK_OK(keel_scope_join(s, KEEL_FOREVER));
	CHECK_OK(keel_scope_close(s));
	CHECK_EQ(op.rc, 1);
	CHECK_EQ(op.buf[0], 'x');
	close(sv[0]);
	close(sv[1]);
}

TEST(read_returns_zero_at_eof)
{
	char buf[4];
	int sv[2], p[2];

	pair(sv);
	CHECK_EQ(write(sv[1], "ab", 2), 2);
	close(sv[1]);
	CHECK_EQ(keel_read(sv[0], buf, sizeof buf, KEEL_FOREVER), 2);
	CHECK_EQ(keel_read(sv[0], buf, sizeof buf, KEEL_FOREVER), 0);
	close(sv[0]);
	/* A pipe (not a socket), blocking. */
	CHECK_EQ(pipe(p), 0);
	close(p[1]);
	CHECK_EQ(keel_read(p[0], buf, sizeof buf, KEEL_FOREVER), 0);
	close(p[0]);
}

TEST(read_deadline)
{
	char buf[4];
	int sv[2], p[2];

	pair(sv);
	CHECK_RC(keel_read(sv[0], buf, sizeof buf, keel_after(KEEL_MS(20))),
		 -ETIMEDOUT);
	CHECK_RC(keel_read(sv[0], buf, sizeof buf, 0), -ETIMEDOUT);
	close(sv[0]);
	close(sv[1]);
	CHECK_EQ(pipe(p), 0); /* blocking: polled first */
	CHECK_RC(keel_read(p[0], buf, sizeof buf, keel_after(KEEL_MS(20))),
		 -ETIMEDOUT);
	close(p[0]);
	close(p[1]);
}

TEST(read_cancelled_while_blocked)
{
	struct op op = {0};
	int sv[2], p[2];

	pair(sv);
	op.fd = sv[0];
	cancel_while_blocked(do_read, &op);
	CHECK_RC(op.rc, -ECANCELED);
	close(sv[0]);
	close(sv[1]);
	/* A blocking pipe: the same. */
	CHECK_EQ(pipe(p), 0);
	op.fd = p[0];
	cancel_while_blocked(do_read, &op);
	CHECK_RC(op.rc, -ECANCELED);
	close(p[0]);
	close(p[1]);
}

TEST(read_woken_by_keel_task_cancel)
{
	struct op op = {0}, other = {0};
	keel_scope_t *s;
	keel_task_t c, c2;
	int sv[2], sv2[2];

	pair(sv);
	pair(sv2);
	op.fd = sv[0];
	other.fd = sv2[0];
	CHECK_OK(keel_scope_open(&s, NULL));
	CHECK_OK(keel_spawn(s, do_read, &op, NULL, &c));
	CHECK_OK(keel_spawn(s, do_read, &other, NULL, &c2));
	wait_blocked(c, "fd_wait");
	wait_blocked(c2, "fd_wait");
	/* One task is cancelled; its sibling goes on reading. */
	CHECK_OK(keel_task_cancel(c));
	CHECK_OK(keel_join(c, NULL, KEEL_FOREVER));
	CHECK_RC(op.rc, -ECANCELED);
	CHECK_EQ(write(sv2[1], "y", 1), 1);
	CHECK_OK(keel_join(c2, NULL, KEEL_FOREVER));
	CHECK_EQ(other.rc, 1);
	CHECK_OK(keel_scope_close(s));
	close(sv[0]);
	close(sv[1]);
	close(sv2[0]);
	close(sv2[1]);
}

static int read_when_cancelled(keel_scope_t *s, void *p)
{
	struct op *op = p;

	keel_scope_cancel(s);
	op->rc = keel_read(op->fd, op->buf, sizeof op->buf, KEEL_FOREVER);
	return 0;
}

TEST(read_is_a_cancellation_point_even_with_bytes_waiting)
{
	struct op op = {0};
	int sv[2];

	pair(sv);
	CHECK_EQ(write(sv[1], "x", 1), 1);
	op.fd = sv[0];
	CHECK_RC(keel_scope_run(read_when_cancelled, &op, NULL), -ECANCELED);
	CHECK_RC(op.rc, -ECANCELED);
	/* The byte is still there. */
	CHECK_EQ(keel_read(sv[0], op.buf, sizeof op.buf, 0), 1);
	close(sv[0]);
	close(sv[1]);
}

/* ---- keel_write_all ---- */

/* A writer in a child task pushes 1 MiB through small socket buffers; the
 * reader (this task) starts only once the writer has had to wait. */
TEST(write_all_with_a_slow_reader)
{
	static char got[sizeof big];
	struct op op = {0};
	int sv[2], small = 4096;
	size_t have = 0;
	keel_scope_t *s;
	keel_task_t c;

	fill_pattern();
	pair(sv);
	CHECK_EQ(setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &small, sizeof small), 0);
	CHECK_EQ(setsockopt(sv[1], SOL_SOCKET, SO_RCVBUF, &small, sizeof small), 0);
	op.fd = sv[0];
	op.rc = 1;
	CHECK_OK(keel_scope_open(&s, NULL));
	CHECK_OK(keel_spawn(s, do_write_big, &op, NULL, &c));
	wait_blocked(c, "fd_wait");
	while (have < sizeof got) {
		ssize_t n = keel_read(sv[1], got + have, 1000, KEEL_FOREVER);

		CHECK(n > 0);
		have += (size_t)n;
	}
	CHECK_OK(keel_scope_join(s, KEEL_FOREVER));
	CHECK_OK(keel_scope_close(s));
	CHECK_RC(op.rc, 0);
	CHECK_EQ(op.written, sizeof big);
	CHECK(memcmp(got, big, sizeof big) == 0);
	close(sv[0]);
	close(sv[1]);
}

TEST(write_all_deadline_reports_what_was_written)
{
	size_t written = 12345;
	int sv[2];

	pair(sv);
	CHECK_RC(keel_write_all(sv[0], big, sizeof big, &written,
				keel_after(KEEL_MS(20))),
		 -ETIMEDOUT);
	CHECK(written > 0 && written < sizeof big);
	CHECK_RC(keel_write_all(-1, big, 1, &written, KEEL_FOREVER), -EBADF);
	CHECK_EQ(written, 0);
	CHECK_RC(keel_write_all(sv[0], NULL, 1, NULL, KEEL_FOREVER), -EINVAL);
	CHECK_OK(keel_write_all(sv[0], NULL, 0, NULL, KEEL_FOREVER));
	close(sv[0]);
	close(sv[1]);
}

TEST(write_all_cancelled_while_blocked)
{
	struct op op = {0};
	int sv[2], p[2];

	pair(sv);
	op.fd = sv[0];
	cancel_while_blocked(do_write_big, &op);
	CHECK_RC(op.rc, -ECANCELED);
	CHECK(op.written > 0 && op.written < sizeof big);
	close(sv[0]);
	close(sv[1]);
	/* A blocking pipe: written PIPE_BUF at a time after a poll, so the
	 * writer waits in keel_fd_wait, never in write(2). */
	CHECK_EQ(pipe(p), 0);
	op.fd = p[1];
	op.written = 0;
	cancel_while_blocked(do_write_big, &op);
	CHECK_RC(op.rc, -ECANCELED);
	CHECK(op.written > 0 && op.written < sizeof big);
	close(p[0]);
	close(p[1]);
}

TEST(write_all_to_a_closed_peer_is_epipe_not_sigpipe)
{
	size_t written;
	int sv[2];

	pair(sv);
	close(sv[1]);
	/* SIGPIPE's default action would end this process. */
	CHECK_RC(keel_write_all(sv[0], "x", 1, &written, KEEL_FOREVER), -EPIPE);
	CHECK_EQ(written, 0);
	close(sv[0]);
}

static int read_all_pipe(void *p)
{
	static char got[sizeof big];
	struct op *op = p;
	size_t have = 0;
	ssize_t n;

	while ((n = keel_read(op->fd, got + have, sizeof got - have,
			      KEEL_FOREVER)) > 0)
		have += (size_t)n;
	op->rc = n;
	op->len = have;
	return memcmp(got, big, have) == 0 ? 0 : -EIO;
}

TEST(write_all_through_a_blocking_pipe)
{
	struct op op = {0};
	size_t written;
	keel_scope_t *s;
	int p[2];

	HARNESS_NEED(FD_WAIT);
	fill_pattern();
	CHECK_EQ(pipe(p), 0);
	op.fd = p[0];
	CHECK_OK(keel_scope_open(&s, NULL));
	CHECK_OK(keel_spawn(s, read_all_pipe, &op, NULL, NULL));
	CHECK_OK(keel_write_all(p[1], big, sizeof big, &written, KEEL_FOREVER));
	CHECK_EQ(written, sizeof big);
	close(p[1]);
	CHECK_OK(keel_scope_join(s, KEEL_FOREVER));
	CHECK_OK(keel_scope_close(s));
	CHECK_EQ(op.rc, 0);
	CHECK_EQ(op.len, sizeof big);
	close(p[0]);
}

TEST(read_and_write_all_on_a_nonblocking_pipe)
{
	char buf[8];
	size_t written;
	int p[2];

	HARNESS_NEED(FD_WAIT);
	CHECK_EQ(pipe2(p, O_NONBLOCK | O_CLOEXEC), 0);
	CHECK_RC(keel_read(p[0], buf, sizeof buf, keel_after(KEEL_MS(10))),
		 -ETIMEDOUT);
	CHECK_OK(keel_write_all(p[1], "abc", 3, &written, KEEL_FOREVER));
	CHECK_EQ(written, 3);
	CHECK_EQ(keel_read(p[0], buf, sizeof buf, KEEL_FOREVER), 3);
	CHECK(memcmp(buf, "abc", 3) == 0);
	/* Full: the rest waits for room until the deadline. */
	CHECK_RC(keel_write_all(p[1], big, sizeof big, &written,
				keel_after(KEEL_MS(10))),
		 -ETIMEDOUT);
	CHECK(written > 0 && written < sizeof big);
	close(p[1]);
	close(p[0]);
}

/* ---- keel_accept and keel_connect ---- */

static void accept_and_talk(int nonblocking_listener)
{
	struct sockaddr_storage peer;
	struct sockaddr_in sa;
	struct op op = {0};
	keel_scope_t *s;
	char buf[8];
	int lfd, fd;

	lfd = listener(&sa, 16, nonblocking_listener);
	op.fd = tcp_socket();
	op.sa = &sa;
	op.rc = 1;
	CHECK_OK(keel_scope_open(&s, NULL));
	CHECK_OK(keel_spawn(s, do_connect, &op, NULL, NULL));
	fd = keel_accept(lfd, &peer, keel_after(KEEL_SEC(10)));
	CHECK(fd >= 0);
	CHECK_OK(keel_scope_join(s, KEEL_FOREVER));
	CHECK_OK(keel_scope_close(s));
	CHECK_RC(op.rc, 0);
	CHECK_EQ(peer.ss_family, AF_INET);
	/* The new fd is close-on-exec and non-blocking; the connected one
	 * is blocking again, as it was given. */
	CHECK(fcntl(fd, F_GETFD) & FD_CLOEXEC);
	CHECK(fcntl(fd, F_GETFL) & O_NONBLOCK);
	CHECK(!(fcntl(op.fd, F_GETFL) & O_NONBLOCK));
	CHECK_OK(keel_write_all(op.fd, "ping", 4, NULL, KEEL_FOREVER));
	CHECK_EQ(keel_read(fd, buf, sizeof buf, KEEL_FOREVER), 4);
	CHECK(memcmp(buf, "ping", 4) == 0);
	close(fd);
	CHECK_EQ(keel_read(op.fd, buf, sizeof buf, KEEL_FOREVER), 0);
	close(op.fd);
	close(lfd);
}

TEST(accept_and_connect_over_loopback)
{
	accept_and_talk(0);
	accept_and_talk(1);
}

TEST(accept_deadline)
{
	struct sockaddr_in sa;
	int lfd;

	for (int nb = 0; nb < 2; nb++) {
		lfd = listener(&sa, 16, nb);
		CHECK_RC(keel_accept(lfd, NULL, keel_after(KEEL_MS(20))),
			 -ETIMEDOUT);
		close(lfd);
	}
	CHECK_RC(keel_accept(-1, NULL, 0), -EBADF);
	lfd = listener(&sa, -1, 1); /* bound, not listening */
	CHECK_RC(keel_accept(lfd, NULL, 0), -EINVAL);
	close(lfd);
}

TEST(accept_cancelled_while_blocked)
{
	struct sockaddr_in sa;
	struct op op = {0};

	for (int nb = 0; nb < 2; nb++) {
		op.fd = listener(&sa, 16, nb);
		cancel_while_blocked(do_accept, &op);
		CHECK_RC(op.rc, -ECANCELED);
		close(op.fd);
	}
}

TEST(connect_refused)
{
	struct sockaddr_in sa;
	int port_holder = listener(&sa, -1, 0), fd = tcp_socket();

	/* Bound but not listening: the SYN is answered with a reset. */
	CHECK_RC(keel_connect(fd, (struct sockaddr *)&sa, sizeof sa,
			      keel_after(KEEL_SEC(10))),
		 -ECONNREFUSED);
	CHECK_RC(keel_connect(fd, NULL, 0, 0), -EINVAL);
	CHECK_RC(keel_connect(-1, (struct sockaddr *)&sa, sizeof sa, 0), -EBADF);
	close(fd);
	close(port_holder);
}

/* A listener with a backlog of 0 takes one connection; Linux drops the
 * SYNs of the next ones while nobody accepts, so they stay in progress. */
static int full_listener(struct sockaddr_in *sa, int *first)
{
	int lfd = listener(sa, 0, 0);

	*first = tcp_socket();
	CHECK_OK(keel_connect(*first, (struct sockaddr *)sa, sizeof *sa,
			      keel_after(KEEL_SEC(10))));
	return lfd;
}

TEST(connect_deadline)
{
	struct sockaddr_in sa;
	int first, fd, lfd = full_listener(&sa, &first), rc = 0;

	/* The kernel may still take one more; the third waits. */
	for (int i = 0; i < 4 && rc == 0; i++) {
		fd = tcp_socket();
		rc = keel_connect(fd, (struct sockaddr *)&sa, sizeof sa,
				  keel_after(KEEL_MS(50)));
		close(fd);
	}
	CHECK_RC(rc, -ETIMEDOUT);
	close(first);
	close(lfd);
}

TEST(connect_cancelled_while_blocked)
{
	struct sockaddr_in sa;
	struct op op = {0};
	int first, second, lfd = full_listener(&sa, &first), rc;

	second = tcp_socket();
	rc = keel_connect(second, (struct sockaddr *)&sa, sizeof sa,
			  keel_after(KEEL_MS(50)));
	CHECK(rc == 0 || rc == -ETIMEDOUT);
	op.fd = tcp_socket();
	op.sa = &sa;
	cancel_while_blocked(do_connect, &op);
	CHECK_RC(op.rc, -ECANCELED);
	/* Put back to blocking, as it came. */
	CHECK(!(fcntl(op.fd, F_GETFL) & O_NONBLOCK));
	close(op.fd);
	close(second);
	close(first);
	close(lfd);
}

/* ---- keel_spawn_fd ---- */

struct owner {
	int fd;
	int was_open;
	int exit_thread;
};

static int own_fd(int fd, void *p)
{
	struct owner *o = p;

	o->fd = fd;
	o->was_open = is_open(fd);
	if (o->exit_thread)
		pthread_exit(NULL);
	return 0;
}

static void check_spawn_fd_fails(keel_scope_t *s, keel_fd_fn fn,
				 const keel_spawn_opts *opts, int want)
{
	struct owner o = {-1, 0, 0};
	int before = count_fds(), sv[2];

	pair(sv);
	close(sv[1]);
	CHECK_RC(keel_spawn_fd(s, fn, &o, sv[0], opts, NULL), want);
	CHECK(!is_open(sv[0]));
	CHECK_EQ(count_fds(), before);
	CHECK_EQ(o.fd, -1); /* fn never ran */
}

TEST(spawn_fd_closes_the_fd_on_bad_arguments)
{
	keel_scope_t *s;

	CHECK_OK(keel_scope_open(&s, NULL));
	check_spawn_fd_fails(s, NULL, NULL, -EINVAL);
	check_spawn_fd_fails(NULL, own_fd, NULL, -EINVAL);
	CHECK_RC(keel_spawn_fd(s, own_fd, NULL, -1, NULL, NULL), -EBADF);
	CHECK_OK(keel_scope_close(s));
}

TEST(spawn_fd_closes_the_fd_in_a_cancelled_scope)
{
	keel_scope_t *s, *stale;

	CHECK_OK(keel_scope_open(&s, NULL));
	CHECK_OK(keel_scope_cancel(s));
	check_spawn_fd_fails(s, own_fd, NULL, -ECANCELED);
	keel_scope_close(s);
	/* A closed scope too. */
	CHECK_OK(keel_scope_open(&stale, NULL));
	CHECK_OK(keel_scope_close(stale));
	check_spawn_fd_fails(stale, own_fd, NULL, -ECANCELED);
}

TEST(spawn_fd_closes_the_fd_when_the_thread_cannot_start)
{
	/* More than the address space holds: 64 TiB, or 3 GiB of 4. */
	keel_spawn_opts opts = {
		.stack_size = sizeof(size_t) < 8 ? SIZE_MAX / 4 * 3
						 : (size_t)(UINT64_C(1) << 46)};
	keel_scope_t *s;

	CHECK_OK(keel_scope_open(&s, NULL));
	check_spawn_fd_fails(s, own_fd, &opts, -ENOMEM);
	CHECK_OK(keel_scope_close(s));
}

#if defined(__GLIBC__) && !defined(__SANITIZE_ADDRESS__) &&                \
	!defined(__SANITIZE_THREAD__) && !defined(KEEL_UNDER_SANITIZER)
#define INTERPOSE 1
void *__libc_malloc(size_t);
static _Thread_local int fail_mallocs;

/* While fail_mallocs is set on this thread, malloc fails. */
void *malloc(size_t n)
{
	if (fail_mallocs)
		return NULL;
	return __libc_malloc(n);
}
#endif

TEST(spawn_fd_closes_the_fd_when_out_of_memory)
{
#ifdef INTERPOSE
	keel_scope_t *s;
	struct owner o = {-1, 0, 0};
	int before, sv[2], rc;

	CHECK_OK(keel_scope_open(&s, NULL));
	before = count_fds();
	pair(sv);
	close(sv[1]);
	fail_mallocs = 1;
	rc = keel_spawn_fd(s, own_fd, &o, sv[0], NULL, NULL);
	fail_mallocs = 0;
	CHECK_RC(rc, -ENOMEM);
	CHECK(!is_open(sv[0]));
	CHECK_EQ(count_fds(), before);
	CHECK_EQ(o.fd, -1);
	CHECK_OK(keel_scope_close(s));
#else
	harness_skip("malloc cannot be replaced here (sanitizer or libc)");
#endif
}

static void spawn_fd_child_closes(int exit_thread, int cancel_first)
{
	struct owner o = {-1, 0, exit_thread};
	keel_scope_t *s;
	int before = count_fds(), sv[2];

	pair(sv);
	close(sv[1]);
	CHECK_OK(keel_scope_open(&s, NULL));
	if (cancel_first) {
		/* The body runs all the same once the spawn succeeded. */
		CHECK_OK(keel_spawn_fd(s, own_fd, &o, sv[0], NULL, NULL));
		CHECK_OK(keel_scope_cancel(s));
	} else {
		CHECK_OK(keel_spawn_fd(s, own_fd, &o, sv[0], NULL, NULL));
	}
	keel_scope_close(s);
	CHECK_EQ(o.fd, sv[0]);
	CHECK(o.was_open);
	CHECK(!is_open(sv[0]));
	CHECK_EQ(count_fds(), before);
}

TEST(spawn_fd_child_owns_and_closes_the_fd)
{
	spawn_fd_child_closes(0, 0);
	spawn_fd_child_closes(0, 1);
}

TEST(spawn_fd_closes_the_fd_when_the_child_calls_pthread_exit)
{
	spawn_fd_child_closes(1, 0);
}
