/*
 * lazy-init: worker tasks share a cache that is built on first use; the
 * first builder dies half-way through, and the cache is built anyway.
 *
 * At start-up a warm-up thread begins building the cache (a table of the
 * primes below 200000), ahead of demand. Half-way through, it dies: its
 * thread ends with pthread_exit(), as a thread does when a fatal error is
 * handled by ending it. Meanwhile the workers, keel tasks, ask for the
 * cache. With pthread_once() they would wait forever for a builder that is
 * gone. With keel_once() one of them notices the builder's death within
 * KEEL_ONCE_POLL, claims the once, sees keel_claim_prev_owner_died() (so
 * it throws away the half-built table) and builds it; every worker gets
 * that one cache.
 *
 * The program exits 0 when every worker got the same, complete cache.
 */
#include <keel.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define WORKERS 6
#define LIMIT 200000

struct cache {
	int count;
	int *primes;
	keel_task_t built_by;
	int rebuilt; /* took over from a builder that did not finish */
};

static keel_once_t cache_once = KEEL_ONCE_INIT;
static struct cache *half_built; /* what the dead builder left behind */
static _Atomic int workers_asking;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int warmup_owns;

static int is_prime(int n)
{
	if (n < 2)
		return 0;
	for (int d = 2; d * d <= n; d++)
		if (n % d == 0)
			return 0;
	return 1;
}

/* Build the cache; the warm-up thread's attempt dies half-way. */
static int build_cache(keel_claim_t *claim, void *dies_halfway)
{
	struct cache *c = calloc(1, sizeof *c);
	int rc;

	if (!c || !(c->primes = malloc(LIMIT * sizeof *c->primes))) {
		free(c);
		return -ENOMEM;
	}
	if (keel_claim_prev_owner_died(claim)) {
		struct cache *old;

		pthread_mutex_lock(&mu);
		old = half_built;
		half_built = NULL;
		pthread_mutex_unlock(&mu);
		if (old) {
			printf("builder %llu: the previous builder died; "
			       "discarding its half-built table (%d primes)\n",
			       (unsigned long long)keel_self(), old->count);
			free(old->primes);
			free(old);
		}
		c->rebuilt = 1;
	}
	for (int n = 2; n < LIMIT; n++) {
		if (dies_halfway && n == LIMIT / 2) {
			printf("warm-up: half-way (%d primes), and now it dies\n",
			       c->count);
			fflush(stdout);
			/* Not before the workers are asking for the cache. */
			pthread_mutex_lock(&mu);
			half_built = c;
			warmup_owns = 1;
			pthread_cond_broadcast(&cv);
			while (atomic_load(&workers_asking) < WORKERS)
				pthread_cond_wait(&cv, &mu);
			pthread_mutex_unlock(&mu);
			pthread_exit(NULL);
		}
		if (is_prime(n))
			c->primes[c->count++] = n;
	}
	c->built_by = keel_self();
	if ((rc = keel_claim_publish(claim, c)) < 0) {
		/* -ESTALE: someone else's cache won; ours goes. */
		free(c->primes);
		free(c);
	}
	return rc;
}

static struct cache *get_cache(int *err)
{
	void *c = keel_once_value(&cache_once);

	if (!c)
		*err = keel_once(&cache_once, build_cache, NULL, NULL, &c);
	return c;
}

static void *warmup_main(void *arg)
{
	void *c;

	(void)arg;
	keel_once(&cache_once, build_cache, (void *)1, NULL, &c);
	return NULL; /* not reached: it dies in build_cache() */
}

struct worker {
	struct cache *got;
	int err;
	keel_time_t waited;
};

static int worker_main(void *arg)
{
	struct worker *w = arg;
	keel_time_t start = keel_now();

	pthread_mutex_lock(&mu);
	atomic_fetch_add(&workers_asking, 1);
	pthread_cond_broadcast(&cv);
	pthread_mutex_unlock(&mu);
	w->got = get_cache(&w->err);
	w->waited = keel_now() - start;
	return w->got ? 0 : w->err;
}

int main(void)
{
	struct worker workers[WORKERS] = {{0}};
	pthread_t warmup;
	keel_scope_t *s;
	int rc, ok = 1;

	pthread_create(&warmup, NULL, warmup_main, NULL);
	pthread_mutex_lock(&mu);
	while (!warmup_owns)
		pthread_cond_wait(&cv, &mu);
	pthread_mutex_unlock(&mu);
	printf("warm-up thread is building the cache; %d workers start\n",
	       WORKERS);
	if ((rc = keel_scope_open(&s, NULL)) < 0) {
		fprintf(stderr, "lazy-init: %s\n", keel_strerror(rc));
		return 1;
	}
	for (int i = 0; i < WORKERS; i++)
		if ((rc = keel_spawn(s, worker_main, &workers[i], NULL, NULL)) < 0) {
			fprintf(stderr, "lazy-init: spawn: %s\n", keel_strerror(rc));
			return 1;
		}
	rc = keel_scope_join(s, KEEL_FOREVER); /* wait for every worker */
	keel_scope_close(s);
	pthread_join(warmup, NULL);
	for (int i = 0; i < WORKERS; i++) {
		struct cache *c = workers[i].got;

		printf("worker %d: %s after %.1f ms", i,
		       c ? "got the cache" : keel_strerror(workers[i].err),
		       (double)workers[i].waited / 1e6);
		if (c)
			printf(" (%d primes, built by task %llu)", c->count,
			       (unsigned long long)c->built_by);
		printf("\n");
		if (!c || c != workers[0].got)
			ok = 0;
	}
	if (rc < 0 || !ok || !workers[0].got->rebuilt ||
	    workers[0].got->count != 17984 || half_built) {
		printf("FAILED: every worker should get the one rebuilt cache\n");
		return 1;
	}
	printf("ok: the first builder died mid-build; another took over within "
	       "a poll interval (%.0f ms), and every worker got its cache\n",
	       (double)KEEL_ONCE_POLL / 1e6);
	return 0;
}
