/* After a destroy and re-init the lock starts clean, but its new order is
 * learned as carefully as any: A -> B, B destroyed and initialised again,
 * B -> A, then A -> B closes a cycle with the new B: reported (a nesting
 * remembered from the old B must not hide it). */
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
	NEST(&lock_a, &lock_b);
	return 0;
}
