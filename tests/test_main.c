/*
 * test_main.c: keel_main() and signals, on a real process.
 *
 * Each test runs this same executable again as the program under test
 * (KEEL_MAIN_MODE in its environment selects what it does, before the
 * test harness starts), reads its output through a pipe, sends it
 * signals when it says it is ready, and checks its exit status and the
 * order of what it printed.
 */
#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "harness.h"
#include "internal.h"

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

/* The fds open now, as a bitmap of the first 1024. */
struct fdset {
	unsigned char open[1024];
};

static void list_fds(struct fdset *set)
{
	DIR *d = opendir("/proc/self/fd");
	struct dirent *e;
	int listed = 0;

	memset(set, 0, sizeof *set);
	if (!d)
		harness_skip("no /proc/self/fd");
	while ((e = readdir(d)) != NULL) {
		int fd = atoi(e->d_name);

		if (e->d_name[0] != '.' && fd != dirfd(d) && fd >= 0 &&
		    fd < (int)sizeof set->open) {
			set->open[fd] = 1;
			listed++;
		}
	}
	closedir(d);
	/* Emscripten's lists nothing, not even stdin. */
	if (!listed)
		harness_skip("/proc/self/fd lists no fd");
}

static int count_fds(void)
{
	struct fdset set;
	int n = 0;

	list_fds(&set);
	for (size_t i = 0; i < sizeof set.open; i++)
		n += set.open[i];
	return n;
}

static struct fdset before_main;

static void say_int(const char *what, int v)
{
	char line[128];

	snprintf(line, sizeof line, "%s: %d\n", what, v);
	say(line);
}

static int block_in_fd_wait(void *arg)
{
	int fd = *(int *)arg;

	keel_mailbox_fd();
	keel_fd_wait(fd, POLLIN, KEEL_FOREVER); /* until cancelled */
	return 0;
}

/* Make every kind of fd keel makes: the mailbox fd and the wake fd of the
 * main task and of a child (blocked in keel_fd_wait until the scope is
 * cancelled); keel_main's signal fd exists already. */
static void make_keel_fds(keel_scope_t *s, int quiet_fd)
{
	static int fd;
	keel_task_t c;

	fd = quiet_fd;
	if (keel_mailbox_fd() < 0 ||
	    keel_fd_wait(quiet_fd, POLLIN, 0) != -ETIMEDOUT ||
	    keel_spawn(s, block_in_fd_wait, &fd,
		       &(keel_spawn_opts){.background = 1}, &c) < 0)
		_exit(97);
	while (!load_relaxed(&keel__task_slot(c)->blocked_in))
		sched_yield();
}

/* Exec this program in "list-fds" mode and report which of keel's fds it
 * inherited. */
static int exec_child(keel_scope_t *s, void *arg)
{
	char *argv[] = {(char *)(uintptr_t)"keel-list-fds", NULL};
	char *envp[] = {(char *)(uintptr_t)"KEEL_MAIN_MODE=list-fds", NULL};
	posix_spawn_file_actions_t fa;
	struct fdset now;
	int quiet[2], out[2], keel_fds = 0, inherited = 0, fd, status;
	char buf[4096];
	size_t len = 0;
	ssize_t n;
	pid_t pid;

	(void)arg;
	if (pipe2(quiet, O_CLOEXEC) < 0)
		_exit(96);
	make_keel_fds(s, quiet[0]);
	list_fds(&now);
	if (pipe2(out, O_CLOEXEC) < 0)
		_exit(96);
	posix_spawn_file_actions_init(&fa);
	posix_spawn_file_actions_adddup2(&fa, out[1], STDOUT_FILENO);
	if (posix_spawn(&pid, "/proc/self/exe", &fa, NULL, argv, envp) != 0)
		_exit(95);
	posix_spawn_file_actions_destroy(&fa);
	close(out[1]);
	while ((n = read(out[0], buf + len, sizeof buf - 1 - len)) > 0)
		len += (size_t)n;
	buf[len] = '\0';
	close(out[0]);
	waitpid(pid, &status, 0);
	for (fd = 0; fd < (int)sizeof now.open; fd++)
		if (now.open[fd] && !before_main.open[fd] && fd != quiet[0] &&
		    fd != quiet[1])
			keel_fds++;
	for (char *p = buf; *p; p = strchr(p, '\n') + 1) {
		fd = atoi(p);
		if (fd > 2 && fd < (int)sizeof now.open && !before_main.open[fd]) {
			inherited++;
			say_int("inherited", fd);
		}
		if (!strchr(p, '\n'))
			break;
	}
	close(quiet[0]);
	close(quiet[1]);
	say_int("keel-fds", keel_fds);
	say_int("inherited-keel-fds", inherited);
	return 0;
}

static int return_status(keel_scope_t *s, void *arg)
{
	(void)s;
	return atoi(arg);
}

__attribute__((constructor)) static void maybe_run_program(void)
{
	const char *mode = getenv("KEEL_MAIN_MODE");
	struct fdset set;

	if (!mode || !*mode)
		return;
	if (strcmp(mode, "list-fds") == 0) {
		list_fds(&set);
		for (int fd = 0; fd < (int)sizeof set.open; fd++) {
			char line[16];

			if (!set.open[fd])
				continue;
			snprintf(line, sizeof line, "%d\n", fd);
			say(line);
		}
		exit(0);
	}
	list_fds(&before_main);
	if (strcmp(mode, "exec-fds") == 0)
		exit(keel_main(exec_child, NULL));
	if (strncmp(mode, "status:", 7) == 0)
		exit(keel_main(return_status, (void *)(uintptr_t)(mode + 7)));
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
		dup2(p[1], STDERR_FILENO);
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
	HARNESS_NEED(FORK);
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
	HARNESS_NEED(FORK);
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
	HARNESS_NEED(FORK);
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

TEST(exit_status_from_the_body)
{
	HARNESS_NEED(FORK);
	static const struct {
		const char *mode;
		int status;
		const char *line;
	} cases[] = {
		{"status:3", 3, NULL},
		{"status:0", 0, NULL},
		{"status:300", 255, NULL},
		{"status:-111",
		 1, "keel: keel_main: body failed: ECONNREFUSED (connection refused)"},
		{"status:-1", 1, "keel: keel_main: body failed: EPERM (not permitted)"},
	};

	for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
		struct child c;

		start(&c, cases[i].mode);
		CHECK_EQ(finish(&c), cases[i].status);
		printf("%s -> %d: %s", cases[i].mode, cases[i].status, c.seen);
		if (cases[i].line)
			CHECK(seen_line(&c, cases[i].line));
		else
			CHECK_EQ(c.seen[0], '\0'); /* nothing said on success */
	}
}

TEST(an_execed_program_inherits_no_keel_fd)
{
	HARNESS_NEED(FORK);
	struct child c;
	int rc;

	start(&c, "exec-fds");
	rc = finish(&c);
	printf("%s", c.seen);
	CHECK_EQ(rc, 0);
	CHECK(seen_line(&c, "inherited-keel-fds: 0"));
	/* The signal fd, and the mailbox and wake fds of two tasks. */
	CHECK(strstr(c.seen, "keel-fds: ") != NULL);
	CHECK_INT(atoi(strstr(c.seen, "keel-fds: ") + 10), >=, 5);
}

static int use_fds_and_return(keel_scope_t *s, void *arg)
{
	int *p = arg;

	p[2] = keel_mailbox_fd();
	make_keel_fds(s, p[0]);
	p[3] = count_fds();
	return 0;
}

TEST(no_fd_left_after_keel_main_returns)
{
	int p[4], before, after;

	CHECK_EQ(pipe2(p, O_CLOEXEC), 0);
	before = count_fds();
	CHECK_EQ(keel_main(use_fds_and_return, p), 0);
	after = count_fds();
	printf("fds: %d before keel_main, %d inside, %d after\n", before,
	       p[3], after);
	/* It did make some: the signal fd, two tasks' mailbox and wake fds. */
	CHECK_INT(p[3], >=, before + 5);
	CHECK_EQ(after, before);
	CHECK(fcntl(p[2], F_GETFD) < 0); /* the mailbox fd is closed */
	/* The thread is adopted afresh, and keel works on it. */
	CHECK(keel_self() != KEEL_TASK_NONE);
	CHECK_OK(keel_checkpoint());
	close(p[0]);
	close(p[1]);
}

/* ---- keel_main_opts ---- */

static harness_log opt_log;
static int opt_pipe[2];

static void on_exit_hook(keel_task_t child, int status, void *arg)
{
	char name[32], token[64];

	(void)arg;
	keel_task_name(child, name, sizeof name);
	snprintf(token, sizeof token, "exit:%s:%d", name, status);
	log_add(&opt_log, token);
	/* Tell the sibling, which a fail-fast scope would have cancelled. */
	if (strcmp(name, "failing") == 0 && write(opt_pipe[1], "x", 1) != 1)
		abort();
}

static int failing(void *arg)
{
	(void)arg;
	return -EIO;
}

static int sibling(void *arg)
{
	char c;

	(void)arg;
	/* Woken by the hook once "failing" has ended: under KEEL_SUPERVISE
	 * nothing cancels this read. */
	return keel_read(opt_pipe[0], &c, 1, KEEL_FOREVER) == 1 ? 7 : -EPROTO;
}

static int stuck_cleanup(void *arg)
{
	(void)arg;
	/* Shielded until cleanup_deadline (20 ms), then cut off. */
	if (keel_sleep_until(KEEL_FOREVER) == -ECANCELED)
		log_add(&opt_log, "cleanup-cut-off");
	return 0;
}

static int opts_body(keel_scope_t *s, void *arg)
{
	(void)arg;
	keel_defer(s, stuck_cleanup, NULL);
	keel_spawn(s, sibling, NULL, &(keel_spawn_opts){.name = "sibling"}, NULL);
	keel_spawn(s, failing, NULL, &(keel_spawn_opts){.name = "failing"}, NULL);
	return 0;
}

TEST(keel_main_opts_are_honoured)
{
	keel_scope_opts opts = {
		.name = "root",
		.cleanup_deadline = KEEL_MS(20),
		.policy = KEEL_SUPERVISE,
		.on_exit = on_exit_hook,
	};
	harness_capture cap;
	char want[64];
	int rc;

	HARNESS_NEED(FD_WAIT); /* "sibling" waits in keel_read() */
	log_init(&opt_log);
	CHECK_EQ(pipe2(opt_pipe, O_CLOEXEC), 0);
	capture_begin(&cap);
	rc = keel_main_opts(opts_body, NULL, &opts);
	capture_end(&cap);
	CHECK_EQ(rc, 1);
	/* A child's failure, named with the scope's name. */
	CHECK(strstr(cap.text, "keel_main: scope 'root' failed: EIO") != NULL);
	snprintf(want, sizeof want,
		 "exit:failing:%d exit:sibling:7 cleanup-cut-off", -EIO);
	CHECK_LOG(&opt_log, want);
	close(opt_pipe[0]);
	close(opt_pipe[1]);
}

static int sleep_forever(keel_scope_t *s, void *arg)
{
	(void)s;
	(void)arg;
	return keel_sleep_until(KEEL_FOREVER);
}

static int cancel_own_scope(keel_scope_t *s, void *arg)
{
	(void)arg;
	keel_scope_cancel(s);
	return keel_sleep_until(KEEL_FOREVER) == -ECANCELED ? 4 : 0;
}

TEST(keel_main_opts_deadline_and_a_clean_cancel)
{
	keel_scope_opts opts = {.deadline = keel_after(KEEL_MS(20))};
	harness_capture cap;
	int rc;

	capture_begin(&cap);
	rc = keel_main_opts(sleep_forever, NULL, &opts);
	capture_end(&cap);
	CHECK_EQ(rc, 1);
	CHECK(strstr(cap.text, "keel_main: scope 'main' failed: ETIMEDOUT") !=
	      NULL);
	/* The body stopping the program by cancelling its own scope is a
	 * clean end: its status, and nothing on stderr. */
	capture_begin(&cap);
	rc = keel_main(cancel_own_scope, NULL);
	capture_end(&cap);
	CHECK_EQ(rc, 4);
	CHECK(strstr(cap.text, "keel_main") == NULL);
	/* Bad options: nothing runs. */
	capture_begin(&cap);
	rc = keel_main_opts(sleep_forever, NULL,
			    &(keel_scope_opts){.cleanup_deadline = -1});
	capture_end(&cap);
	CHECK_EQ(rc, 1);
	CHECK(strstr(cap.text, "cannot open its root scope: EINVAL") != NULL);
}
