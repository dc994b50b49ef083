/*
 * keel/io.h: cancellable fd I/O, in libdill's manner.
 *
 * accept, connect, read and write-all, each with an absolute deadline and
 * each a cancellation point: a task blocked in one of them is woken by
 * its scope's cancellation (-ECANCELED) or its deadline (-ETIMEDOUT).
 * They are built on keel_fd_wait() and work on blocking and non-blocking
 * fds alike (see each call for the one case where a blocking fd can still
 * block). Errors are negative errno values; errno is not used.
 *
 * keel_spawn_fd() hands an fd to a new task so that it cannot leak: on
 * every failure path the call closes it, and once the call succeeds the
 * child owns it and keel closes it when the child ends, however it ends.
 *
 * See docs/io.md.
 */
#ifndef KEEL_IO_H
#define KEEL_IO_H

#include <sys/types.h>

#include "common.h"
#include "scope.h"
#include "task.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Only pointers to these are passed: <sys/socket.h>, with its send(),
 * accept() and connect(), is not pulled into every file that includes
 * keel.h. */
struct sockaddr;
struct sockaddr_storage;

/**
 * keel_accept() - accept a connection, cancellably.
 * @lfd:      a listening socket, blocking or not.
 * @peer:     where the peer's address is stored (its ss_family says which
 *            kind); may be NULL.
 * @deadline: absolute time to give up.
 *
 * The new fd is close-on-exec and non-blocking, whatever @lfd is: keel's
 * I/O calls need no more, and a program that execs never leaks it (clear
 * O_NONBLOCK with fcntl(2) to hand it to blocking code). A connection
 * aborted before it could be accepted (ECONNABORTED, EPROTO) is skipped.
 * If @lfd is blocking and several threads accept on it, one may block in
 * accept(2) after the connection it saw was taken by another: make a
 * shared listener non-blocking.
 *
 * Context: a task; blocks until a connection comes; a cancellation point
 * (checked on entry too, even with a connection waiting).
 * Return: the new fd (>= 0); -ETIMEDOUT; -ECANCELED; -EBADF if @lfd is
 * negative or not open; -EINVAL (not listening); -EMFILE or -ENFILE (out
 * of fds: nothing was accepted); another negative errno value of accept(2).
 */
KEEL_API int keel_accept(int lfd, struct sockaddr_storage *peer,
			 keel_time_t deadline);

/**
 * keel_connect() - connect a socket, cancellably.
 * @fd:       a socket not yet connected, blocking or not.
 * @addr:     the address to connect to.
 * @addrlen:  its length (sizeof of the address's struct).
 * @deadline: absolute time to give up.
 *
 * A non-blocking connect(2), a wait for the socket to be writable, then
 * its SO_ERROR. A blocking @fd is made non-blocking for the call and put
 * back before it returns. After -ETIMEDOUT or -ECANCELED the connection
 * attempt is left half-way: close @fd (it cannot be connected again).
 *
 * Context: a task; blocks until connected or refused; a cancellation point
 * (checked on entry too).
 * Return: 0; -ETIMEDOUT; -ECANCELED; -EBADF if @fd is negative or not
 * open; -EINVAL if @addr is NULL or @addrlen too large; -ECONNREFUSED, -ENETUNREACH,
 * -EHOSTUNREACH and the rest of connect(2)'s errors, the ones that come
 * after the wait included; -EAGAIN for a Unix socket whose listener's
 * backlog is full; -EISCONN or -EALREADY as connect(2) gives them.
 */
KEEL_API int keel_connect(int fd, const struct sockaddr *addr,
			  size_t addrlen, keel_time_t deadline);

/**
 * keel_read() - read what is there, waiting for at least one byte.
 * @fd:       the descriptor, blocking or not.
 * @buf:      where the bytes go.
 * @len:      at most this many are read.
 * @deadline: absolute time to give up.
 *
 * Returns as soon as some bytes have been read, as read(2) does, or at end
 * of file. A socket is read with MSG_DONTWAIT, so its O_NONBLOCK flag does
 * not matter; another blocking fd (a pipe, a terminal) is polled before
 * each read, which does not block unless another reader takes the bytes
 * in between.
 *
 * Context: a task; blocks until a byte comes; a cancellation point
 * (checked on entry too, even with bytes waiting).
 * Return: the number of bytes read (> 0); 0 at end of file, or if @len is
 * 0; -ETIMEDOUT; -ECANCELED; -EBADF if @fd is negative or not open;
 * -EINVAL if @buf is NULL and @len is not 0; -ECONNRESET and the rest of
 * read(2)'s errors.
 */
KEEL_API ssize_t keel_read(int fd, void *buf, size_t len,
			   keel_time_t deadline);

/**
 * keel_write_all() - write a whole buffer, or fail.
 * @fd:       the descriptor, blocking or not.
 * @buf:      the bytes.
 * @len:      how many.
 * @written:  where the count of bytes written is stored, on failure too
 *            (a write that failed half-way has sent that many); may be
 *            NULL.
 * @deadline: absolute time to give up.
 *
 * Writes, and waits for room, until all @len bytes are written. A socket
 * is written with MSG_DONTWAIT and MSG_NOSIGNAL: a peer that has gone
 * gives -EPIPE, never SIGPIPE. Another fd (a pipe) is written as write(2)
 * does, SIGPIPE included; if it is blocking, it is polled and then written
 * PIPE_BUF bytes at a time, which does not block unless another writer
 * fills it in between.
 *
 * Context: a task; blocks until everything is written; a cancellation
 * point (checked on entry and whenever it must wait; a buffer the fd takes
 * at once is written whole).
 * Return: 0 when all @len bytes are written; -ETIMEDOUT; -ECANCELED;
 * -EBADF if @fd is negative or not open; -EINVAL if @buf is NULL and @len
 * is not 0; -EPIPE, -ECONNRESET and the rest of write(2)'s errors. Check
 * *@written to know how much went out before the error.
 */
KEEL_API int keel_write_all(int fd, const void *buf, size_t len,
			    size_t *written, keel_time_t deadline);

/* The body of a task started by keel_spawn_fd(): it owns @fd. */
typedef int (*keel_fd_fn)(int fd, void *arg);

/**
 * keel_spawn_fd() - start a child task that owns a file descriptor.
 * @s:    the scope.
 * @fn:   the child's body, called with @fd and @arg; its return value is
 *        the child's status.
 * @arg:  passed to @fn.
 * @fd:   the descriptor handed over. The call owns it from the moment it
 *        is called: on every failure it is closed before the call returns,
 *        and on success the child owns it.
 * @opts: as keel_spawn(); may be NULL.
 * @out:  where the child's handle is stored; may be NULL.
 *
 * As keel_spawn() (with @out NULL or @opts->detached, the child is reaped
 * when it ends: what a server wants for a connection), plus: @fd is closed
 * when @fn returns or the child's thread exits inside it (pthread_exit()),
 * before the child counts as ended. @fn must not close @fd itself (it may dup2() over it or hand it
 * on with dup(); the fd number stays reserved until @fn returns).
 *
 * Context: any task; never blocks.
 * Return: 0; -EBADF if @fd is negative (nothing to close); -EINVAL if @fn
 * is NULL or @s is not a scope; -ECANCELED if @s is cancelled, closing or
 * closed; -ENOMEM, including when the thread could not start. @fd is
 * closed on every error but -EBADF.
 */
KEEL_API int keel_spawn_fd(keel_scope_t *s, keel_fd_fn fn, void *arg, int fd,
			   const keel_spawn_opts *opts, keel_task_t *out);

#ifdef __cplusplus
}
#endif

#endif /* KEEL_IO_H */
