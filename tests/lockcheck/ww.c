/* WW: write-lock A, read-lock B, write-lock A again: the holder waits for
 * itself. */
#include "pairs.h"

pthread_rwlock_t rw_a = PTHREAD_RWLOCK_INITIALIZER;
pthread_rwlock_t rw_b = PTHREAD_RWLOCK_INITIALIZER;

int main(void)
{
	pthread_rwlock_wrlock(&rw_a);
	pthread_rwlock_rdlock(&rw_b);
	/* glibc answers EDEADLK here; a writer-preferring or another
	 * implementation may block. Reported either way. */
	pthread_rwlock_wrlock(&rw_a);
	return 0;
}
