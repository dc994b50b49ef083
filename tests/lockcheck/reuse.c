/* Memory freed and reused for another lock: m (on the heap) is taken
 * under A, then freed without pthread_mutex_destroy; the same memory is
 * allocated again for a new mutex, initialised, and A is taken under it.
 * Another lock, another order: no report. */
#include <stdint.h>

#include "pairs.h"

pthread_mutex_t lock_a = PTHREAD_MUTEX_INITIALIZER;

int main(void)
{
	pthread_mutex_t *m = malloc(sizeof *m), *n;
	uintptr_t old = (uintptr_t)m;

	CHECK(m != NULL);
	pthread_mutex_init(m, NULL);
	NEST(&lock_a, m);
	free(m);
	n = malloc(sizeof *n);
	CHECK(n != NULL);
	if ((uintptr_t)n != old) {
		printf("skipped: the allocator did not reuse the memory\n");
		return 77;
	}
	pthread_mutex_init(n, NULL);
	NEST(n, &lock_a);
	free(n);
	return 0;
}
