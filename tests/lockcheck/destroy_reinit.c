/* Destroy and re-init forget a lock's order: A -> B, then B destroyed and
 * initialised again in the same memory (a new lock), then B -> A: no
 * cycle (Helgrind's tc15). */
#include "pairs.h"

pthread_mutex_t lock_a = PTHREAD_MUTEX_INITIALIZER;
pthread_mutex_t lock_b;

int main(void)
{
	pthread_mutex_init(&lock_b, NULL);
	NEST(&lock_a, &lock_b);
	CHECK(pthread_mutex_destroy(&lock_b) == 0);
	pthread_mutex_init(&lock_b, NULL);
	NEST(&lock_b, &lock_a);
	/* A re-init alone (no destroy) forgets too: B -> A is gone. */
	pthread_mutex_init(&lock_b, NULL);
	NEST(&lock_a, &lock_b);
	return 0;
}
