/* Mutex kinds as pthread defines them: a recursive mutex taken again by
 * its holder is no edge and no report; an errorcheck mutex taken again
 * returns EDEADLK, passed through, and is reported as AA; a robust mutex
 * behaves as a normal one for ordering. Spinlocks join the order too. */
#include <errno.h>

#include "pairs.h"

pthread_mutex_t rec;
pthread_mutex_t errc;
pthread_mutex_t robust;
pthread_spinlock_t spin;

int main(void)
{
	pthread_mutexattr_t a;

	pthread_mutexattr_init(&a);
	pthread_mutexattr_settype(&a, PTHREAD_MUTEX_RECURSIVE);
	pthread_mutex_init(&rec, &a);
	pthread_mutexattr_settype(&a, PTHREAD_MUTEX_ERRORCHECK);
	pthread_mutex_init(&errc, &a);
	pthread_mutexattr_settype(&a, PTHREAD_MUTEX_NORMAL);
	pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
	pthread_mutex_init(&robust, &a);
	pthread_spin_init(&spin, 0);

	/* Recursive: twice, then unlocked twice. No report. */
	pthread_mutex_lock(&rec);
	pthread_mutex_lock(&rec);
	pthread_mutex_unlock(&rec);
	pthread_mutex_unlock(&rec);

	/* Errorcheck: EDEADLK, reported. */
	CHECK(pthread_mutex_lock(&errc) == 0);
	CHECK(pthread_mutex_lock(&errc) == EDEADLK);
	CHECK(pthread_mutex_unlock(&errc) == 0);
	/* And an unlock not held: EPERM from pthread, reported by us. */
	CHECK(pthread_mutex_unlock(&errc) == EPERM);

	/* Robust and spin: robust -> spin, then spin -> robust: a cycle. */
	pthread_mutex_lock(&robust);
	pthread_spin_lock(&spin);
	pthread_spin_unlock(&spin);
	pthread_mutex_unlock(&robust);
	pthread_spin_lock(&spin);
	pthread_mutex_lock(&robust);
	pthread_mutex_unlock(&robust);
	pthread_spin_unlock(&spin);
	return 0;
}
