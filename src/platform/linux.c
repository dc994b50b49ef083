/*
 * platform/linux.c: futex and eventfd implementation of platform.h.
 *
 * Waits use FUTEX_WAIT_BITSET, whose timeout is an absolute time on
 * CLOCK_MONOTONIC, so a deadline is never recomputed as a relative delay
 * and a clock step cannot stretch it. Private futexes: keel's futex words
 * are never shared between processes.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <linux/futex.h>
#include <pthread.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "../platform.h"

static int futex_wait_op(_Atomic uint32_t *addr, uint32_t expected,
			 keel_time_t deadline, int op)
{
	struct timespec ts, *tsp = NULL;
	long rc;

	if (deadline != KEEL_FOREVER) {
		if (deadline < 0)
			deadline = 0;
		ts.tv_sec = (time_t)(deadline / 1000000000);
		ts.tv_nsec = (long)(deadline % 1000000000);
		tsp = &ts;
	}
	rc = syscall(SYS_futex, (void *)(uintptr_t)addr, op, expected, tsp, NULL,
		     FUTEX_BITSET_MATCH_ANY);
	if (rc == -1 && errno == ETIMEDOUT)
		return -ETIMEDOUT;
	/* EAGAIN (value changed), EINTR and wake-ups all mean "re-check". */
	return 0;
}

int keel__futex_wait(_Atomic uint32_t *addr, uint32_t expected,
		     keel_time_t deadline)
{
	return futex_wait_op(addr, expected, deadline,
			     FUTEX_WAIT_BITSET | FUTEX_PRIVATE_FLAG);
}

void keel__futex_wake(_Atomic uint32_t *addr, int n)
{
	syscall(SYS_futex, (void *)(uintptr_t)addr, FUTEX_WAKE | FUTEX_PRIVATE_FLAG,
		n, NULL, NULL, 0);
}

int keel__futex_wait_shared(_Atomic uint32_t *addr, uint32_t expected,
			    keel_time_t deadline)
{
	return futex_wait_op(addr, expected, deadline, FUTEX_WAIT_BITSET);
}

void keel__futex_wake_shared(_Atomic uint32_t *addr)
{
	syscall(SYS_futex, (void *)(uintptr_t)addr, FUTEX_WAKE, INT32_MAX, NULL,
		NULL, 0);
}

int keel__notify_open(int *rfd, int *wfd)
{
	int fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);

	if (fd < 0)
		return -errno;
	*rfd = *wfd = fd;
	return 0;
}

void keel__notify_close(int rfd, int wfd)
{
	(void)wfd;
	close(rfd);
}

void keel__notify_signal(int wfd)
{
	uint64_t one = 1;
	ssize_t n;

	/* Fails only with EAGAIN when the counter is saturated, in which
	 * case the fd is readable already. */
	do
		n = write(wfd, &one, sizeof one);
	while (n < 0 && errno == EINTR);
}

uint64_t keel__notify_drain(int rfd)
{
	uint64_t v = 0;
	ssize_t n;

	/* The counter is the number of signals since the last read. */
	do
		n = read(rfd, &v, sizeof v);
	while (n < 0 && errno == EINTR);
	return n == (ssize_t)sizeof v ? v : 0;
}

int keel__accept(int lfd, struct sockaddr_storage *peer)
{
	socklen_t sl = sizeof *peer;
	int fd = accept4(lfd, (struct sockaddr *)peer, peer ? &sl : NULL,
			 SOCK_CLOEXEC | SOCK_NONBLOCK);

	return fd < 0 ? -errno : fd;
}

keel_time_t keel__clock_now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (keel_time_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

void keel__thread_set_os_name(const char *name)
{
	char buf[16];

	strncpy(buf, name, sizeof buf - 1);
	buf[sizeof buf - 1] = '\0';
	pthread_setname_np(pthread_self(), buf);
}

int keel__thread_may_block(void)
{
	return 1;
}

int keel__thread_is_initial(void)
{
	return syscall(SYS_gettid) == getpid();
}

void keel__platform_fork(int phase)
{
	(void)phase; /* futexes and eventfds hold no lock of keel's */
}

void *keel__pages_alloc(size_t bytes)
{
	void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	return p == MAP_FAILED ? NULL : p;
}

int keel__pages_release(void *p, size_t bytes)
{
	/* Private anonymous memory reads as zeros after MADV_DONTNEED. */
	return madvise(p, bytes, MADV_DONTNEED) == 0 ? 0 : -errno;
}

/* No JavaScript event loop here. */
_Atomic uint64_t keel__loop_notified;

int keel__loop_supported(void)
{
	return 0;
}

void keel__loop_notify(uintptr_t thread)
{
	(void)thread;
}
