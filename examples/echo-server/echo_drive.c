/*
 * echo-drive: runs echo-server and drives it.
 *
 *     echo-drive <path to echo-server> [clients]
 * keeps clients talking to it, interrupts it with SIGINT in the middle of
 * the traffic, and checks that every connection was closed cleanly: each
 * client receives "bye", closes its side, and then sees the server close
 * (end of file, not a reset); the server exits with status 130 and
 * reports a goodbye for every connection it accepted.
 *
 *     echo-drive <path to echo-server> idle
 * runs the server with a 1 s idle timeout: a client that goes quiet gets
 * its goodbye, and one that keeps talking does not.
 *
 *     echo-drive <path to echo-server> load [total [at-once [band]]]
 * opens `total` connections (default 10000), `at-once` at a time (default
 * 200), each a short echo exchange, and checks that the server's fd count
 * returns to where it was and its RSS to its band: within `band` KiB
 * (default 4096; 0: not checked) of what it was after a warm-up of the
 * first 10 x `at-once` connections.
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
#include <dirent.h>
#include <stdatomic.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
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

static pid_t start_server(const char *path, const char *idle, FILE **out)
{
	char line[256];
	int p[2];
	pid_t pid;

	if (pipe(p) < 0 || (pid = fork()) < 0)
		exit(2);
	if (pid == 0) {
		dup2(p[1], STDOUT_FILENO);
		close(p[0]);
		close(p[1]);
		execl(path, path, "0", idle, (char *)NULL);
		_exit(127);
	}
	close(p[1]);
	*out = fdopen(p[0], "r");
	if (!fgets(line, sizeof line, *out) ||
	    sscanf(line, "listening on 127.0.0.1:%d", &port) != 1) {
		fprintf(stderr, "echo-drive: the server did not start\n");
		exit(1);
	}
	return pid;
}

/* Stop the server with SIGINT; its exit status (-1 if it did not exit),
 * and its last report's counts. */
static long task_slots = -1;

static int stop_server(pid_t pid, FILE *out, long counts[3])
{
	char line[256];
	int status;

	kill(pid, SIGINT);
	counts[0] = counts[1] = counts[2] = -1;
	while (fgets(line, sizeof line, out)) {
		sscanf(line,
		       "accepted %ld connections, closed %ld with a goodbye "
		       "(%ld idle)",
		       &counts[0], &counts[1], &counts[2]);
		sscanf(line, "task slots: %ld", &task_slots);
	}
	fclose(out);
	waitpid(pid, &status, 0);
	return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

static int connect_to_server(void)
{
	struct sockaddr_in a = {.sin_family = AF_INET};
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);

	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	a.sin_port = htons((uint16_t)port);
	if (fd >= 0 && connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
		close(fd);
		return -1;
	}
	return fd;
}

/* ---- idle ---- */

static int run_idle(const char *path)
{
	FILE *out;
	pid_t pid = start_server(path, "1", &out);
	int quiet = connect_to_server(), status, ok = 1;
	char line[128];
	long counts[3];

	printf("server up on port %d with a 1 s idle timeout\n", port);
	if (quiet < 0 || write(quiet, "hi\n", 3) != 3 ||
	    read_line(quiet, line, sizeof line) <= 0 || strcmp(line, "hi") != 0)
		ok = 0;
	/* Now quiet: the next line must be the server's goodbye, then, once
	 * we close our side, its end of file. */
	if (ok && (read_line(quiet, line, sizeof line) <= 0 ||
		   strcmp(line, "bye") != 0))
		ok = 0;
	shutdown(quiet, SHUT_WR);
	if (ok && read_line(quiet, line, sizeof line) != 0)
		ok = 0;
	close(quiet);
	printf("a quiet client got %s\n", ok ? "its goodbye" : "no goodbye");
	status = stop_server(pid, out, counts);
	printf("server exited with status %d; accepted %ld, goodbyes %ld, idle "
	       "%ld\n",
	       status, counts[0], counts[1], counts[2]);
	if (!ok || status != 130 || counts[0] != 1 || counts[2] != 1) {
		printf("FAILED: the idle client was not said goodbye to\n");
		return 1;
	}
	printf("ok: the idle connection was closed with a goodbye\n");
	return 0;
}

/* ---- load ---- */

static atomic_long load_left, load_done, load_failed;

static void *load_client(void *arg)
{
	char msg[32], line[64];

	(void)arg;
	while (atomic_fetch_sub(&load_left, 1) > 0) {
		int fd = connect_to_server(), len;

		len = snprintf(msg, sizeof msg, "ping %ld\n",
			       atomic_load(&load_done));
		if (fd < 0 || write(fd, msg, (size_t)len) != len ||
		    read_line(fd, line, sizeof line) <= 0 ||
		    strncmp(line, msg, (size_t)len - 1) != 0)
			atomic_fetch_add(&load_failed, 1);
		if (fd >= 0)
			close(fd);
		atomic_fetch_add(&load_done, 1);
	}
	return NULL;
}

/* The server's open fds, and how many of them are sockets. */
static int server_fds(pid_t pid, int *sockets)
{
	char path[64], link[64], target[64];
	struct dirent *e;
	DIR *d;
	int n = 0;

	*sockets = 0;
	snprintf(path, sizeof path, "/proc/%d/fd", (int)pid);
	if (!(d = opendir(path)))
		return -1;
	while ((e = readdir(d)) != NULL) {
		ssize_t len;

		if (e->d_name[0] == '.')
			continue;
		n++;
		snprintf(link, sizeof link, "%.20s/%.20s", path, e->d_name);
		len = readlink(link, target, sizeof target - 1);
		if (len > 7 && strncmp(target, "socket:", 7) == 0)
			(*sockets)++;
	}
	closedir(d);
	return n;
}

/* What the server's fds are, for a failure's report. */
static void show_fds(pid_t pid)
{
	char path[64], link[64], target[256];
	struct dirent *e;
	DIR *d;

	snprintf(path, sizeof path, "/proc/%d/fd", (int)pid);
	if (!(d = opendir(path)))
		return;
	while ((e = readdir(d)) != NULL) {
		ssize_t n;

		if (e->d_name[0] == '.')
			continue;
		snprintf(link, sizeof link, "%.20s/%.20s", path, e->d_name);
		n = readlink(link, target, sizeof target - 1);
		target[n > 0 ? n : 0] = '\0';
		printf("  fd %s -> %s\n", e->d_name, target);
	}
	closedir(d);
}


static void run_clients(long total, int at_once)
{
	pthread_t *th = calloc((size_t)at_once, sizeof *th);

	atomic_store(&load_left, total);
	for (int i = 0; i < at_once; i++)
		pthread_create(&th[i], NULL, load_client, NULL);
	for (int i = 0; i < at_once; i++)
		pthread_join(th[i], NULL);
	free(th);
}

/* The server's RSS in KiB, and its thread count. */
static long server_rss_kib(pid_t pid, int *threads)
{
	char path[64], line[256];
	long kib = -1;
	FILE *f;

	*threads = -1;
	snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
	if (!(f = fopen(path, "r")))
		return -1;
	while (fgets(line, sizeof line, f)) {
		sscanf(line, "VmRSS: %ld", &kib);
		sscanf(line, "Threads: %d", threads);
	}
	fclose(f);
	return kib;
}

/* The server's fd count once only its listening socket is left and its
 * threads are back to what its thread cache keeps idle (64, keel's
 * MAX_IDLE, and a few of its own), or 30 s passed: connection tasks close
 * their sockets a moment after the client saw its echo, and their threads
 * leave a moment after that (later on a loaded machine). The server is
 * another process: its /proc entries are all there is to wait on. */
static int settled_fds(pid_t pid, int *sockets)
{
	struct timespec pause = {0, 10 * 1000 * 1000};
	int n = server_fds(pid, sockets), threads;

	for (int i = 0; i < 3000; i++) {
		server_rss_kib(pid, &threads);
		if (*sockets <= 1 && threads <= 64 + 8)
			break;
		nanosleep(&pause, NULL);
		n = server_fds(pid, sockets);
	}
	return n;
}

static int run_load(const char *path, long total, int at_once, long band)
{
	FILE *out;
	pid_t pid = start_server(path, NULL, &out);
	int sockets, fds0 = server_fds(pid, &sockets), fds1, status, th0, th1;
	long rss0, rss1, counts[3], warmup = 10L * at_once;

	printf("server up on port %d; %ld connections, %d at a time\n", port,
	       total, at_once);
	/* The band is taken after a warm-up of ten waves, which brings the
	 * thread cache, the task table and the allocator's arenas to their
	 * working size (set by the peak of tasks alive at once, which is
	 * above at-once: a task ends a moment after its client has gone). */
	if (warmup > total)
		warmup = total;
	run_clients(warmup, at_once);
	settled_fds(pid, &sockets);
	rss0 = server_rss_kib(pid, &th0);
	run_clients(total - warmup, at_once);
	fds1 = settled_fds(pid, &sockets);
	rss1 = server_rss_kib(pid, &th1);
	/* The band: the fds it started with, and the wake fd its acceptor
	 * makes on its first wait if it had not waited yet (an eventfd, or
	 * a pipe's two ends in the portable layer). */
	if (sockets != 1 || fds1 > fds0 + 2)
		show_fds(pid);
	status = stop_server(pid, out, counts);
	printf("server: %d fds at the start; %ld KiB RSS and %d threads after "
	       "the first %ld connections; %d fds (%d a socket), %ld KiB and %d "
	       "threads after %ld\n",
	       fds0, rss0, th0, warmup, fds1, sockets, rss1, th1, total);
	printf("server exited with status %d; accepted %ld connections; %ld "
	       "exchanges failed; at most %ld tasks alive at once\n",
	       status, counts[0], atomic_load(&load_failed), task_slots);
	if (status != 130 || counts[0] != total ||
	    atomic_load(&load_failed) != 0 || sockets != 1 || fds1 > fds0 + 2 ||
	    (band > 0 && rss1 - rss0 > band)) {
		printf("FAILED: the server did not come back to its band\n");
		return 1;
	}
	if (band > 0)
		printf("ok: fds and RSS back to their band (%ld KiB) after %ld "
		       "connections\n",
		       band, total);
	else
		printf("ok: fds back to where they were after %ld connections "
		       "(RSS not checked)\n",
		       total);
	return 0;
}

/* ---- Ctrl-C mid-traffic ---- */

int main(int argc, char **argv)
{
	int nclients, failed = 0, status;
	long counts[3];
	struct client *clients;
	pid_t pid;
	FILE *out;

	if (argc < 2) {
		fprintf(stderr, "usage: echo-drive <echo-server> [clients | idle | "
				"load [total [at-once [band]]]]\n");
		return 2;
	}
	signal(SIGPIPE, SIG_IGN);
	if (argc > 2 && strcmp(argv[2], "idle") == 0)
		return run_idle(argv[1]);
	if (argc > 2 && strcmp(argv[2], "load") == 0)
		return run_load(argv[1], argc > 3 ? atol(argv[3]) : 10000,
				argc > 4 ? atoi(argv[4]) : 200,
				argc > 5 ? atol(argv[5]) : 4096);
	nclients = argc > 2 ? atoi(argv[2]) : 16;
	pid = start_server(argv[1], NULL, &out);
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
	status = stop_server(pid, out, counts);
	for (int i = 0; i < nclients; i++) {
		pthread_join(clients[i].th, NULL);
		if (!clients[i].clean) {
			failed++;
			printf("client %d: %s\n", i, clients[i].error);
		}
	}
	free(clients);
	printf("server exited with status %d; it accepted %ld connections and "
	       "said goodbye on %ld\n",
	       status, counts[0], counts[1]);
	if (failed || status != 130 || counts[0] != nclients ||
	    counts[1] != nclients) {
		printf("FAILED: not every connection closed cleanly\n");
		return 1;
	}
	printf("ok: %d connections, each closed with a goodbye after Ctrl-C\n",
	       nclients);
	return 0;
}
