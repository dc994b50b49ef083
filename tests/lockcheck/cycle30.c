/* A cycle of 30 locks: 0 -> 1 -> ... -> 29, then 29 -> 0. No cap on the
 * length of a cycle. */
#include "pairs.h"

#define N 30
pthread_mutex_t chain[N];

int main(void)
{
	for (int i = 0; i < N; i++)
		pthread_mutex_init(&chain[i], NULL);
	for (int i = 0; i + 1 < N; i++)
		NEST(&chain[i], &chain[i + 1]);
	NEST(&chain[N - 1], &chain[0]);
	return 0;
}
