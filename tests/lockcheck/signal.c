/* Locks taken inside a signal handler, which may interrupt the thread
 * anywhere, the checker itself included: a second thread signals the
 * first, which nests A -> B over and over; the handler takes C (a lock
 * only handlers take, so no deadlock is possible). Nothing may crash or
 * hang, and no cycle exists to report. */
#include <signal.h>
#include <stdatomic.h>

#include "pairs.h"

#define ROUNDS 200000
pthread_mutex_t lock_a = PTHREAD_MUTEX_INITIALIZER;
pthread_mutex_t lock_b = PTHREAD_MUTEX_INITIALIZER;
pthread_mutex_t lock_c = PTHREAD_MUTEX_INITIALIZER;
static atomic_int stop;
static atomic_long handled;

static void handler(int sig)
{
	(void)sig;
	/* Only async-signal-safe in practice for a lock no interrupted
	 * code holds: C is taken by handlers only, one thread's. */
	pthread_mutex_lock(&lock_c);
	pthread_mutex_unlock(&lock_c);
	atomic_fetch_add(&handled, 1);
}

static void *signaller(void *arg)
{
	pthread_t target = *(pthread_t *)arg;

	while (!atomic_load(&stop) || atomic_load(&handled) == 0)
		pthread_kill(target, SIGUSR1);
	return NULL;
}

int main(void)
{
	pthread_t self = pthread_self(), t;
	struct sigaction sa = {.sa_handler = handler};

	sigemptyset(&sa.sa_mask);
	sa.sa_flags = SA_RESTART;
	CHECK(sigaction(SIGUSR1, &sa, NULL) == 0);
	CHECK(pthread_create(&t, NULL, signaller, &self) == 0);
	for (int i = 0; i < ROUNDS; i++)
		NEST(&lock_a, &lock_b);
	atomic_store(&stop, 1);
	pthread_join(t, NULL);
	CHECK(atomic_load(&handled) > 0);
	printf("handled %ld signals\n", atomic_load(&handled));
	return 0;
}
