/* AA: a normal mutex taken twice by one thread deadlocks it. Reported
 * before the second lock blocks; under the abort policy the process ends. */
#include "pairs.h"

pthread_mutex_t lock_a = PTHREAD_MUTEX_INITIALIZER;

void take_twice(void);

void take_twice(void)
{
	pthread_mutex_lock(&lock_a);
	pthread_mutex_lock(&lock_a); /* blocks forever without a checker */
}

int main(void)
{
	take_twice();
	return 0;
}
