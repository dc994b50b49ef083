/*
 * bench_once.c: what a once costs once it is done, and how soon a dead
 * owner is replaced.
 *
 * WHAT IS MEASURED
 * once_fast: ns per read of an initialised once, in a loop that uses each
 *   value (summed), each written as a program would: get the value, and
 *   if it is not there yet, call the slow path (out of line). keel:
 *   keel_once_value(), inlined, with keel_once() as the slow path.
 *   keel_once_call: the keel_once() function on a done once (a call into
 *   the library). pthread_once: pthread_once() then reading the variable
 *   it set. c11_call_once: call_once() from <threads.h>, the same way.
 *   glib_once: the g_once_init_enter() idiom. acquire_load: a hand-written
 *   acquire load of a published pointer, NULL meaning "call the slow
 *   path": the floor.
 * once_reclaim: ns from an owner's death (pthread_exit() inside init) to
 *   a waiter, already asleep on the once, running init in its place: the
 *   mean of 10 takeovers per repetition. The waiter notices at its next
 *   look, so this is about half of KEEL_ONCE_POLL, printed beside it.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <threads.h>

#include <keel.h>

#include "bench.h"

#ifdef HAVE_GLIB
#include <glib.h>
#endif

#define FAST 50000000L
#define RECLAIMS 10

static int the_value[4];

/* Keeps the sum alive without a store in the loop. */
static volatile uintptr_t sink;

/* ---- once_fast --------------------------------------------------------------- */

static keel_once_t ko = KEEL_ONCE_INIT;

static int publish_value(keel_claim_t *c, void *arg)
{
	(void)arg;
	return keel_claim_publish(c, the_value);
}

static void keel_ready(void)
{
	void *v;

	if (keel_once(&ko, publish_value, NULL, NULL, &v) < 0 || v != the_value)
		bench_fail("keel_once failed");
}

static __attribute__((noinline)) void *keel_slow(void)
{
	void *v = NULL;

	keel_once(&ko, publish_value, NULL, NULL, &v);
	return v;
}

BENCH(once_fast, keel)
{
	long n = bench_count(FAST, 1000);
	uintptr_t sum = 0;
	int64_t start;

	keel_ready();
	start = bench_now();
	for (long i = 0; i < n; i++) {
		void *v = keel_once_value(&ko);

		if (__builtin_expect(!v, 0))
			v = keel_slow();
		sum += (uintptr_t)v;
	}
	start = bench_now() - start;
	sink = sum;
	return (double)start / (double)n;
}

BENCH(once_fast, keel_once_call)
{
	long n = bench_count(FAST / 5, 1000);
	uintptr_t sum = 0;
	int64_t start;

	keel_ready();
	start = bench_now();
	for (long i = 0; i < n; i++) {
		void *v;

		keel_once(&ko, publish_value, NULL, NULL, &v);
		sum += (uintptr_t)v;
	}
	start = bench_now() - start;
	sink = sum;
	return (double)start / (double)n;
}

static pthread_once_t po = PTHREAD_ONCE_INIT;
static int *po_value;

static void po_init(void)
{
	po_value = the_value;
}

BENCH(once_fast, pthread_once)
{
	long n = bench_count(FAST / 5, 1000);
	uintptr_t sum = 0;
	int64_t start = bench_now();

	for (long i = 0; i < n; i++) {
		pthread_once(&po, po_init);
		sum += (uintptr_t)po_value;
	}
	start = bench_now() - start;
	sink = sum;
	return (double)start / (double)n;
}

static once_flag co = ONCE_FLAG_INIT;
static int *co_value;

static void co_init(void)
{
	co_value = the_value;
}

BENCH(once_fast, c11_call_once)
{
	long n = bench_count(FAST / 5, 1000);
	uintptr_t sum = 0;
	int64_t start = bench_now();

	for (long i = 0; i < n; i++) {
		call_once(&co, co_init);
		sum += (uintptr_t)co_value;
	}
	start = bench_now() - start;
	sink = sum;
	return (double)start / (double)n;
}

#ifdef HAVE_GLIB
static gsize go_value;

BENCH(once_fast, glib_once)
{
	long n = bench_count(FAST, 1000);
	uintptr_t sum = 0;
	int64_t start = bench_now();

	for (long i = 0; i < n; i++) {
		if (g_once_init_enter(&go_value))
			g_once_init_leave(&go_value, (gsize)(uintptr_t)the_value);
		sum += (uintptr_t)go_value;
	}
	start = bench_now() - start;
	sink = sum;
	return (double)start / (double)n;
}
#else
BENCH_SKIP(once_fast, glib_once, BENCH_PEER_MISSING("GLib"))
#endif

static int *_Atomic published = the_value;

static __attribute__((noinline)) int *acquire_slow(void)
{
	static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
	int *p;

	pthread_mutex_lock(&mu);
	if (!(p = atomic_load_explicit(&published, memory_order_relaxed)))
		atomic_store_explicit(&published, p = the_value,
				      memory_order_release);
	pthread_mutex_unlock(&mu);
	return p;
}

BENCH(once_fast, acquire_load)
{
	long n = bench_count(FAST, 1000);
	uintptr_t sum = 0;
	int64_t start = bench_now();

	for (long i = 0; i < n; i++) {
		int *p = atomic_load_explicit(&published, memory_order_acquire);

		if (__builtin_expect(!p, 0))
			p = acquire_slow();
		sum += (uintptr_t)p;
	}
	start = bench_now() - start;
	sink = sum;
	return (double)start / (double)n;
}

BENCH_TARGET(once_fast, "acquire_load", 1.1)

/* ---- once_reclaim ------------------------------------------------------------- */

struct takeover {
	keel_once_t o;
	pthread_mutex_t mu;
	pthread_cond_t cv;
	int owning, go;
	_Atomic int64_t died_at, reclaimed_at;
};

static int dies_in_init(keel_claim_t *c, void *arg)
{
	struct takeover *t = arg;

	(void)c;
	pthread_mutex_lock(&t->mu);
	t->owning = 1;
	pthread_cond_broadcast(&t->cv);
	while (!t->go)
		pthread_cond_wait(&t->cv, &t->mu);
	pthread_mutex_unlock(&t->mu);
	atomic_store(&t->died_at, bench_now());
	pthread_exit(NULL);
}

static int takes_over(keel_claim_t *c, void *arg)
{
	struct takeover *t = arg;

	atomic_store(&t->reclaimed_at, bench_now());
	return keel_claim_publish(c, the_value);
}

static void *owner_main(void *arg)
{
	struct takeover *t = arg;
	void *v;

	keel_once(&t->o, dies_in_init, t, NULL, &v);
	return NULL;
}

static void *waiter_main(void *arg)
{
	struct takeover *t = arg;
	void *v;

	if (keel_once(&t->o, takes_over, t, NULL, &v) < 0 || v != the_value)
		bench_fail("the waiter did not take over");
	return NULL;
}

BENCH(once_reclaim, keel)
{
	double total = 0;

	for (int i = 0; i < RECLAIMS; i++) {
		struct takeover *t = calloc(1, sizeof *t);
		pthread_t owner, waiter;

		pthread_mutex_init(&t->mu, NULL);
		pthread_cond_init(&t->cv, NULL);
		owner = bench_thread(owner_main, t);
		pthread_mutex_lock(&t->mu);
		while (!t->owning)
			pthread_cond_wait(&t->cv, &t->mu);
		pthread_mutex_unlock(&t->mu);
		waiter = bench_thread(waiter_main, t);
		/* Until the waiter sleeps on the once (its queue node shows). */
		while (!__atomic_load_n(&t->o.k_waitq, __ATOMIC_ACQUIRE))
			sched_yield();
		pthread_mutex_lock(&t->mu);
		t->go = 1;
		pthread_cond_broadcast(&t->cv);
		pthread_mutex_unlock(&t->mu);
		bench_join(waiter);
		bench_join(owner);
		total += (double)(atomic_load(&t->reclaimed_at) -
				  atomic_load(&t->died_at));
		free(t);
	}
	bench_note("once_reclaim: a waiter looks at the owner every %.0f ms "
		   "(KEEL_ONCE_POLL)",
		   (double)KEEL_ONCE_POLL / 1e6);
	return total / RECLAIMS;
}
