/*
 * lockcheck_pair: a program that does nothing but lock and unlock pthread
 * mutexes, one thread, no contention, and prints the nanoseconds per
 * operation it measured itself (start-up, and the checker's load, left
 * out). bench_lockcheck.c runs it natively and under libkeel-lockcheck.so.
 *
 *     lockcheck_pair pair|nested|init [operations]
 *
 * pair: lock + unlock of one mutex. nested: lock A, lock B, unlock B,
 * unlock A (the nesting is learned once, then known to the thread).
 * init: init, lock, unlock, destroy of a mutex taken under A each time
 * (what keel-lockcheck's lock identity costs: *_init and *_destroy
 * forget the lock's node, and the nesting is learned anew each time).
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static pthread_mutex_t a = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t b = PTHREAD_MUTEX_INITIALIZER;

static long long now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

int main(int argc, char **argv)
{
	/* Through volatile pointers: nothing for the compiler to see through. */
	pthread_mutex_t *volatile pa = &a, *volatile pb = &b;
	int nested = argc > 1 && strcmp(argv[1], "nested") == 0;
	int init = argc > 1 && strcmp(argv[1], "init") == 0;
	long n = argc > 2 ? atol(argv[2]) : 20000000L;
	long long t0, t1;

	if (n <= 0)
		return 2;
	for (long i = 0; i < 100000; i++) {
		pthread_mutex_lock(pa);
		pthread_mutex_unlock(pa);
	}
	t0 = now();
	if (init) {
		pthread_mutex_t m;

		pthread_mutex_lock(pa);
		for (long i = 0; i < n; i++) {
			pthread_mutex_init(&m, NULL);
			pthread_mutex_lock(&m);
			pthread_mutex_unlock(&m);
			pthread_mutex_destroy(&m);
		}
		pthread_mutex_unlock(pa);
	} else if (nested)
		for (long i = 0; i < n; i++) {
			pthread_mutex_lock(pa);
			pthread_mutex_lock(pb);
			pthread_mutex_unlock(pb);
			pthread_mutex_unlock(pa);
		}
	else
		for (long i = 0; i < n; i++) {
			pthread_mutex_lock(pa);
			pthread_mutex_unlock(pa);
		}
	t1 = now();
	printf("%.3f\n", (double)(t1 - t0) / (double)n);
	return 0;
}
