/*
 * io.c: cancellable fd I/O (accept, connect, read, write-all) and
 * keel_spawn_fd().
 *
 * DESIGN
 * Each call tries the system call first and waits with keel_fd_wait()
 * only when it would block, so cancellation and deadlines reach every
 * wait and a ready fd costs one system call. Every call checks for
 * cancellation on entry as well (as libdill and Trio do): a cancelled task
 * that loops on keel_read() of a busy socket still stops.
 *
 * Blocking fds work too. "Would block" must then be found out without
 * blocking:
 *   - sockets: recv()/send() with MSG_DONTWAIT make one call non-blocking
 *     whatever the fd's O_NONBLOCK flag says; ENOTSOCK tells us the fd is
 *     something else;
 *   - other fds: fcntl(F_GETFL); a blocking one is polled first (through
 *     keel_fd_wait) and then read once, or written at most PIPE_BUF bytes,
 *     which a pipe that polled writable takes without blocking;
 *   - a listener: accept() on a blocking one after it polled readable;
 *   - connect: the socket is made non-blocking for the call (there is no
 *     per-call flag for connect), and put back.
 * We never set O_NONBLOCK on an fd the caller gave us for longer than a
 * keel_connect(): the flag belongs to the open file description, which
 * other processes may share (a terminal, an inherited pipe).
 *
 * keel_spawn_fd() OWNERSHIP. The fd has one owner at every moment:
 *   CALL (from entry) --any failure--> closed by the call, error returned
 *   CALL --keel_spawn() returned 0--> CHILD
 *   CHILD --fn returns, or pthread_exit inside fn--> closed by the child,
 *         before its task ends (a cleanup handler around fn)
 * keel_spawn() runs the child's fn once it has returned 0, even in a scope
 * cancelled right after, so CHILD is always reached by the trampoline and
 * the close always happens; the trampoline's box is freed by the child
 * (success) or by the call (failure), never both.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

#include "internal.h"

#ifndef MSG_NOSIGNAL
#define MSG_NOSIGNAL 0 /* the system has none: SIGPIPE as write(2) */
#endif
#ifndef PIPE_BUF
#define PIPE_BUF 512 /* POSIX's minimum */
#endif

/* How an fd is driven; found out by the first call on it in each call. */
enum io_kind {
	IO_UNKNOWN,  /* not tried yet */
	IO_SOCKET,   /* recv/send with MSG_DONTWAIT */
	IO_NONBLOCK, /* read/write, O_NONBLOCK set */
	IO_BLOCKING, /* read/write after a poll */
};

/* The entry of every call: the calling task, checked for cancellation. */
static int enter(void)
{
	struct keel__task *t = keel__self();

	return t ? keel__check(t) : -ENOMEM;
}

static int is_again(int e)
{
	return e == EAGAIN || e == EWOULDBLOCK;
}

/* The kind of a descriptor that is not a socket; -errno if fcntl fails. */
static int plain_kind(int fd)
{
	int fl = fcntl(fd, F_GETFL);

	if (fl < 0)
		return -errno;
	return (fl & O_NONBLOCK) ? IO_NONBLOCK : IO_BLOCKING;
}

/* One attempt: bytes moved, or -errno (-EAGAIN: wait, then try again).
 * *kind is learnt on the first attempt. */
static ssize_t try_io(int fd, void *buf, size_t len, int out, int *kind)
{
	ssize_t n;

	if (*kind == IO_UNKNOWN || *kind == IO_SOCKET) {
		n = out ? send(fd, buf, len, MSG_DONTWAIT | MSG_NOSIGNAL)
			: recv(fd, buf, len, MSG_DONTWAIT);
		if (n >= 0) {
			*kind = IO_SOCKET;
			return n;
		}
		if (errno != ENOTSOCK || *kind == IO_SOCKET)
			return -errno;
		if ((n = plain_kind(fd)) < 0)
			return n;
		*kind = (int)n;
		if (*kind == IO_BLOCKING)
			return -EAGAIN; /* poll first */
	}
	if (*kind == IO_BLOCKING && out && len > PIPE_BUF)
		len = PIPE_BUF;
	n = out ? write(fd, buf, len) : read(fd, buf, len);
	return n < 0 ? -errno : n;
}

/* Wait until fd may be ready for `events`; 0 or a keel_fd_wait() error. */
static int wait_ready(int fd, short events, keel_time_t deadline)
{
	int rc = keel_fd_wait(fd, events, deadline);

	return rc < 0 ? rc : 0;
}

ssize_t keel_read(int fd, void *buf, size_t len, keel_time_t deadline)
{
	int kind = IO_UNKNOWN, rc;
	ssize_t n;

	if (fd < 0)
		return -EBADF;
	if (!buf && len)
		return -EINVAL;
	if ((rc = enter()) < 0)
		return rc;
	if (len == 0)
		return 0;
	if (len > SSIZE_MAX)
		len = SSIZE_MAX;
	for (;;) {
		if (kind == IO_BLOCKING &&
		    (rc = wait_ready(fd, POLLIN, deadline)) < 0)
			return rc;
		n = try_io(fd, buf, len, 0, &kind);
		if (n >= 0)
			return n;
		if (n == -EINTR)
			continue;
		if (!is_again((int)-n))
			return n;
		if (kind != IO_BLOCKING &&
		    (rc = wait_ready(fd, POLLIN, deadline)) < 0)
			return rc;
	}
}

int keel_write_all(int fd, const void *buf, size_t len, size_t *written,
		   keel_time_t deadline)
{
	int kind = IO_UNKNOWN, rc = 0;
	size_t done = 0;
	ssize_t n;

	if (written)
		*written = 0;
	if (fd < 0)
		return -EBADF;
	if (!buf && len)
		return -EINVAL;
	if ((rc = enter()) < 0)
		return rc;
	while (done < len) {
		size_t chunk = len - done;

		if (chunk > SSIZE_MAX)
			chunk = SSIZE_MAX;
		if (kind == IO_BLOCKING &&
		    (rc = wait_ready(fd, POLLOUT, deadline)) < 0)
			break;
		/* send() and write() do not write through buf; the cast only
		 * lets one helper serve both directions. */
		n = try_io(fd, (char *)(uintptr_t)buf + done, chunk, 1, &kind);
		if (n > 0) {
			done += (size_t)n;
			continue;
		}
		if (n == 0) {
			/* write(2) of a positive count never returns 0 on
			 * what poll can wait for: do not spin on it. */
			rc = -EIO;
			break;
		}
		if (n == -EINTR)
			continue;
		if (!is_again((int)-n)) {
			rc = (int)n;
			break;
		}
		if (kind != IO_BLOCKING &&
		    (rc = wait_ready(fd, POLLOUT, deadline)) < 0)
			break;
	}
	if (written)
		*written = done;
	return done == len ? 0 : rc;
}

int keel_accept(int lfd, struct sockaddr_storage *peer, keel_time_t deadline)
{
	int kind, rc, fd;

	if (lfd < 0)
		return -EBADF;
	if ((rc = enter()) < 0)
		return rc;
	if ((kind = plain_kind(lfd)) < 0)
		return kind;
	for (;;) {
		if (kind == IO_BLOCKING &&
		    (rc = wait_ready(lfd, POLLIN, deadline)) < 0)
			return rc;
		fd = keel__accept(lfd, peer);
		if (fd >= 0)
			return fd;
		/* A connection that died in the backlog is not the
		 * listener's failure: take the next one. */
		if (fd == -EINTR || fd == -ECONNABORTED || fd == -EPROTO)
			continue;
		if (!is_again(-fd))
			return fd;
		if (kind != IO_BLOCKING &&
		    (rc = wait_ready(lfd, POLLIN, deadline)) < 0)
			return rc;
	}
}

/* After connect(2) said EINPROGRESS: wait for the outcome. keel_fd_wait()
 * returns only for the fd's own events (a wake of keel's makes it check
 * for cancellation and poll again), so writable means decided. */
static int connect_wait(int fd, keel_time_t deadline)
{
	socklen_t sl = sizeof(int);
	int rc, err = 0;

	if ((rc = wait_ready(fd, POLLOUT, deadline)) < 0)
		return rc;
	if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &sl) < 0)
		return -errno;
	return -err;
}

int keel_connect(int fd, const struct sockaddr *addr, size_t addrlen,
		 keel_time_t deadline)
{
	int rc, fl;

	if (fd < 0)
		return -EBADF;
	if (!addr || addrlen > (socklen_t)-1 >> 1)
		return -EINVAL;
	if ((rc = enter()) < 0)
		return rc;
	if ((fl = fcntl(fd, F_GETFL)) < 0)
		return -errno;
	if (!(fl & O_NONBLOCK) && fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
		return -errno;
	if (connect(fd, addr, (socklen_t)addrlen) == 0)
		rc = 0;
	else if (errno == EINPROGRESS || errno == EINTR)
		/* Interrupted, it goes on in the background all the same. */
		rc = connect_wait(fd, deadline);
	else
		rc = -errno;
	if (!(fl & O_NONBLOCK) && fcntl(fd, F_SETFL, fl) < 0 && rc == 0)
		rc = -errno;
	return rc;
}

/* ---- keel_spawn_fd ------------------------------------------------------- */

struct fd_box {
	keel_fd_fn fn;
	void *arg;
	int fd;
};

static void close_fd(void *p)
{
	close(*(int *)p);
}

static int fd_child(void *p)
{
	struct fd_box *box = p;
	keel_fd_fn fn = box->fn;
	void *arg = box->arg;
	int fd = box->fd, rc;

	free(box);
	/* Runs on return and on pthread_exit() alike, before the thread's
	 * keel exit hook ends the task. */
	pthread_cleanup_push(close_fd, &fd);
	rc = fn(fd, arg);
	pthread_cleanup_pop(1);
	return rc;
}

int keel_spawn_fd(keel_scope_t *s, keel_fd_fn fn, void *arg, int fd,
		  const keel_spawn_opts *opts, keel_task_t *out)
{
	struct fd_box *box;
	int rc;

	if (fd < 0)
		return -EBADF;
	if (!fn) {
		rc = -EINVAL;
		goto fail;
	}
	if (!(box = malloc(sizeof *box))) {
		rc = -ENOMEM;
		goto fail;
	}
	box->fn = fn;
	box->arg = arg;
	box->fd = fd;
	if ((rc = keel_spawn(s, fd_child, box, opts, out)) == 0)
		return 0;
	free(box);
fail:
	close(fd);
	return rc;
}
