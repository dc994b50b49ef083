/* A library whose constructor takes locks before main, perhaps before
 * the checker's own constructor has run: A -> B. */
#include <pthread.h>

pthread_mutex_t ctor_lock_a = PTHREAD_MUTEX_INITIALIZER;
pthread_mutex_t ctor_lock_b = PTHREAD_MUTEX_INITIALIZER;

void ctor_lib_init(void);

__attribute__((constructor)) void ctor_lib_init(void)
{
	pthread_mutex_lock(&ctor_lock_a);
	pthread_mutex_lock(&ctor_lock_b);
	pthread_mutex_unlock(&ctor_lock_b);
	pthread_mutex_unlock(&ctor_lock_a);
}
