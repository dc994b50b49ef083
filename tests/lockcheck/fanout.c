/* One lock taken before 1,000 others (memcached takes thousands of
 * hash-striped item locks under one): the graph must keep every edge,
 * and an inversion with one of the 1,000 is still reported. The graph
 * once stored a lock's out-edges in a fixed array (128 in the preload)
 * and switched itself off past it. */
#include "pairs.h"

#define N 1000
pthread_mutex_t lock_big = PTHREAD_MUTEX_INITIALIZER;

int main(void)
{
	pthread_mutex_t *l = calloc(N, sizeof *l);

	CHECK(l != NULL);
	for (int i = 0; i < N; i++)
		pthread_mutex_init(&l[i], NULL);
	for (int i = 0; i < N; i++)
		NEST(&lock_big, &l[i]);
	/* The inversion: l[777] before lock_big. */
	NEST(&l[777], &lock_big);
	printf("fanout: %d\n", N);
	return 0;
}
