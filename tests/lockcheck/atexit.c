/* Locks in an atexit handler: main nests A -> B, the handler B -> A,
 * which closes the cycle while the process exits: reported, then the
 * summary line; nothing crashes or hangs. */
#include "pairs.h"

pthread_mutex_t lock_a = PTHREAD_MUTEX_INITIALIZER;
pthread_mutex_t lock_b = PTHREAD_MUTEX_INITIALIZER;

void at_exit_handler(void);

void at_exit_handler(void)
{
	NEST(&lock_b, &lock_a);
}

int main(void)
{
	CHECK(atexit(at_exit_handler) == 0);
	NEST(&lock_a, &lock_b);
	return 0;
}
