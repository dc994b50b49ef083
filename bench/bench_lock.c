/*
 * bench_lock.c: what keel's checked locks cost.
 *
 * WHAT IS MEASURED
 * lock_uncontended: ns per lock + unlock of one lock by one thread, every
 *   call crossing a shared library as a program's would. keel: a ranked
 *   keel_mutex_t, level checks on (the held-lock record is kept and
 *   checked on every acquisition). keel_graph: a learned-order (level 0)
 *   keel_mutex_t. pthread_mutex: the default mutex. pthread_errorcheck:
 *   PTHREAD_MUTEX_ERRORCHECK, the owner-checking pthread type.
 *   glib_mutex: GMutex.
 *   Measured in a process that has had a second thread: glibc's mutex
 *   skips its atomic instructions while a process has only ever had one
 *   thread, which no program that needs a mutex is. A full run has
 *   started threads before this group anyway; the group starts one of its
 *   own so that it measures the same when it runs alone.
 * lock_contended: ns per lock + unlock when two threads take turns at one
 *   lock with a short critical section (a few writes); the reciprocal of
 *   throughput. keel and pthread_mutex.
 * lockheavy_checker: whole-process wall time of lockheavy (two threads,
 *   each on its own CPU and started together, each taking, 80000 times, a
 *   random one of eight chains of four nested locks, so they often meet),
 *   run as a child process: unchecked (pthread mutexes, no checker), keel
 *   (keel's checked locks), keel_off (keel with KEEL_LOCKCHECK=off), tsan
 *   (the unchecked program under ThreadSanitizer) and helgrind (it under
 *   valgrind --tool=helgrind, if installed). The ratios to "unchecked" are
 *   what a checker costs a lock-heavy program.
 */
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <keel.h>

#include "bench.h"

#ifdef HAVE_GLIB
#include <glib.h>
#endif

extern char **environ;

#define UNCONTENDED 20000000L
#define CONTENDED 4000000L

/* ---- lock_uncontended ------------------------------------------------------- */

static keel_mutex_t ranked = KEEL_MUTEX_INIT(5, "bench-ranked");
static keel_mutex_t learned = KEEL_MUTEX_INIT(KEEL_LEVEL_LEARNED, "bench-learned");

static void *nothing(void *arg)
{
	return arg;
}

/* Leave the process "multi-threaded" for the C library (see above). */
static void threaded(void)
{
	static int done;

	if (!done) {
		bench_join(bench_thread(nothing, NULL));
		done = 1;
	}
}

static double keel_loop(keel_mutex_t *m)
{
	long n = bench_count(UNCONTENDED, 1000);
	int64_t start;

	threaded();
	start = bench_now();

	for (long i = 0; i < n; i++) {
		keel_mutex_lock(m);
		keel_mutex_unlock(m);
	}
	return (double)(bench_now() - start) / (double)n;
}

BENCH(lock_uncontended, keel)
{
	return keel_loop(&ranked);
}

BENCH(lock_uncontended, keel_graph)
{
	return keel_loop(&learned);
}

static double pthread_loop(pthread_mutex_t *m)
{
	long n = bench_count(UNCONTENDED, 1000);
	int64_t start;

	threaded();
	start = bench_now();

	for (long i = 0; i < n; i++) {
		pthread_mutex_lock(m);
		pthread_mutex_unlock(m);
	}
	return (double)(bench_now() - start) / (double)n;
}

BENCH(lock_uncontended, pthread_mutex)
{
	static pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;

	return pthread_loop(&m);
}

BENCH(lock_uncontended, pthread_errorcheck)
{
	static pthread_mutex_t m;
	static int ready;

	if (!ready) {
		pthread_mutexattr_t a;

		pthread_mutexattr_init(&a);
		pthread_mutexattr_settype(&a, PTHREAD_MUTEX_ERRORCHECK);
		pthread_mutex_init(&m, &a);
		pthread_mutexattr_destroy(&a);
		ready = 1;
	}
	return pthread_loop(&m);
}

#ifdef HAVE_GLIB
BENCH(lock_uncontended, glib_mutex)
{
	static GMutex m;
	long n = bench_count(UNCONTENDED, 1000);
	int64_t start;

	threaded();
	start = bench_now();

	for (long i = 0; i < n; i++) {
		g_mutex_lock(&m);
		g_mutex_unlock(&m);
	}
	return (double)(bench_now() - start) / (double)n;
}
#else
BENCH_SKIP(lock_uncontended, glib_mutex, BENCH_PEER_MISSING("GLib"))
#endif

BENCH_TARGET(lock_uncontended, "pthread_mutex", 1.0)
BENCH_TARGET_FOR(lock_uncontended, keel_graph, "pthread_mutex", 3.0)

/* ---- lock_contended --------------------------------------------------------- */

struct contended {
	pthread_barrier_t gate;
	long per_thread;
	volatile long shared[4];
	int keel;
	pthread_mutex_t pm;
	keel_mutex_t km;
};

static void *contend(void *arg)
{
	struct contended *c = arg;

	pthread_barrier_wait(&c->gate);
	for (long i = 0; i < c->per_thread && !bench_aborted(); i++) {
		if (c->keel)
			keel_mutex_lock(&c->km);
		else
			pthread_mutex_lock(&c->pm);
		c->shared[0]++;
		c->shared[1] += c->shared[0];
		c->shared[2] ^= c->shared[1];
		if (c->keel)
			keel_mutex_unlock(&c->km);
		else
			pthread_mutex_unlock(&c->pm);
	}
	return NULL;
}

static double contended_run(int use_keel)
{
	struct contended c = {.keel = use_keel};
	pthread_t a, b;
	int64_t start;

	c.per_thread = bench_count(CONTENDED, 1000) / 2;
	pthread_mutex_init(&c.pm, NULL);
	keel_mutex_init(&c.km, 7, "bench-contended", 0);
	pthread_barrier_init(&c.gate, NULL, 3);
	a = bench_thread(contend, &c);
	b = bench_thread(contend, &c);
	pthread_barrier_wait(&c.gate);
	start = bench_now();
	bench_join(a);
	bench_join(b);
	start = bench_now() - start;
	if (c.shared[0] != 2 * c.per_thread)
		bench_fail("lock_contended: lost updates");
	pthread_barrier_destroy(&c.gate);
	pthread_mutex_destroy(&c.pm);
	keel_mutex_destroy(&c.km);
	return (double)start / (double)(2 * c.per_thread);
}

BENCH(lock_contended, keel)
{
	return contended_run(1);
}

BENCH(lock_contended, pthread_mutex)
{
	return contended_run(0);
}

/* At least pthread's throughput: at most its time. */
BENCH_TARGET(lock_contended, "pthread_mutex", 1.0)

/* ---- lockheavy_checker ------------------------------------------------------- */

#define LOCKHEAVY_ROUNDS "80000"

/* Wall time of one run of a command, or BENCH_DNF. */
static double run_process(char *const argv[], int checks_off)
{
	char *envp_off[256];
	char **envp = environ;
	int64_t start;
	pid_t pid;
	int status;

	if (checks_off) {
		int n = 0;

		for (char **e = environ; *e && n < 250; e++)
			envp_off[n++] = *e;
		envp_off[n++] = (char *)(uintptr_t)"KEEL_LOCKCHECK=off";
		envp_off[n] = NULL;
		envp = envp_off;
	}
	start = bench_now();
	if (posix_spawn(&pid, argv[0], NULL, NULL, argv, envp) != 0)
		return BENCH_DNF;
	if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) ||
	    WEXITSTATUS(status) != 0)
		bench_fail("%s failed (status %#x)", argv[0], status);
	return (double)(bench_now() - start);
}

BENCH(lockheavy_checker, unchecked)
{
	char *argv[] = {(char *)(uintptr_t)LOCKHEAVY_PLAIN,
			(char *)(uintptr_t)LOCKHEAVY_ROUNDS, NULL};

	return run_process(argv, 0);
}

BENCH(lockheavy_checker, keel)
{
	char *argv[] = {(char *)(uintptr_t)LOCKHEAVY_KEEL_BIN,
			(char *)(uintptr_t)LOCKHEAVY_ROUNDS, NULL};

	return run_process(argv, 0);
}

BENCH(lockheavy_checker, keel_off)
{
	char *argv[] = {(char *)(uintptr_t)LOCKHEAVY_KEEL_BIN,
			(char *)(uintptr_t)LOCKHEAVY_ROUNDS, NULL};

	return run_process(argv, 1);
}

#ifdef LOCKHEAVY_TSAN
BENCH(lockheavy_checker, tsan)
{
	char *argv[] = {(char *)(uintptr_t)LOCKHEAVY_TSAN,
			(char *)(uintptr_t)LOCKHEAVY_ROUNDS, NULL};

	return run_process(argv, 0);
}
#else
BENCH_SKIP(lockheavy_checker, tsan, "the compiler cannot build with -fsanitize=thread")
#endif

#ifdef VALGRIND
BENCH(lockheavy_checker, helgrind)
{
	char *argv[] = {(char *)(uintptr_t)VALGRIND,
			(char *)(uintptr_t)"--tool=helgrind",
			(char *)(uintptr_t)"-q",
			(char *)(uintptr_t)LOCKHEAVY_PLAIN,
			(char *)(uintptr_t)LOCKHEAVY_ROUNDS, NULL};

	return run_process(argv, 0);
}
#else
BENCH_SKIP(lockheavy_checker, helgrind, "valgrind not installed")
#endif

BENCH_TARGET(lockheavy_checker, "unchecked", 1.1)
