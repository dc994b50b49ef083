/*
 * lockheavy: a small program that does little but take nested locks, for
 * measuring whole-process cost under lock checkers.
 *
 * Two threads (one per core of the machines the benchmarks run on: with
 * more threads than cores the run time is ruled by which lock holder the
 * scheduler preempts), each pinned to its own CPU and released together by
 * a barrier, each run N rounds. There are eight chains of four locks
 * (levels 4 down to 1 in the keel build); a round picks a chain at random,
 * takes its four locks nested, bumps a counter under each and releases
 * them. Threads meet on a chain often enough to contend, but not on every
 * round, as in a program whose threads share tables, not one global lock.
 * Built with LOCKHEAVY_KEEL it uses keel's ranked mutexes (checked on
 * every acquisition); otherwise plain pthread mutexes: the unchecked
 * build, and the build that ThreadSanitizer and Helgrind run.
 *
 *     lockheavy [rounds per thread]
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#define THREADS 2
#define CHAINS 8
#define DEPTH 4

#ifdef LOCKHEAVY_KEEL
#include <keel.h>
static keel_mutex_t locks[CHAINS][DEPTH];
static const char *const names[DEPTH] = {"outer", "middle", "inner",
					 "innermost"};
static void init_locks(void)
{
	for (int c = 0; c < CHAINS; c++)
		for (int i = 0; i < DEPTH; i++)
			keel_mutex_init(&locks[c][i], DEPTH - i, names[i], 0);
}
#define LOCK(c, i) keel_mutex_lock(&locks[c][i])
#define UNLOCK(c, i) keel_mutex_unlock(&locks[c][i])
#else
static pthread_mutex_t locks[CHAINS][DEPTH];
static void init_locks(void)
{
	for (int c = 0; c < CHAINS; c++)
		for (int i = 0; i < DEPTH; i++)
			pthread_mutex_init(&locks[c][i], NULL);
}
#define LOCK(c, i) pthread_mutex_lock(&locks[c][i])
#define UNLOCK(c, i) pthread_mutex_unlock(&locks[c][i])
#endif

static long rounds;
static long counters[CHAINS][DEPTH];
static pthread_barrier_t start;

/* Put worker i on the i-th CPU the process may use, so that the two
 * threads always run side by side: left to the scheduler, they sometimes
 * share a CPU for a while, and a run then takes twice as long whatever
 * the locks cost. Best effort, and Linux only. */
static void pin(int i)
{
#ifdef __linux__
	cpu_set_t allowed, one;
	int seen = 0;

	if (sched_getaffinity(0, sizeof allowed, &allowed) != 0)
		return;
	for (int cpu = 0; cpu < CPU_SETSIZE; cpu++) {
		if (!CPU_ISSET(cpu, &allowed))
			continue;
		if (seen++ == i) {
			CPU_ZERO(&one);
			CPU_SET(cpu, &one);
			pthread_setaffinity_np(pthread_self(), sizeof one, &one);
			return;
		}
	}
#else
	(void)i;
#endif
}

static void *worker(void *arg)
{
	uint32_t x = (uint32_t)(uintptr_t)arg * 2654435761u + 1;

	pin((int)(uintptr_t)arg - 1);
	/* Both threads run every round together: without the gate the first
	 * one created may be done with a good part of its rounds before the
	 * second starts, and how much differs from run to run. */
	pthread_barrier_wait(&start);
	for (long r = 0; r < rounds; r++) {
		int c;

		x ^= x << 13;
		x ^= x >> 17;
		x ^= x << 5;
		c = (int)(x % CHAINS);
		for (int i = 0; i < DEPTH; i++) {
			LOCK(c, i);
			counters[c][i]++;
		}
		for (int i = DEPTH - 1; i >= 0; i--)
			UNLOCK(c, i);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	pthread_t th[THREADS];

	rounds = argc > 1 ? atol(argv[1]) : 20000;
	init_locks();
	pthread_barrier_init(&start, NULL, THREADS);
	for (int i = 0; i < THREADS; i++)
		pthread_create(&th[i], NULL, worker, (void *)(uintptr_t)(i + 1));
	for (int i = 0; i < THREADS; i++)
		pthread_join(th[i], NULL);
	for (int i = 0; i < DEPTH; i++) {
		long sum = 0;

		for (int c = 0; c < CHAINS; c++)
			sum += counters[c][i];
		if (sum != rounds * THREADS) {
			fprintf(stderr, "lockheavy: lost updates\n");
			return 1;
		}
	}
	return 0;
}
