/* A -> B, then 4096 locks created and chained between B and back to A:
 * B -> L0 -> ... -> L4095, and L4095 -> A closes a cycle through all of
 * them (4098 locks). */
#include "pairs.h"

#define N 4096
pthread_mutex_t lock_a = PTHREAD_MUTEX_INITIALIZER;
pthread_mutex_t lock_b = PTHREAD_MUTEX_INITIALIZER;

int main(void)
{
	pthread_mutex_t *l = calloc(N, sizeof *l);

	CHECK(l != NULL);
	NEST(&lock_a, &lock_b);
	for (int i = 0; i < N; i++)
		pthread_mutex_init(&l[i], NULL);
	NEST(&lock_b, &l[0]);
	for (int i = 0; i + 1 < N; i++)
		NEST(&l[i], &l[i + 1]);
	NEST(&l[N - 1], &lock_a);
	return 0;
}
