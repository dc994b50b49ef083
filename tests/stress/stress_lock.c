/*
 * stress_lock.c: no false positives, and exact deduplication.
 *
 * Threads take random nested sequences of shared locks that follow one
 * lawful order (ranked locks by level, learned ones at fixed places among
 * them), with trylocks out of order mixed in and unlocks in random order.
 * There must be no report at all. Each lock guards a plain counter, which
 * also checks the mutual exclusion itself, also for lockings whose
 * contended spin took the word (with more than one CPU, the threads go on
 * until some have). Then every thread injects the same reversed pair,
 * many times: exactly one report.
 *
 * KEEL_THREADS (4), KEEL_ITERS sequences per thread (20,000; 500,000
 * under KEEL_STRESS=long), KEEL_SEED.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* CPU_COUNT */
#endif
#include <sched.h>
#include <stdatomic.h>
#include <string.h>
#include <unistd.h>

#include "harness.h"
#include "internal.h"

#define NRANKED 12
#define NLEARNED 4

static keel_mutex_t ranked[NRANKED];   /* ranked[i] has level NRANKED - i */
static keel_mutex_t learned[NLEARNED]; /* always taken in index order */
static long guarded[NRANKED + NLEARNED];
static long taken[NRANKED + NLEARNED];
static char names[NRANKED + NLEARNED][16];
static long iters;
/* Phase 1 goes on until a spin has won (see worker_main()). */
#define SPIN_WIN_SECONDS 30
static int need_spin_win;
static keel_time_t spin_win_deadline;
static atomic_int a_spin_won;
static harness_barrier phase;

struct worker {
	uint64_t rng;
	pthread_t th;
	long takes[NRANKED + NLEARNED];
	long sequences;
	uint32_t spins_won, spins_lost; /* its contended mutex spins */
};

/* The lawful order: ranked locks by falling level, with the learned ones
 * at fixed places among them. Every sequence takes a subsequence of it. */
#define NORDER (NRANKED + NLEARNED)
static int order[NORDER];

static void make_order(void)
{
	int n = 0;

	for (int i = 0; i < NRANKED; i++) {
		order[n++] = i;
		if (i % 3 == 1)
			order[n++] = NRANKED + i / 3;
	}
}

static keel_mutex_t *lock_at(int i)
{
	return i < NRANKED ? &ranked[i] : &learned[i - NRANKED];
}

static void one_sequence(struct worker *w)
{
	keel_mutex_t *held[NORDER + 1];
	int n = 0;

	for (int pos = (int)(rng_next(&w->rng) % 4); pos < NORDER;
	     pos += 1 + (int)(rng_next(&w->rng) % 3)) {
		uint64_t r = rng_next(&w->rng);
		int i = order[pos];

		keel_mutex_lock(lock_at(i));
		guarded[i]++;
		w->takes[i]++;
		held[n++] = lock_at(i);
		/* A trylock out of order: allowed, never reported. */
		if (r % 11 == 0 && pos > 1) {
			int j = order[(r >> 8) % (uint64_t)pos];

			if (keel_mutex_trylock(lock_at(j)) == 0) {
				guarded[j]++;
				w->takes[j]++;
				held[n++] = lock_at(j);
			}
		}
		if (n > 6)
			break;
	}
	/* Release in a random order. */
	while (n > 0) {
		int k = (int)(rng_next(&w->rng) % (uint64_t)n);

		keel_mutex_unlock(held[k]);
		held[k] = held[--n];
	}
}

/* The CPUs this process may run on. */
static long cpus_allowed(void)
{
#ifdef __linux__
	cpu_set_t set;

	if (sched_getaffinity(0, sizeof set, &set) == 0)
		return CPU_COUNT(&set);
#endif
	return sysconf(_SC_NPROCESSORS_ONLN);
}

static void *worker_main(void *arg)
{
	struct worker *w = arg;

	for (w->sequences = 0; w->sequences < iters; w->sequences++)
		one_sequence(w);
	/* More sequences until some thread's contended locking has taken
	 * the word in its spin, for at most SPIN_WIN_SECONDS: while other
	 * programs keep the other CPUs busy, one thread runs at a time and
	 * no holder lets go during a spin. */
	if (keel__spin.won)
		atomic_store(&a_spin_won, 1);
	while (need_spin_win && !atomic_load(&a_spin_won) &&
	       keel_now() < spin_win_deadline) {
		one_sequence(w);
		w->sequences++;
		if (keel__spin.won)
			atomic_store(&a_spin_won, 1);
	}
	w->spins_won = keel__spin.won;
	w->spins_lost = keel__spin.lost;
	barrier_wait(&phase); /* phase 1 done */
	barrier_wait(&phase); /* its result checked */
	/* Phase 2: the same reversed pair, again and again. */
	for (int i = 0; i < 50; i++) {
		keel_mutex_lock(&ranked[NRANKED - 1]); /* level 1 */
		keel_mutex_lock(&ranked[0]);	       /* level 12: wrong */
		keel_mutex_unlock(&ranked[0]);
		keel_mutex_unlock(&ranked[NRANKED - 1]);
	}
	return NULL;
}

TEST(stress_lawful_nesting_no_false_positives)
{
	long nthreads = harness_param("KEEL_THREADS", 4, 4);
	uint64_t seed = harness_seed();
	struct worker *w = calloc((size_t)nthreads, sizeof *w);
	unsigned long before;
	harness_capture cap;
	long total = 0, won = 0, lost = 0, sequences = 0;

	iters = harness_param("KEEL_ITERS", 20000, 500000);
	keel_lockcheck_set(KEEL_LOCKCHECK_REPORT);
	make_order();
	for (int i = 0; i < NRANKED; i++) {
		snprintf(names[i], sizeof names[i], "ranked-%d", NRANKED - i);
		CHECK_OK(keel_mutex_init(&ranked[i], (unsigned)(NRANKED - i),
					 names[i], 0));
	}
	for (int i = 0; i < NLEARNED; i++) {
		snprintf(names[NRANKED + i], sizeof names[0], "learned-%d", i);
		CHECK_OK(keel_mutex_init(&learned[i], KEEL_LEVEL_LEARNED,
					 names[NRANKED + i], 0));
	}
	barrier_init(&phase, (unsigned)nthreads + 1);
	/* On one CPU the holder cannot run while a waiter spins. */
	need_spin_win = cpus_allowed() > 1;
	spin_win_deadline = keel_now() + KEEL_SEC(SPIN_WIN_SECONDS);
	before = keel_lockcheck_reports();
	for (long i = 0; i < nthreads; i++) {
		w[i].rng = seed + (uint64_t)i * 7919;
		w[i].th = harness_thread(worker_main, &w[i]);
	}
	barrier_wait(&phase);
	/* Phase 1 is over: lawful nesting, nothing reported. */
	CHECK_EQ(keel_lockcheck_reports() - before, 0);
	for (int i = 0; i < NRANKED + NLEARNED; i++) {
		for (long t = 0; t < nthreads; t++)
			taken[i] += w[t].takes[i];
		/* Every increment under the lock survived: exclusion held. */
		CHECK_EQ(guarded[i], taken[i]);
		total += taken[i];
	}
	for (long t = 0; t < nthreads; t++) {
		won += w[t].spins_won;
		lost += w[t].spins_lost;
		sequences += w[t].sequences;
	}
	printf("contended lockings: %ld took the lock in their spin, %ld "
	       "went on to sleep\n", won, lost);
	/* The spin's race was won: exclusion held through lockings that
	 * took the word in the spin, not only through the CAS and the
	 * futex. */
	if (need_spin_win)
		CHECK(won > 0);
	capture_begin(&cap);
	barrier_wait(&phase); /* go on to phase 2 */
	for (long i = 0; i < nthreads; i++)
		harness_join(w[i].th);
	capture_end(&cap);
	CHECK_EQ(keel_lockcheck_reports() - before, 1);
	CHECK(strstr(cap.text, "taking 'ranked-12' (level 12)") != NULL);
	printf("%ld lawful lock sequences, %ld lockings: no report; one "
	       "reversed pair taken %ld times: one report\n",
	       sequences, total, nthreads * 50);
	free(w);
}
