/* ABBCCA: A -> B, B -> C, then C -> A closes a cycle of three. */
#include "pairs.h"

pthread_mutex_t lock_a = PTHREAD_MUTEX_INITIALIZER;
pthread_mutex_t lock_b = PTHREAD_MUTEX_INITIALIZER;
pthread_mutex_t lock_c = PTHREAD_MUTEX_INITIALIZER;

int main(void)
{
	NEST(&lock_a, &lock_b);
	NEST(&lock_b, &lock_c);
	NEST(&lock_c, &lock_a);
	return 0;
}
