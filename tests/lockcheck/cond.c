/* A condition-variable wait releases and retakes its mutex: the held
 * record stays right (no unlock reported as not held, the order after
 * the wait is still checked). A waits on a cond (timed out at once),
 * then B under A; then B -> A closes a cycle: one report. */
#include <time.h>

#include "pairs.h"

pthread_mutex_t lock_a = PTHREAD_MUTEX_INITIALIZER;
pthread_mutex_t lock_b = PTHREAD_MUTEX_INITIALIZER;
pthread_cond_t cond = PTHREAD_COND_INITIALIZER;

int main(void)
{
	struct timespec past = {0, 0};

	pthread_mutex_lock(&lock_a);
	CHECK(pthread_cond_timedwait(&cond, &lock_a, &past) != 0);
	pthread_mutex_lock(&lock_b);
	pthread_mutex_unlock(&lock_b);
	pthread_mutex_unlock(&lock_a);
	NEST(&lock_b, &lock_a);
	return 0;
}
