/*
 * platform/pipe.c: the notification fd pair and accept() of platform.h for
 * systems without eventfd or accept4(): the portable POSIX layer and the
 * Emscripten one.
 *
 * Notification fds are pipes: a byte written to the write end makes the
 * read end readable until drained. Both ends are non-blocking, so a full
 * pipe (already readable) costs the signaller nothing; Emscripten's pipes
 * never block anyway.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include "../platform.h"

int keel__notify_open(int *rfd, int *wfd)
{
	int p[2];

	if (pipe(p) < 0)
		return -errno;
	for (int i = 0; i < 2; i++) {
		fcntl(p[i], F_SETFL, fcntl(p[i], F_GETFL) | O_NONBLOCK);
		fcntl(p[i], F_SETFD, FD_CLOEXEC);
	}
	*rfd = p[0];
	*wfd = p[1];
	return 0;
}

void keel__notify_close(int rfd, int wfd)
{
	close(rfd);
	close(wfd);
}

void keel__notify_signal(int wfd)
{
	char c = 1;
	ssize_t n;

	/* EAGAIN means the pipe is full, hence readable already. */
	do
		n = write(wfd, &c, 1);
	while (n < 0 && errno == EINTR);
}

uint64_t keel__notify_drain(int rfd)
{
	char buf[64];
	uint64_t got = 0;
	ssize_t n;

	/* One byte per signal. */
	do {
		n = read(rfd, buf, sizeof buf);
		if (n > 0)
			got += (uint64_t)n;
	} while (n > 0 || (n < 0 && errno == EINTR));
	return got;
}

int keel__accept(int lfd, struct sockaddr_storage *peer)
{
	socklen_t sl = sizeof *peer;
	int fd = accept(lfd, (struct sockaddr *)peer, peer ? &sl : NULL), fl;

	if (fd < 0)
		return -errno;
	/* Not atomic with the accept: an exec on another thread in between
	 * inherits the fd. POSIX.1-2024's accept4() closes that window
	 * where the system has it. */
	fl = fcntl(fd, F_GETFL);
	if (fcntl(fd, F_SETFD, FD_CLOEXEC) < 0 || fl < 0 ||
	    fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) {
		int e = errno;

		close(fd);
		return -e;
	}
	return fd;
}
