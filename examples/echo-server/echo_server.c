/*
 * echo-server: a TCP echo server on 127.0.0.1, written the way a keel
 * server is meant to be written.
 *
 *     echo-server [port [idle-seconds]]    port 0 or none: any free port;
 *                                          idle timeout 30 s by default
 *
 * It prints "listening on 127.0.0.1:PORT".
 *
 * - keel_main_opts() runs the root scope: Ctrl-C (SIGINT) or SIGTERM
 *   cancels it, and the exit status says so (130, 143). The scope
 *   supervises (one connection's failure is not the server's) and gives
 *   goodbyes 2 s (cleanup_deadline).
 * - The listening socket is a keel_resource() of the root scope: closed
 *   last, after every connection has ended.
 * - keel_accept() waits for a client, cancellably; keel_spawn_fd() hands
 *   the socket to a task of its own, which owns it: keel closes it when
 *   the task ends, and on every path where the task could not start.
 * - The connection task reads with keel_read() and a deadline: a client
 *   silent for the idle timeout gets a goodbye, as every client does when
 *   the server is stopped (keel_read() returns -ECANCELED).
 * - The goodbye ("bye", then our side shut down, then waiting for the
 *   client to close its side, so the close is clean and not a reset) runs
 *   in a shield: it still works in a cancelled task, for at most 2 s.
 *
 * At exit it prints how many connections it accepted, how many it closed
 * with a goodbye and how many of those were idle; a second Ctrl-C ends it
 * at once.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <keel.h>
#include <netinet/in.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define GOODBYE_TIME KEEL_SEC(2)

static atomic_long accepted, goodbyes, idle_closed;
static keel_time_t idle_timeout = KEEL_SEC(30);

/* ---- One connection ---- */

/* "bye", shut our side, then read until the client has closed its side:
 * closing with unread data would reset the connection instead. In a
 * shield, so that it works after a cancellation, until a deadline. */
static int goodbye(int fd)
{
	keel_time_t deadline = keel_after(GOODBYE_TIME);
	char buf[512];
	ssize_t n = 1;
	int rc;

	if ((rc = keel_shield_begin(deadline)) < 0)
		return rc;
	rc = keel_write_all(fd, "bye\n", 4, NULL, deadline);
	if (rc == 0 && shutdown(fd, SHUT_WR) < 0)
		rc = -errno;
	while (rc == 0 && (n = keel_read(fd, buf, sizeof buf, deadline)) > 0)
		;
	keel_shield_end();
	if (rc == 0 && n < 0)
		rc = (int)n;
	if (rc == 0)
		atomic_fetch_add(&goodbyes, 1);
	return rc;
}

/* The connection's task: it owns fd (keel_spawn_fd closes it when this
 * returns). Problems of one client are not the server's: they end the
 * connection, and the status stays 0. */
static int connection(int fd, void *arg)
{
	char buf[4096];
	ssize_t n;
	int rc = 0;

	(void)arg;
	while ((n = keel_read(fd, buf, sizeof buf, keel_after(idle_timeout))) >
	       0) {
		rc = keel_write_all(fd, buf, (size_t)n, NULL,
				    keel_after(idle_timeout));
		if (rc < 0)
			break;
	}
	if (n == -ETIMEDOUT || rc == -ETIMEDOUT) {
		atomic_fetch_add(&idle_closed, 1);
		goodbye(fd);
	} else if (n == -ECANCELED || rc == -ECANCELED) {
		goodbye(fd); /* the server is stopping */
	}
	/* n == 0: the client closed; another error: it reset. */
	return 0;
}

/* ---- The listener ---- */

static int open_listener(void *arg, void **out)
{
	int port = *(int *)arg, one = 1;
	struct sockaddr_in a = {.sin_family = AF_INET};
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);

	if (fd < 0)
		return -errno;
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	a.sin_port = htons((uint16_t)port);
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0 ||
	    listen(fd, 512) < 0) {
		int err = -errno;

		close(fd);
		return err;
	}
	*out = (void *)(intptr_t)fd;
	return 0;
}

static int close_listener(void *res)
{
	close((int)(intptr_t)res);
	return 0;
}

static int server(keel_scope_t *s, void *arg)
{
	struct sockaddr_in a;
	socklen_t alen = sizeof a;
	void *res;
	int lfd, rc;

	if ((rc = keel_resource(s, open_listener, close_listener, arg, &res)) <
	    0)
		return rc; /* keel_main names the error and exits 1 */
	lfd = (int)(intptr_t)res;
	getsockname(lfd, (struct sockaddr *)&a, &alen);
	printf("listening on 127.0.0.1:%d\n", ntohs(a.sin_port));
	fflush(stdout);
	for (;;) {
		char name[32];
		int cfd = keel_accept(lfd, NULL, KEEL_FOREVER);

		if (cfd == -ECANCELED)
			return 0; /* Ctrl-C: the scope tears down */
		if (cfd == -EMFILE || cfd == -ENFILE) {
			/* Out of fds: connections are waiting in the
			 * backlog; let some of ours end first. */
			if (keel_sleep_until(keel_after(KEEL_MS(50))) < 0)
				return 0;
			continue;
		}
		if (cfd < 0)
			return cfd;
		snprintf(name, sizeof name, "conn-%ld",
			 atomic_fetch_add(&accepted, 1) + 1);
		/* On failure (the scope is being cancelled) the socket is
		 * closed for us. */
		keel_spawn_fd(s, connection, NULL, cfd,
			      &(keel_spawn_opts){.name = name,
						 .stack_size = 128 << 10},
			      NULL);
	}
}

int main(int argc, char **argv)
{
	int port = argc > 1 ? atoi(argv[1]) : 0, status;
	keel_stats stats;
	keel_scope_opts opts = {
		.name = "echo-server",
		.policy = KEEL_SUPERVISE,
		.cleanup_deadline = GOODBYE_TIME,
	};

	if (argc > 2 && atoi(argv[2]) > 0)
		idle_timeout = KEEL_SEC(atoi(argv[2]));
	status = keel_main_opts(server, &port, &opts);
	printf("accepted %ld connections, closed %ld with a goodbye (%ld "
	       "idle)\n",
	       atomic_load(&accepted), atomic_load(&goodbyes),
	       atomic_load(&idle_closed));
	/* Finished connections gave back their task slots: the high-water
	 * mark is the most that were alive at once, not the total. */
	if (keel_stats_get(&stats) == 0)
		printf("task slots: %zu at most in use at once\n",
		       stats.task_slots);
	return status;
}
