/* A common fork pattern: the prepare handler takes a lock, the parent
 * handler releases it, the child handler makes it anew with
 * pthread_mutex_init (it is held, by a thread that is gone or is this
 * one). The child then takes it as a free lock: no "taken again" report. */
#include <sys/wait.h>
#include <unistd.h>

#include "pairs.h"

pthread_mutex_t registry = PTHREAD_MUTEX_INITIALIZER;

static void prepare(void)
{
	pthread_mutex_lock(&registry);
}

static void parent(void)
{
	pthread_mutex_unlock(&registry);
}

static void child(void)
{
	pthread_mutex_init(&registry, NULL);
}

int main(void)
{
	pid_t pid;
	int status;

	CHECK(pthread_atfork(prepare, parent, child) == 0);
	pid = fork();
	CHECK(pid >= 0);
	if (pid == 0) {
		pthread_mutex_lock(&registry);
		pthread_mutex_unlock(&registry);
		_exit(0);
	}
	CHECK(waitpid(pid, &status, 0) == pid);
	CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
	pthread_mutex_lock(&registry);
	pthread_mutex_unlock(&registry);
	printf("child and parent done\n");
	return 0;
}
