/*
 * error.c: error names and the panic path.
 *
 * keel__panic() formats into a buffer on the stack and writes it with one
 * write(2): no stdio, no allocation, so it works when malloc is broken or
 * the heap is what went wrong.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"

/* Every errno value the C library defines that POSIX or Linux names, each
 * with a few words of meaning: keel's own codes in keel's terms, the rest
 * as a program that passes them through (a body's status, an I/O call's
 * error) would describe them. A static table: no locale, no allocation,
 * safe in a signal handler. */
#define E(name, text) \
	case name: return #name ": " text;

static const char *errno_name(unsigned e)
{
	switch (e) {
	E(ECANCELED, "cancelled")
	E(ETIMEDOUT, "deadline passed")
	E(ESRCH, "no such task (ended, or never existed)")
	E(ESHUTDOWN, "mailbox closed")
	E(ENOMEM, "out of memory")
	E(EINVAL, "invalid argument")
	E(EPERM, "not permitted")
	E(EDEADLK, "would deadlock")
	E(ESTALE, "stale: already finished or superseded")
	E(EBUSY, "busy")
	E(EAGAIN, "try again (a bounded mailbox is full)")
	E(EMFILE, "too many open files")
	E(EPROTO, "protocol error (a once's owner broke its claim's rules)")
	E(EOVERFLOW, "too large for its type")
	E(EALREADY, "already in progress")
	E(ENOTSUP, "not supported")
	E(EIO, "input/output error")
	E(E2BIG, "argument list too long")
	E(EACCES, "permission denied")
	E(EADDRINUSE, "address in use")
	E(EADDRNOTAVAIL, "address not available")
	E(EAFNOSUPPORT, "address family not supported")
	E(EBADF, "bad file descriptor")
	E(EBADMSG, "bad message")
	E(ECHILD, "no child process")
	E(ECONNABORTED, "connection aborted")
	E(ECONNREFUSED, "connection refused")
	E(ECONNRESET, "connection reset")
	E(EDESTADDRREQ, "destination address required")
	E(EDOM, "argument out of domain")
	E(EDQUOT, "disk quota exceeded")
	E(EEXIST, "already exists")
	E(EFAULT, "bad address")
	E(EFBIG, "file too large")
	E(EHOSTUNREACH, "host unreachable")
	E(EIDRM, "identifier removed")
	E(EILSEQ, "illegal byte sequence")
	E(EINPROGRESS, "in progress")
	E(EINTR, "interrupted")
	E(EISCONN, "already connected")
	E(EISDIR, "is a directory")
	E(ELOOP, "too many levels of symbolic links")
	E(EMLINK, "too many links")
	E(EMSGSIZE, "message too long")
	E(ENAMETOOLONG, "name too long")
	E(ENETDOWN, "network down")
	E(ENETRESET, "connection reset by the network")
	E(ENETUNREACH, "network unreachable")
	E(ENFILE, "too many open files in the system")
	E(ENOBUFS, "no buffer space")
	E(ENODEV, "no such device")
	E(ENOENT, "no such file or directory")
	E(ENOEXEC, "not an executable")
	E(ENOLCK, "no locks available")
	E(ENOMSG, "no message of that type")
	E(ENOPROTOOPT, "protocol option not available")
	E(ENOSPC, "no space left on device")
	E(ENOSYS, "not implemented")
	E(ENOTCONN, "not connected")
	E(ENOTDIR, "not a directory")
	E(ENOTEMPTY, "directory not empty")
	E(ENOTSOCK, "not a socket")
	E(ENOTTY, "not a terminal")
	E(ENXIO, "no such device or address")
	E(EPIPE, "broken pipe")
	E(EPROTONOSUPPORT, "protocol not supported")
	E(EPROTOTYPE, "wrong protocol type for socket")
	E(ERANGE, "result out of range")
	E(EROFS, "read-only file system")
	E(ESPIPE, "invalid seek")
	E(ETXTBSY, "text file busy")
	E(EXDEV, "cross-device link")
#ifdef ENODATA
	E(ENODATA, "no data available")
#endif
#ifdef ENOLINK
	E(ENOLINK, "link severed")
#endif
#ifdef EMULTIHOP
	E(EMULTIHOP, "multihop attempted")
#endif
#ifdef ENOSR
	E(ENOSR, "out of stream resources")
#endif
#ifdef ENOSTR
	E(ENOSTR, "not a stream")
#endif
#ifdef ETIME
	E(ETIME, "timer expired")
#endif
#ifdef EOWNERDEAD
	E(EOWNERDEAD, "previous owner died")
#endif
#ifdef ENOTRECOVERABLE
	E(ENOTRECOVERABLE, "state not recoverable")
#endif
#if defined(EWOULDBLOCK) && EWOULDBLOCK != EAGAIN
	E(EWOULDBLOCK, "operation would block")
#endif
#if defined(EOPNOTSUPP) && EOPNOTSUPP != ENOTSUP
	E(EOPNOTSUPP, "operation not supported")
#endif
#ifdef EHOSTDOWN
	E(EHOSTDOWN, "host down")
#endif
#ifdef ETOOMANYREFS
	E(ETOOMANYREFS, "too many references")
#endif
#ifdef ESOCKTNOSUPPORT
	E(ESOCKTNOSUPPORT, "socket type not supported")
#endif
#ifdef EPFNOSUPPORT
	E(EPFNOSUPPORT, "protocol family not supported")
#endif
#ifdef ENOMEDIUM
	E(ENOMEDIUM, "no medium found")
#endif
#ifdef EKEYEXPIRED
	E(EKEYEXPIRED, "key expired")
#endif
#ifdef ENOKEY
	E(ENOKEY, "required key not available")
#endif
#ifdef ERFKILL
	E(ERFKILL, "blocked by rfkill")
#endif
#ifdef EHWPOISON
	E(EHWPOISON, "memory page has a hardware error")
#endif
#ifdef ENOTBLK
	E(ENOTBLK, "block device required")
#endif
#ifdef EBADFD
	E(EBADFD, "file descriptor in bad state")
#endif
	default: return NULL;
	}
}

#undef E

const char *keel_strerror(int err)
{
	/* The magnitude, computed unsigned: -INT_MIN is no int. */
	unsigned e = err < 0 ? 0u - (unsigned)err : (unsigned)err;
	const char *name;

	if (e == 0)
		return "0: success";
	if ((name = errno_name(e)) != NULL)
		return name;
#if defined(__GLIBC__) && (__GLIBC__ > 2 || __GLIBC_MINOR__ >= 32)
	/* The C library knows the names of the rest (a static table). */
	if (e <= INT_MAX && (name = strerrorname_np((int)e)) != NULL)
		return name;
#endif
	return "unknown error";
}

void keel__panic(const char *file, int line, const char *fmt, ...)
{
	char buf[1024];
	int n;
	va_list ap;

	n = snprintf(buf, sizeof buf, "keel: %s:%d: ", file, line);
	if (n < 0 || (size_t)n >= sizeof buf)
		n = 0;
	va_start(ap, fmt);
	n += vsnprintf(buf + n, sizeof buf - (size_t)n, fmt, ap);
	va_end(ap);
	if ((size_t)n >= sizeof buf - 1)
		n = (int)sizeof buf - 2;
	buf[n++] = '\n';
	if (write(STDERR_FILENO, buf, (size_t)n) < 0) {
		/* Nothing more can be done. */
	}
	abort();
}

void keel__report(const char *fmt, ...)
{
	char buf[512];
	int n;
	va_list ap;

	memcpy(buf, "keel: ", 6);
	va_start(ap, fmt);
	n = vsnprintf(buf + 6, sizeof buf - 7, fmt, ap);
	va_end(ap);
	if (n < 0)
		n = 0;
	n += 6;
	if ((size_t)n > sizeof buf - 2)
		n = (int)sizeof buf - 2;
	buf[n++] = '\n';
	if (write(STDERR_FILENO, buf, (size_t)n) < 0) {
		/* Nothing more can be done. */
	}
}
