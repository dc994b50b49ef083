/* More nestings than the graph has edges (262,144 in the preload): the
 * ones that do not fit are left out with one warning, and the checking
 * goes on with what is recorded, so an inversion of an order learned
 * before the table filled is still reported. (A full table once switched
 * the whole graph off.) */
#include "pairs.h"

#define N 520 /* N * N edges from a[] to b[] */
pthread_mutex_t lock_x = PTHREAD_MUTEX_INITIALIZER;
pthread_mutex_t lock_y = PTHREAD_MUTEX_INITIALIZER;

int main(void)
{
	pthread_mutex_t *a = calloc(N, sizeof *a), *b = calloc(N, sizeof *b);

	CHECK(a != NULL && b != NULL);
	for (int i = 0; i < N; i++) {
		pthread_mutex_init(&a[i], NULL);
		pthread_mutex_init(&b[i], NULL);
	}
	NEST(&lock_x, &lock_y);
	for (int i = 0; i < N; i++)
		for (int j = 0; j < N; j++)
			NEST(&a[i], &b[j]);
	printf("nestings: %d\n", N * N);
	fflush(stdout);
	NEST(&lock_y, &lock_x); /* the inversion, after the table filled */
	return 0;
}
