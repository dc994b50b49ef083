/* fork() while other threads nest locks (so the checker's graph lock may
 * be held at the fork): the child, which holds A as its parent did, takes
 * B under it, learns a new edge and exits; nothing hangs, in the child or
 * the parent, and there is no cycle to report. */
#include <stdatomic.h>
#include <sys/wait.h>
#include <unistd.h>

#include "pairs.h"

#define FORKS 50
pthread_mutex_t lock_a = PTHREAD_MUTEX_INITIALIZER;
pthread_mutex_t lock_b = PTHREAD_MUTEX_INITIALIZER;
pthread_mutex_t lock_x[4];
static atomic_int stop;

static void *churn(void *arg)
{
	long i = (long)arg;

	/* New edges keep the graph's lock busy. */
	while (!atomic_load(&stop)) {
		pthread_mutex_t m;

		pthread_mutex_init(&m, NULL);
		NEST(&lock_x[i], &m);
		pthread_mutex_destroy(&m);
	}
	return NULL;
}

int main(void)
{
	pthread_t t[2];

	for (int i = 0; i < 4; i++)
		pthread_mutex_init(&lock_x[i], NULL);
	for (long i = 0; i < 2; i++)
		CHECK(pthread_create(&t[i], NULL, churn, (void *)i) == 0);
	NEST(&lock_a, &lock_b);
	for (int f = 0; f < FORKS; f++) {
		pid_t pid;
		int status;

		pthread_mutex_lock(&lock_a);
		pid = fork();
		CHECK(pid >= 0);
		if (pid == 0) {
			pthread_mutex_t m;

			pthread_mutex_lock(&lock_b);
			pthread_mutex_unlock(&lock_b);
			pthread_mutex_unlock(&lock_a);
			pthread_mutex_init(&m, NULL);
			NEST(&lock_x[3], &m);
			_exit(0);
		}
		pthread_mutex_unlock(&lock_a);
		CHECK(waitpid(pid, &status, 0) == pid);
		CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
	}
	atomic_store(&stop, 1);
	for (int i = 0; i < 2; i++)
		pthread_join(t[i], NULL);
	printf("forks: %d\n", FORKS);
	return 0;
}
