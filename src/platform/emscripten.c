/*
 * platform/emscripten.c: platform.h on WebAssembly threads (Emscripten).
 *
 * Waiting and waking are Emscripten's own futex calls, which wait with
 * Atomics.wait on the word itself: the same contract as a Linux futex
 * (the word is compared, a wake between the check and the sleep is not
 * lost, -ETIMEDOUT at the deadline). There is one process, so the
 * "shared" futex is the same call. The notification fd pair and accept()
 * are platform/pipe.c's (no eventfd, no accept4).
 *
 * THE INITIAL THREAD
 * Without -sPROXY_TO_PTHREAD, main() runs on the browser's (or Node's)
 * main thread, whose thread id is the process id. With it, the runtime
 * starts on that thread and creates one pthread to run main() before it
 * runs anything else; Emscripten gives thread ids in creation order from
 * the process id up, so that thread's id is the process id + 1. Whether
 * the program was linked with PROXY_TO_PTHREAD shows in whether
 * emscripten_proxy_main() (which only that setting links in) is present:
 * a weak reference to it is null otherwise. (A constructor that starts a
 * thread before main() would take the id; keel's rule for the main task
 * is documented in docs/webassembly.md.)
 *
 * SERVING FROM THE EVENT LOOP
 * keel__loop_notify() hands keel__mbox_loop_serve() to the target thread
 * through a proxying queue of keel's own (not the system queue, whose work
 * also runs inside futex waits: a serve must run only from the event
 * loop). Emscripten posts the target's Worker a message, and the queue is
 * run when the thread is back in its event loop. Emscripten 3.1.6's main
 * thread does not know that message when a Worker sends it (its handler
 * lacks the command), so a serve for the main JavaScript thread sent from
 * another thread takes the system queue instead, with a function that only
 * schedules the serve (a zero-delay timeout): the system queue also runs
 * inside the main thread's futex waits, the timeout only from its loop.
 * proxying.h is not installed by every Emscripten (3.1.6 has the
 * functions, not the header): then the two calls are declared here.
 *
 * THE MAIN JAVASCRIPT THREAD
 * keel__thread_may_block() is 0 there (with or without PROXY_TO_PTHREAD:
 * the thread is the same), so keel's blocking calls refuse with -EDEADLK
 * instead of spinning (keel__wait(), docs/webassembly.md).
 *
 * OWNER DEATH
 * Robust mutexes never report their owner's death here (thread exit does
 * not walk the robust list). The once does not need them to: a dying
 * thread releases its lifelines from keel's thread-exit hook (once.c),
 * and there is no raw thread exit that would skip the hook (no
 * syscall()).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <emscripten/emscripten.h>
#include <emscripten/threading.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "../platform.h"

#if __has_include(<emscripten/proxying.h>)
#include <emscripten/proxying.h>
#else
typedef struct em_proxying_queue em_proxying_queue;
em_proxying_queue *em_proxying_queue_create(void);
int emscripten_proxy_async(em_proxying_queue *q, pthread_t target_thread,
			   void (*func)(void *), void *arg);
#endif

int emscripten_proxy_main(int argc, char **argv) __attribute__((weak));

_Atomic uint64_t keel__loop_notified;
static em_proxying_queue *loop_queue;
static pthread_once_t loop_once = PTHREAD_ONCE_INIT;

static void loop_queue_create(void)
{
	loop_queue = em_proxying_queue_create();
}

static void loop_serve(void *arg)
{
	(void)arg;
	keel__mbox_loop_serve();
}

int keel__loop_supported(void)
{
	pthread_once(&loop_once, loop_queue_create);
	return loop_queue != NULL;
}

static void loop_serve_later(void)
{
	emscripten_async_call(loop_serve, NULL, 0);
}

void keel__loop_notify(uintptr_t thread)
{
	/* keel__loop_supported() made the queue before any thread could
	 * be served from its loop. This fails only out of memory, and then
	 * the serve is lost and the task no longer served from its loop
	 * (docs/webassembly.md). */
	atomic_fetch_add_explicit(&keel__loop_notified, 1,
				  memory_order_relaxed);
	if ((pthread_t)thread == emscripten_main_browser_thread_id() &&
	    !emscripten_is_main_browser_thread())
		emscripten_async_run_in_main_runtime_thread(EM_FUNC_SIG_V,
							    loop_serve_later);
	else
		emscripten_proxy_async(loop_queue, (pthread_t)thread,
				       loop_serve, NULL);
}

void keel__platform_fork(int phase)
{
	(void)phase; /* no fork() here */
}

int keel__futex_wait(_Atomic uint32_t *addr, uint32_t expected,
		     keel_time_t deadline)
{
	double ms = INFINITY;
	int rc;

	if (deadline != KEEL_FOREVER) {
		keel_time_t now = keel__clock_now();

		if (deadline <= now)
			return atomic_load_explicit(addr, memory_order_acquire) ==
					       expected
				       ? -ETIMEDOUT
				       : 0;
		ms = (double)(deadline - now) / 1e6;
	}
	rc = emscripten_futex_wait((volatile void *)addr, expected, ms);
	return rc == -ETIMEDOUT ? -ETIMEDOUT : 0;
}

void keel__futex_wake(_Atomic uint32_t *addr, int n)
{
	emscripten_futex_wake((volatile void *)addr, n < 0 ? INT_MAX : n);
}

int keel__futex_wait_shared(_Atomic uint32_t *addr, uint32_t expected,
			    keel_time_t deadline)
{
	return keel__futex_wait(addr, expected, deadline);
}

void keel__futex_wake_shared(_Atomic uint32_t *addr)
{
	keel__futex_wake(addr, INT_MAX);
}

keel_time_t keel__clock_now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (keel_time_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

void keel__thread_set_os_name(const char *name)
{
	/* Shown by Emscripten's thread profiler, where it is built in. */
	emscripten_set_thread_name(pthread_self(), name);
}

int keel__thread_is_initial(void)
{
	pid_t main_tid = getpid();

	if (emscripten_proxy_main)
		main_tid += 1;
	return gettid() == main_tid;
}

int keel__thread_may_block(void)
{
	/* Node's main thread could wait, but it is the one that starts
	 * Workers; a browser's must not, and its futex waits spin. The same
	 * rule for both, so that what passes under Node holds in a page. */
	return !emscripten_is_main_browser_thread();
}

void *keel__pages_alloc(size_t bytes)
{
	/* No virtual memory to map: zeroed heap memory, page-aligned. */
	void *q = NULL;

	if (posix_memalign(&q, (size_t)sysconf(_SC_PAGESIZE), bytes) != 0)
		return NULL;
	memset(q, 0, bytes);
	return q;
}

int keel__pages_release(void *p, size_t bytes)
{
	/* The heap cannot hand back part of a block: the memory stays. */
	(void)p;
	(void)bytes;
	return -ENOTSUP;
}
