/*
 * platform/posix.c: portable implementation of platform.h for any POSIX
 * system with pthreads.
 *
 * Futex emulation: a fixed table of buckets, each a mutex and a condition
 * variable on CLOCK_MONOTONIC, chosen by hashing the word's address. A
 * waiter checks the word under the bucket's mutex before it sleeps; a waker
 * takes the same mutex before broadcasting, so a wake that follows a change
 * of the word can never fall between the waiter's check and its sleep.
 * Broadcasting wakes every waiter of the bucket; waiters re-check, as they
 * must with a real futex too.
 *
 * Notification fds and accept() are in platform/pipe.c, shared with the
 * Emscripten layer.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "../platform.h"

#define NBUCKETS 64

static struct bucket {
	pthread_mutex_t mu;
	pthread_cond_t cv;
} buckets[NBUCKETS];

static pthread_once_t buckets_once = PTHREAD_ONCE_INIT;
static pthread_t initial_thread;

static void buckets_init(void)
{
	pthread_condattr_t ca;

	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	for (int i = 0; i < NBUCKETS; i++) {
		pthread_mutex_init(&buckets[i].mu, NULL);
		pthread_cond_init(&buckets[i].cv, &ca);
	}
	pthread_condattr_destroy(&ca);
}

static struct bucket *bucket_of(const void *addr)
{
	uintptr_t a = (uintptr_t)addr;

	a ^= a >> 17;
	a *= (uintptr_t)0x9E3779B97F4A7C15ull;
	pthread_once(&buckets_once, buckets_init);
	return &buckets[(a >> 7) % NBUCKETS];
}

void keel__platform_fork(int phase)
{
	pthread_once(&buckets_once, buckets_init);
	if (phase == 0) {
		/* A futex call holds one bucket at a time: in index order. */
		for (int i = 0; i < NBUCKETS; i++)
			pthread_mutex_lock(&buckets[i].mu);
	} else if (phase == 1) {
		for (int i = NBUCKETS; i-- > 0;)
			pthread_mutex_unlock(&buckets[i].mu);
	} else {
		/* Made anew, condition variables included: their waiters
		 * were threads that did not come along, and a broadcast
		 * could wait for them. */
		buckets_init();
	}
}

int keel__futex_wait(_Atomic uint32_t *addr, uint32_t expected,
		     keel_time_t deadline)
{
	struct bucket *b = bucket_of(addr);
	struct timespec ts;
	int rc = 0;

	pthread_mutex_lock(&b->mu);
	if (atomic_load_explicit(addr, memory_order_acquire) == expected) {
		if (deadline == KEEL_FOREVER) {
			pthread_cond_wait(&b->cv, &b->mu);
		} else {
			if (deadline < 0)
				deadline = 0;
			ts.tv_sec = (time_t)(deadline / 1000000000);
			ts.tv_nsec = (long)(deadline % 1000000000);
			if (pthread_cond_timedwait(&b->cv, &b->mu, &ts) ==
			    ETIMEDOUT)
				rc = -ETIMEDOUT;
		}
	}
	pthread_mutex_unlock(&b->mu);
	return rc;
}

void keel__futex_wake(_Atomic uint32_t *addr, int n)
{
	struct bucket *b = bucket_of(addr);

	(void)n;
	pthread_mutex_lock(&b->mu);
	pthread_cond_broadcast(&b->cv);
	pthread_mutex_unlock(&b->mu);
}

int keel__futex_wait_shared(_Atomic uint32_t *addr, uint32_t expected,
			    keel_time_t deadline)
{
	keel_time_t now = keel_now(), until = now + KEEL_MS(1);
	struct timespec ts;

	if (atomic_load_explicit(addr, memory_order_acquire) != expected)
		return 0;
	if (deadline <= now)
		return -ETIMEDOUT;
	if (deadline < until)
		until = deadline;
	ts.tv_sec = (time_t)(until / 1000000000);
	ts.tv_nsec = (long)(until % 1000000000);
	while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
		;
	return until == deadline ? -ETIMEDOUT : 0;
}

void keel__futex_wake_shared(_Atomic uint32_t *addr)
{
	(void)addr; /* waiters poll */
}

keel_time_t keel__clock_now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (keel_time_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

void keel__thread_set_os_name(const char *name)
{
#if defined(__linux__)
	/* Not POSIX, but glibc and musl have it. */
	char buf[16];

	strncpy(buf, name, sizeof buf - 1);
	buf[sizeof buf - 1] = '\0';
	pthread_setname_np(pthread_self(), buf);
#else
	(void)name;
#endif
}

/* Without gettid there is no portable test. A constructor runs on the
 * thread that loads the library, which is the initial thread whenever keel
 * is linked into the program rather than loaded later with dlopen. */
__attribute__((constructor)) static void record_initial_thread(void)
{
	initial_thread = pthread_self();
}

int keel__thread_may_block(void)
{
	return 1;
}

int keel__thread_is_initial(void)
{
	return pthread_equal(initial_thread, pthread_self());
}

#if !defined(MAP_ANONYMOUS) && defined(MAP_ANON)
#define MAP_ANONYMOUS MAP_ANON
#endif

void *keel__pages_alloc(size_t bytes)
{
#ifdef MAP_ANONYMOUS
	void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	return p == MAP_FAILED ? NULL : p;
#else
	/* No anonymous mappings: heap memory, never given back. */
	long page = sysconf(_SC_PAGESIZE);
	void *q = NULL;

	if (page <= 0 || posix_memalign(&q, (size_t)page, bytes) != 0)
		return NULL;
	memset(q, 0, bytes);
	return q;
#endif
}

int keel__pages_release(void *p, size_t bytes)
{
#ifdef MAP_ANONYMOUS
	/* POSIX's madvise(DONTNEED) need neither free nor zero anything, so
	 * map fresh anonymous pages over the range instead: the old ones go
	 * back to the system and the range stays mapped (a stale reader
	 * sees the old contents or zeros, never a hole). */
	void *q = mmap(p, bytes, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);

	return q == MAP_FAILED ? -errno : 0;
#else
	(void)p;
	(void)bytes;
	return -ENOTSUP;
#endif
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
