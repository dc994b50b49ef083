/* Reader-writer locks. Write A then read B, against write B then read A:
 * each writer keeps the other's reader out, a deadlock: reported. Read C
 * then read D, against read D then read C: with glibc's default
 * (reader-preferring) rwlocks a reader is let in while readers hold the
 * lock, so this cannot deadlock: not reported. */
#include "pairs.h"

pthread_rwlock_t rw_a = PTHREAD_RWLOCK_INITIALIZER;
pthread_rwlock_t rw_b = PTHREAD_RWLOCK_INITIALIZER;
pthread_rwlock_t rw_c = PTHREAD_RWLOCK_INITIALIZER;
pthread_rwlock_t rw_d = PTHREAD_RWLOCK_INITIALIZER;

static void write_read(pthread_rwlock_t *w, pthread_rwlock_t *r)
{
	pthread_rwlock_wrlock(w);
	pthread_rwlock_rdlock(r);
	pthread_rwlock_unlock(r);
	pthread_rwlock_unlock(w);
}

static void read_read(pthread_rwlock_t *x, pthread_rwlock_t *y)
{
	pthread_rwlock_rdlock(x);
	pthread_rwlock_rdlock(y);
	pthread_rwlock_unlock(y);
	pthread_rwlock_unlock(x);
}

int main(void)
{
	read_read(&rw_c, &rw_d);
	read_read(&rw_d, &rw_c);
	write_read(&rw_a, &rw_b);
	write_read(&rw_b, &rw_a);
	return 0;
}
