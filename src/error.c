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
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"

const char *keel_strerror(int err)
{
	/* The magnitude, computed unsigned: -INT_MIN is no int. */
	unsigned e = err < 0 ? 0u - (unsigned)err : (unsigned)err;

	switch (e) {
	case 0: return "0: success";
	case ECANCELED: return "ECANCELED: cancelled";
	case ETIMEDOUT: return "ETIMEDOUT: deadline passed";
	case ESRCH: return "ESRCH: no such task (ended, or never existed)";
	case ESHUTDOWN: return "ESHUTDOWN: mailbox closed";
	case ENOMEM: return "ENOMEM: out of memory";
	case EINVAL: return "EINVAL: invalid argument";
	case EPERM: return "EPERM: not permitted for this task";
	case EDEADLK: return "EDEADLK: would deadlock";
	case ESTALE: return "ESTALE: stale: already finished or superseded";
	case EBUSY: return "EBUSY: busy";
	case EAGAIN: return "EAGAIN: try again";
	case EMFILE: return "EMFILE: too many open files";
	default: return "unknown error";
	}
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
