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
 */
#include <fcntl.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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
BENCH_TARGET_FOR(lockheavy_checker, keel_lockcheck, "unchecked", 1.2)

#else
BENCH_SKIP(lockcheck_pair, keel_lockcheck, "keel-lockcheck not built (Linux/glibc)")
BENCH_SKIP(lockcheck_nested, keel_lockcheck, "keel-lockcheck not built (Linux/glibc)")
BENCH_SKIP(lockcheck_init, keel_lockcheck, "keel-lockcheck not built (Linux/glibc)")
BENCH_SKIP(lockheavy_checker, keel_lockcheck, "keel-lockcheck not built (Linux/glibc)")
#endif
