/*
 * echo-server: a TCP echo server on 127.0.0.1 with one task per
 * connection, under keel_main().
 *
 *     echo-server [port]        port 0 or none: any free port
 *
 * It prints "listening on 127.0.0.1:PORT". On Ctrl-C (SIGINT) or SIGTERM
 * the root scope is cancelled: the acceptor stops, and every connection's
 * task is cancelled in its wait for input. Each connection owns its socket
 * as a keel resource whose teardown is a graceful goodbye: it writes
 * "bye", shuts down its side, reads until the client has closed too, then
 * closes. Teardowns run shielded, so that goodbye still works after the
 * cancellation, but they are bounded by the scope's cleanup deadline. At
 * exit it prints how many connections it accepted and how many it closed
 * that way; a second Ctrl-C ends it at once.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <keel.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static atomic_long accepted, goodbyes;

/* ---- One connection ---- */

static int take_socket(void *arg, void **out)
{
	*out = arg; /* the accepted socket becomes this task's resource */
	return 0;
}

/* Write all of buf, waiting (cancellably) for room. */
static int write_all(int fd, const char *buf, size_t len)
{
	while (len > 0) {
		ssize_t n = write(fd, buf, len);

		if (n > 0) {
			buf += n;
			len -= (size_t)n;
		} else if (n < 0 && errno == EAGAIN) {
			int rc = keel_fd_wait(fd, POLLOUT, KEEL_FOREVER);

			if (rc < 0)
				return rc;
		} else {
			return -errno;
		}
	}
	return 0;
}

/* The teardown: a goodbye the client can see, then a clean close. */
static int say_goodbye(void *res)
{
	int fd = (int)(intptr_t)res;
	char buf[512];
	int rc = write_all(fd, "bye\n", 4);

	if (rc == 0)
		rc = shutdown(fd, SHUT_WR) < 0 ? -errno : 0;
	/* Read until the client closes its side: closing with unread data
	 * would reset the connection instead of closing it. */
	while (rc == 0) {
		ssize_t n = read(fd, buf, sizeof buf);
		int w;

		if (n == 0)
			break;
		if (n < 0 && errno == EAGAIN) {
			/* Past the cleanup deadline this is cancelled. */
			w = keel_fd_wait(fd, POLLIN, KEEL_FOREVER);
			rc = w < 0 ? w : 0;
		} else if (n < 0) {
			rc = -errno;
		}
	}
	close(fd);
	if (rc == 0)
		atomic_fetch_add(&goodbyes, 1);
	return rc;
}

static int connection(void *arg)
{
	int fd = (int)(intptr_t)arg, rc;
	keel_scope_t *s;
	char buf[4096];

	if ((rc = keel_scope_open(&s, NULL)) < 0) {
		close(fd); /* cancelled before it was ours */
		return rc == -ECANCELED ? 0 : rc;
	}
	if ((rc = keel_resource(s, take_socket, say_goodbye, arg, NULL)) < 0) {
		close(fd);
		keel_scope_close(s);
		return rc == -ECANCELED ? 0 : rc;
	}
	for (;;) {
		ssize_t n;

		if ((rc = keel_fd_wait(fd, POLLIN, KEEL_FOREVER)) < 0)
			break; /* cancelled: the goodbye follows */
		n = read(fd, buf, sizeof buf);
		if (n == 0 || (n < 0 && errno != EAGAIN))
			break; /* the client left */
		if (n > 0 && write_all(fd, buf, (size_t)n) < 0)
			break;
	}
	rc = keel_scope_close(s);
	return rc == -ECANCELED ? 0 : rc;
}

/* ---- The listener ---- */

static int open_listener(void *arg, void **out)
{
	int port = *(int *)arg, one = 1;
	struct sockaddr_in a = {.sin_family = AF_INET};
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);

	if (fd < 0)
		return -errno;
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	a.sin_port = htons((uint16_t)port);
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0 ||
	    listen(fd, 128) < 0) {
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
	    0) {
		fprintf(stderr, "echo-server: listen: %s\n", keel_strerror(rc));
		return rc;
	}
	lfd = (int)(intptr_t)res;
	getsockname(lfd, (struct sockaddr *)&a, &alen);
	printf("listening on 127.0.0.1:%d\n", ntohs(a.sin_port));
	fflush(stdout);
	for (;;) {
		char name[32];
		int cfd;

		if ((rc = keel_fd_wait(lfd, POLLIN, KEEL_FOREVER)) == -ECANCELED)
			return 0; /* Ctrl-C: the scope tears down */
		cfd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (cfd < 0)
			continue;
		snprintf(name, sizeof name, "conn-%ld",
			 atomic_fetch_add(&accepted, 1) + 1);
		if (keel_spawn(s, connection, (void *)(intptr_t)cfd,
			       &(keel_spawn_opts){.name = name,
						  .stack_size = 128 << 10},
			       NULL) < 0)
			close(cfd);
	}
}

int main(int argc, char **argv)
{
	int port = argc > 1 ? atoi(argv[1]) : 0;
	int status = keel_main(server, &port);

	printf("accepted %ld connections, closed %ld with a goodbye\n",
	       atomic_load(&accepted), atomic_load(&goodbyes));
	return status;
}
