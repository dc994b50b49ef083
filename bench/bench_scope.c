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
 * scope_churn: ns per child for 10^6 short children spawned through one
 *   scope, at most 200 live at a time: the life of a server's root scope.
 *   The notes after the tables give the resident set and the task-slot
 *   high-water mark after 10^5 and after 10^6 children: memory follows
 *   what is live, so neither should grow between the two.
 *   keel: children spawned without a handle, reaped as they end; the
 *     spawner waits for room, which each child's on_exit hook makes. (A
 *     child still holds its slot for the few instructions after its hook:
 *     on a loaded machine, a child preempted there, often by the spawner
 *     its hook just woke, holds it longer, and the high-water mark shows
 *     it.)
 *   keel_join_window: joinable children; before the 201st, the spawner
 *     joins the oldest (the join reaps it), so at most 200 exist.
 *   pthread_create_detached: detached threads, gated as keel (10^5).
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

/* ---- cancel_10k ------------------------------------------------------------ */
/*
 * cancel_10k: ns from cancelling a scope of 10,000 tasks, each blocked in a
 *   keel wait (keel_sleep_until() or keel_serve(), alternately), to the
 *   last child's body returning; then the scope is closed (joined) outside
 *   the timing. pthread_cond_broadcast: the same number of plain threads
 *   waiting on one condition variable for a flag; the time from the
 *   broadcast to the last one returning. The _loaded impls run the same
 *   with two busy-loop processes beside it on the machine (started before
 *   the tasks, stopped after): a shared server, or CI.
 */
#include <signal.h>
#include <sys/wait.h>

#define CANCEL_TASKS 10000

static atomic_int c10_running;
static _Atomic int64_t c10_last_exit;

static void c10_note_exit(void)
{
	int64_t now = bench_now(), seen = atomic_load(&c10_last_exit);

	while (seen < now &&
	       !atomic_compare_exchange_weak(&c10_last_exit, &seen, now))
		;
}

static int c10_wait(void *arg)
{
	atomic_fetch_add(&c10_running, 1);
	if ((intptr_t)arg & 1)
		keel_serve(KEEL_FOREVER);
	else
		keel_sleep_until(KEEL_FOREVER);
	c10_note_exit();
	return 0;
}

/* Two processes that spin until killed; pids in out[2]. */
static void busy_start(pid_t out[2])
{
	for (int i = 0; i < 2; i++) {
		out[i] = fork();
		if (out[i] < 0)
			bench_fail("fork: busy loop");
		if (out[i] == 0) {
			volatile unsigned long x = 0;

			for (;;)
				x++;
		}
	}
}

static void busy_stop(pid_t pids[2])
{
	for (int i = 0; i < 2; i++) {
		kill(pids[i], SIGKILL);
		waitpid(pids[i], NULL, 0);
	}
}

static double c10_keel(int loaded)
{
	keel_spawn_opts o = {.name = "c10", .stack_size = 64 << 10};
	keel_scope_t *s;
	pid_t busy[2];
	int64_t start, took;
	int rc;

	if (loaded)
		busy_start(busy);
	atomic_store(&c10_running, 0);
	atomic_store(&c10_last_exit, 0);
	if ((rc = keel_scope_open(&s, NULL)) < 0)
		bench_fail("keel_scope_open: %s", keel_strerror(rc));
	for (intptr_t i = 0; i < CANCEL_TASKS; i++)
		if ((rc = keel_spawn(s, c10_wait, (void *)i, &o, NULL)) < 0)
			bench_fail("keel_spawn #%ld: %s", (long)i,
				   keel_strerror(rc));
	while (atomic_load(&c10_running) < CANCEL_TASKS)
		sched_yield();
	start = bench_now();
	keel_scope_cancel(s);
	keel_scope_close(s);
	took = atomic_load(&c10_last_exit) - start;
	bench_note("cancel_10k%s: the close returned %.0f ms after the cancel "
		   "(the last child's body returned after %.0f ms)",
		   loaded ? " loaded" : "",
		   (double)(bench_now() - start) / 1e6, (double)took / 1e6);
	if (loaded)
		busy_stop(busy);
	return (double)took;
}

BENCH(cancel_10k, keel)
{
	return c10_keel(0);
}

BENCH(cancel_10k, keel_loaded)
{
	return c10_keel(1);
}

static pthread_mutex_t c10_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t c10_cv = PTHREAD_COND_INITIALIZER;
static int c10_flag;

static void *c10_pthread(void *arg)
{
	(void)arg;
	pthread_mutex_lock(&c10_mu);
	atomic_fetch_add(&c10_running, 1);
	while (!c10_flag)
		pthread_cond_wait(&c10_cv, &c10_mu);
	pthread_mutex_unlock(&c10_mu);
	c10_note_exit();
	return NULL;
}

static double c10_plain(int loaded)
{
	static pthread_t th[CANCEL_TASKS];
	pthread_attr_t attr;
	pid_t busy[2];
	int64_t start;

	if (loaded)
		busy_start(busy);
	atomic_store(&c10_running, 0);
	atomic_store(&c10_last_exit, 0);
	c10_flag = 0;
	pthread_attr_init(&attr);
	pthread_attr_setstacksize(&attr, 64 << 10);
	for (int i = 0; i < CANCEL_TASKS; i++)
		if (pthread_create(&th[i], &attr, c10_pthread, NULL) != 0)
			bench_fail("pthread_create #%d", i);
	pthread_attr_destroy(&attr);
	while (atomic_load(&c10_running) < CANCEL_TASKS)
		sched_yield();
	start = bench_now();
	pthread_mutex_lock(&c10_mu);
	c10_flag = 1;
	pthread_cond_broadcast(&c10_cv);
	pthread_mutex_unlock(&c10_mu);
	for (int i = 0; i < CANCEL_TASKS; i++)
		pthread_join(th[i], NULL);
	start = atomic_load(&c10_last_exit) - start;
	if (loaded)
		busy_stop(busy);
	return (double)start;
}

BENCH(cancel_10k, pthread_cond_broadcast)
{
	return c10_plain(0);
}

BENCH(cancel_10k, pthread_cond_broadcast_loaded)
{
	return c10_plain(1);
}

/* ---- scope_churn ------------------------------------------------------------ */

#define CHURN_LIVE 200

struct gate {
	pthread_mutex_t mu;
	pthread_cond_t cv;
	int live;
};

static struct gate churn_gate = {PTHREAD_MUTEX_INITIALIZER,
				 PTHREAD_COND_INITIALIZER, 0};

static void gate_enter(struct gate *g)
{
	pthread_mutex_lock(&g->mu);
	while (g->live >= CHURN_LIVE)
		pthread_cond_wait(&g->cv, &g->mu);
	g->live++;
	pthread_mutex_unlock(&g->mu);
}

static void gate_leave(struct gate *g)
{
	pthread_mutex_lock(&g->mu);
	g->live--;
	pthread_cond_signal(&g->cv);
	pthread_mutex_unlock(&g->mu);
}

static void churn_exit(keel_task_t child, int status, void *arg)
{
	(void)child;
	(void)status;
	gate_leave(arg);
}

/* 10^6 children through one scope, at most CHURN_LIVE at a time: gated by
 * their on_exit hook (children without a handle, reaped as they end), or
 * by joining the oldest of a window of joinable ones. */
static double churn(const char *impl, int join_window)
{
	long n = bench_count(1000000, 20000), mark = n / 10;
	long rss0 = resident_bytes(), rss_mark = 0;
	keel_scope_opts so = {.name = "churn", .on_exit = churn_exit,
			      .on_exit_arg = &churn_gate};
	static keel_task_t window[CHURN_LIVE];
	keel_stats st0, st_mark = {0}, st_end;
	keel_scope_t *s;
	int64_t start;
	int rc;

	keel_self();
	keel_stats_reset_peak();
	keel_stats_get(&st0);
	if ((rc = keel_scope_open(&s, join_window ? NULL : &so)) < 0)
		bench_fail("keel_scope_open: %s", keel_strerror(rc));
	start = bench_now();
	for (long i = 0; i < n; i++) {
		keel_task_t *slot = join_window ? &window[i % CHURN_LIVE] : NULL;

		if (i == mark) {
			rss_mark = resident_bytes();
			keel_stats_get(&st_mark);
			keel_stats_reset_peak();
		}
		if (!join_window)
			gate_enter(&churn_gate);
		else if (i >= CHURN_LIVE &&
			 (rc = keel_join(*slot, NULL, KEEL_FOREVER)) < 0)
			bench_fail("keel_join #%ld: %s", i, keel_strerror(rc));
		if ((rc = keel_spawn(s, return_at_once, NULL, NULL, slot)) < 0)
			bench_fail("keel_spawn #%ld: %s", i, keel_strerror(rc));
	}
	if ((rc = keel_scope_join(s, KEEL_FOREVER)) < 0)
		bench_fail("keel_scope_join: %s", keel_strerror(rc));
	keel_stats_get(&st_end);
	bench_note("scope_churn %s: %ld children, <=%d live: RSS +%.1f MB "
		   "after %ld, +%.1f MB after %ld (growth %.2f MB); tasks at once "
		   "%zu, then %zu",
		   impl, n, CHURN_LIVE, (double)(rss_mark - rss0) / 1048576.0,
		   mark, (double)(resident_bytes() - rss0) / 1048576.0, n,
		   (double)(resident_bytes() - rss_mark) / 1048576.0,
		   st_mark.tasks_peak - st0.tasks_live,
		   st_end.tasks_peak - st0.tasks_live);
	if ((rc = keel_scope_close(s)) < 0)
		bench_fail("keel_scope_close: %s", keel_strerror(rc));
	return (double)(bench_now() - start) / (double)n;
}

BENCH(scope_churn, keel)
{
	return churn("keel", 0);
}

BENCH(scope_churn, keel_join_window)
{
	return churn("keel_join_window", 1);
}

static void *detached_child(void *arg)
{
	gate_leave(arg);
	return NULL;
}

BENCH(scope_churn, pthread_create_detached)
{
	long n = bench_count(100000, 2000);
	pthread_attr_t attr;
	int64_t start;

	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	start = bench_now();
	for (long i = 0; i < n; i++) {
		pthread_t th;

		gate_enter(&churn_gate);
		if (pthread_create(&th, &attr, detached_child, &churn_gate))
			bench_fail("pthread_create #%ld failed", i);
	}
	/* All have left the gate (their last act). */
	pthread_mutex_lock(&churn_gate.mu);
	while (churn_gate.live > 0)
		pthread_cond_wait(&churn_gate.cv, &churn_gate.mu);
	pthread_mutex_unlock(&churn_gate.mu);
	pthread_attr_destroy(&attr);
	return (double)(bench_now() - start) / (double)n;
}
