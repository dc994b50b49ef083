/*
 * bench_scope.c: starting tasks and waiting for them.
 *
 * WHAT IS MEASURED
 * spawn_join: ns per task started and waited for, one after another: the
 *   task returns at once, so this is the cost of the hand-off and of the
 *   wait. keel: keel_spawn() into a scope, then keel_join(); tasks run on
 *   keel's thread cache. pthread_create_join: pthread_create() then
 *   pthread_join(). glib_threadpool: g_thread_pool_push() to a pool of one
 *   thread, then waiting on a GMutex and GCond until the job has run.
 * scale_10k: ns per task for 10,000 tasks live at once in one scope: all
 *   are spawned (each waits to be cancelled), the run waits until every
 *   one is running, then the scope is cancelled and closed, which joins
 *   them all. The resident memory per live task (the process's resident
 *   set while all 10,000 run, less before, divided by 10,000; 64 KiB
 *   stacks) is printed as a note after the tables.
 */
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include <keel.h>

#include "bench.h"

#ifdef HAVE_GLIB
#include <glib.h>
#endif

#define SPAWN_KEEL 20000L
#define SPAWN_SLOW 2000L
#define SCALE_TASKS 10000

/* ---- spawn_join --------------------------------------------------------- */

static int return_at_once(void *arg)
{
	(void)arg;
	return 0;
}

BENCH(spawn_join, keel)
{
	long n = bench_count(SPAWN_KEEL, 100);
	keel_scope_t *s;
	int64_t start;
	int rc;

	if ((rc = keel_scope_open(&s, NULL)) < 0)
		bench_fail("keel_scope_open: %s", keel_strerror(rc));
	start = bench_now();
	for (long i = 0; i < n; i++) {
		keel_task_t t;
		int st;

		if ((rc = keel_spawn(s, return_at_once, NULL, NULL, &t)) < 0 ||
		    (rc = keel_join(t, &st, KEEL_FOREVER)) < 0)
			bench_fail("spawn/join: %s", keel_strerror(rc));
	}
	start = bench_now() - start;
	keel_scope_close(s);
	return (double)start / (double)n;
}

static void *pthread_return_at_once(void *arg)
{
	return arg;
}

BENCH(spawn_join, pthread_create_join)
{
	long n = bench_count(SPAWN_SLOW, 50);
	int64_t start = bench_now();

	for (long i = 0; i < n; i++)
		bench_join(bench_thread(pthread_return_at_once, NULL));
	return (double)(bench_now() - start) / (double)n;
}

#ifdef HAVE_GLIB
struct pool_wait {
	GMutex mu;
	GCond cv;
	long done;
};

static void pool_job(gpointer data, gpointer user)
{
	struct pool_wait *w = user;

	(void)data;
	g_mutex_lock(&w->mu);
	w->done++;
	g_cond_signal(&w->cv);
	g_mutex_unlock(&w->mu);
}

BENCH(spawn_join, glib_threadpool)
{
	long n = bench_count(SPAWN_SLOW, 50);
	struct pool_wait w = {.done = 0};
	GThreadPool *pool;
	int64_t start;

	g_mutex_init(&w.mu);
	g_cond_init(&w.cv);
	pool = g_thread_pool_new(pool_job, &w, 1, FALSE, NULL);
	start = bench_now();
	for (long i = 0; i < n; i++) {
		g_thread_pool_push(pool, GINT_TO_POINTER(1), NULL);
		g_mutex_lock(&w.mu);
		while (w.done <= i)
			g_cond_wait(&w.cv, &w.mu);
		g_mutex_unlock(&w.mu);
	}
	start = bench_now() - start;
	g_thread_pool_free(pool, FALSE, TRUE);
	g_cond_clear(&w.cv);
	g_mutex_clear(&w.mu);
	return (double)start / (double)n;
}
#else
BENCH_SKIP(spawn_join, glib_threadpool, BENCH_PEER_MISSING("GLib"))
#endif

BENCH_TARGET(spawn_join, "pthread_create_join", 0.2)

/* ---- scale_10k ------------------------------------------------------------ */

static atomic_int running;

static int wait_for_cancel(void *arg)
{
	(void)arg;
	atomic_fetch_add(&running, 1);
	keel_sleep_until(KEEL_FOREVER);
	return 0;
}

static long resident_bytes(void)
{
	long pages = 0, resident = 0;
	FILE *f = fopen("/proc/self/statm", "r");

	if (f) {
		if (fscanf(f, "%ld %ld", &pages, &resident) != 2)
			resident = 0;
		fclose(f);
	}
	return resident * sysconf(_SC_PAGESIZE);
}

BENCH(scale_10k, keel)
{
	keel_spawn_opts o = {.name = "scale", .stack_size = 64 << 10};
	long before = resident_bytes(), during;
	keel_scope_t *s;
	int64_t start = bench_now(), live;
	int rc;

	atomic_store(&running, 0);
	if ((rc = keel_scope_open(&s, NULL)) < 0)
		bench_fail("keel_scope_open: %s", keel_strerror(rc));
	for (int i = 0; i < SCALE_TASKS; i++)
		if ((rc = keel_spawn(s, wait_for_cancel, NULL, &o, NULL)) < 0)
			bench_fail("keel_spawn #%d: %s", i, keel_strerror(rc));
	while (atomic_load(&running) < SCALE_TASKS)
		sched_yield();
	live = bench_now() - start;
	during = resident_bytes();
	keel_scope_cancel(s);
	keel_scope_close(s);
	bench_note("scale_10k: %d tasks live at once: %.1f KiB resident per "
		   "task (64 KiB stacks); all started in %.0f ms, then "
		   "cancelled and joined; total below",
		   SCALE_TASKS, (double)(during - before) / SCALE_TASKS / 1024,
		   (double)live / 1e6);
	return (double)(bench_now() - start) / SCALE_TASKS;
}
