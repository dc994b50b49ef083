/*
 * platform.h: the only place keel touches the operating system for
 * waiting, waking, notification fds, clocks and thread names.
 *
 * Three implementations: platform/linux.c (futex, eventfd),
 * platform/posix.c (a hashed table of condition variables standing in for
 * futexes) and platform/emscripten.c (WebAssembly threads: Emscripten's
 * futex calls); the last two take their notification pipe and accept()
 * from platform/pipe.c. The POSIX one is also what a port to another
 * system starts from; build with -DKEEL_PORTABLE=ON to use it on Linux.
 *
 * Every function returns 0 or a negative errno value unless it says
 * otherwise.
 */
#ifndef KEEL_PLATFORM_H
#define KEEL_PLATFORM_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "keel/common.h"

/*
 * Wait while *addr == expected, until woken or the absolute CLOCK_MONOTONIC
 * deadline passes. May return spuriously: callers always re-check. Returns
 * -ETIMEDOUT when the deadline passed, else 0.
 */
int keel__futex_wait(_Atomic uint32_t *addr, uint32_t expected,
		     keel_time_t deadline);

/* Wake up to n waiters blocked on addr. Cheap when nobody waits only on
 * Linux; callers avoid calling it when they know nobody waits. */
void keel__futex_wake(_Atomic uint32_t *addr, int n);

/* The same for a word in memory shared between processes (MAP_SHARED).
 * The POSIX layer has no cross-process wake-up: its wait sleeps a short
 * slice (at most 1 ms) and its wake does nothing; callers poll. */
int keel__futex_wait_shared(_Atomic uint32_t *addr, uint32_t expected,
			    keel_time_t deadline);
void keel__futex_wake_shared(_Atomic uint32_t *addr);

/* A notification fd pair: rfd becomes readable after notify_signal(wfd)
 * until notify_drain(rfd). On Linux both are the same eventfd.
 * notify_drain() returns how many signals it consumed (0 if none had
 * landed), so that a caller can tell whether a signal it expects has. */
int keel__notify_open(int *rfd, int *wfd);
void keel__notify_close(int rfd, int wfd);
void keel__notify_signal(int wfd);
uint64_t keel__notify_drain(int rfd);

/* accept(2) whose new fd is close-on-exec and non-blocking from the start:
 * accept4() on Linux; accept() then fcntl() in the portable layer, where an
 * exec on another thread between the two may still inherit the fd. The
 * peer's address goes to *peer unless it is NULL. Returns the new fd, or a
 * negative errno value (EINTR included). */
struct sockaddr_storage;
int keel__accept(int lfd, struct sockaddr_storage *peer);

/* Memory for tables that only grow (message records): `bytes`, a multiple
 * of the page size, zero-filled and page-aligned; NULL if none. Never
 * unmapped. keel__pages_release() gives the pages of such a range back to
 * the system while keeping it mapped: it reads as zeros afterwards, and
 * costs memory again only once written. 0, or a negative errno value if
 * the platform cannot (the memory then simply stays). */
void *keel__pages_alloc(size_t bytes);
int keel__pages_release(void *p, size_t bytes);

/* CLOCK_MONOTONIC in nanoseconds. */
keel_time_t keel__clock_now(void);

/* Set the OS-level name of the calling thread, where supported. */
void keel__thread_set_os_name(const char *name);

/* Nonzero if the calling thread is the process's initial thread. */
int keel__thread_is_initial(void);

/* Nonzero if the calling thread may sleep in a wait. 0 only on the main
 * JavaScript thread of a WebAssembly program (a browser's main thread
 * must never block, and a futex wait there only spins): keel's blocking
 * calls refuse there with -EDEADLK (keel__wait()). 1 everywhere else. */
int keel__thread_may_block(void);

/* fork(): 0 prepare, 1 parent, 2 child. Taken last by keel's prepare
 * handler (nothing is taken while the platform's own locks are held):
 * the portable layer's futex buckets, held by a thread that does not come
 * along, would hang the child's first wait or wake. */
void keel__platform_fork(int phase);

/* Serving a mailbox from a thread's JavaScript event loop (WebAssembly
 * threads). keel__loop_supported() is 0 where there is none (every other
 * platform). keel__loop_notify(thread) schedules one call of
 * keel__mbox_loop_serve() (mailbox.c) on that thread's event loop, where
 * it runs when the thread is back there; `thread` is the pthread_t of a
 * thread that is still running (the caller sees to it). */
#ifdef __EMSCRIPTEN__
#define KEEL__JS_LOOP 1 /* compiled in: a send's notify looks for a loop */
#else
#define KEEL__JS_LOOP 0
#endif
int keel__loop_supported(void);
void keel__loop_notify(uintptr_t thread);
/* Serves scheduled by keel__loop_notify() so far (for tests). */
extern _Atomic uint64_t keel__loop_notified;
void keel__mbox_loop_serve(void);

/* A spin-wait hint to the CPU. */
static inline void keel__cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
	__builtin_ia32_pause();
#elif defined(__aarch64__)
	__asm__ __volatile__("yield" ::: "memory");
#else
	atomic_signal_fence(memory_order_seq_cst);
#endif
}

#endif /* KEEL_PLATFORM_H */
