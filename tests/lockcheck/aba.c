/* ABA: A, then B, then A again while holding both: self-deadlock on A. */
#include "pairs.h"

pthread_mutex_t lock_a = PTHREAD_MUTEX_INITIALIZER;
pthread_mutex_t lock_b = PTHREAD_MUTEX_INITIALIZER;

void take_aba(void);

void take_aba(void)
{
	pthread_mutex_lock(&lock_a);
	pthread_mutex_lock(&lock_b);
	pthread_mutex_lock(&lock_a);
}

int main(void)
{
	take_aba();
	return 0;
}
