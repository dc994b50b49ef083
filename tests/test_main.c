/*
 * test_main.c: keel_main() and signals, on a real process.
 *
 * Each test runs this same executable again as the program under test
 * (KEEL_MAIN_MODE in its environment selects what it does, before the
 * test harness starts), reads its output through a pipe, sends it
 * signals when it says it is ready, and checks its exit status and the
 * order of what it printed.
 */
#include <signal.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "harness.h"

/* ---- The program under test ---- */

static void say(const char *line)
{
	/* One write per line, straight to the pipe: the driver reacts to
	 * each as it comes. */
	if (write(STDOUT_FILENO, line, strlen(line)) < 0)
		_exit(99);
}

static int worker(void *arg)
{
	(void)arg;
	say("worker-running\n");
	if (keel_sleep_until(KEEL_FOREVER) == -ECANCELED &&
	    keel_cancel_cause() == KEEL_CANCEL_SIGNAL)
		say("worker-cancelled-by-signal\n");
	return 0;
}

static int quick_cleanup(void *arg)
{
	(void)arg;
	say("cleanup-ran\n");
	return 0;
}

static int slow_cleanup(void *arg)
{
	(void)arg;
	say("slow-cleanup-started\n");
	/* Shielded until cleanup_deadline (long here): only a second signal
	 * ends this early, by ending the process. */
	keel_sleep_until(KEEL_FOREVER);
	say("slow-cleanup-finished\n");
	return 0;
}

static int program(keel_scope_t *s, void *arg)
{
	const char *mode = arg;
	keel_task_t w;

	/* Registered first, so torn down last: after the worker exited. */
	if (strcmp(mode, "slow") == 0)
		keel_defer(s, slow_cleanup, NULL);
	else
		keel_defer(s, quick_cleanup, NULL);
	keel_spawn(s, worker, NULL, &(keel_spawn_opts){.name = "worker"}, &w);
	say("ready\n");
	if (keel_sleep_until(KEEL_FOREVER) == -ECANCELED)
		say("body-cancelled\n");
	return 0;
}

__attribute__((constructor)) static void maybe_run_program(void)
{
	const char *mode = getenv("KEEL_MAIN_MODE");

	if (mode && *mode)
		exit(keel_main(program, (void *)(uintptr_t)mode));
}

/* ---- The driver ---- */

struct child {
	pid_t pid;
	FILE *out;
	char seen[1024];
};

static void start(struct child *c, const char *mode)
{
	int p[2];

	CHECK_EQ(pipe(p), 0);
	c->pid = fork();
	CHECK(c->pid >= 0);
	if (c->pid == 0) {
		char *argv[] = {(char *)(uintptr_t)"keel-main-program", NULL};

		dup2(p[1], STDOUT_FILENO);
		close(p[0]);
		close(p[1]);
		setenv("KEEL_MAIN_MODE", mode, 1);
		execv("/proc/self/exe", argv);
		_exit(98);
	}
	close(p[1]);
	c->out = fdopen(p[0], "r");
	c->seen[0] = '\0';
}

/* Whether a whole line equal to `want` was read already. */
static int seen_line(struct child *c, const char *want)
{
	size_t n = strlen(want);

	for (const char *p = c->seen; (p = strstr(p, want)) != NULL; p += n)
		if ((p == c->seen || p[-1] == '\n') && p[n] == '\n')
			return 1;
	return 0;
}

/* Read lines until one equals `want` (lines may come in any order, so one
 * read before counts); all lines are kept in c->seen. */
static void read_until(struct child *c, const char *want)
{
	char line[128];

	if (want && seen_line(c, want))
		return;
	while (fgets(line, sizeof line, c->out)) {
		strncat(c->seen, line, sizeof c->seen - strlen(c->seen) - 1);
		line[strcspn(line, "\n")] = '\0';
		if (want && strcmp(line, want) == 0)
			return;
	}
	if (want)
		harness_fail(__FILE__, __LINE__,
			     "program ended before \"%s\"; it said:\n%s", want,
			     c->seen);
}

static int finish(struct child *c)
{
	int status;

	read_until(c, NULL);
	fclose(c->out);
	CHECK_EQ(waitpid(c->pid, &status, 0), c->pid);
	if (!WIFEXITED(status))
		harness_fail(__FILE__, __LINE__,
			     "program did not exit normally (status %#x); it "
			     "said:\n%s",
			     status, c->seen);
	return WEXITSTATUS(status);
}

static int before(const char *text, const char *a, const char *b)
{
	const char *pa = strstr(text, a), *pb = strstr(text, b);

	return pa && pb && pa < pb;
}

TEST(sigint_tears_down_in_order_and_exits_130)
{
	struct child c;

	start(&c, "quick");
	read_until(&c, "ready");
	read_until(&c, "worker-running");
	CHECK_EQ(kill(c.pid, SIGINT), 0);
	CHECK_EQ(finish(&c), 130);
	printf("%s", c.seen);
	/* Cancelled by the signal; the cleanup registered before the worker
	 * ran after the worker had exited. */
	CHECK(strstr(c.seen, "body-cancelled") != NULL);
	CHECK(before(c.seen, "worker-cancelled-by-signal", "cleanup-ran"));
}

TEST(sigterm_exits_143)
{
	struct child c;

	start(&c, "quick");
	read_until(&c, "ready");
	read_until(&c, "worker-running");
	CHECK_EQ(kill(c.pid, SIGTERM), 0);
	CHECK_EQ(finish(&c), 143);
	CHECK(before(c.seen, "worker-cancelled-by-signal", "cleanup-ran"));
}

TEST(second_sigint_during_slow_cleanup_exits_at_once)
{
	struct child c;

	start(&c, "slow");
	read_until(&c, "ready");
	read_until(&c, "worker-running");
	CHECK_EQ(kill(c.pid, SIGINT), 0);
	read_until(&c, "slow-cleanup-started");
	/* The cleanup is shielded and would wait for its deadline (5 s):
	 * the second signal ends the process without it. */
	CHECK_EQ(kill(c.pid, SIGINT), 0);
	CHECK_EQ(finish(&c), 130);
	printf("%s", c.seen);
	CHECK(strstr(c.seen, "slow-cleanup-finished") == NULL);
}
