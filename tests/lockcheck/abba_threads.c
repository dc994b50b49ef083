/* ABBA across two threads, forced by a barrier: each holds one lock when
 * both go for the other's. Without a checker this hangs for ever; under
 * keel-lockcheck the second taking is reported before it blocks, and
 * with the abort policy the process ends instead of hanging. */
#include "pairs.h"

pthread_mutex_t lock_a = PTHREAD_MUTEX_INITIALIZER;
pthread_mutex_t lock_b = PTHREAD_MUTEX_INITIALIZER;
static pthread_barrier_t both_hold, first_waits;

void *thread_ab(void *arg);
void *thread_ba(void *arg);

void *thread_ab(void *arg)
{
	(void)arg;
	pthread_mutex_lock(&lock_a);
	pthread_barrier_wait(&both_hold);
	/* Learns A -> B, then blocks on B (held by the other thread). The
	 * other thread goes on only once this one has learned the edge. */
	pthread_barrier_wait(&first_waits);
	pthread_mutex_lock(&lock_b);
	pthread_mutex_unlock(&lock_b);
	pthread_mutex_unlock(&lock_a);
	return NULL;
}

void *thread_ba(void *arg)
{
	(void)arg;
	pthread_mutex_lock(&lock_b);
	pthread_barrier_wait(&both_hold);
	pthread_barrier_wait(&first_waits);
	/* Which thread learns its edge first is up to the scheduler: the
	 * other one closes the cycle, and is reported. */
	pthread_mutex_lock(&lock_a);
	pthread_mutex_unlock(&lock_a);
	pthread_mutex_unlock(&lock_b);
	return NULL;
}

int main(void)
{
	pthread_t t1, t2;

	pthread_barrier_init(&both_hold, NULL, 2);
	pthread_barrier_init(&first_waits, NULL, 2);
	pthread_create(&t1, NULL, thread_ab, NULL);
	pthread_create(&t2, NULL, thread_ba, NULL);
	pthread_join(t1, NULL);
	pthread_join(t2, NULL);
	return 0;
}
