/*
 * test_task.c: task handles, adoption, names, the thread cache, fork.
 */
#include <limits.h>
#include <signal.h>
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
	}
	keel__thread_cache_stats(&after);
	CHECK_EQ(after.started - before.started, 200);
	/* A thread goes back to the idle list just after its task ends, so a
	 * spawn right after a join may find none idle yet and create one;
	 * but most of 200 sequential spawns reuse a cached thread. */
	CHECK_INT(after.created - before.created, <=, 20);
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
	CHECK_OK(keel__task_spawn(&t, return_arg, NULL, NULL, 0));
	CHECK_OK(keel__task_join(t, NULL));
	keel__thread_cache_stats(&st);
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
