/* unlock_balance: a mutex unlocked once more than it was locked. */
#include "pairs.h"

pthread_mutex_t lock_a = PTHREAD_MUTEX_INITIALIZER;

void unlock_twice(void);

void unlock_twice(void)
{
	pthread_mutex_lock(&lock_a);
	pthread_mutex_unlock(&lock_a);
	pthread_mutex_unlock(&lock_a);
}

int main(void)
{
	unlock_twice();
	return 0;
}
