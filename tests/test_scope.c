/*
 * test_scope.c: scopes, cancellation, deadlines, shields, teardown order.
 *
 * Order of events is checked with logs: each test records what ran and
 * compares it with the expected sequence.
 */
#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <stdatomic.h>
#include <string.h>
#include <unistd.h>

#include "harness.h"
#include "internal.h"

static harness_log lg;

static void note(const char *token)
{
	log_add(&lg, token);
}

/* ---- Helpers ---- */

static int count_fds(void)
{
	DIR *d = opendir("/proc/self/fd");
	struct dirent *e;
	int n = 0;

	CHECK(d != NULL);
	while ((e = readdir(d)) != NULL)
		if (e->d_name[0] != '.')
			n++;
	closedir(d);
	return n - 1; /* the directory's own fd */
}

/* Threads whose kernel name is `name`. */
static int threads_named(const char *name)
{
	DIR *d = opendir("/proc/self/task");
	struct dirent *e;
	int n = 0;

	if (!d)
		return 0; /* no /proc: names cannot be seen (the caller skips) */
	while ((e = readdir(d)) != NULL) {
		char path[300], comm[64] = "";
		int fd;
		ssize_t r;

		if (e->d_name[0] == '.')
			continue;
		snprintf(path, sizeof path, "/proc/self/task/%s/comm",
			 e->d_name);
		if ((fd = open(path, O_RDONLY)) < 0)
			continue; /* exited meanwhile */
		r = read(fd, comm, sizeof comm - 1);
		close(fd);
		if (r > 0) {
			comm[r] = '\0';
			comm[strcspn(comm, "\n")] = '\0';
			if (strcmp(comm, name) == 0)
				n++;
		}
	}
	closedir(d);
	return n;
}

static int wait_cancelled(void *arg)
{
	(void)arg;
	return keel_sleep_until(KEEL_FOREVER) == -ECANCELED ? 0 : -EPROTO;
}

/* ---- The Effection scenario ---- */

struct effection {
	int open; /* the resource */
	harness_event child_ready;
};

static int open_resource(void *arg, void **out)
{
	struct effection *e = arg;

	e->open = 1;
	note("resource-open");
	*out = e;
	return 0;
}

static int close_resource(void *arg)
{
	struct effection *e = arg;

	e->open = 0;
	note("resource-close");
	return 0;
}

static int child_cleanup(void *arg)
{
	struct effection *e = arg;

	/* The child's own cleanup uses the resource: it must still be open. */
	note(e->open ? "child-cleanup-resource-open"
		     : "child-cleanup-resource-CLOSED");
	return 0;
}

static int effection_child(void *arg)
{
	keel_scope_t *mine;
	int rc;

	CHECK_OK(keel_scope_open(&mine, NULL));
	CHECK_OK(keel_defer(mine, child_cleanup, arg));
	note("child-running");
	event_set(&((struct effection *)arg)->child_ready);
	rc = keel_sleep_until(KEEL_FOREVER);
	note(rc == -ECANCELED ? "child-cancelled" : "child-woke-wrongly");
	return keel_scope_close(mine);
}

static int effection_body(keel_scope_t *s, void *arg)
{
	keel_spawn_opts bg = {.name = "user", .background = 1};
	keel_task_t child;

	CHECK_OK(keel_resource(s, open_resource, close_resource, arg, NULL));
	CHECK_OK(keel_spawn(s, effection_child, arg, &bg, &child));
	/* The child is registered after the resource, and running. */
	event_wait(&((struct effection *)arg)->child_ready);
	note("body-returns");
	return 0;
}

/* A scope's slot is reused last-freed first: open and close more scopes
 * than 2^16 after the first one closed. Its handle is refused every time
 * and never reaches the scope that lives in its slot now, whatever the
 * width of a pointer. */
static int stale_cleanup_ran;

static int stale_cleanup(void *arg)
{
	(void)arg;
	stale_cleanup_ran++;
	return 0;
}

static int never_runs(void *arg)
{
	(void)arg;
	return 0;
}

/* A spawn that fails has no side effect: the handle the caller passed
 * keeps its value, even when the failure comes last (the thread cannot
 * start, here for a stack larger than the address space). */
TEST(failed_spawn_leaves_the_handle_alone)
{
	keel_spawn_opts huge = {
		.stack_size = sizeof(size_t) < 8 ? SIZE_MAX / 4 * 3
						 : (size_t)(UINT64_C(1) << 46)};
	keel_task_t child = (keel_task_t)0x1234;
	keel_scope_t *s;
	int rc;

	CHECK_OK(keel_scope_open(&s, NULL));
	rc = keel_spawn(s, never_runs, NULL, &huge, &child);
	if (rc == 0) {
		/* Where such a thread starts after all (Emscripten 3.1.6
		 * does), there is no late failure to test. */
		CHECK_OK(keel_scope_close(s));
		harness_skip("the platform starts a thread whose stack is "
			     "larger than the address space");
	}
	CHECK_RC(rc, -ENOMEM);
	CHECK(child == (keel_task_t)0x1234);
	CHECK_RC(keel_spawn(s, NULL, NULL, NULL, &child), -EINVAL);
	CHECK(child == (keel_task_t)0x1234);
	CHECK_OK(keel_scope_close(s));
}

TEST(stale_scope_handle_never_names_a_later_scope)
{
	enum { ROUNDS = (1 << 16) + 1000 };
	keel_scope_t *stale, *s;

	CHECK_OK(keel_scope_open(&stale, NULL));
	CHECK_OK(keel_scope_close(stale));
	for (int i = 0; i < ROUNDS; i++) {
		CHECK_OK(keel_scope_open(&s, NULL));
		CHECK(s != stale);
		CHECK_RC(keel_scope_cancel(stale), -EINVAL);
		/* As for any closed scope. */
		CHECK_RC(keel_defer(stale, stale_cleanup, NULL), -ECANCELED);
		/* Neither reached s: it closes uncancelled, with no cleanup. */
		CHECK_OK(keel_scope_close(s));
		CHECK_EQ(stale_cleanup_ran, 0);
	}
}

TEST(effection_scenario)
{
	struct effection e = {0};

	log_init(&lg);
	event_init(&e.child_ready);
	CHECK_OK(keel_scope_run(effection_body, &e, NULL));
	/* The body returns; the background child is cancelled and its own
	 * cleanup runs while the resource is still open; then it closes. */
	CHECK_LOG(&lg, "resource-open child-running body-returns "
		       "child-cancelled child-cleanup-resource-open "
		       "resource-close");
}

/* ---- Exact reverse order ---- */

static int log_cleanup(void *arg)
{
	note(arg);
	return 0;
}

struct ordered_child {
	const char *name;
	harness_event started;
};

static int ordered_child_fn(void *arg)
{
	struct ordered_child *c = arg;

	event_set(&c->started);
	keel_sleep_until(KEEL_FOREVER);
	note(c->name);
	return 0;
}

TEST(teardown_is_exact_reverse_of_creation)
{
	struct ordered_child a = {.name = "child-a"}, b = {.name = "child-b"},
			     c = {.name = "child-c"};
	keel_scope_t *s;

	log_init(&lg);
	event_init(&a.started);
	event_init(&b.started);
	event_init(&c.started);
	CHECK_OK(keel_scope_open(&s, NULL));
	CHECK_OK(keel_spawn(s, ordered_child_fn, &a, NULL, NULL));
	CHECK_OK(keel_defer(s, log_cleanup, TOKEN("cleanup-1")));
	CHECK_OK(keel_spawn(s, ordered_child_fn, &b, NULL, NULL));
	CHECK_OK(keel_defer(s, log_cleanup, TOKEN("cleanup-2")));
	CHECK_OK(keel_spawn(s, ordered_child_fn, &c, NULL, NULL));
	CHECK_OK(keel_defer(s, log_cleanup, TOKEN("cleanup-3")));
	event_wait(&a.started);
	event_wait(&b.started);
	event_wait(&c.started);
	/* Each child is cancelled only when its turn comes. */
	CHECK_OK(keel_scope_close(s));
	CHECK_LOG(&lg, "cleanup-3 child-c cleanup-2 child-b cleanup-1 child-a");
}

/* ---- Policies and results ---- */

static int fail_now(void *arg)
{
	(void)arg;
	note("fail");
	return -EIO;
}

static int note_cancel(void *arg)
{
	int rc = keel_sleep_until(KEEL_FOREVER);

	note(rc == -ECANCELED ? arg : "sibling-not-cancelled");
	return rc;
}

static int fail_fast_body(keel_scope_t *s, void *arg)
{
	int rc;

	(void)arg;
	CHECK_OK(keel_spawn(s, note_cancel, TOKEN("sibling-cancelled"), NULL,
			    NULL));
	CHECK_OK(keel_spawn(s, fail_now, NULL, NULL, NULL));
	rc = keel_sleep_until(KEEL_FOREVER);
	CHECK_RC(rc, -ECANCELED);
	CHECK_EQ(keel_cancel_cause(), KEEL_CANCEL_SIBLING);
	note("body-cancelled");
	return 0;
}

TEST(fail_fast_cancels_siblings_and_body)
{
	log_init(&lg);
	CHECK_RC(keel_scope_run(fail_fast_body, NULL, NULL), -EIO);
	/* "fail" first; the sibling and the body are both cancelled. */
	CHECK(strncmp(lg.buf, "fail ", 5) == 0);
	CHECK(strstr(lg.buf, "sibling-cancelled") != NULL);
	CHECK(strstr(lg.buf, "body-cancelled") != NULL);
}

static harness_event finish_ok;

static int finish_when_told(void *arg)
{
	(void)arg;
	event_wait(&finish_ok);
	note("sibling-finished");
	return 7;
}

static void record_exit(keel_task_t child, int status, void *arg)
{
	char buf[32];

	(void)child;
	(void)arg;
	snprintf(buf, sizeof buf, "exit=%d", status);
	note(buf);
}

static int supervise_body(keel_scope_t *s, void *arg)
{
	keel_task_t failing;
	int st;

	(void)arg;
	CHECK_OK(keel_spawn(s, finish_when_told, NULL, NULL, NULL));
	CHECK_OK(keel_spawn(s, fail_now, NULL, NULL, &failing));
	CHECK_OK(keel_join(failing, &st, KEEL_FOREVER));
	CHECK_EQ(st, -EIO);
	/* Supervised: nothing was cancelled. */
	CHECK_OK(keel_checkpoint());
	event_set(&finish_ok);
	return 0;
}

TEST(supervise_lets_siblings_finish)
{
	keel_scope_opts o = {.policy = KEEL_SUPERVISE, .on_exit = record_exit};
	char want[64];

	log_init(&lg);
	event_init(&finish_ok);
	CHECK_RC(keel_scope_run(supervise_body, NULL, &o), -EIO);
	/* Errno values differ between systems (EIO is 29 on Emscripten). */
	snprintf(want, sizeof want, "fail exit=%d sibling-finished exit=7",
		 -EIO);
	CHECK_LOG(&lg, want);
}

static int return_cancelled(void *arg)
{
	(void)arg;
	return -ECANCELED;
}

static int fail_with(void *arg)
{
	return (int)(intptr_t)arg;
}

static int cleanup_fails(void *arg)
{
	(void)arg;
	return -EPIPE;
}

static int errors_body(keel_scope_t *s, void *arg)
{
	keel_task_t a, b;

	(void)arg;
	CHECK_OK(keel_defer(s, cleanup_fails, NULL));
	CHECK_OK(keel_spawn(s, return_cancelled, NULL, NULL, &a));
	CHECK_OK(keel_join(a, NULL, KEEL_FOREVER));
	/* A cancellation exit is not an error: nothing was cancelled. */
	CHECK_OK(keel_checkpoint());
	CHECK_OK(keel_spawn(s, fail_with, (void *)(intptr_t)-EBADMSG, NULL,
			    &b));
	CHECK_OK(keel_join(b, NULL, KEEL_FOREVER));
	return 0;
}

TEST(results_first_failure_not_cancellation_nor_cleanup)
{
	/* The child's failure, not the later cleanup's. */
	CHECK_RC(keel_scope_run(errors_body, NULL, NULL), -EBADMSG);
}

static int only_cleanup_fails(keel_scope_t *s, void *arg)
{
	(void)arg;
	CHECK_OK(keel_defer(s, cleanup_fails, NULL));
	return 0;
}

TEST(cleanup_failure_is_the_result_when_nothing_else_failed)
{
	CHECK_RC(keel_scope_run(only_cleanup_fails, NULL, NULL), -EPIPE);
}

static int body_fails(keel_scope_t *s, void *arg)
{
	(void)arg;
	CHECK_OK(keel_spawn(s, note_cancel, TOKEN("child-cancelled"), NULL,
			    NULL));
	return -ENOTCONN;
}

TEST(body_failure_cancels_children)
{
	log_init(&lg);
	CHECK_RC(keel_scope_run(body_fails, NULL, NULL), -ENOTCONN);
	CHECK_LOG(&lg, "child-cancelled");
}

/* ---- Deadlines ---- */

TEST(deadline_is_inherited_by_inner_waits)
{
	keel_scope_opts outer = {.deadline = keel_after(KEEL_MS(30))};
	keel_scope_t *o, *i;
	keel_time_t start = keel_now();

	CHECK_OK(keel_scope_open(&o, &outer));
	CHECK_OK(keel_scope_open(&i, NULL));
	/* The wait's own deadline is later: the outer scope's applies. */
	CHECK_RC(keel_sleep_until(keel_after(KEEL_SEC(30))), -ECANCELED);
	CHECK_EQ(keel_cancel_cause(), KEEL_CANCEL_DEADLINE);
	CHECK_INT(keel_now(), >=, outer.deadline);
	CHECK_INT(keel_now() - start, <, KEEL_SEC(10));
	CHECK_RC(keel_scope_close(i), -ECANCELED);
	CHECK_RC(keel_scope_close(o), -ETIMEDOUT);
	CHECK_OK(keel_checkpoint());
}

static int sleep_past(void *arg)
{
	int rc = keel_sleep_until(KEEL_FOREVER);

	(void)arg;
	note(rc == -ECANCELED && keel_cancel_cause() == KEEL_CANCEL_DEADLINE
		     ? "child-deadline"
		     : "child-other");
	return 0;
}

TEST(deadline_reaches_children)
{
	keel_scope_opts o = {.deadline = keel_after(KEEL_MS(20))};
	keel_scope_t *s;

	log_init(&lg);
	CHECK_OK(keel_scope_open(&s, &o));
	CHECK_OK(keel_spawn(s, sleep_past, NULL, NULL, NULL));
	/* The owner is inside the scope too: the deadline ends its wait. */
	CHECK_RC(keel_sleep_until(KEEL_FOREVER), -ECANCELED);
	CHECK_EQ(keel_cancel_cause(), KEEL_CANCEL_DEADLINE);
	CHECK_RC(keel_scope_close(s), -ETIMEDOUT);
	/* And the child's ended the same way. */
	CHECK_LOG(&lg, "child-deadline");
}

TEST(inner_timeout_does_not_cancel_outer)
{
	keel_scope_opts inner = {.deadline = keel_after(KEEL_MS(10))};
	keel_scope_t *o, *i;

	CHECK_OK(keel_scope_open(&o, NULL));
	CHECK_OK(keel_scope_open(&i, &inner));
	CHECK_RC(keel_sleep_until(KEEL_FOREVER), -ECANCELED);
	CHECK_RC(keel_scope_close(i), -ETIMEDOUT);
	/* Back in the outer scope: not cancelled, waits work. */
	CHECK_OK(keel_checkpoint());
	CHECK_EQ(keel_cancel_cause(), KEEL_CANCEL_NONE);
	CHECK_OK(keel_sleep_until(keel_after(KEEL_MS(1))));
	CHECK_OK(keel_scope_close(o));
}

/* ---- Cleanups cut off at their deadline ---- */

static int blocking_cleanup(void *arg)
{
	int rc = keel_sleep_until(KEEL_FOREVER);

	(void)arg;
	note(rc == -ECANCELED ? "blocker-cut-off" : "blocker-woke");
	return rc;
}

TEST(blocking_cleanup_is_cut_off_and_reported)
{
	keel_scope_opts o = {.cleanup_deadline = KEEL_MS(30), .name = "cut"};
	harness_capture cap;
	keel_scope_t *s;
	keel_time_t start;

	log_init(&lg);
	CHECK_OK(keel_scope_open(&s, &o));
	CHECK_OK(keel_defer(s, log_cleanup, TOKEN("first-registered")));
	CHECK_OK(keel_defer(s, blocking_cleanup, NULL));
	CHECK_OK(keel_defer(s, log_cleanup, TOKEN("last-registered")));
	capture_begin(&cap);
	start = keel_now();
	/* Cut off: the teardown was incomplete. */
	CHECK_RC(keel_scope_close(s), -ETIMEDOUT);
	capture_end(&cap);
	CHECK_INT(keel_now() - start, >=, KEEL_MS(30));
	CHECK_LOG(&lg, "last-registered blocker-cut-off first-registered");
	CHECK(strstr(cap.text, "scope 'cut': cleanup #1 was cut off") != NULL);
}

TEST(cleanups_are_shielded_from_outer_cancellation)
{
	keel_scope_t *s;

	log_init(&lg);
	CHECK_OK(keel_scope_open(&s, NULL));
	CHECK_OK(keel_defer(s, log_cleanup, TOKEN("ran")));
	CHECK_OK(keel_scope_cancel(s));
	CHECK_RC(keel_checkpoint(), -ECANCELED);
	CHECK_RC(keel_scope_close(s), -ECANCELED);
	CHECK_LOG(&lg, "ran");
}

static int cleanup_can_wait(void *arg)
{
	/* Shielded: a short wait completes even though the scope was
	 * cancelled. */
	(void)arg;
	CHECK_OK(keel_sleep_until(keel_after(KEEL_MS(2))));
	note("waited");
	return 0;
}

TEST(cleanup_may_block_briefly_after_cancel)
{
	keel_scope_t *s;

	log_init(&lg);
	CHECK_OK(keel_scope_open(&s, NULL));
	CHECK_OK(keel_defer(s, cleanup_can_wait, NULL));
	CHECK_OK(keel_scope_cancel(s));
	CHECK_RC(keel_scope_close(s), -ECANCELED);
	CHECK_LOG(&lg, "waited");
}

/* ---- Resources ---- */

struct fd_res {
	int cancel_at; /* which point of the setup sees a cancellation */
	keel_scope_t *s;
	int setups, teardowns;
};

static int open_fd_setup(void *arg, void **out)
{
	struct fd_res *r = arg;
	int fd;

	r->setups++;
	if (r->cancel_at == 1)
		keel_scope_cancel(r->s);
	/* A cancellation point before acquiring. */
	if (keel_checkpoint() < 0)
		return -ECANCELED;
	if ((fd = open("/dev/null", O_RDONLY | O_CLOEXEC)) < 0)
		return -errno;
	if (r->cancel_at == 2)
		keel_scope_cancel(r->s);
	/* A cancellation point after acquiring: undo, then fail. */
	if (keel_checkpoint() < 0) {
		close(fd);
		return -ECANCELED;
	}
	if (r->cancel_at == 3)
		keel_scope_cancel(r->s); /* after the last point: armed */
	*out = (void *)(intptr_t)fd;
	return 0;
}

static int close_fd_teardown(void *arg)
{
	close((int)(intptr_t)arg);
	return 0;
}

TEST(resource_cancelled_anywhere_leaks_nothing)
{
	int before = count_fds();

	/* 0: not cancelled; 1, 2: inside setup; 3: after setup returns;
	 * 4: before keel_resource is called. */
	for (int at = 0; at <= 4; at++) {
		struct fd_res r = {.cancel_at = at};
		int rc;

		CHECK_OK(keel_scope_open(&r.s, NULL));
		if (at == 4)
			CHECK_OK(keel_scope_cancel(r.s));
		rc = keel_resource(r.s, open_fd_setup, close_fd_teardown, &r,
				   NULL);
		if (at == 0 || at == 3)
			CHECK_OK(rc);
		else
			CHECK_RC(rc, -ECANCELED);
		CHECK_EQ(r.setups, at == 4 ? 0 : 1);
		keel_scope_close(r.s);
		CHECK_EQ(count_fds(), before);
	}
}

static int failing_setup(void *arg, void **out)
{
	(void)arg;
	(void)out;
	return -ENOENT;
}

static int must_not_teardown(void *arg)
{
	(void)arg;
	harness_fail(__FILE__, __LINE__, "teardown of a failed setup ran");
}

TEST(resource_failed_setup_registers_nothing)
{
	static int untouched;
	keel_scope_t *s;
	void *out = &untouched;

	CHECK_OK(keel_scope_open(&s, NULL));
	CHECK_RC(keel_resource(s, failing_setup, must_not_teardown, NULL, &out),
		 -ENOENT);
	CHECK(out == &untouched);
	CHECK_OK(keel_scope_close(s));
}

/* ---- keel_join and keel_scope_join ---- */

static int return_42(void *arg)
{
	(void)arg;
	return 42;
}

TEST(join_status_is_not_lost_to_a_later_cancel)
{
	keel_scope_t *s;
	keel_task_t t;
	int st = 0;

	CHECK_OK(keel_scope_open(&s, NULL));
	CHECK_OK(keel_spawn(s, return_42, NULL, NULL, &t));
	CHECK_OK(keel_scope_join(s, KEEL_FOREVER)); /* it has finished */
	CHECK_OK(keel_scope_cancel(s));
	CHECK_OK(keel_join(t, &st, 0));
	CHECK_EQ(st, 42);
	CHECK_RC(keel_join(t, &st, 0), -ESRCH); /* joined already */
	CHECK_RC(keel_scope_close(s), -ECANCELED);
}

TEST(join_deadline_and_bad_handles)
{
	keel_scope_t *s;
	keel_task_t t;

	CHECK_OK(keel_scope_open(&s, NULL));
	CHECK_OK(keel_spawn(s, wait_cancelled, NULL, NULL, &t));
	CHECK_RC(keel_join(t, NULL, keel_after(KEEL_MS(5))), -ETIMEDOUT);
	CHECK_RC(keel_join(keel_self(), NULL, 0), -ESRCH);
	CHECK_RC(keel_join(KEEL_TASK_NONE, NULL, 0), -ESRCH);
	CHECK_RC(keel_join(t + ((uint64_t)1 << MB_GEN_SHIFT), NULL, 0), -ESRCH);
	CHECK_OK(keel_scope_close(s));
	/* The close joined it. */
	CHECK_RC(keel_join(t, NULL, 0), -ESRCH);
}

static harness_event fg_go;

static int fg_child(void *arg)
{
	(void)arg;
	event_wait(&fg_go);
	note("fg-done");
	return 0;
}

static int bg_child(void *arg)
{
	(void)arg;
	note(keel_sleep_until(KEEL_FOREVER) == -ECANCELED ? "bg-cancelled"
							   : "bg-woke");
	return 0;
}

TEST(scope_join_waits_for_foreground_only)
{
	keel_spawn_opts bg = {.background = 1};
	keel_scope_t *s;

	log_init(&lg);
	event_init(&fg_go);
	CHECK_OK(keel_scope_open(&s, NULL));
	CHECK_OK(keel_spawn(s, bg_child, NULL, &bg, NULL));
	CHECK_OK(keel_spawn(s, fg_child, NULL, NULL, NULL));
	CHECK_RC(keel_scope_join(s, keel_after(KEEL_MS(5))), -ETIMEDOUT);
	event_set(&fg_go);
	CHECK_OK(keel_scope_join(s, KEEL_FOREVER));
	CHECK_LOG(&lg, "fg-done");
	CHECK_OK(keel_scope_close(s));
	CHECK_LOG(&lg, "fg-done bg-cancelled");
}

/* ---- Misuse ---- */

struct other_closer {
	keel_scope_t *s;
	int rc_close, rc_defer, rc_join, rc_cancel;
};

static void *close_from_other_thread(void *arg)
{
	struct other_closer *o = arg;

	o->rc_close = keel_scope_close(o->s);
	o->rc_defer = keel_defer(o->s, log_cleanup, TOKEN("x"));
	o->rc_join = keel_scope_join(o->s, 0);
	o->rc_cancel = keel_scope_cancel(o->s);
	return NULL;
}

static int close_enclosing(void *arg)
{
	return keel_scope_close(arg);
}

static atomic_int started_count;

static int count_start(void *arg)
{
	(void)arg;
	atomic_fetch_add(&started_count, 1);
	return 0;
}

TEST(misuse_gives_errors)
{
	struct other_closer o = {0};
	keel_scope_t *s, *inner, *closed;
	keel_task_t child;
	int st;

	CHECK_RC(keel_scope_open(NULL, NULL), -EINVAL);
	{
		keel_scope_opts bad = {.policy = (keel_policy_t)7};

		CHECK_RC(keel_scope_open(&s, &bad), -EINVAL);
	}
	CHECK_OK(keel_scope_open(&s, NULL));
	/* Another task may not close it (nor add cleanups, nor join it)
	 * but may cancel it. */
	o.s = s;
	harness_join(harness_thread(close_from_other_thread, &o));
	CHECK_RC(o.rc_close, -EPERM);
	CHECK_RC(o.rc_defer, -EPERM);
	CHECK_RC(o.rc_join, -EPERM);
	CHECK_OK(o.rc_cancel);
	/* Cancelled by the other task: spawning is refused. */
	CHECK_RC(keel_spawn(s, close_enclosing, s, NULL, &child), -ECANCELED);
	CHECK_RC(keel_scope_close(s), -ECANCELED);
	/* A child may not close the scope that encloses it. (Supervised, so
	 * that the child's failure does not cancel the scope.) */
	CHECK_OK(keel_scope_open(&s, &(keel_scope_opts){.policy =
							    KEEL_SUPERVISE}));
	CHECK_OK(keel_spawn(s, close_enclosing, s, NULL, &child));
	CHECK_OK(keel_join(child, &st, KEEL_FOREVER));
	CHECK_RC(st, -EPERM);
	/* Out of nesting order. */
	CHECK_OK(keel_scope_open(&inner, NULL));
	CHECK_RC(keel_scope_close(s), -EBUSY);
	CHECK_OK(keel_scope_close(inner));
	/* Spawning into a cancelled scope starts nothing. */
	CHECK_OK(keel_scope_cancel(s));
	CHECK_RC(keel_spawn(s, count_start, NULL, NULL, NULL), -ECANCELED);
	CHECK_RC(keel_scope_close(s), -EPERM); /* the child's failure */
	/* Nor into a closed one, whose handle is recognised. */
	closed = s;
	CHECK_RC(keel_spawn(closed, count_start, NULL, NULL, NULL), -ECANCELED);
	CHECK_RC(keel_scope_close(closed), -EINVAL);
	CHECK_RC(keel_scope_cancel(closed), -EINVAL);
	CHECK_RC(keel_defer(closed, log_cleanup, NULL), -ECANCELED);
	CHECK_EQ(atomic_load(&started_count), 0);
	/* Bad arguments. */
	CHECK_OK(keel_scope_open(&s, NULL));
	CHECK_RC(keel_spawn(s, NULL, NULL, NULL, NULL), -EINVAL);
	CHECK_RC(keel_defer(s, NULL, NULL), -EINVAL);
	CHECK_RC(keel_resource(s, NULL, close_fd_teardown, NULL, NULL),
		 -EINVAL);
	CHECK_RC(keel_spawn(NULL, count_start, NULL, NULL, NULL), -EINVAL);
	CHECK_RC(keel_scope_cancel((keel_scope_t *)(uintptr_t)0xfffff0),
		 -EINVAL);
	CHECK_RC(keel_scope_run(NULL, NULL, NULL), -EINVAL);
	CHECK_OK(keel_scope_close(s));
}

static int leave_scope_open(void *arg)
{
	keel_scope_t *s;

	(void)arg;
	CHECK_OK(keel_scope_open(&s, &(keel_scope_opts){.name = "forgotten"}));
	CHECK_OK(keel_defer(s, log_cleanup, TOKEN("forgotten-cleanup")));
	note("child-returns");
	return 0;
}

TEST(scope_left_open_is_reported_and_closed)
{
	harness_capture cap;
	keel_scope_t *s;
	keel_task_t t;

	log_init(&lg);
	capture_begin(&cap);
	CHECK_OK(keel_scope_open(&s, NULL));
	CHECK_OK(keel_spawn(s, leave_scope_open, NULL,
			    &(keel_spawn_opts){.name = "careless"}, &t));
	CHECK_OK(keel_join(t, NULL, KEEL_FOREVER));
	CHECK_OK(keel_scope_close(s));
	capture_end(&cap);
	/* Its cleanup ran before the task counted as ended. */
	CHECK_LOG(&lg, "child-returns forgotten-cleanup");
	CHECK(strstr(cap.text, "task 'careless' ended with scope 'forgotten' "
			       "open") != NULL);
}

/* ---- No orphans ---- */

static int nest_and_wait(void *arg)
{
	keel_scope_t *s;
	int depth = (int)(intptr_t)arg;

	if (depth > 0) {
		CHECK_OK(keel_scope_open(&s, NULL));
		for (int i = 0; i < 3; i++)
			CHECK_OK(keel_spawn(s, nest_and_wait,
					    (void *)(intptr_t)(depth - 1),
					    &(keel_spawn_opts){.name = "orphan-check"},
					    NULL));
		keel_sleep_until(KEEL_FOREVER);
		keel_scope_close(s);
		return 0;
	}
	keel_sleep_until(KEEL_FOREVER);
	return 0;
}

static int name_probe(void *arg)
{
	(void)arg;
	return threads_named("keel-probe");
}

TEST(no_orphans_after_close)
{
	keel_scope_t *s;
	keel_task_t t;
	int seen;

	/* The check counts threads by the names keel gives them. */
	CHECK_OK(keel_scope_open(&s, NULL));
	CHECK_OK(keel_spawn(s, name_probe, NULL,
			    &(keel_spawn_opts){.name = "keel-probe"}, &t));
	CHECK_OK(keel_join(t, &seen, KEEL_FOREVER));
	CHECK_OK(keel_scope_close(s));
	if (seen != 1)
		harness_skip("threads cannot be named on this platform");

	CHECK_OK(keel_scope_open(&s, NULL));
	for (int i = 0; i < 3; i++)
		CHECK_OK(keel_spawn(s, nest_and_wait, (void *)(intptr_t)2,
				    &(keel_spawn_opts){.name = "orphan-check"},
				    NULL));
	/* 3 + 9 + 27 tasks; let them all get going. */
	while (threads_named("orphan-check") < 39)
		sched_yield();
	CHECK_OK(keel_scope_close(s));
	CHECK_EQ(threads_named("orphan-check"), 0);
}

/* ---- Shields ---- */

TEST(shield_hides_cancellation_until_its_end)
{
	keel_scope_t *s;

	CHECK_OK(keel_scope_open(&s, NULL));
	CHECK_OK(keel_shield_begin(keel_after(KEEL_SEC(30))));
	CHECK_OK(keel_scope_cancel(s));
	CHECK_OK(keel_checkpoint());
	CHECK_OK(keel_sleep_until(keel_after(KEEL_MS(1))));
	CHECK_OK(keel_shield_end());
	CHECK_RC(keel_checkpoint(), -ECANCELED);
	CHECK_RC(keel_scope_close(s), -ECANCELED);
}

TEST(shield_deadline_cancels_inside_it)
{
	keel_time_t start = keel_now();

	CHECK_OK(keel_shield_begin(keel_after(KEEL_MS(10))));
	CHECK_RC(keel_sleep_until(KEEL_FOREVER), -ECANCELED);
	CHECK_EQ(keel_cancel_cause(), KEEL_CANCEL_DEADLINE);
	CHECK_INT(keel_now() - start, >=, KEEL_MS(10));
	CHECK_OK(keel_shield_end());
	CHECK_OK(keel_checkpoint());
	CHECK_RC(keel_shield_end(), -EPERM);
	CHECK_RC(keel_shield_begin(KEEL_FOREVER), -EINVAL);
}

/* ---- keel_on_cancel ---- */

static void cb_note(void *arg)
{
	note(arg);
}

TEST(on_cancel_runs_once_or_not_at_all)
{
	keel_cancel_token_t a, b, c;
	keel_scope_t *s;

	log_init(&lg);
	CHECK_OK(keel_scope_open(&s, NULL));
	CHECK_OK(keel_on_cancel(cb_note, TOKEN("a"), &a));
	CHECK_OK(keel_on_cancel(cb_note, TOKEN("b"), &b));
	CHECK_OK(keel_on_cancel_remove(b)); /* removed before: never runs */
	CHECK_OK(keel_scope_cancel(s));
	CHECK_OK(keel_scope_cancel(s)); /* idempotent: a runs once */
	CHECK_LOG(&lg, "a");
	/* Registered after: runs at once, here. */
	CHECK_OK(keel_on_cancel(cb_note, TOKEN("c"), &c));
	CHECK_LOG(&lg, "a c");
	CHECK_EQ(keel_on_cancel_remove(a), 1);
	CHECK_EQ(keel_on_cancel_remove(c), 1);
	CHECK_RC(keel_on_cancel_remove(a), -EINVAL);
	CHECK_RC(keel_on_cancel_remove(0), -EINVAL);
	CHECK_RC(keel_on_cancel(NULL, NULL, &a), -EINVAL);
	CHECK_RC(keel_scope_close(s), -ECANCELED);
}

struct slow_cb {
	harness_event running, release;
	atomic_int done;
	keel_cancel_token_t token;
	keel_scope_t *s;
	int remove_rc;
};

static void slow_callback(void *arg)
{
	struct slow_cb *c = arg;

	event_set(&c->running);
	event_wait(&c->release);
	atomic_store(&c->done, 1);
}

static void *cancel_from_elsewhere(void *arg)
{
	struct slow_cb *c = arg;

	CHECK_OK(keel_scope_cancel(c->s));
	return NULL;
}

static void *release_later(void *arg)
{
	struct slow_cb *c = arg;

	event_wait(&c->running);
	event_set(&c->release);
	return NULL;
}

TEST(on_cancel_remove_waits_for_a_running_callback)
{
	struct slow_cb c;
	pthread_t canceller, releaser;

	memset(&c, 0, sizeof c);
	event_init(&c.running);
	event_init(&c.release);
	CHECK_OK(keel_scope_open(&c.s, NULL));
	CHECK_OK(keel_on_cancel(slow_callback, &c, &c.token));
	canceller = harness_thread(cancel_from_elsewhere, &c);
	event_wait(&c.running);
	releaser = harness_thread(release_later, &c);
	/* The callback is running on the canceller: removal waits. */
	CHECK_EQ(keel_on_cancel_remove(c.token), 1);
	CHECK_EQ(atomic_load(&c.done), 1);
	harness_join(canceller);
	harness_join(releaser);
	CHECK_RC(keel_scope_close(c.s), -ECANCELED);
}

static keel_cancel_token_t self_token;

static void remove_self(void *arg)
{
	(void)arg;
	/* Removing a registration from inside its own callback is allowed
	 * and does not wait for itself. */
	CHECK_EQ(keel_on_cancel_remove(self_token), 1);
	note("removed-self");
}

TEST(on_cancel_remove_from_inside_the_callback)
{
	keel_scope_t *s;

	log_init(&lg);
	CHECK_OK(keel_scope_open(&s, NULL));
	CHECK_OK(keel_on_cancel(remove_self, NULL, &self_token));
	CHECK_OK(keel_scope_cancel(s));
	CHECK_LOG(&lg, "removed-self");
	CHECK_RC(keel_scope_close(s), -ECANCELED);
}

/* ---- Every cancellation point ---- */

enum point {
	P_CHECKPOINT,
	P_SLEEP,
	P_FD_WAIT,
	P_SERVE,
	P_CALL,
	P_JOIN,
	P_SCOPE_JOIN,
	P_COND_WAIT,
	P_LOCK,
	P_COUNT
};

static const char *point_name[P_COUNT] = {
	"checkpoint", "sleep_until", "fd_wait",	  "serve",	 "call",
	"join",	      "scope_join",  "cond_wait", "mutex_lock_until",
};

struct point_ctx {
	enum point p;
	int result;
	int pipefd[2];
	keel_task_t never_serves;
	harness_event entered, release_child;
	keel_mutex_t mu; /* P_COND_WAIT waits on cv with it; P_LOCK: held */
	keel_cond_t cv;
};

/* Not cancellable: it ends only when the test lets it. */
static int wait_released(void *arg)
{
	event_wait(&((struct point_ctx *)arg)->release_child);
	return 0;
}

static void nop_work(void *arg)
{
	(void)arg;
}

static int wait_at_point(void *arg)
{
	struct point_ctx *pc = arg;
	keel_scope_t *inner;
	keel_task_t t;
	int rc = 0;

	/* "entered" means about to block: the cancel may land just before
	 * the wait begins or during it, and both must end it. */
	if (pc->p != P_JOIN && pc->p != P_SCOPE_JOIN)
		event_set(&pc->entered);
	switch (pc->p) {
	case P_CHECKPOINT:
		while ((rc = keel_checkpoint()) == 0)
			sched_yield();
		break;
	case P_SLEEP:
		rc = keel_sleep_until(KEEL_FOREVER);
		break;
	case P_FD_WAIT:
		rc = keel_fd_wait(pc->pipefd[0], POLLIN, KEEL_FOREVER);
		break;
	case P_SERVE:
		rc = keel_serve(KEEL_FOREVER);
		break;
	case P_CALL:
		rc = keel_call(pc->never_serves, nop_work, NULL, KEEL_FOREVER);
		break;
	case P_COND_WAIT:
		keel_mutex_lock(&pc->mu);
		while ((rc = keel_cond_wait_until(&pc->cv, &pc->mu,
						  KEEL_FOREVER)) == 0)
			;
		keel_mutex_unlock(&pc->mu);
		break;
	case P_LOCK:
		rc = keel_mutex_lock_until(&pc->mu, KEEL_FOREVER);
		if (rc == 0)
			keel_mutex_unlock(&pc->mu);
		break;
	case P_JOIN:
	case P_SCOPE_JOIN:
		CHECK_OK(keel_scope_open(&inner, NULL));
		CHECK_OK(keel_spawn(inner, wait_released, pc, NULL, &t));
		event_set(&pc->entered);
		rc = pc->p == P_JOIN ? keel_join(t, NULL, KEEL_FOREVER)
				     : keel_scope_join(inner, KEEL_FOREVER);
		event_set(&pc->release_child);
		keel_scope_close(inner);
		break;
	default:
		break;
	}
	pc->result = rc;
	return 0;
}

static void *never_serving(void *arg)
{
	struct point_ctx *pc = arg;

	pc->never_serves = keel_self();
	event_set(&pc->entered);
	keel_sleep_until(KEEL_FOREVER); /* an adopted task: never cancelled */
	return NULL;
}

/* Each cancellation point, cancelled through its scope or (by_task) through
 * keel_task_cancel() of the one task waiting in it. */
static void cancel_each_point(int by_task)
{
	for (int p = 0; p < P_COUNT; p++) {
		struct point_ctx pc;
		pthread_t server = 0;
		keel_scope_t *s;
		keel_task_t t;

		memset(&pc, 0, sizeof pc);
		pc.p = (enum point)p;
		CHECK_EQ(pipe(pc.pipefd), 0);
		event_init(&pc.entered);
		event_init(&pc.release_child);
		CHECK_OK(keel_mutex_init(&pc.mu, 0, "point", 0));
		CHECK_OK(keel_cond_init(&pc.cv));
		if (p == P_CALL) {
			server = harness_thread(never_serving, &pc);
			event_wait(&pc.entered);
			event_init(&pc.entered);
		}
		if (p == P_LOCK)
			keel_mutex_lock(&pc.mu);
		CHECK_OK(keel_scope_open(&s, NULL));
		CHECK_OK(keel_spawn(s, wait_at_point, &pc, NULL, &t));
		event_wait(&pc.entered);
		if (by_task) {
			CHECK_OK(keel_task_cancel(t));
			CHECK_OK(keel_join(t, NULL, KEEL_FOREVER));
			CHECK_OK(keel_checkpoint()); /* only t was */
			CHECK_OK(keel_scope_close(s));
		} else {
			CHECK_OK(keel_scope_cancel(s));
			/* The close joins it (the owner's own waits are
			 * cancelled). */
			CHECK_RC(keel_scope_close(s), -ECANCELED);
		}
		if (p == P_LOCK)
			keel_mutex_unlock(&pc.mu);
		if (pc.result != -ECANCELED)
			harness_fail(__FILE__, __LINE__, "%s returned %d (%s)",
				     point_name[p], pc.result,
				     keel_strerror(pc.result));
		CHECK_OK(keel_cond_destroy(&pc.cv));
		CHECK_OK(keel_mutex_destroy(&pc.mu));
		close(pc.pipefd[0]);
		close(pc.pipefd[1]);
		if (server) {
			/* Its keel_sleep_until is not cancellable from here:
			 * detach it and let the process end. */
			pthread_detach(server);
		}
	}
}

TEST(every_cancellation_point_returns_ecanceled)
{
	cancel_each_point(0);
}

TEST(task_cancel_wakes_every_cancellation_point)
{
	cancel_each_point(1);
}

/* ---- Dumps ---- */

static int dump_child(void *arg)
{
	harness_event *ready = arg;

	keel_set_name("dumped-child");
	event_set(ready);
	keel_sleep_until(KEEL_FOREVER);
	return 0;
}

TEST(dump_shows_the_tree)
{
	harness_event ready;
	keel_scope_t *s;
	char buf[8192];
	FILE *f;

	event_init(&ready);
	CHECK_OK(keel_scope_open(&s, &(keel_scope_opts){.name = "dumped"}));
	CHECK_OK(keel_spawn(s, dump_child, &ready,
			    &(keel_spawn_opts){.name = "dumped-child"}, NULL));
	CHECK_OK(keel_defer(s, log_cleanup, TOKEN("x")));
	event_wait(&ready);
	f = fmemopen(buf, sizeof buf, "w");
	CHECK_OK(keel_dump(f));
	fclose(f);
	printf("%s", buf);
	CHECK(strstr(buf, "scope 'dumped'") != NULL);
	CHECK(strstr(buf, "task 'dumped-child'") != NULL);
	CHECK(strstr(buf, "cleanup #1") != NULL);
	f = fmemopen(buf, sizeof buf, "w");
	CHECK_OK(keel_dump_dot(f));
	fclose(f);
	CHECK(strncmp(buf, "digraph keel {", 14) == 0);
	CHECK(strstr(buf, "dumped-child") != NULL);
	CHECK_RC(keel_dump(NULL), -EINVAL);
	log_init(&lg);
	CHECK_OK(keel_scope_close(s));
}

/* ---- Deadlines in the past ---- */

TEST(negative_deadline_is_already_past)
{
	/* 0 means "none"; any other time before now has passed already,
	 * negative ones included (keel_after() of a negative duration). */
	keel_time_t past[] = {-1, INT64_MIN, keel_after(-KEEL_SEC(1)), 1};

	for (unsigned i = 0; i < sizeof past / sizeof past[0]; i++) {
		keel_scope_t *s;

		CHECK_OK(keel_scope_open(&s, &(keel_scope_opts){
						     .deadline = past[i]}));
		CHECK_RC(keel_checkpoint(), -ECANCELED);
		CHECK_RC(keel_sleep_until(KEEL_FOREVER), -ECANCELED);
		CHECK_EQ(keel_cancel_cause(), KEEL_CANCEL_DEADLINE);
		CHECK_RC(keel_scope_close(s), -ETIMEDOUT);
	}
	CHECK_OK(keel_checkpoint());
}

/* ---- Misuse inside setups and cleanups ---- */

struct closer {
	keel_scope_t *s;
	int rc;
};

static int setup_closes_its_scope(void *arg, void **out)
{
	struct closer *c = arg;

	c->rc = keel_scope_close(c->s);
	note("setup");
	*out = c;
	return 0;
}

static int teardown_logged(void *arg)
{
	(void)arg;
	note("teardown");
	return 0;
}

TEST(resource_setup_that_closes_its_scope_is_refused)
{
	harness_capture cap;
	struct closer c;
	void *res = NULL;

	log_init(&lg);
	CHECK_OK(keel_scope_open(&c.s, &(keel_scope_opts){.name = "held"}));
	CHECK_OK(keel_defer(c.s, log_cleanup, TOKEN("first")));
	capture_begin(&cap);
	CHECK_OK(keel_resource(c.s, setup_closes_its_scope, teardown_logged,
			       &c, &res));
	capture_end(&cap);
	/* The close from inside the setup was refused and named; the scope
	 * is whole, and its resource is torn down in its turn. */
	CHECK_RC(c.rc, -EBUSY);
	CHECK(res == &c);
	CHECK(strstr(cap.text, "scope 'held'") != NULL);
	CHECK_OK(keel_defer(c.s, log_cleanup, TOKEN("last")));
	CHECK_OK(keel_scope_close(c.s));
	CHECK_LOG(&lg, "setup last teardown first");
}

static int cleanup_leaves_shield_open(void *arg)
{
	(void)arg;
	CHECK_OK(keel_shield_begin(keel_after(KEEL_SEC(60))));
	note("leaky-cleanup");
	return 0;
}

static int cleanup_leaves_scope_open(void *arg)
{
	keel_scope_t *inner;

	(void)arg;
	CHECK_OK(keel_scope_open(&inner, &(keel_scope_opts){.name = "inner"}));
	CHECK_OK(keel_defer(inner, log_cleanup, TOKEN("inner-cleanup")));
	note("leaky-cleanup");
	return 0;
}

/* The calling task's chain is back to its base: nothing left open. */
static void check_nothing_open(void)
{
	struct keel__task *t = keel__self();

	CHECK(t->cur == &t->base);
	CHECK_EQ(t->nshields, 0);
}

static int cleanup_ends_keels_shield(void *arg)
{
	(void)arg;
	/* The shield a cleanup runs in is keel's: the cleanup cannot end
	 * it. */
	CHECK_RC(keel_shield_end(), -EPERM);
	return 0;
}

TEST(cleanup_leaving_a_shield_open_is_named_and_ended)
{
	harness_capture cap;
	keel_scope_t *s;

	log_init(&lg);
	capture_begin(&cap);
	/* More scopes than there are shield slots: a leaked shield per close
	 * would leave later cleanups unshielded or refused. */
	for (int i = 0; i < KEEL_MAX_SHIELDS + 2; i++) {
		CHECK_OK(keel_scope_open(&s, &(keel_scope_opts){.name = "leaky"}));
		CHECK_OK(keel_defer(s, log_cleanup, TOKEN("first")));
		CHECK_OK(keel_defer(s, cleanup_ends_keels_shield, NULL));
		CHECK_OK(keel_defer(s, cleanup_leaves_shield_open, NULL));
		CHECK_OK(keel_scope_close(s));
		check_nothing_open();
	}
	capture_end(&cap);
	CHECK(strstr(cap.text, "scope 'leaky': cleanup #2 left a shield open; "
			       "ending it") != NULL);
	CHECK(strstr(cap.text, "unshielded") == NULL);
	{
		char want[1024] = "";

		for (int i = 0; i < KEEL_MAX_SHIELDS + 2; i++)
			strcat(want, i ? " leaky-cleanup first" : "leaky-cleanup first");
		CHECK_LOG(&lg, want);
	}
}

TEST(cleanup_leaving_a_scope_open_is_named_and_closed)
{
	harness_capture cap;
	keel_scope_t *s;

	log_init(&lg);
	capture_begin(&cap);
	CHECK_OK(keel_scope_open(&s, &(keel_scope_opts){.name = "outer"}));
	CHECK_OK(keel_defer(s, log_cleanup, TOKEN("first")));
	CHECK_OK(keel_defer(s, cleanup_leaves_scope_open, NULL));
	CHECK_OK(keel_scope_close(s));
	capture_end(&cap);
	check_nothing_open();
	/* The scope the cleanup left open closes as soon as the cleanup
	 * returns, before the cleanups registered earlier run. */
	CHECK_LOG(&lg, "leaky-cleanup inner-cleanup first");
	CHECK(strstr(cap.text, "scope 'outer': cleanup #1 left scope 'inner' "
			       "open; closing it") != NULL);
}

static int body_leaves_shield_open(keel_scope_t *s, void *arg)
{
	(void)arg;
	CHECK_OK(keel_defer(s, log_cleanup, TOKEN("cleanup")));
	CHECK_OK(keel_shield_begin(keel_after(KEEL_SEC(60))));
	note("body");
	return 0;
}

static int body_leaves_scope_open(keel_scope_t *s, void *arg)
{
	keel_scope_t *inner;

	(void)arg;
	CHECK_OK(keel_defer(s, log_cleanup, TOKEN("cleanup")));
	CHECK_OK(keel_scope_open(&inner, &(keel_scope_opts){.name = "inner"}));
	CHECK_OK(keel_defer(inner, log_cleanup, TOKEN("inner-cleanup")));
	note("body");
	return 0;
}

TEST(scope_run_body_leaving_a_shield_or_scope_open_is_named_and_closed)
{
	harness_capture cap;

	log_init(&lg);
	capture_begin(&cap);
	for (int i = 0; i < KEEL_MAX_SHIELDS + 2; i++) {
		CHECK_OK(keel_scope_run(body_leaves_shield_open, NULL,
					&(keel_scope_opts){.name = "run"}));
		check_nothing_open();
	}
	CHECK_OK(keel_scope_run(body_leaves_scope_open, NULL,
				&(keel_scope_opts){.name = "run"}));
	check_nothing_open();
	capture_end(&cap);
	CHECK(strstr(cap.text, "scope 'run': the body left a shield open; "
			       "ending it") != NULL);
	CHECK(strstr(cap.text, "scope 'run': the body left scope 'inner' "
			       "open; closing it") != NULL);
	{
		char want[1024] = "";

		for (int i = 0; i < KEEL_MAX_SHIELDS + 2; i++)
			strcat(want, "body cleanup ");
		strcat(want, "body inner-cleanup cleanup");
		CHECK_LOG(&lg, want);
	}
}

/* ---- The close's report of a child slow to end ---- */

static harness_event slow_body, slow_drain;
static harness_capture slow_cap;

/* Not a keel wait: cancellation cannot reach it. */
static int body_ignores_cancel(void *arg)
{
	(void)arg;
	event_wait(&slow_body);
	return 0;
}

static void never(void *arg)
{
	(void)arg;
	CHECK(0);
}

static void drain_blocks(void *arg)
{
	(void)arg;
	event_wait(&slow_drain);
}

/* Returns at once, leaving a message whose cancel handler blocks in its
 * mailbox's drain, a step of its ending. */
static int body_ends_slowly(void *arg)
{
	(void)arg;
	CHECK_OK(keel_post(keel_self(), never, drain_blocks, NULL));
	return 0;
}

/* Releases each child once the close has reported it. */
static void *release_when_reported(void *arg)
{
	(void)arg;
	while (!capture_contains(&slow_cap, "child 'stuck' still running"))
		sched_yield();
	event_set(&slow_body);
	while (!capture_contains(&slow_cap, "child 'ending' returned from "
					    "its body"))
		sched_yield();
	event_set(&slow_drain);
	return NULL;
}

TEST(close_report_tells_a_running_child_from_an_ending_one)
{
	keel_scope_t *s;
	pthread_t th;

	event_init(&slow_body);
	event_init(&slow_drain);
	CHECK_OK(keel_scope_open(&s, &(keel_scope_opts){
					     .name = "slow",
					     .cleanup_deadline = KEEL_MS(20)}));
	/* Closed in reverse: 'stuck' first, then 'ending'. */
	CHECK_OK(keel_spawn(s, body_ends_slowly, NULL,
			    &(keel_spawn_opts){.name = "ending"}, NULL));
	CHECK_OK(keel_spawn(s, body_ignores_cancel, NULL,
			    &(keel_spawn_opts){.name = "stuck"}, NULL));
	capture_begin(&slow_cap);
	th = harness_thread(release_when_reported, NULL);
	CHECK_OK(keel_scope_close(s));
	harness_join(th);
	capture_end(&slow_cap);
	CHECK(strstr(slow_cap.text,
		     "scope 'slow': child 'stuck' still running 20 ms after it "
		     "was cancelled (running); waiting") != NULL);
	CHECK(strstr(slow_cap.text,
		     "scope 'slow': child 'ending' returned from its body but "
		     "has not ended 20 ms after it was cancelled (in: closing "
		     "its mailbox); waiting") != NULL);
}

/* ---- on_cancel callbacks run holding no keel lock ---- */

static harness_event cb_woken;

static void cb_cancels_other(void *arg)
{
	/* Scope calls from a callback: keel holds none of its locks here. */
	note("callback");
	CHECK_OK(keel_scope_cancel(arg));
	event_set(&cb_woken);
}

/* Waits on something keel does not own; only the callback wakes it. */
static int wait_with_callback(void *arg)
{
	keel_cancel_token_t tok;

	CHECK_OK(keel_on_cancel(cb_cancels_other, arg, &tok));
	store_relaxed(&keel__self()->blocked_in, "event");
	event_wait(&cb_woken);
	CHECK_EQ(keel_on_cancel_remove(tok), 1); /* it ran */
	note("first-cancelled");
	return 0;
}

static int wait_logged(void *arg)
{
	(void)arg;
	keel_sleep_until(KEEL_FOREVER);
	note("second-cancelled");
	return 0;
}

TEST(on_cancel_callback_may_cancel_another_scope)
{
	keel_scope_t *outer, *inner;
	keel_task_t t1, t2;

	log_init(&lg);
	event_init(&cb_woken);
	/* Cancelling the inner scope does not reach the outer one: only the
	 * callback does. */
	CHECK_OK(keel_scope_open(&outer, NULL));
	CHECK_OK(keel_spawn(outer, wait_logged, NULL, NULL, &t2));
	CHECK_OK(keel_scope_open(&inner, NULL));
	CHECK_OK(keel_spawn(inner, wait_with_callback, outer, NULL, &t1));
	while (!load_relaxed(&keel__task_slot(t1)->blocked_in) ||
	       !load_relaxed(&keel__task_slot(t2)->blocked_in))
		sched_yield();
	CHECK_OK(keel_scope_cancel(inner));
	CHECK_RC(keel_scope_close(inner), -ECANCELED);
	CHECK_RC(keel_scope_close(outer), -ECANCELED);
	pthread_mutex_lock(&lg.mu);
	CHECK(strncmp(lg.buf, "callback ", 9) == 0);
	CHECK(strstr(lg.buf, "first-cancelled") != NULL);
	CHECK(strstr(lg.buf, "second-cancelled") != NULL);
	pthread_mutex_unlock(&lg.mu);
}

/* A registration the body left behind is dropped when the task ends, so a
 * cancellation that reaches the task while it ends (here, from a cancel
 * handler its mailbox's drain runs) runs no callback of a body that has
 * returned. */
static atomic_int stale_cb_ran;
static keel_task_t leaver;

static void stale_cb(void *arg)
{
	(void)arg;
	atomic_fetch_add(&stale_cb_ran, 1);
}

static void cancel_the_leaver(void *arg)
{
	(void)arg;
	CHECK_OK(keel__task_cancel(leaver, KEEL_CANCEL_EXPLICIT));
}

static int body_leaves_registration(void *arg)
{
	keel_cancel_token_t tok;

	(void)arg;
	leaver = keel_self();
	CHECK_OK(keel_on_cancel(stale_cb, NULL, &tok));
	CHECK_OK(keel_post(leaver, never, cancel_the_leaver, NULL));
	return 0;
}

TEST(on_cancel_left_by_a_returned_body_never_runs)
{
	keel_scope_t *s;
	keel_task_t t;
	int st = -1;

	CHECK_OK(keel_scope_open(&s, NULL));
	CHECK_OK(keel_spawn(s, body_leaves_registration, NULL, NULL, &t));
	CHECK_OK(keel_join(t, &st, KEEL_FOREVER));
	CHECK_EQ(st, 0);
	CHECK_EQ(atomic_load(&stale_cb_ran), 0);
	CHECK_OK(keel_scope_close(s));
}

/* A cleanup that ends its thread (pthread_exit) runs once: the task's end
 * closes the scope it was closing, and goes on with the cleanups left. */
static int cleanup_exits_thread(void *arg)
{
	note(arg);
	pthread_exit(NULL);
}

static int close_with_exiting_cleanup(void *arg)
{
	keel_scope_t *s;

	(void)arg;
	CHECK_OK(keel_scope_open(&s, &(keel_scope_opts){.name = "exiting"}));
	CHECK_OK(keel_defer(s, log_cleanup, TOKEN("first")));
	CHECK_OK(keel_defer(s, cleanup_exits_thread, TOKEN("exits")));
	keel_scope_close(s);
	note("after-close");
	return 0;
}

TEST(cleanup_that_exits_its_thread_runs_once)
{
	harness_capture cap;
	keel_scope_t *s;
	keel_task_t t;

	log_init(&lg);
	capture_begin(&cap);
	CHECK_OK(keel_scope_open(&s, NULL));
	CHECK_OK(keel_spawn(s, close_with_exiting_cleanup, NULL,
			    &(keel_spawn_opts){.name = "quitter"}, &t));
	CHECK_OK(keel_join(t, NULL, KEEL_FOREVER));
	CHECK_OK(keel_scope_close(s));
	capture_end(&cap);
	CHECK_LOG(&lg, "exits first");
	CHECK(strstr(cap.text, "task 'quitter' ended with scope 'exiting' "
			       "half closed") != NULL);
	CHECK(strstr(cap.text, "shield") == NULL);
}

/* An on_exit hook that ends the child's thread: the child still leaves its
 * scope, so its join and the close return. */
static void hook_exits_thread(keel_task_t child, int status, void *arg)
{
	(void)child;
	(void)arg;
	if (status == 5)
		pthread_exit(NULL);
}

static int return_five(void *arg)
{
	(void)arg;
	return 5;
}

TEST(on_exit_hook_that_exits_the_thread_still_ends_the_child)
{
	keel_scope_t *s;
	keel_task_t t;
	int st = 0;

	CHECK_OK(keel_scope_open(&s, &(keel_scope_opts){
					     .on_exit = hook_exits_thread}));
	CHECK_OK(keel_spawn(s, return_five, NULL, NULL, &t));
	CHECK_OK(keel_join(t, &st, KEEL_FOREVER));
	CHECK_EQ(st, 5);
	CHECK_OK(keel_spawn(s, return_five, NULL, NULL, NULL));
	CHECK_OK(keel_scope_close(s));
}

/* A callback that ends the cancelling thread (pthread_exit) counts as
 * returned: its task's remove and end do not wait for it forever. */
static void cb_exits_thread(void *arg)
{
	(void)arg;
	pthread_exit(NULL);
}

static harness_event exiter_registered, exiter_release;

/* Waits outside keel, so that only the test decides when it goes on:
 * after the cancelling thread (and the callback in it) has ended. */
static int register_and_wait(void *arg)
{
	keel_cancel_token_t tok;

	(void)arg;
	CHECK_OK(keel_on_cancel(cb_exits_thread, NULL, &tok));
	event_set(&exiter_registered);
	event_wait(&exiter_release);
	CHECK_EQ(keel_on_cancel_remove(tok), 1);
	return 0;
}

static void *cancel_and_die(void *arg)
{
	keel_scope_cancel(arg);
	CHECK(0); /* the callback ended this thread */
	return NULL;
}

TEST(on_cancel_callback_that_exits_the_cancelling_thread)
{
	keel_scope_t *s;
	keel_task_t t, later;

	event_init(&exiter_registered);
	event_init(&exiter_release);
	CHECK_OK(keel_scope_open(&s, NULL));
	CHECK_OK(keel_spawn(s, register_and_wait, NULL, NULL, &t));
	event_wait(&exiter_registered);
	/* Reached after t by the cancellation's spread. */
	CHECK_OK(keel_spawn(s, wait_cancelled, NULL, NULL, &later));
	while (!load_relaxed(&keel__task_slot(later)->blocked_in))
		sched_yield();
	harness_join(harness_thread(cancel_and_die, s));
	event_set(&exiter_release);
	/* The spread went on to the end although its thread ended: 'later'
	 * was woken (a close, which waits uncancellably, would hang if not;
	 * its -ECANCELED is not a failure). */
	CHECK_RC(keel_scope_close(s), -ECANCELED);
}

/* ---- Long-lived scopes: memory follows what is live ---- */

/* The runtime's counters, the caller adopted first (so that its own slot
 * is counted before as after). */
static void stats_now(keel_stats *st)
{
	CHECK(keel_self() != KEEL_TASK_NONE);
	CHECK_OK(keel_stats_get(st));
}

/* The spawner keeps at most `max` children live; each child's on_exit
 * hook, which runs when its status is delivered, makes room. */
struct churn {
	pthread_mutex_t mu;
	pthread_cond_t cv;
	int live, max_live, ended, failed;
};

static int churn_child(void *arg)
{
	(void)arg;
	return 0;
}

static void churn_exit(keel_task_t child, int status, void *arg)
{
	struct churn *ch = arg;

	(void)child;
	pthread_mutex_lock(&ch->mu);
	ch->live--;
	ch->ended++;
	if (status != 0)
		ch->failed++;
	pthread_cond_signal(&ch->cv);
	pthread_mutex_unlock(&ch->mu);
}

/* Live means holding a task slot: a child still running, or past its
 * hook but not yet reaped (a thread preempted there, on a loaded machine,
 * holds its slot a while longer). So the room is counted in slots. */
static void churn_make_room(struct churn *ch, size_t base, int max)
{
	keel_stats st;

	for (;;) {
		CHECK_OK(keel_stats_get(&st));
		if (st.tasks_live < base + (size_t)max)
			break;
		pthread_mutex_lock(&ch->mu);
		if (ch->live > 0) /* a hook to come: wait for it */
			pthread_cond_wait(&ch->cv, &ch->mu);
		pthread_mutex_unlock(&ch->mu);
		sched_yield();
	}
	pthread_mutex_lock(&ch->mu);
	ch->live++;
	if ((int)(st.tasks_live - base) + 1 > ch->max_live)
		ch->max_live = (int)(st.tasks_live - base) + 1;
	pthread_mutex_unlock(&ch->mu);
}

/* Issue 10: a scope kept every finished child until it closed (1.26 KB
 * each; a server spawning each connection into its root scope ran out of
 * task slots). A child whose handle was not taken is reaped when it ends:
 * the slot high-water mark stays within twice the live maximum. */
TEST(children_give_back_their_slots_as_they_end)
{
	static struct churn ch = {PTHREAD_MUTEX_INITIALIZER,
				  PTHREAD_COND_INITIALIZER, 0, 0, 0, 0};
#ifdef KEEL_UNDER_SANITIZER
	const int n = 20000;
#else
	const int n = 100000;
#endif
	const int max = 200;
	keel_stats before, after, closed;
	keel_scope_t *s;

	stats_now(&before);
	CHECK_OK(keel_scope_open(
		&s, &(keel_scope_opts){.on_exit = churn_exit,
				       .on_exit_arg = &ch}));
	for (int i = 0; i < n; i++) {
		churn_make_room(&ch, before.tasks_live, max);
		CHECK_OK(keel_spawn(s, churn_child, NULL, NULL, NULL));
	}
	CHECK_OK(keel_scope_join(s, KEEL_FOREVER));
	CHECK_OK(keel_stats_get(&after));
	CHECK_OK(keel_scope_close(s));
	CHECK_OK(keel_stats_get(&closed));
	printf("%d children, at most %d live: task slots %zu -> %zu, "
	       "live %zu -> %zu -> %zu\n",
	       n, ch.max_live, before.task_slots, after.task_slots,
	       before.tasks_live, after.tasks_live, closed.tasks_live);
	CHECK_EQ(ch.ended, n);
	CHECK_EQ(ch.failed, 0);
	CHECK_INT(ch.max_live, <=, max);
	CHECK_INT(after.task_slots - before.task_slots, <=, 2 * max);
	CHECK_INT(after.tasks_peak - before.tasks_live, <=, 2 * max);
	CHECK_INT(after.tasks_peak, >=, before.tasks_live + 1);
	keel_stats_reset_peak();
	CHECK_OK(keel_stats_get(&after));
	CHECK_INT(after.tasks_peak, ==, after.tasks_live);
	/* The last ones may still be between their hook and their release
	 * when scope_join returns; after the close, none is left. */
	CHECK_EQ(closed.tasks_live, before.tasks_live);
	CHECK_EQ(closed.scopes_live, before.scopes_live);
}

static int join_self_later(void *arg)
{
	(void)arg;
	return 7;
}

/* Joined children give back their entries too: a scope that spawned and
 * joined 20,000 children one by one holds no more slots than one. */
TEST(joined_children_give_back_their_slots)
{
	keel_stats before, after;
	keel_scope_t *s;

	stats_now(&before);
	CHECK_OK(keel_scope_open(&s, NULL));
	for (int i = 0; i < 20000; i++) {
		keel_task_t t;
		int st = 0;

		CHECK_OK(keel_spawn(s, join_self_later, NULL, NULL, &t));
		CHECK_OK(keel_join(t, &st, KEEL_FOREVER));
		CHECK_EQ(st, 7);
		CHECK_RC(keel_join(t, &st, KEEL_FOREVER), -ESRCH);
	}
	CHECK_OK(keel_stats_get(&after));
	CHECK_INT(after.task_slots - before.task_slots, <=, 2);
	CHECK_EQ(after.tasks_live, before.tasks_live);
	CHECK_OK(keel_scope_close(s));
}

static atomic_int reaped_hooks;

static void count_hook(keel_task_t child, int status, void *arg)
{
	(void)child;
	(void)status;
	(void)arg;
	atomic_fetch_add(&reaped_hooks, 1);
}

/* Wait until the runtime holds `live` task slots: reaped children give
 * theirs back just after their hook. A condition, polled with yields. */
static void wait_tasks_live(size_t live)
{
	keel_stats st;

	for (;;) {
		CHECK_OK(keel_stats_get(&st));
		if (st.tasks_live == live)
			return;
		sched_yield();
	}
}

/* What is still live is torn down in exact reverse order, whatever was
 * reaped (and compacted away) between: 300 short children interleaved
 * with cleanups and two long ones. */
TEST(teardown_order_holds_across_reaped_children)
{
	struct ordered_child a = {.name = "child-a"}, b = {.name = "child-b"};
	keel_stats base;
	keel_scope_t *s;

	log_init(&lg);
	event_init(&a.started);
	event_init(&b.started);
	atomic_store(&reaped_hooks, 0);
	stats_now(&base);
	CHECK_OK(keel_scope_open(&s, &(keel_scope_opts){.on_exit = count_hook}));
	CHECK_OK(keel_defer(s, log_cleanup, TOKEN("cleanup-1")));
	for (int i = 0; i < 100; i++)
		CHECK_OK(keel_spawn(s, churn_child, NULL, NULL, NULL));
	CHECK_OK(keel_spawn(s, ordered_child_fn, &a, NULL, NULL));
	for (int i = 0; i < 100; i++)
		CHECK_OK(keel_spawn(s, churn_child, NULL, NULL, NULL));
	CHECK_OK(keel_defer(s, log_cleanup, TOKEN("cleanup-2")));
	CHECK_OK(keel_spawn(s, ordered_child_fn, &b, NULL, NULL));
	for (int i = 0; i < 100; i++)
		CHECK_OK(keel_spawn(s, churn_child, NULL, NULL, NULL));
	CHECK_OK(keel_defer(s, log_cleanup, TOKEN("cleanup-3")));
	event_wait(&a.started);
	event_wait(&b.started);
	/* The 300 are reaped; the two long children are all that is live. */
	wait_tasks_live(base.tasks_live + 2);
	CHECK_EQ(atomic_load(&reaped_hooks), 300);
	CHECK_OK(keel_scope_close(s));
	CHECK_LOG(&lg, "cleanup-3 child-b cleanup-2 child-a cleanup-1");
}

/* A reaped child's failure is still the scope's result, and a detached
 * child cannot be joined; once reaped, its handle is stale. */
static int fail_eio(void *arg)
{
	(void)arg;
	return -EIO;
}

static int wait_event_child(void *arg)
{
	event_wait(arg);
	return 0;
}

TEST(reaped_children_keep_every_status_rule)
{
	harness_event go;
	keel_stats base;
	keel_scope_t *s;
	keel_task_t d;
	char name[32];

	event_init(&go);
	atomic_store(&reaped_hooks, 0);
	stats_now(&base);
	CHECK_OK(keel_scope_open(&s, &(keel_scope_opts){
					     .policy = KEEL_SUPERVISE,
					     .on_exit = count_hook}));
	CHECK_OK(keel_spawn(s, fail_eio, NULL, NULL, NULL));
	CHECK_OK(keel_spawn(s, wait_event_child, &go,
			    &(keel_spawn_opts){.detached = 1}, &d));
	CHECK_RC(keel_join(d, NULL, KEEL_FOREVER), -EINVAL);
	CHECK_INT(keel_task_name(d, name, sizeof name), >, 0);
	event_set(&go);
	wait_tasks_live(base.tasks_live);
	CHECK_EQ(atomic_load(&reaped_hooks), 2);
	CHECK_RC(keel_join(d, NULL, KEEL_FOREVER), -ESRCH);
	CHECK_RC(keel_task_cancel(d), -ESRCH);
	CHECK_RC(keel_task_name(d, name, sizeof name), -ESRCH);
	/* Reaped long before the close, its failure is the result. */
	CHECK_RC(keel_scope_close(s), -EIO);
}

/* ---- keel_task_cancel ---- */

struct tc_child {
	harness_event started, release;
	int result, cause, checkpoint_after;
};

static int tc_wait(void *arg)
{
	struct tc_child *c = arg;

	event_set(&c->started);
	c->result = keel_sleep_until(KEEL_FOREVER);
	c->cause = keel_cancel_cause();
	return c->result;
}

static int tc_sibling(void *arg)
{
	struct tc_child *c = arg;

	event_set(&c->started);
	event_wait(&c->release);
	c->checkpoint_after = keel_checkpoint();
	return 0;
}

static void record_status(keel_task_t child, int status, void *arg)
{
	char buf[64];

	(void)child;
	snprintf(buf, sizeof buf, "exit:%d", status);
	log_add(arg, buf);
}

/* One task cancelled: it alone is woken, with the cause EXPLICIT; its
 * siblings go on under KEEL_SUPERVISE, and its -ECANCELED is no failure. */
TEST(task_cancel_cancels_one_child_and_leaves_its_siblings)
{
	static harness_log exits;
	struct tc_child victim, left, right;
	keel_scope_t *s;
	keel_task_t t;
	char want[64];

	memset(&victim, 0, sizeof victim);
	memset(&left, 0, sizeof left);
	memset(&right, 0, sizeof right);
	event_init(&victim.started);
	event_init(&left.started);
	event_init(&left.release);
	event_init(&right.started);
	event_init(&right.release);
	log_init(&exits);
	CHECK_OK(keel_scope_open(&s, &(keel_scope_opts){
					     .policy = KEEL_SUPERVISE,
					     .on_exit = record_status,
					     .on_exit_arg = &exits}));
	CHECK_OK(keel_spawn(s, tc_sibling, &left, NULL, NULL));
	CHECK_OK(keel_spawn(s, tc_wait, &victim, NULL, &t));
	CHECK_OK(keel_spawn(s, tc_sibling, &right, NULL, NULL));
	event_wait(&victim.started);
	event_wait(&left.started);
	event_wait(&right.started);
	CHECK_OK(keel_task_cancel(t));
	CHECK_OK(keel_task_cancel(t)); /* idempotent */
	CHECK_OK(keel_join(t, NULL, KEEL_FOREVER));
	CHECK_RC(victim.result, -ECANCELED);
	CHECK_EQ(victim.cause, KEEL_CANCEL_EXPLICIT);
	CHECK_RC(keel_task_cancel(t), -ESRCH); /* joined */
	CHECK_OK(keel_checkpoint()); /* the owner is not cancelled */
	event_set(&left.release);
	event_set(&right.release);
	CHECK_OK(keel_scope_join(s, KEEL_FOREVER));
	CHECK_OK(left.checkpoint_after);
	CHECK_OK(right.checkpoint_after);
	CHECK_OK(keel_scope_close(s)); /* a cancelled child is no failure */
	snprintf(want, sizeof want, "exit:%d exit:0 exit:0", -ECANCELED);
	CHECK_LOG(&exits, want);
}

static int tc_nested(void *arg)
{
	struct tc_child *c = arg;
	keel_scope_t *inner;
	struct tc_child grand;
	int rc;

	memset(&grand, 0, sizeof grand);
	event_init(&grand.started);
	CHECK_OK(keel_scope_open(&inner, NULL));
	CHECK_OK(keel_spawn(inner, tc_wait, &grand, NULL, NULL));
	event_wait(&grand.started);
	event_set(&c->started);
	c->result = keel_sleep_until(KEEL_FOREVER);
	rc = keel_scope_close(inner);
	/* The grandchild heard it too. */
	c->checkpoint_after = grand.result == -ECANCELED &&
			      grand.cause == KEEL_CANCEL_EXPLICIT;
	return rc;
}

TEST(task_cancel_reaches_the_scopes_nested_in_it)
{
	struct tc_child c;
	keel_scope_t *s;
	keel_task_t t;
	int st = 0;

	memset(&c, 0, sizeof c);
	event_init(&c.started);
	CHECK_OK(keel_scope_open(&s, NULL));
	CHECK_OK(keel_spawn(s, tc_nested, &c, NULL, &t));
	event_wait(&c.started);
	CHECK_OK(keel_task_cancel(t));
	CHECK_OK(keel_join(t, &st, KEEL_FOREVER));
	CHECK_RC(c.result, -ECANCELED);
	CHECK_RC(st, -ECANCELED);
	CHECK_EQ(c.checkpoint_after, 1);
	CHECK_OK(keel_scope_close(s));
}

TEST(task_cancel_of_a_bad_handle_is_esrch)
{
	keel_scope_t *s;
	keel_task_t t;

	CHECK_RC(keel_task_cancel(KEEL_TASK_NONE), -ESRCH);
	CHECK_RC(keel_task_cancel(~(keel_task_t)0), -ESRCH);
	CHECK_RC(keel_task_cancel((keel_task_t)1 << 40 | 5), -ESRCH);
	CHECK_OK(keel_scope_open(&s, NULL));
	CHECK_OK(keel_spawn(s, churn_child, NULL, NULL, &t));
	CHECK_OK(keel_join(t, NULL, KEEL_FOREVER));
	CHECK_RC(keel_task_cancel(t), -ESRCH);
	CHECK_OK(keel_scope_close(s));
}
