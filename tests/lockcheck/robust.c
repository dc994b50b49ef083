/* A robust mutex whose owner died holding it: the next lock returns
 * EOWNERDEAD and holds it (recorded as held), the program makes it
 * consistent and unlocks it: no report. The dead thread's record went
 * with it. */
#include <errno.h>

#include "pairs.h"

pthread_mutex_t robust;

static void *die_holding(void *arg)
{
	(void)arg;
	pthread_mutex_lock(&robust);
	return NULL; /* ends without unlocking */
}

int main(void)
{
	pthread_mutexattr_t a;
	pthread_t t;

	pthread_mutexattr_init(&a);
	pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
	CHECK(pthread_mutex_init(&robust, &a) == 0);
	CHECK(pthread_create(&t, NULL, die_holding, NULL) == 0);
	pthread_join(t, NULL);
	CHECK(pthread_mutex_lock(&robust) == EOWNERDEAD);
	CHECK(pthread_mutex_consistent(&robust) == 0);
	CHECK(pthread_mutex_unlock(&robust) == 0);
	CHECK(pthread_mutex_lock(&robust) == 0);
	CHECK(pthread_mutex_unlock(&robust) == 0);
	printf("robust: owner death handled\n");
	return 0;
}
