/* Timed and clock locks are blocking acquisitions: they learn the order
 * and are checked like lock. A timed lock that times out holds nothing:
 * no entry, and no unlock report later. A -> B by timedlock, then B -> A
 * by clocklock: reported. */
#include <errno.h>
#include <time.h>

#include "pairs.h"

pthread_mutex_t lock_a = PTHREAD_MUTEX_INITIALIZER;
pthread_mutex_t lock_b = PTHREAD_MUTEX_INITIALIZER;
pthread_mutex_t busy = PTHREAD_MUTEX_INITIALIZER;
static pthread_barrier_t held, done;

static void *holder(void *arg)
{
	(void)arg;
	pthread_mutex_lock(&busy);
	pthread_barrier_wait(&held);
	pthread_barrier_wait(&done);
	pthread_mutex_unlock(&busy);
	return NULL;
}

int main(void)
{
	struct timespec later, past = {0, 0};
	pthread_t t;

	clock_gettime(CLOCK_REALTIME, &later);
	later.tv_sec += 10;
	pthread_barrier_init(&held, NULL, 2);
	pthread_barrier_init(&done, NULL, 2);
	CHECK(pthread_create(&t, NULL, holder, NULL) == 0);
	pthread_barrier_wait(&held);
	/* Times out at once (the deadline is past): nothing held. */
	CHECK(pthread_mutex_timedlock(&busy, &past) == ETIMEDOUT);
	pthread_barrier_wait(&done);
	pthread_join(t, NULL);

	pthread_mutex_lock(&lock_a);
	CHECK(pthread_mutex_timedlock(&lock_b, &later) == 0);
	pthread_mutex_unlock(&lock_b);
	pthread_mutex_unlock(&lock_a);

	clock_gettime(CLOCK_MONOTONIC, &later);
	later.tv_sec += 10;
	pthread_mutex_lock(&lock_b);
	CHECK(pthread_mutex_clocklock(&lock_a, CLOCK_MONOTONIC, &later) == 0);
	pthread_mutex_unlock(&lock_a);
	pthread_mutex_unlock(&lock_b);
	return 0;
}
