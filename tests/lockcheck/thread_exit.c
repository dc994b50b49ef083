/* Locks at thread exit: a thread-specific value's destructor, run as the
 * thread ends, nests B -> A after main nested A -> B: reported from the
 * exiting thread, which then ends normally. */
#include "pairs.h"

pthread_mutex_t lock_a = PTHREAD_MUTEX_INITIALIZER;
pthread_mutex_t lock_b = PTHREAD_MUTEX_INITIALIZER;
static pthread_key_t key;

void at_thread_exit(void *value);

void at_thread_exit(void *value)
{
	(void)value;
	NEST(&lock_b, &lock_a);
}

static void *worker(void *arg)
{
	pthread_setspecific(key, arg);
	return NULL;
}

int main(void)
{
	pthread_t t;
	static int value;

	CHECK(pthread_key_create(&key, at_thread_exit) == 0);
	NEST(&lock_a, &lock_b);
	CHECK(pthread_create(&t, NULL, worker, &value) == 0);
	pthread_join(t, NULL);
	return 0;
}
