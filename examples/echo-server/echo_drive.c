/*
 * echo-drive: runs echo-server, keeps clients talking to it, interrupts it
 * with SIGINT in the middle of the traffic, and checks that every
 * connection was closed cleanly: each client receives "bye", closes its
 * side, and then sees the server close (end of file, not a reset); the
 * server exits with status 130 and reports a goodbye for every connection
 * it accepted.
 *
 *     echo-drive <path to echo-server> [clients]
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#define WARMUP_ROUNDS 20

static int port;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int warmed_up;

struct client {
	pthread_t th;
	int id, rounds, clean;
	char error[128];
};

/* Read one line (without its newline); 0 at end of file, -1 on error. */
static int read_line(int fd, char *line, size_t size)
{
	size_t n = 0;

	while (n + 1 < size) {
		char c;
		ssize_t r = read(fd, &c, 1);

		if (r == 0)
			return n ? 1 : 0;
		if (r < 0)
			return -1;
		if (c == '\n')
			break;
		line[n++] = c;
	}
	line[n] = '\0';
	return 1;
}

static void *client_main(void *arg)
{
	struct client *c = arg;
	struct sockaddr_in a = {.sin_family = AF_INET};
	char line[128], want[64];
	int fd = socket(AF_INET, SOCK_STREAM, 0), counted = 0;

	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	a.sin_port = htons((uint16_t)port);
	if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
		snprintf(c->error, sizeof c->error, "connect: %s",
			 strerror(errno));
		goto out;
	}
	for (;;) {
		int len = snprintf(want, sizeof want, "ping %d-%d", c->id,
				   c->rounds);

		want[len] = '\n';
		if (write(fd, want, (size_t)len + 1) != len + 1) {
			snprintf(c->error, sizeof c->error, "write: %s",
				 strerror(errno));
			goto out;
		}
		want[len] = '\0';
		if (read_line(fd, line, sizeof line) <= 0) {
			snprintf(c->error, sizeof c->error,
				 "connection ended without a goodbye");
			goto out;
		}
		if (strcmp(line, "bye") == 0)
			break;
		if (strcmp(line, want) != 0) {
			snprintf(c->error, sizeof c->error,
				 "sent \"%.40s\", got \"%.40s\"", want, line);
			goto out;
		}
		if (++c->rounds == WARMUP_ROUNDS && !counted) {
			counted = 1;
			pthread_mutex_lock(&mu);
			warmed_up++;
			pthread_cond_broadcast(&cv);
			pthread_mutex_unlock(&mu);
		}
	}
	/* The goodbye: close our side, then the server closes its side. */
	shutdown(fd, SHUT_WR);
	for (;;) {
		int r = read_line(fd, line, sizeof line);

		if (r == 0) {
			c->clean = 1;
			break;
		}
		if (r < 0) {
			snprintf(c->error, sizeof c->error,
				 "after the goodbye: %s", strerror(errno));
			break;
		}
	}
out:
	if (!counted) {
		pthread_mutex_lock(&mu);
		warmed_up++;
		pthread_cond_broadcast(&cv);
		pthread_mutex_unlock(&mu);
	}
	close(fd);
	return NULL;
}

int main(int argc, char **argv)
{
	int nclients = argc > 2 ? atoi(argv[2]) : 16, p[2], status, failed = 0;
	long accepted = -1, goodbyes = -1;
	struct client *clients;
	char line[256];
	pid_t pid;
	FILE *out;

	if (argc < 2) {
		fprintf(stderr, "usage: echo-drive <echo-server> [clients]\n");
		return 2;
	}
	signal(SIGPIPE, SIG_IGN);
	if (pipe(p) < 0 || (pid = fork()) < 0)
		return 2;
	if (pid == 0) {
		dup2(p[1], STDOUT_FILENO);
		close(p[0]);
		close(p[1]);
		execl(argv[1], argv[1], "0", (char *)NULL);
		_exit(127);
	}
	close(p[1]);
	out = fdopen(p[0], "r");
	if (!fgets(line, sizeof line, out) ||
	    sscanf(line, "listening on 127.0.0.1:%d", &port) != 1) {
		fprintf(stderr, "echo-drive: the server did not start\n");
		return 1;
	}
	printf("server up on port %d; %d clients talking to it\n", port,
	       nclients);
	clients = calloc((size_t)nclients, sizeof *clients);
	for (int i = 0; i < nclients; i++) {
		clients[i].id = i;
		pthread_create(&clients[i].th, NULL, client_main, &clients[i]);
	}
	/* Mid-traffic: every client has made its first rounds and keeps
	 * going. */
	pthread_mutex_lock(&mu);
	while (warmed_up < nclients)
		pthread_cond_wait(&cv, &mu);
	pthread_mutex_unlock(&mu);
	printf("sending SIGINT to the server\n");
	kill(pid, SIGINT);
	for (int i = 0; i < nclients; i++) {
		pthread_join(clients[i].th, NULL);
		if (!clients[i].clean) {
			failed++;
			printf("client %d: %s\n", i, clients[i].error);
		}
	}
	while (fgets(line, sizeof line, out))
		sscanf(line, "accepted %ld connections, closed %ld", &accepted,
		       &goodbyes);
	fclose(out);
	free(clients);
	waitpid(pid, &status, 0);
	printf("server exited with status %d; it accepted %ld connections and "
	       "said goodbye on %ld\n",
	       WIFEXITED(status) ? WEXITSTATUS(status) : -1, accepted,
	       goodbyes);
	if (failed || !WIFEXITED(status) || WEXITSTATUS(status) != 130 ||
	    accepted != nclients || goodbyes != nclients) {
		printf("FAILED: not every connection closed cleanly\n");
		return 1;
	}
	printf("ok: %d connections, each closed with a goodbye after Ctrl-C\n",
	       nclients);
	return 0;
}
