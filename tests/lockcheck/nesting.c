/* 4 threads x 100,000 nestings that respect one order (lower index first,
 * up to three deep): no report, and every nesting ran. */
#include <stdatomic.h>
#include <stdint.h>

#include "pairs.h"

#define THREADS 4
#define ROUNDS 100000
#define LOCKS 8
static pthread_mutex_t locks[LOCKS];
static pthread_barrier_t start;
static atomic_long done;

static void *worker(void *arg)
{
	unsigned seed = (unsigned)(uintptr_t)arg * 2654435761u + 1;

	pthread_barrier_wait(&start);
	for (int r = 0; r < ROUNDS; r++) {
		int a, b, c;

		seed = seed * 1103515245u + 12345u;
		a = (int)(seed >> 16) % (LOCKS - 2);
		b = a + 1 + (int)(seed >> 8) % (LOCKS - 2 - a);
		c = b + 1 + (int)(seed >> 4) % (LOCKS - 1 - b);
		pthread_mutex_lock(&locks[a]);
		pthread_mutex_lock(&locks[b]);
		pthread_mutex_lock(&locks[c]);
		pthread_mutex_unlock(&locks[c]);
		pthread_mutex_unlock(&locks[b]);
		pthread_mutex_unlock(&locks[a]);
		atomic_fetch_add(&done, 1);
	}
	return NULL;
}

int main(void)
{
	pthread_t t[THREADS];

	for (int i = 0; i < LOCKS; i++)
		pthread_mutex_init(&locks[i], NULL);
	pthread_barrier_init(&start, NULL, THREADS);
	for (long i = 0; i < THREADS; i++)
		CHECK(pthread_create(&t[i], NULL, worker, (void *)i) == 0);
	for (int i = 0; i < THREADS; i++)
		pthread_join(t[i], NULL);
	CHECK(atomic_load(&done) == (long)THREADS * ROUNDS);
	printf("nestings: %ld\n", atomic_load(&done));
	return 0;
}
