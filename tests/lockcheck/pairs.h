/* pairs.h: helpers for the keel-lockcheck scenarios. These programs know
 * nothing of keel: plain pthreads, run under libkeel-lockcheck.so. */
#ifndef LOCKCHECK_PAIRS_H
#define LOCKCHECK_PAIRS_H

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

/* Take x, then y while holding x; release both. */
#define NEST(x, y)                                                          \
	do {                                                                \
		pthread_mutex_lock(x);                                      \
		pthread_mutex_lock(y);                                      \
		pthread_mutex_unlock(y);                                    \
		pthread_mutex_unlock(x);                                    \
	} while (0)

#define CHECK(cond)                                                         \
	do {                                                                \
		if (!(cond)) {                                              \
			fprintf(stderr, "%s:%d: check failed: %s\n",        \
				__FILE__, __LINE__, #cond);                 \
			exit(1);                                            \
		}                                                           \
	} while (0)

#endif
