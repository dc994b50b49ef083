/*
 * thread_cache.c: a cache of idle OS threads that run keel tasks, so that
 * starting a task does not pay for pthread_create each time.
 *
 * DESIGN
 * keel__thread_start(fn, arg, stack_size) hands fn to an idle thread with
 * the same stack size, or creates one. A thread that finishes a job goes
 * back on the idle list, spins briefly (a spawn that follows a join is
 * common, and waking a sleeping thread costs tens of microseconds), then
 * sleeps on its own futex word until a job comes or its idle timeout
 * passes, when it leaves.
 *
 * Worker state word:
 *   WAIT   on the idle list, spinning or about to sleep
 *   SLEEP  on the idle list, asleep in futex_wait
 *   JOB    taken off the idle list; fn/arg are set
 * Transitions: the starter takes the worker off the idle list under the
 * cache lock, sets fn/arg, exchanges the word to JOB and wakes it only if
 * it was SLEEP. A worker whose idle timeout passes takes the lock and
 * leaves only if it is still on the list; otherwise a job is on its way
 * and it waits for JOB. Taking a worker and a worker leaving are both under
 * the lock, so a job is never handed to a thread that is going away.
 *
 * Threads are created with asynchronous signals blocked: keel tasks receive
 * no signals; keel's own signal handling (keel_main) runs elsewhere.
 * Synchronous fault signals cannot be blocked usefully and are left alone.
 * The new thread blocks them again itself, first thing: not every system
 * gives a new thread its creator's mask (Emscripten does not).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <limits.h>
#include <signal.h>
#include <stdlib.h>
#include <unistd.h>

#include "internal.h"

#define W_WAIT 0u
#define W_SLEEP 1u
#define W_JOB 2u

#define MAX_IDLE 64
#define WORKER_SPIN_NS 20000

struct worker {
	_Atomic uint32_t state;
	void (*fn)(void *);
	void *arg;
	size_t stack_size;
	struct worker *next; /* idle list, under cache_lock */
	uint8_t on_list;     /* under cache_lock */
};

static pthread_mutex_t cache_lock = PTHREAD_MUTEX_INITIALIZER;
static struct worker *idle_list;
static uint32_t nidle;
static _Atomic uint64_t n_created, n_started;
/* Futex word counting worker exits, so tests can wait for one. */
static _Atomic uint32_t n_exited;
static _Atomic keel_time_t idle_timeout = KEEL_SEC(10);

void keel__thread_cache_set_idle_timeout(keel_time_t ns)
{
	store_relaxed(&idle_timeout, ns);
}

void keel__thread_cache_stats(struct keel__thread_cache_stats *st)
{
	pthread_mutex_lock(&cache_lock);
	st->idle = nidle;
	pthread_mutex_unlock(&cache_lock);
	st->created = load_relaxed(&n_created);
	st->started = load_relaxed(&n_started);
	st->exited = load_acquire(&n_exited);
}

void keel__thread_cache_wait_exit(uint32_t seen)
{
	while (load_acquire(&n_exited) == seen)
		keel__futex_wait(&n_exited, seen, KEEL_FOREVER);
}

void keel__thread_cache_fork(int phase)
{
	if (phase == 0) {
		pthread_mutex_lock(&cache_lock);
		return;
	}
	if (phase == 2) {
		/* The cached threads do not exist in the child. */
		idle_list = NULL;
		nidle = 0;
	}
	pthread_mutex_unlock(&cache_lock);
}

/* Wait for a job; 0 if one came, -1 if the worker should exit. */
static int wait_for_job(struct worker *w)
{
	keel_time_t start = keel__clock_now();
	keel_time_t deadline = start + load_relaxed(&idle_timeout);
	uint32_t s;

	for (unsigned i = 1; load_acquire(&w->state) != W_JOB; i++) {
		keel__cpu_relax();
		if ((i & 15) == 0 &&
		    keel__clock_now() - start >= WORKER_SPIN_NS)
			break;
	}
	for (;;) {
		s = W_WAIT;
		if (!cas_acq_rel(&w->state, &s, W_SLEEP) && s == W_JOB)
			return 0;
		if (keel__futex_wait(&w->state, W_SLEEP, deadline) == 0)
			continue; /* re-check: a job, or spurious */
		/* Timed out: leave, unless a starter already took us. */
		pthread_mutex_lock(&cache_lock);
		if (w->on_list) {
			struct worker **pp = &idle_list;

			while (*pp != w)
				pp = &(*pp)->next;
			*pp = w->next;
			w->on_list = 0;
			nidle--;
			pthread_mutex_unlock(&cache_lock);
			return -1;
		}
		pthread_mutex_unlock(&cache_lock);
		deadline = KEEL_FOREVER; /* a job is being handed over */
		s = W_SLEEP;
		cas_acq_rel(&w->state, &s, W_WAIT);
	}
}

/* The worker leaves: normally, or because its job called pthread_exit(). */
static void worker_exit(void *p)
{
	free(p);
	fetch_add_acq_rel(&n_exited, 1);
	keel__futex_wake(&n_exited, INT32_MAX);
}

/* The signals a worker blocks: all but the synchronous faults. */
static void async_signals(sigset_t *set)
{
	sigfillset(set);
	sigdelset(set, SIGSEGV);
	sigdelset(set, SIGBUS);
	sigdelset(set, SIGFPE);
	sigdelset(set, SIGILL);
	sigdelset(set, SIGTRAP);
	sigdelset(set, SIGSYS);
}

static void *worker_main(void *p)
{
	struct worker *w = p;
	sigset_t all;

	async_signals(&all);
	pthread_sigmask(SIG_SETMASK, &all, NULL);
	pthread_cleanup_push(worker_exit, w);
	for (;;) {
		/* Pairs with the release exchange in keel__thread_start(). */
		w->fn(w->arg);
		pthread_mutex_lock(&cache_lock);
		if (nidle >= MAX_IDLE) {
			pthread_mutex_unlock(&cache_lock);
			break;
		}
		store_relaxed(&w->state, W_WAIT);
		w->fn = NULL;
		w->next = idle_list;
		w->on_list = 1;
		idle_list = w;
		nidle++;
		pthread_mutex_unlock(&cache_lock);
		if (wait_for_job(w) < 0)
			break;
	}
	pthread_cleanup_pop(1);
	return NULL;
}

static size_t normal_stack(size_t size)
{
	long page = sysconf(_SC_PAGESIZE);

	if (size == 0)
		return 0;
	if (size < (size_t)PTHREAD_STACK_MIN)
		size = (size_t)PTHREAD_STACK_MIN;
	if (page > 0)
		size = (size + (size_t)page - 1) & ~((size_t)page - 1);
	return size;
}

int keel__thread_start(void (*fn)(void *), void *arg, size_t stack_size)
{
	struct worker *w, **pp;
	pthread_attr_t attr;
	pthread_t th;
	sigset_t all, old;
	int rc;

	stack_size = normal_stack(stack_size);
	pthread_mutex_lock(&cache_lock);
	for (pp = &idle_list; (w = *pp) != NULL; pp = &w->next) {
		if (w->stack_size == stack_size) {
			*pp = w->next;
			w->on_list = 0;
			nidle--;
			break;
		}
	}
	pthread_mutex_unlock(&cache_lock);
	fetch_add_relaxed(&n_started, 1);
	if (w) {
		w->fn = fn;
		w->arg = arg;
		if (xchg_acq_rel(&w->state, W_JOB) == W_SLEEP)
			keel__futex_wake(&w->state, 1);
		return 0;
	}

	if (!(w = calloc(1, sizeof *w)))
		return -ENOMEM;
	w->fn = fn;
	w->arg = arg;
	w->stack_size = stack_size;
	atomic_init(&w->state, W_JOB);
	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	if (stack_size)
		pthread_attr_setstacksize(&attr, stack_size);
	async_signals(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	rc = pthread_create(&th, &attr, worker_main, w);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	pthread_attr_destroy(&attr);
	if (rc != 0) {
		free(w);
		fetch_add_relaxed(&n_started, (uint64_t)-1);
		return -ENOMEM;
	}
	fetch_add_relaxed(&n_created, 1);
	return 0;
}
