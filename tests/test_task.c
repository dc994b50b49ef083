/*
 * test_task.c: task handles, adoption, names, the thread cache, fork.
 */
#include <limits.h>
#include <signal.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "harness.h"
#include "internal.h"

static void *adopt_and_report(void *p)
{
	keel_task_t *out = p;

	*out = keel_self();
	return NULL;
}

TEST(self_is_stable_and_named_main)
{
	keel_task_t a = keel_self(), b = keel_self();
	char name[64];

	CHECK(a != KEEL_TASK_NONE);
	CHECK_EQ(a, b);
	CHECK_EQ(keel_task_name(a, name, sizeof name), 4);
	CHECK(strcmp(name, "main") == 0);
}

TEST(adopted_thread_ends_at_exit)
{
	keel_task_t t = KEEL_TASK_NONE;
	char name[64];

	harness_join(harness_thread(adopt_and_report, &t));
	CHECK(t != KEEL_TASK_NONE);
	CHECK(t != keel_self());
	/* The thread has exited, so its task has ended and its slot is free:
	 * the handle names nothing any more. */
	CHECK_RC(keel_task_name(t, name, sizeof name), -ESRCH);
}

TEST(slot_reuse_gets_a_new_generation)
{
	keel_task_t a = KEEL_TASK_NONE, b = KEEL_TASK_NONE;

	keel_self();
	harness_join(harness_thread(adopt_and_report, &a));
	harness_join(harness_thread(adopt_and_report, &b));
	/* Slots are reused last-in first-out: b took a's slot. */
	CHECK_EQ(a & TASK_IDX_MASK, b & TASK_IDX_MASK);
	CHECK(a != b);
	CHECK_EQ((b >> MB_GEN_SHIFT), (a >> MB_GEN_SHIFT) + 1);
}

TEST(names)
{
	char name[64], small[4];
	char longname[80];

	CHECK_OK(keel_set_name("worker"));
	CHECK_EQ(keel_task_name(keel_self(), name, sizeof name), 6);
	CHECK(strcmp(name, "worker") == 0);
	/* Truncated to fit the buffer; the full length is returned. */
	CHECK_EQ(keel_task_name(keel_self(), small, sizeof small), 6);
	CHECK(strcmp(small, "wor") == 0);
	memset(longname, 'x', sizeof longname - 1);
	longname[sizeof longname - 1] = '\0';
	CHECK_OK(keel_set_name(longname));
	CHECK_EQ(keel_task_name(keel_self(), name, sizeof name),
		 KEEL_TASK_NAME_MAX);
}

TEST(names_bad_input)
{
	char name[8];

	CHECK_RC(keel_set_name(NULL), -EINVAL);
	CHECK_RC(keel_task_name(keel_self(), NULL, 8), -EINVAL);
	CHECK_RC(keel_task_name(keel_self(), name, 0), -EINVAL);
	CHECK_RC(keel_task_name(KEEL_TASK_NONE, name, sizeof name), -ESRCH);
	/* Right index, wrong generation. */
	CHECK_RC(keel_task_name(keel_self() + ((uint64_t)7 << MB_GEN_SHIFT),
				name, sizeof name),
		 -ESRCH);
	/* An index no slot was ever made for. */
	CHECK_RC(keel_task_name(((uint64_t)1 << MB_GEN_SHIFT) | 0xfffff0, name,
				sizeof name),
		 -ESRCH);
	CHECK_RC(keel_task_name(UINT64_MAX, name, sizeof name), -ESRCH);
}

TEST(time_helpers)
{
	keel_time_t a = keel_now(), b = keel_now();

	CHECK(b >= a);
	CHECK_EQ(keel_after(KEEL_FOREVER), KEEL_FOREVER);
	CHECK(keel_after(KEEL_FOREVER - 1) == KEEL_FOREVER);
	CHECK(keel_after(-KEEL_SEC(1)) < keel_now());
	CHECK(keel_after(KEEL_SEC(1)) > keel_now());
	CHECK_EQ(KEEL_MS(3), 3000000);
	CHECK_EQ(KEEL_SEC(2), 2000000000);
	CHECK_EQ(KEEL_USEC(5), 5000);
}

TEST(strerror_names_codes)
{
	CHECK(strncmp(keel_strerror(-ESHUTDOWN), "ESHUTDOWN", 9) == 0);
	CHECK(strncmp(keel_strerror(-ESRCH), "ESRCH", 5) == 0);
	CHECK(strncmp(keel_strerror(ECANCELED), "ECANCELED", 9) == 0);
	CHECK(strncmp(keel_strerror(-ESTALE), "ESTALE", 6) == 0);
	CHECK(strncmp(keel_strerror(0), "0", 1) == 0);
	CHECK(keel_strerror(-12345) != NULL);
}

/* Every errno value has its name: keel's own codes (EPROTO from a once,
 * EIO, EOVERFLOW...) and the ones a task's body passes through
 * (EADDRINUSE); `return -1` reads as plain EPERM, not as keel's. */
TEST(strerror_names_every_errno)
{
	static const struct {
		int code;
		const char *name;
	} codes[] = {
		{EPROTO, "EPROTO"},	  {EOVERFLOW, "EOVERFLOW"},
		{EALREADY, "EALREADY"}, {ENOTSUP, "ENOTSUP"},
		{EIO, "EIO"},		  {EADDRINUSE, "EADDRINUSE"},
		{ECONNRESET, "ECONNRESET"}, {EPIPE, "EPIPE"},
		{ENOENT, "ENOENT"},	  {EINTR, "EINTR"},
	};
	char want[32];

	for (unsigned i = 0; i < sizeof codes / sizeof codes[0]; i++) {
		snprintf(want, sizeof want, "%s: ", codes[i].name);
		if (strncmp(keel_strerror(-codes[i].code), want, strlen(want)))
			harness_fail(__FILE__, __LINE__, "keel_strerror(-%s) "
				     "is \"%s\"", codes[i].name,
				     keel_strerror(-codes[i].code));
	}
	CHECK(strcmp(keel_strerror(-EPERM), "EPERM: not permitted") == 0);
	/* Every value the C library knows: none is "unknown". (What the C
	 * library calls an unknown one: glibc "Unknown error N", musl "No
	 * error information".) */
	for (int e = 1; e < 134; e++)
		if (strcmp(strerror(e), "Unknown error") != 0 &&
		    strncmp(strerror(e), "Unknown error ", 14) != 0 &&
		    strcmp(strerror(e), "No error information") != 0 &&
		    strcmp(keel_strerror(-e), "unknown error") == 0)
			harness_fail(__FILE__, __LINE__,
				     "keel_strerror(-%d) (%s) is unknown", e,
				     strerror(e));
}

/* Any int is an error code to keel_strerror(), the extremes included:
 * INT_MIN has no positive counterpart to look up. (UBSan's build is where
 * a negation of INT_MIN shows.) */
TEST(strerror_takes_any_int)
{
	CHECK(strcmp(keel_strerror(INT_MIN), "unknown error") == 0);
	CHECK(strcmp(keel_strerror(INT_MIN + 1), "unknown error") == 0);
	CHECK(strcmp(keel_strerror(INT_MAX), "unknown error") == 0);
	CHECK(strncmp(keel_strerror(-EINVAL), "EINVAL", 6) == 0);
}

/* ---- Spawned tasks and the thread cache ---- */

static int return_arg(void *arg)
{
	return (int)(intptr_t)arg;
}

TEST(spawn_join_status)
{
	keel_task_t t;
	int status = -1;

	CHECK_OK(keel__task_spawn(&t, return_arg, (void *)(intptr_t)42, "j",
				  0));
	CHECK_OK(keel__task_join(t, &status));
	CHECK_EQ(status, 42);
	/* Joined: the handle is stale now. */
	CHECK_RC(keel__task_join(t, &status), -ESRCH);
	CHECK_RC(keel__task_join(keel_self(), &status), -ESRCH);
}

static int report_name(void *arg)
{
	char *buf = arg;

	return keel_task_name(keel_self(), buf, 32);
}

TEST(spawn_gives_the_name)
{
	keel_task_t t;
	char buf[32];
	int status;

	CHECK_OK(keel__task_spawn(&t, report_name, buf, "indexer", 0));
	CHECK_OK(keel__task_join(t, &status));
	CHECK_EQ(status, 7);
	CHECK(strcmp(buf, "indexer") == 0);
}

TEST(thread_cache_reuses_threads)
{
	struct keel__thread_cache_stats before, after;

	keel__thread_cache_stats(&before);
	for (int i = 0; i < 200; i++) {
		keel_task_t t;
		int status;

		CHECK_OK(keel__task_spawn(&t, return_arg, (void *)(intptr_t)i,
					  NULL, 0));
		CHECK_OK(keel__task_join(t, &status));
		CHECK_EQ(status, i);
		/* A thread goes back to the idle list just after its task
		 * ends: wait for it there (however slow a loaded machine
		 * makes it), so that the next spawn has one to reuse. */
		for (keel__thread_cache_stats(&after); after.idle == 0;
		     keel__thread_cache_stats(&after))
			sched_yield();
	}
	keel__thread_cache_stats(&after);
	CHECK_EQ(after.started - before.started, 200);
	/* One thread made, then reused by every later spawn. */
	CHECK_INT(after.created - before.created, <=, 1);
}

static int stack_size_of_thread(void *arg)
{
	pthread_attr_t attr;
	size_t size = 0;

	(void)arg;
	pthread_getattr_np(pthread_self(), &attr);
	pthread_attr_getstacksize(&attr, &size);
	pthread_attr_destroy(&attr);
	return (int)(size / 1024);
}

TEST(thread_cache_stack_size)
{
	keel_task_t t;
	int kib;

	CHECK_OK(keel__task_spawn(&t, stack_size_of_thread, NULL, NULL,
				  (size_t)3 << 20));
	CHECK_OK(keel__task_join(t, &kib));
	CHECK_INT(kib, >=, 3 * 1024);
	CHECK_OK(keel__task_spawn(&t, stack_size_of_thread, NULL, NULL,
				  (size_t)256 << 10));
	CHECK_OK(keel__task_join(t, &kib));
	CHECK_INT(kib, >=, 256);
	CHECK_INT(kib, <, 3 * 1024);
}

TEST(thread_cache_idle_threads_leave)
{
	struct keel__thread_cache_stats st;
	keel_task_t t;

	keel__thread_cache_set_idle_timeout(KEEL_MS(5));
	/* Counted before the spawn: the thread may time out and leave
	 * before the join returns, on a loaded machine. */
	keel__thread_cache_stats(&st);
	CHECK_OK(keel__task_spawn(&t, return_arg, NULL, NULL, 0));
	CHECK_OK(keel__task_join(t, NULL));
	/* Wait for the cached thread to time out and leave. */
	keel__thread_cache_wait_exit(st.exited);
	keel__thread_cache_stats(&st);
	CHECK_EQ(st.idle, 0);
	/* A new spawn still works: it creates a thread. */
	CHECK_OK(keel__task_spawn(&t, return_arg, (void *)(intptr_t)5, NULL,
				  0));
	CHECK_OK(keel__task_join(t, NULL));
}

static int check_signals_blocked(void *arg)
{
	sigset_t cur;

	(void)arg;
	pthread_sigmask(SIG_SETMASK, NULL, &cur);
	return sigismember(&cur, SIGINT) * 1 + sigismember(&cur, SIGTERM) * 2 +
	       sigismember(&cur, SIGSEGV) * 4;
}

TEST(spawned_tasks_block_async_signals)
{
	keel_task_t t;
	int st;

	CHECK_OK(keel__task_spawn(&t, check_signals_blocked, NULL, NULL, 0));
	CHECK_OK(keel__task_join(t, &st));
	CHECK_EQ(st, 1 + 2); /* SIGINT and SIGTERM blocked, SIGSEGV not */
}

static int exit_thread(void *arg)
{
	(void)arg;
	pthread_exit(NULL);
}

TEST(spawned_task_ending_by_pthread_exit_is_joinable)
{
	struct keel__thread_cache_stats before;
	keel_task_t t;
	int st = -1;

	keel__thread_cache_stats(&before);
	CHECK_OK(keel__task_spawn(&t, exit_thread, NULL, NULL, 0));
	CHECK_OK(keel__task_join(t, &st));
	CHECK_EQ(st, 0);
	/* The cached thread it ran on left the cache properly (this would
	 * hang if its cleanup had not run). */
	keel__thread_cache_wait_exit(before.exited);
}

/* ---- Cancellation by handle ---- */

TEST(cancel_by_handle_is_exact)
{
	keel_task_t a = KEEL_TASK_NONE;
	struct keel__task *slot;

	keel_self();
	harness_join(harness_thread(adopt_and_report, &a));
	/* Put a new task in a's old slot. */
	slot = keel__task_alloc();
	CHECK(slot != NULL);
	CHECK_EQ(slot->id & TASK_IDX_MASK, a & TASK_IDX_MASK);
	CHECK_RC(keel__task_cancel(a, 1), -ESRCH);
	CHECK_EQ(keel__cancelled(slot), 0);
	CHECK_OK(keel__task_cancel(slot->id, 3));
	CHECK_EQ(keel__cancelled(slot), 3);
	CHECK_OK(keel__task_cancel(slot->id, 5)); /* sticky: first cause */
	CHECK_EQ(keel__cancelled(slot), 3);
	CHECK_RC(keel__task_cancel(KEEL_TASK_NONE, 1), -ESRCH);
	keel__task_end(slot, 0);
	keel__task_release(slot);
}

/* ---- fork ---- */

static harness_event fork_hold, fork_ready;

static void *hold_in_serve(void *p)
{
	keel_task_t *out = p;

	*out = keel_self();
	event_set(&fork_ready);
	event_wait(&fork_hold);
	return NULL;
}

static void incr(void *p)
{
	++*(int *)p;
}

TEST(fork_child_keeps_only_its_own_task)
{
	HARNESS_NEED(FORK);
	keel_task_t other = KEEL_TASK_NONE;
	pthread_t th;
	pid_t pid;
	int status;

	event_init(&fork_hold);
	event_init(&fork_ready);
	th = harness_thread(hold_in_serve, &other);
	event_wait(&fork_ready);
	pid = fork();
	CHECK(pid >= 0);
	if (pid == 0) {
		int n = 0;
		keel_task_t t;

		/* The other thread does not exist here: its task ended. */
		if (keel_post(other, incr, NULL, &n) != -ESRCH)
			_exit(10);
		/* The child's own task works, and so do new ones. */
		if (keel_post(keel_self(), incr, NULL, &n) != 0)
			_exit(11);
		if (keel_serve(0) != 1 || n != 1)
			_exit(12);
		if (keel__task_spawn(&t, return_arg, (void *)(intptr_t)9, NULL,
				     0) != 0)
			_exit(13);
		if (keel__task_join(t, &status) != 0 || status != 9)
			_exit(14);
		_exit(0);
	}
	CHECK_EQ(waitpid(pid, &status, 0), pid);
	CHECK(WIFEXITED(status));
	CHECK_EQ(WEXITSTATUS(status), 0);
	/* The parent is unaffected. */
	{
		int n = 0;

		CHECK_OK(keel_post(other, incr, NULL, &n));
	}
	event_set(&fork_hold);
	harness_join(th);
}

/* ---- A task's thread ending by pthread_exit ---- */

static harness_event exit_ended, exit_go, fresh_ready, fresh_done;
static atomic_int exit_hook_armed;

/* Runs on the exiting thread after its task has ended: holds it there
 * while the owner joins the task and a new thread takes its slot. */
static void hold_after_task_end(void)
{
	if (!atomic_exchange(&exit_hook_armed, 0))
		return;
	event_set(&exit_ended);
	event_wait(&exit_go);
}

static void *adopt_and_hold(void *p)
{
	keel_task_t *out = p;

	*out = keel_self();
	event_set(&fresh_ready);
	event_wait(&fresh_done);
	return NULL;
}

TEST(task_ending_by_pthread_exit_releases_its_slot_once)
{
	struct keel__thread_cache_stats before;
	keel_task_t child, fresh = KEEL_TASK_NONE, next = KEEL_TASK_NONE;
	keel_scope_t *s;
	char name[64];
	pthread_t th;
	int st = -1;

	event_init(&exit_ended);
	event_init(&exit_go);
	event_init(&fresh_ready);
	event_init(&fresh_done);
	keel_self();
	keel__thread_cache_stats(&before);
	atomic_store(&exit_hook_armed, 1);
	keel__thread_exit_hook = hold_after_task_end;
	CHECK_OK(keel_scope_open(&s, NULL));
	CHECK_OK(keel_spawn(s, exit_thread, NULL, NULL, &child));
	/* The task has ended; its thread is still in its exit hook. Join it
	 * (its slot is released) and adopt a thread, which takes the slot. */
	event_wait(&exit_ended);
	CHECK_OK(keel_join(child, &st, KEEL_FOREVER));
	th = harness_thread(adopt_and_hold, &fresh);
	event_wait(&fresh_ready);
	CHECK_EQ(fresh & TASK_IDX_MASK, child & TASK_IDX_MASK);
	/* Now let the old thread finish leaving. */
	event_set(&exit_go);
	keel__thread_cache_wait_exit(before.exited);
	/* The new thread's task is alive and keeps its slot: its handle
	 * works, and the next task gets another slot. */
	CHECK_INT(keel_task_name(fresh, name, sizeof name), >, 0);
	harness_join(harness_thread(adopt_and_report, &next));
	CHECK(next != KEEL_TASK_NONE);
	CHECK(next != fresh);
	CHECK_INT(keel_task_name(fresh, name, sizeof name), >, 0);
	event_set(&fresh_done);
	harness_join(th);
	CHECK_OK(keel_scope_close(s));
}

/* ---- fork() while scopes are in use ---- */

static int return_zero(void *arg)
{
	(void)arg;
	return 0;
}

struct churn {
	atomic_int stop;
	atomic_long rounds;
};

/* Spawns and joins in scopes of its own, as fast as it can: at any moment
 * it may be inside keel's scope bookkeeping. */
static void *churn_scopes(void *p)
{
	struct churn *c = p;

	while (!atomic_load(&c->stop)) {
		keel_scope_t *s;
		keel_task_t t;

		CHECK_OK(keel_scope_open(&s, NULL));
		CHECK_OK(keel_spawn(s, return_zero, NULL, NULL, &t));
		CHECK_OK(keel_join(t, NULL, KEEL_FOREVER));
		CHECK_OK(keel_spawn(s, return_zero, NULL, NULL, NULL));
		CHECK_OK(keel_scope_close(s));
		atomic_fetch_add(&c->rounds, 1);
	}
	return NULL;
}

/* In a forked child: use scopes; a hang is ended by the alarm. Under a
 * sanitizer the child spawns nothing: the runtimes we build with (GCC 12,
 * LLVM 14) take no lock of their allocator around fork(), so a child of a
 * process whose other threads allocate can hang in the sanitizer's own
 * malloc (LLVM 18 added the fork handlers). */
static void child_uses_scopes(void)
{
	keel_scope_t *s;
	keel_task_t t;
	int st = 7;

	alarm(10);
	if (keel_scope_open(&s, NULL) != 0)
		_exit(20);
#ifndef KEEL_UNDER_SANITIZER
	if (keel_spawn(s, return_arg, (void *)(intptr_t)7, NULL, &t) != 0 ||
	    keel_join(t, &st, KEEL_FOREVER) != 0)
		_exit(21);
#else
	(void)t;
#endif
	if (st != 7 || keel_scope_close(s) != 0)
		_exit(22);
	_exit(0);
}

TEST(fork_while_other_threads_use_scopes)
{
	HARNESS_NEED(FORK);
	struct churn c = {0};
	pthread_t th[2];
	int forks = (int)harness_param("KEEL_ITERS", 30, 300);

	keel_self();
	for (int i = 0; i < 2; i++)
		th[i] = harness_thread(churn_scopes, &c);
	for (int i = 0; i < forks; i++) {
		long before = atomic_load(&c.rounds);
		pid_t pid;
		int status;

		/* Fork while the others are busy in scopes. */
		while (atomic_load(&c.rounds) < before + 2)
			sched_yield();
		pid = fork();
		CHECK(pid >= 0);
		if (pid == 0)
			child_uses_scopes();
		CHECK_EQ(waitpid(pid, &status, 0), pid);
		if (WIFSIGNALED(status))
			harness_fail(__FILE__, __LINE__,
				     "fork #%d: the child was killed by signal "
				     "%d (SIGALRM: it hung)",
				     i, WTERMSIG(status));
		CHECK(WIFEXITED(status));
		CHECK_EQ(WEXITSTATUS(status), 0);
	}
	atomic_store(&c.stop, 1);
	for (int i = 0; i < 2; i++)
		harness_join(th[i]);
	/* The forks did land among scope operations. */
	CHECK_INT(atomic_load(&c.rounds), >=, 2 * forks);
}

static harness_event vanish_running, vanish_release;

static int wait_forever(void *arg)
{
	(void)arg;
	return keel_sleep_until(KEEL_FOREVER);
}

static int block_until_released(void *arg)
{
	(void)arg;
	event_set(&vanish_running);
	event_wait(&vanish_release);
	return 5;
}

struct fork_body {
	pid_t pid;
	keel_task_t fg, bg;
};

static int body_forks(keel_scope_t *s, void *p)
{
	struct fork_body *fb = p;
	int st = 0;

	CHECK_OK(keel_spawn(s, block_until_released, NULL, NULL, &fb->fg));
	event_wait(&vanish_running);
	CHECK_OK(keel_spawn(s, wait_forever, NULL,
			    &(keel_spawn_opts){.background = 1}, &fb->bg));
	fb->pid = fork();
	if (fb->pid != 0) {
		event_set(&vanish_release);
		return 0;
	}
	/* The child: the children's threads did not come along. Waiting
	 * for the scope's foreground children returns at once, a join of
	 * a vanished child returns its status (cancelled), and returning
	 * from the body closes the scope. */
	alarm(10);
	if (keel_scope_join(s, KEEL_FOREVER) != 0)
		_exit(21);
	if (keel_join(fb->fg, &st, KEEL_FOREVER) != 0 || st != -ECANCELED)
		_exit(22);
	return 0;
}

TEST(fork_child_scope_joins_return)
{
	HARNESS_NEED(FORK);
	struct fork_body fb = {0};
	int rc, status;

	event_init(&vanish_running);
	event_init(&vanish_release);
	rc = keel_scope_run(body_forks, &fb, NULL);
	if (fb.pid == 0)
		_exit(rc == 0 ? 0 : 23);
	CHECK_OK(rc);
	CHECK_EQ(waitpid(fb.pid, &status, 0), fb.pid);
	if (WIFSIGNALED(status))
		harness_fail(__FILE__, __LINE__,
			     "the child was killed by signal %d (SIGALRM: "
			     "it hung)",
			     WTERMSIG(status));
	CHECK(WIFEXITED(status));
	CHECK_EQ(WEXITSTATUS(status), 0);
}
