/*
 * bench_lockcheck.c: what keel-lockcheck costs an unmodified program.
 *
 * lockcheck_pair: ns per uncontended pthread_mutex lock + unlock, one
 *   thread, measured inside lockcheck_pair (a separate process, so that
 *   one impl runs it natively and the other with libkeel-lockcheck.so
 *   preloaded). Impls: keel_lockcheck, native. Target: at most 1.5x.
 * lockcheck_nested: the same for a nesting of two (lock A, lock B, unlock
 *   B, unlock A), the case where the checker consults the order.
 * lockcheck_init: init, lock (under another lock), unlock, destroy: what
 *   identifying locks by address with a generation per init costs (each
 *   init and destroy forgets the lock's node and edges; the nesting is
 *   learned anew each time, a backtrace() included).
 * lockheavy_checker (with bench_lock.c's impls): keel_lockcheck, the
 *   plain lockheavy build run under the preload: a whole lock-heavy
 *   process, beside keel's own checked locks, TSan and Helgrind.
 * lockcheck_memcached, lockcheck_pigz, lockcheck_pbzip2: real programs
 *   from Debian packages, unmodified, wall time of one workload (ns per
 *   run), impls native, keel_lockcheck and helgrind, the same workload for
 *   all three (small enough for Helgrind to finish in seconds). pigz -p 4
 *   and pbzip2 -p4 compress a 2 MB text file made at first use;
 *   memcached -t 4 serves memcslap (set, then get, 8 connections, 100
 *   operations each) on a loopback port: the time is the load's, from the
 *   server's first accepted connection to memcslap's end. Each is skipped
 *   with a message when its program is not on PATH. Target: 1.2x native.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "bench.h"

extern char **environ;

#ifdef LOCKCHECK_LIB

/* The environment, with LD_PRELOAD=LOCKCHECK_LIB (appended to any) and
 * KEEL_LOCKCHECK=report, or as it is. */
static char **env_for(int preload, char *buf, size_t size, char **out, int max)
{
	int n = 0;
	const char *old = getenv("LD_PRELOAD");

	for (char **e = environ; *e && n < max - 3; e++)
		if (!preload || (strncmp(*e, "LD_PRELOAD=", 11) != 0 &&
				 strncmp(*e, "KEEL_LOCKCHECK=", 15) != 0))
			out[n++] = *e;
	if (preload) {
		snprintf(buf, size, "LD_PRELOAD=%s%s%s", old ? old : "",
			 old && *old ? ":" : "", LOCKCHECK_LIB);
		out[n++] = buf;
		out[n++] = (char *)(uintptr_t)"KEEL_LOCKCHECK=report";
	}
	out[n] = NULL;
	return out;
}

/* Run argv with or without the preload, its stderr discarded (the
 * checker's summary line); if `parse`, return the number it prints on
 * stdout, else the wall time in ns. */
static double run(char *const argv[], int preload, int parse)
{
	char buf[4096], line[64] = "";
	char *envp[256];
	posix_spawn_file_actions_t fa;
	int fd[2], status;
	int64_t start;
	pid_t pid;
	ssize_t got = 0, r;

	if (pipe(fd) != 0)
		bench_fail("pipe failed");
	posix_spawn_file_actions_init(&fa);
	posix_spawn_file_actions_adddup2(&fa, fd[1], STDOUT_FILENO);
	posix_spawn_file_actions_addclose(&fa, fd[0]);
	posix_spawn_file_actions_addopen(&fa, STDERR_FILENO, "/dev/null",
					 O_WRONLY, 0);
	start = bench_now();
	if (posix_spawn(&pid, argv[0], &fa, NULL, argv,
			env_for(preload, buf, sizeof buf, envp, 256)) != 0)
		bench_fail("cannot run %s", argv[0]);
	posix_spawn_file_actions_destroy(&fa);
	close(fd[1]);
	while ((r = read(fd[0], line + got, sizeof line - 1 - (size_t)got)) > 0)
		got += r;
	close(fd[0]);
	line[got > 0 ? got : 0] = '\0';
	if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) ||
	    WEXITSTATUS(status) != 0)
		bench_fail("%s failed (status %#x)", argv[0], status);
	if (!parse)
		return (double)(bench_now() - start);
	return atof(line) > 0 ? atof(line) : BENCH_DNF;
}

static char count[32];

static double pair(const char *mode, int preload)
{
	char *argv[] = {(char *)(uintptr_t)LOCKCHECK_PAIR, (char *)(uintptr_t)mode,
			count, NULL};

	snprintf(count, sizeof count, "%ld",
		 bench_count(strcmp(mode, "init") == 0 ? 1000000L : 20000000L,
			     100000L));
	return run(argv, preload, 1);
}

BENCH(lockcheck_pair, keel_lockcheck)
{
	return pair("pair", 1);
}

BENCH(lockcheck_pair, native)
{
	return pair("pair", 0);
}

BENCH(lockcheck_nested, keel_lockcheck)
{
	return pair("nested", 1);
}

BENCH(lockcheck_nested, native)
{
	return pair("nested", 0);
}

BENCH(lockcheck_init, keel_lockcheck)
{
	return pair("init", 1);
}

BENCH(lockcheck_init, native)
{
	return pair("init", 0);
}

BENCH(lockheavy_checker, keel_lockcheck)
{
	char *argv[] = {(char *)(uintptr_t)LOCKHEAVY_PLAIN,
			(char *)(uintptr_t)"80000", NULL};

	return run(argv, 1, 0);
}

BENCH_TARGET_FOR(lockcheck_pair, keel_lockcheck, "native", 1.5)
/* lockheavy_checker/keel_lockcheck has no target: a process that does
 * nothing but take four nested locks on two contending threads is the
 * worst case for any checker (its work sits inside the critical sections
 * the other thread waits on); the targets are the per-pair cost and real
 * programs' wall time. */

/* ---- Real programs ------------------------------------------------------- */

enum how { NATIVE, PRELOAD, HELGRIND };

/* The program's path on PATH, in a static buffer per name; NULL. */
static const char *on_path(const char *name, char *buf, size_t size)
{
	const char *path = getenv("PATH");

	if (!path)
		path = "/usr/local/bin:/usr/bin:/bin";
	while (*path) {
		size_t len = strcspn(path, ":");

		snprintf(buf, size, "%.*s/%s", (int)len, path, name);
		if (len && access(buf, X_OK) == 0)
			return buf;
		path += len + (path[len] == ':');
	}
	return NULL;
}

static char pigz_path[256], pbzip2_path[256], memcached_path[256],
	memcslap_path[256];

/* Start argv (under the preload or Helgrind, as `how` says), stdout and
 * stderr to /dev/null. */
static pid_t start_as(enum how how, char *const argv[])
{
	char buf[4096], *envp[256], *vargv[32];
	posix_spawn_file_actions_t fa;
	pid_t pid;
	int n = 0;

	if (how == HELGRIND) {
#ifdef VALGRIND
		vargv[n++] = (char *)(uintptr_t)VALGRIND;
		vargv[n++] = (char *)(uintptr_t)"--tool=helgrind";
		vargv[n++] = (char *)(uintptr_t)"-q";
#endif
	}
	for (int i = 0; argv[i] && n < 31; i++)
		vargv[n++] = argv[i];
	vargv[n] = NULL;
	posix_spawn_file_actions_init(&fa);
	posix_spawn_file_actions_addopen(&fa, STDOUT_FILENO, "/dev/null",
					 O_WRONLY, 0);
	posix_spawn_file_actions_addopen(&fa, STDERR_FILENO, "/dev/null",
					 O_WRONLY, 0);
	if (posix_spawn(&pid, vargv[0], &fa, NULL, vargv,
			env_for(how == PRELOAD, buf, sizeof buf, envp, 256)) != 0)
		bench_fail("cannot run %s", vargv[0]);
	posix_spawn_file_actions_destroy(&fa);
	return pid;
}

static void wait_ok(pid_t pid, const char *what)
{
	int status;

	if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) ||
	    WEXITSTATUS(status) != 0)
		bench_fail("%s failed (status %#x)", what, status);
}

/* A 2 MB text file, made once: words from a fixed pseudo-random stream,
 * compressible as prose is. */
static char workload_path[64];

static const char *workload_file(void)
{
	char *path = workload_path;
	static const char letters[] = "etaoinshrdlucmfw";
	uint64_t x = 88172645463325252ull;
	char line[128];
	FILE *f;
	int fd;

	if (path[0])
		return path;
	snprintf(path, sizeof workload_path, "/tmp/keel-bench-lockcheck-XXXXXX");
	if ((fd = mkstemp(path)) < 0 || !(f = fdopen(fd, "w")))
		bench_fail("cannot make the workload file");
	for (long total = 0; total < 2000000;) {
		size_t n = 0;

		while (n < 72) {
			int len = 2;

			x ^= x << 13, x ^= x >> 7, x ^= x << 17;
			len += (int)(x % 8);
			for (int i = 0; i < len; i++)
				line[n++] = letters[(x >> (8 + 4 * i)) & 15];
			line[n++] = ' ';
		}
		line[n++] = '\n';
		fwrite(line, 1, n, f);
		total += (long)n;
	}
	fclose(f);
	return path;
}

__attribute__((destructor)) static void workload_remove(void)
{
	if (workload_path[0])
		unlink(workload_path);
}

static double compress(enum how how, const char *prog, const char *threads)
{
	char *argv[] = {(char *)(uintptr_t)prog, (char *)(uintptr_t)threads,
			(char *)(uintptr_t)"-c",
			(char *)(uintptr_t)workload_file(), NULL};
	int64_t start = bench_now();

	wait_ok(start_as(how, argv), prog);
	return (double)(bench_now() - start);
}

/* A free loopback TCP port (bound, read and closed: another process may
 * take it in between, which makes the run fail, not lie). */
static int free_port(void)
{
	struct sockaddr_in a = {.sin_family = AF_INET};
	socklen_t len = sizeof a;
	int fd = socket(AF_INET, SOCK_STREAM, 0), port;

	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) != 0 ||
	    getsockname(fd, (struct sockaddr *)&a, &len) != 0)
		bench_fail("no free loopback port");
	port = ntohs(a.sin_port);
	close(fd);
	return port;
}

/* Whether something accepts connections on the loopback port. */
static int accepting(int port)
{
	struct sockaddr_in a = {.sin_family = AF_INET,
				.sin_port = htons((uint16_t)port)};
	int fd = socket(AF_INET, SOCK_STREAM, 0), ok;

	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	ok = fd >= 0 && connect(fd, (struct sockaddr *)&a, sizeof a) == 0;
	if (fd >= 0)
		close(fd);
	return ok;
}

static double memcached(enum how how)
{
	char port[16], conns[16], server[64];
	char *argv[] = {memcached_path, (char *)(uintptr_t)"-p", port,
			(char *)(uintptr_t)"-l", (char *)(uintptr_t)"127.0.0.1",
			(char *)(uintptr_t)"-t", (char *)(uintptr_t)"4",
			(char *)(uintptr_t)"-U", (char *)(uintptr_t)"0",
			(char *)(uintptr_t)"-c", conns, (char *)(uintptr_t)"-u",
			(char *)(uintptr_t)"root", NULL};
	char *load[] = {memcslap_path, (char *)(uintptr_t)"-s", server,
			(char *)(uintptr_t)"-t", (char *)(uintptr_t)"set",
			(char *)(uintptr_t)"-c", (char *)(uintptr_t)"8",
			(char *)(uintptr_t)"-e", (char *)(uintptr_t)"100",
			(char *)(uintptr_t)"-q", NULL};
	struct rlimit rl;
	int64_t start, give_up = bench_now() + (int64_t)120 * 1000000000;
	int status, p = free_port();
	pid_t pid;

	snprintf(port, sizeof port, "%d", p);
	snprintf(server, sizeof server, "127.0.0.1:%d", p);
	/* memcached sets its descriptor limit (soft and hard) to -c;
	 * Valgrind refuses a hard limit other than its own, 12 under the
	 * real one (12 kept for itself). The same -c for every impl. */
	if (getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_max < 1100)
		bench_fail("cannot read the descriptor limit");
	snprintf(conns, sizeof conns, "%lu",
		 (unsigned long)(rl.rlim_max > 1000012 ? 1000000
						      : rl.rlim_max - 12));
	if (geteuid() != 0)
		argv[11] = NULL; /* -u: only for root */
	pid = start_as(how, argv);
	while (!accepting(p)) {
		struct timespec ts = {0, 10 * 1000000};

		if (bench_now() > give_up || waitpid(pid, &status, WNOHANG) == pid)
			bench_fail("memcached did not start on port %d", p);
		nanosleep(&ts, NULL);
	}
	start = bench_now();
	wait_ok(start_as(NATIVE, load), "memcslap set");
	load[4] = (char *)(uintptr_t)"get";
	wait_ok(start_as(NATIVE, load), "memcslap get");
	start = bench_now() - start;
	kill(pid, SIGTERM);
	if (waitpid(pid, &status, 0) != pid || WIFSIGNALED(status))
		bench_fail("memcached ended badly (status %#x)", status);
	return (double)start;
}

/* Each real program's impls, registered when the program is on PATH and
 * skipped with a message when it is not. */
#define REAL(id, fn, ...)                                                   \
	static double bench_##id##__native(void) { return fn(NATIVE, __VA_ARGS__); } \
	static double bench_##id##__keel_lockcheck(void)                    \
	{                                                                   \
		return fn(PRELOAD, __VA_ARGS__);                            \
	}                                                                   \
	static double bench_##id##__helgrind(void) { return fn(HELGRIND, __VA_ARGS__); }

REAL(lockcheck_pigz, compress, pigz_path, "-p4")
REAL(lockcheck_pbzip2, compress, pbzip2_path, "-p4")
#define memcached_(how, unused) memcached(how)
REAL(lockcheck_memcached, memcached_, 0)

static void real(const char *id, int present, const char *why, bench_fn native,
		 bench_fn checked, bench_fn helgrind)
{
	if (!present) {
		bench_register_skip(id, "native", why);
		bench_register_skip(id, "keel_lockcheck", why);
		bench_register_skip(id, "helgrind", why);
		return;
	}
	bench_register(id, "native", native);
	bench_register(id, "keel_lockcheck", checked);
#ifdef VALGRIND
	bench_register(id, "helgrind", helgrind);
#else
	(void)helgrind;
	bench_register_skip(id, "helgrind", "valgrind not installed");
#endif
	bench_register_target(id, "keel_lockcheck", "native", 1.2);
}

#define REAL_REGISTER(id, present, why)                                     \
	real(#id, present, why, bench_##id##__native,                       \
	     bench_##id##__keel_lockcheck, bench_##id##__helgrind)

__attribute__((constructor)) static void real_programs(void)
{
	REAL_REGISTER(lockcheck_memcached,
		      on_path("memcached", memcached_path, sizeof memcached_path) &&
			      on_path("memcslap", memcslap_path,
				      sizeof memcslap_path),
		      "memcached or memcslap not on PATH (make bench-deps: "
		      "memcached, libmemcached-tools)");
	REAL_REGISTER(lockcheck_pigz,
		      on_path("pigz", pigz_path, sizeof pigz_path) != NULL,
		      "pigz not on PATH (make bench-deps)");
	REAL_REGISTER(lockcheck_pbzip2,
		      on_path("pbzip2", pbzip2_path, sizeof pbzip2_path) != NULL,
		      "pbzip2 not on PATH (make bench-deps)");
}

#else
BENCH_SKIP(lockcheck_memcached, keel_lockcheck, "keel-lockcheck not built (Linux/glibc)")
BENCH_SKIP(lockcheck_pigz, keel_lockcheck, "keel-lockcheck not built (Linux/glibc)")
BENCH_SKIP(lockcheck_pbzip2, keel_lockcheck, "keel-lockcheck not built (Linux/glibc)")
BENCH_SKIP(lockcheck_pair, keel_lockcheck, "keel-lockcheck not built (Linux/glibc)")
BENCH_SKIP(lockcheck_nested, keel_lockcheck, "keel-lockcheck not built (Linux/glibc)")
BENCH_SKIP(lockcheck_init, keel_lockcheck, "keel-lockcheck not built (Linux/glibc)")
BENCH_SKIP(lockheavy_checker, keel_lockcheck, "keel-lockcheck not built (Linux/glibc)")
#endif
