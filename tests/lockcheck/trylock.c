/* A trylock learns no edge to the lock it takes (it cannot wait), but the
 * locks taken under a trylocked lock do learn one from it. */
#include "pairs.h"

pthread_mutex_t lock_a = PTHREAD_MUTEX_INITIALIZER;
pthread_mutex_t lock_b = PTHREAD_MUTEX_INITIALIZER;
pthread_mutex_t lock_c = PTHREAD_MUTEX_INITIALIZER;

int main(void)
{
	/* A, then B by trylock (no A -> B), then C under B (B -> C). */
	pthread_mutex_lock(&lock_a);
	CHECK(pthread_mutex_trylock(&lock_b) == 0);
	pthread_mutex_lock(&lock_c);
	pthread_mutex_unlock(&lock_c);
	pthread_mutex_unlock(&lock_b);
	pthread_mutex_unlock(&lock_a);
	/* B -> A: no cycle, A -> B was never learned. */
	NEST(&lock_b, &lock_a);
	/* C -> B: closes B -> C -> B, reported. */
	NEST(&lock_c, &lock_b);
	return 0;
}
