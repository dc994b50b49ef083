/*
 * test_proxy.c: keel_call, keel_call_then and the _ctx variants: every
 * outcome, on the right thread, exactly once.
 */
#include <sched.h>
#include <stdatomic.h>
#include <string.h>
#include <unistd.h>

#include "harness.h"
#include "internal.h"

static harness_log lg;

/* A server task: serves until told to stop (by a message). */
struct server {
	keel_task_t id;
	pthread_t th, thread;
	harness_event ready;
	atomic_int stop;
};

static void *server_main(void *p)
{
	struct server *s = p;

	s->id = keel_self();
	s->thread = pthread_self();
	event_set(&s->ready);
	while (!atomic_load(&s->stop)) {
		int rc = keel_serve(KEEL_FOREVER);

		CHECK(rc >= 1 || rc == -ESHUTDOWN);
		if (rc == -ESHUTDOWN)
			break;
	}
	return NULL;
}

static void server_start(struct server *s)
{
	memset(s, 0, sizeof *s);
	event_init(&s->ready);
	s->th = harness_thread(server_main, s);
	event_wait(&s->ready);
}

static void set_stop(void *p)
{
	atomic_store(&((struct server *)p)->stop, 1);
}

static void server_stop(struct server *s)
{
	CHECK_OK(keel_post(s->id, set_stop, NULL, s));
	harness_join(s->th);
}

/* ---- keel_call ---- */

struct on_thread {
	pthread_t seen;
	int value;
};

static void record_thread(void *p)
{
	struct on_thread *o = p;

	o->seen = pthread_self();
	o->value++;
}

TEST(call_runs_on_target_and_waits)
{
	struct server s;
	struct on_thread o = {0};

	server_start(&s);
	for (int i = 0; i < 100; i++)
		CHECK_OK(keel_call(s.id, record_thread, &o, KEEL_FOREVER));
	CHECK(pthread_equal(o.seen, s.thread));
	CHECK_EQ(o.value, 100);
	server_stop(&s);
}

TEST(call_bad_input)
{
	struct server s;
	struct on_thread o = {0};

	server_start(&s);
	CHECK_RC(keel_call(s.id, NULL, &o, KEEL_FOREVER), -EINVAL);
	CHECK_RC(keel_call(keel_self(), record_thread, &o, KEEL_FOREVER),
		 -EDEADLK);
	CHECK_RC(keel_call(KEEL_TASK_NONE, record_thread, &o, KEEL_FOREVER),
		 -ESRCH);
	CHECK_RC(keel_call(s.id + ((uint64_t)1 << MB_GEN_SHIFT), record_thread,
			   &o, KEEL_FOREVER),
		 -ESRCH);
	CHECK_RC(keel_call_ctx(s.id, NULL, &o, KEEL_FOREVER), -EINVAL);
	server_stop(&s);
	CHECK_EQ(o.value, 0);
}

/* The target is slow to serve: busy in a message until released. */
struct slow {
	harness_event release, busy, ready_evt;
	keel_task_t id;
	pthread_t th;
	atomic_int ran;
};

static void slow_block(void *p)
{
	struct slow *s = p;

	event_set(&s->busy);
	event_wait(&s->release);
}

static void *slow_main(void *p)
{
	struct slow *s = p;

	s->id = keel_self();
	event_set(&s->ready_evt);
	while (keel_serve(KEEL_FOREVER) != -ESHUTDOWN)
		;
	return NULL;
}

static void slow_start(struct slow *s)
{
	memset(s, 0, sizeof *s);
	event_init(&s->release);
	event_init(&s->busy);
	event_init(&s->ready_evt);
	s->th = harness_thread(slow_main, s);
	event_wait(&s->ready_evt);
}

static void incr_stack_value(void *p)
{
	/* p points into a caller's stack frame that may be gone: if this
	 * ever ran after keel_call returned, ASan would report it. */
	++*(volatile int *)p;
}

static __attribute__((noinline)) int call_with_stack_arg(keel_task_t target,
							 keel_time_t deadline)
{
	int on_stack = 0;
	int rc = keel_call(target, incr_stack_value, &on_stack, deadline);

	CHECK_EQ(*(volatile int *)&on_stack, rc == 0 ? 1 : 0);
	return rc;
}

static void close_self(void *p)
{
	(void)p;
	CHECK_OK(keel_mailbox_close());
}

TEST(call_timeout_with_stack_arg_never_runs_later)
{
	struct slow s;

	slow_start(&s);
	CHECK_OK(keel_post(s.id, slow_block, NULL, &s));
	event_wait(&s.busy);
	/* The target is stuck in slow_block: the call cannot start. */
	CHECK_RC(call_with_stack_arg(s.id, keel_after(KEEL_MS(20))),
		 -ETIMEDOUT);
	CHECK_RC(call_with_stack_arg(s.id, 0), -ETIMEDOUT);
	/* Reuse the stack where the abandoned calls' arg lived. */
	{
		char scrub[512];

		memset(scrub, 0x5a, sizeof scrub);
		__asm__ __volatile__("" : : "r"(scrub) : "memory");
	}
	/* Let the target go on: it meets the abandoned records and must
	 * skip them; then a good call goes through. */
	event_set(&s.release);
	CHECK_RC(call_with_stack_arg(s.id, KEEL_FOREVER), 0);
	CHECK_OK(keel_post(s.id, close_self, NULL, NULL));
	harness_join(s.th);
}

TEST(call_target_closes_first)
{
	struct slow s;
	int x = 0;

	slow_start(&s);
	CHECK_OK(keel_post(s.id, slow_block, NULL, &s));
	CHECK_OK(keel_post(s.id, close_self, NULL, NULL));
	event_wait(&s.busy);
	event_set(&s.release);
	/* Queued behind close_self, or refused once it closed. */
	{
		int rc = keel_call(s.id, incr_stack_value, &x, KEEL_FOREVER);

		CHECK(rc == -ESHUTDOWN || rc == -ESRCH);
	}
	harness_join(s.th);
	CHECK_EQ(x, 0);
	CHECK_RC(keel_call(s.id, incr_stack_value, &x, KEEL_FOREVER), -ESRCH);
}

static void exit_inside(void *p)
{
	(void)p;
	pthread_exit(NULL);
}

struct close_inside {
	int ran;
	keel_task_t target;
};

static void work_that_closes(void *p)
{
	struct close_inside *c = p;

	c->ran++;
	CHECK_OK(keel_mailbox_close());
	/* Closing from inside does not end this work: it goes on. */
	c->ran++;
}

static void must_not_run(void *p)
{
	(void)p;
	harness_fail(__FILE__, __LINE__, "work ran on an ended task");
}

TEST(call_whose_work_closes_the_target)
{
	struct server s;
	struct close_inside c = {0, 0};

	server_start(&s);
	CHECK_OK(keel_call(s.id, work_that_closes, &c, KEEL_FOREVER));
	CHECK_EQ(c.ran, 2);
	harness_join(s.th); /* its serve loop saw -ESHUTDOWN */
	/* Reuse records freely now: nothing may still touch the call's. */
	for (int i = 0; i < 100; i++)
		CHECK_RC(keel_post(s.id, must_not_run, NULL, NULL), -ESRCH);
}

TEST(call_target_thread_exits_inside_work)
{
	struct server s;

	server_start(&s);
	CHECK_RC(keel_call(s.id, exit_inside, NULL, KEEL_FOREVER), -ESHUTDOWN);
	harness_join(s.th);
}

/* A target whose thread exits in the middle of a drain: the calls queued
 * behind the message that exits are cancelled (-ESHUTDOWN) as the thread
 * ends; none is left waiting, none runs. */
struct exit_mid_drain {
	keel_task_t id;
	pthread_t th;
	harness_event ready, inside, go;
	atomic_int ran;
};

static void wait_then_exit(void *p)
{
	struct exit_mid_drain *x = p;

	event_set(&x->inside);
	event_wait(&x->go);
	pthread_exit(NULL);
}

static void count_ran(void *p)
{
	atomic_fetch_add(&((struct exit_mid_drain *)p)->ran, 1);
}

static void *drain_server(void *p)
{
	struct exit_mid_drain *x = p;

	x->id = keel_self();
	/* A limit no call reaches: only so that the queue is counted. */
	CHECK_OK(keel_mailbox_limit(1u << 20));
	event_set(&x->ready);
	for (;;)
		CHECK_INT(keel_serve(KEEL_FOREVER), >=, 1);
}

static void *sync_caller(void *p)
{
	struct exit_mid_drain *x = p;

	CHECK_RC(keel_call(x->id, count_ran, x, KEEL_FOREVER), -ESHUTDOWN);
	return NULL;
}

TEST(calls_queued_behind_a_thread_exit_are_cancelled)
{
	enum { NCALLERS = 4 };
	struct exit_mid_drain x;
	pthread_t callers[NCALLERS];
	struct keel__task *slot;

	memset(&x, 0, sizeof x);
	event_init(&x.ready);
	event_init(&x.inside);
	event_init(&x.go);
	x.th = harness_thread(drain_server, &x);
	event_wait(&x.ready);
	slot = keel__task_slot(x.id);
	CHECK_OK(keel_post(x.id, wait_then_exit, NULL, &x));
	/* Popped (its place given back) and running: from now on the
	 * places counted are the calls'. Without this wait, a count of
	 * NCALLERS could include the post and leave a call unsent until
	 * after the thread ended (-ESRCH, seen once in CI). */
	event_wait(&x.inside);
	for (int i = 0; i < NCALLERS; i++)
		callers[i] = harness_thread(sync_caller, &x);
	/* Every call queued (the low half of mb_queued counts places). */
	while ((atomic_load(&slot->mb_queued) & 0xffffffffu) < NCALLERS)
		sched_yield();
	event_set(&x.go);
	for (int i = 0; i < NCALLERS; i++)
		harness_join(callers[i]);
	harness_join(x.th);
	CHECK_EQ(atomic_load(&x.ran), 0);
}

static void *cancel_later(void *p)
{
	keel_task_t *who = p;

	CHECK_OK(keel__task_cancel(*who, 1));
	return NULL;
}

TEST(call_cancelled_while_queued)
{
	struct slow s;
	keel_task_t me = keel_self();
	pthread_t th;

	slow_start(&s);
	CHECK_OK(keel_post(s.id, slow_block, NULL, &s));
	event_wait(&s.busy);
	th = harness_thread(cancel_later, &me);
	CHECK_RC(call_with_stack_arg(s.id, KEEL_FOREVER), -ECANCELED);
	harness_join(th);
	event_set(&s.release);
	CHECK_OK(keel_post(s.id, close_self, NULL, NULL));
	harness_join(s.th);
}

struct late {
	keel_time_t deadline;
	atomic_int started_in_time, ran;
};

static void outlive_deadline(void *p)
{
	struct late *l = p;

	atomic_store(&l->started_in_time, keel_now() < l->deadline);
	/* Wait for time itself to pass the caller's deadline. */
	while (keel_now() <= l->deadline)
		;
	atomic_store(&l->ran, 1);
}

/* The case needs the target to take the call before its deadline, which
 * a loaded machine may not grant within any fixed time: so each round
 * checks the contract for whichever order happened, and the deadline
 * doubles until the target was in time once. */
TEST(call_deadline_does_not_cut_running_work)
{
	struct server s;
	int in_time = 0;

	server_start(&s);
	for (keel_time_t d = KEEL_MS(5); !in_time; d *= 2) {
		struct late l = {0};
		int rc;

		CHECK_INT(d, <=, KEEL_SEC(10));
		l.deadline = keel_after(d);
		rc = keel_call(s.id, outlive_deadline, &l, l.deadline);
		if (rc == -ETIMEDOUT) {
			/* Given up while still queued: it never runs. A
			 * round trip through the same queue proves it. */
			CHECK_OK(keel_call(s.id, record_thread,
					   &(struct on_thread){0},
					   KEEL_FOREVER));
			CHECK_EQ(atomic_load(&l.ran), 0);
			continue;
		}
		/* Taken in time: it ran to the end, past the deadline. */
		CHECK_OK(rc);
		CHECK_EQ(atomic_load(&l.ran), 1);
		CHECK(keel_now() > l.deadline);
		in_time = atomic_load(&l.started_in_time);
	}
	server_stop(&s);
}

/* ---- keel_call_then ---- */

struct then_probe {
	pthread_t caller;
	atomic_int work, done, cancel, done_elsewhere, cancel_elsewhere;
};

static void probe_work(void *p)
{
	atomic_fetch_add(&((struct then_probe *)p)->work, 1);
	log_add(&lg, "work");
}

static void probe_done(void *p)
{
	struct then_probe *t = p;

	if (!pthread_equal(pthread_self(), t->caller))
		atomic_fetch_add(&t->done_elsewhere, 1);
	atomic_fetch_add(&t->done, 1);
	log_add(&lg, "done");
}

static void probe_cancel(void *p)
{
	struct then_probe *t = p;

	if (!pthread_equal(pthread_self(), t->caller))
		atomic_fetch_add(&t->cancel_elsewhere, 1);
	atomic_fetch_add(&t->cancel, 1);
	log_add(&lg, "cancel");
}

TEST(call_then_done_on_the_caller)
{
	struct server s;
	struct then_probe p;

	memset(&p, 0, sizeof p);
	log_init(&lg);
	p.caller = pthread_self();
	server_start(&s);
	CHECK_OK(keel_call_then(s.id, probe_work, probe_done, probe_cancel,
				&p));
	while (atomic_load(&p.done) == 0)
		CHECK_INT(keel_serve(KEEL_FOREVER), >=, 1);
	server_stop(&s);
	CHECK_LOG(&lg, "work done");
	CHECK_EQ(p.done_elsewhere, 0);
	CHECK_EQ(p.cancel, 0);
	/* Nothing else is owed: closing runs nothing more. */
	CHECK_OK(keel_mailbox_close());
	CHECK_EQ(p.cancel, 0);
}

TEST(call_then_to_self)
{
	struct then_probe p;

	memset(&p, 0, sizeof p);
	log_init(&lg);
	p.caller = pthread_self();
	CHECK_OK(keel_call_then(keel_self(), probe_work, probe_done,
				probe_cancel, &p));
	CHECK_EQ(keel_serve(0), 2);
	CHECK_LOG(&lg, "work done");
}

static void probe_work_and_close(void *p)
{
	probe_work(p);
	CHECK_OK(keel_mailbox_close());
}

TEST(call_then_whose_work_closes_the_target)
{
	struct server s;
	struct then_probe p;

	memset(&p, 0, sizeof p);
	log_init(&lg);
	p.caller = pthread_self();
	server_start(&s);
	CHECK_OK(keel_call_then(s.id, probe_work_and_close, probe_done,
				probe_cancel, &p));
	harness_join(s.th);
	CHECK_EQ(keel_serve(KEEL_FOREVER), 1);
	CHECK_LOG(&lg, "work done");
	CHECK_EQ(p.cancel, 0);
	CHECK_RC(keel_serve(0), -ETIMEDOUT);
}

TEST(call_then_target_ends_first)
{
	struct slow s;
	struct then_probe p;

	memset(&p, 0, sizeof p);
	log_init(&lg);
	p.caller = pthread_self();
	slow_start(&s);
	CHECK_OK(keel_post(s.id, slow_block, NULL, &s));
	CHECK_OK(keel_post(s.id, close_self, NULL, NULL));
	event_wait(&s.busy);
	/* Queued behind close_self: the target cancels it. */
	CHECK_OK(keel_call_then(s.id, probe_work, probe_done, probe_cancel,
				&p));
	event_set(&s.release);
	harness_join(s.th);
	/* The cancel is delivered through the caller's mailbox. */
	CHECK_EQ(atomic_load(&p.cancel), 0);
	CHECK_EQ(keel_serve(0), 1);
	CHECK_LOG(&lg, "cancel");
	CHECK_EQ(p.cancel_elsewhere, 0);
	CHECK_EQ(p.work + p.done, 0);
}

/* The caller is a thread of its own here, so it can end. */
struct caller_ends {
	keel_task_t target;
	struct then_probe p;
	harness_event sent;
	int close_early;
};

static void *then_and_exit(void *arg)
{
	struct caller_ends *c = arg;

	c->p.caller = pthread_self();
	CHECK_OK(keel_call_then(c->target, probe_work, probe_done, probe_cancel,
				&c->p));
	event_set(&c->sent);
	if (c->close_early)
		CHECK_OK(keel_mailbox_close());
	/* Otherwise thread exit closes the mailbox. */
	return NULL;
}

TEST(call_then_caller_ends_before_work_runs)
{
	struct slow s;
	struct caller_ends c;
	pthread_t th;

	memset(&c, 0, sizeof c);
	log_init(&lg);
	event_init(&c.sent);
	slow_start(&s);
	CHECK_OK(keel_post(s.id, slow_block, NULL, &s));
	event_wait(&s.busy);
	c.target = s.id;
	th = harness_thread(then_and_exit, &c);
	harness_join(th);
	/* The caller ended with its request still queued: its close ran
	 * cancel, and the work will never run. */
	CHECK_LOG(&lg, "cancel");
	CHECK_EQ(c.p.cancel_elsewhere, 0);
	event_set(&s.release);
	CHECK_OK(keel_post(s.id, close_self, NULL, NULL));
	harness_join(s.th);
	CHECK_EQ(c.p.work + c.p.done, 0);
	CHECK_EQ(c.p.cancel, 1);
}

TEST(call_then_caller_ends_while_work_runs)
{
	struct server s;
	struct caller_ends c;
	pthread_t th;

	/* The caller closes (explicitly) right after sending; the work may
	 * be queued, running, or done with its reply refused; in every case
	 * exactly one of done/cancel runs on the caller, and never done,
	 * since the caller closed before it served anything. */
	for (int round = 0; round < 200; round++) {
		memset(&c, 0, sizeof c);
		log_init(&lg);
		event_init(&c.sent);
		c.close_early = 1;
		server_start(&s);
		c.target = s.id;
		th = harness_thread(then_and_exit, &c);
		harness_join(th);
		server_stop(&s);
		CHECK_EQ(c.p.cancel, 1);
		CHECK_EQ(c.p.done, 0);
		CHECK_EQ(c.p.cancel_elsewhere, 0);
		CHECK_INT(c.p.work, <=, 1);
		if (c.p.work)
			CHECK_LOG(&lg, "work cancel");
		else
			CHECK_LOG(&lg, "cancel");
	}
}

TEST(call_then_bad_input)
{
	struct then_probe p;

	memset(&p, 0, sizeof p);
	CHECK_RC(keel_call_then(keel_self(), NULL, probe_done, probe_cancel,
				&p),
		 -EINVAL);
	CHECK_RC(keel_call_then(KEEL_TASK_NONE, probe_work, probe_done,
				probe_cancel, &p),
		 -ESRCH);
	CHECK_RC(keel_call_then_ctx(keel_self(), NULL, probe_done, probe_cancel,
				    &p),
		 -EINVAL);
	CHECK_OK(keel_mailbox_close());
	/* A closed caller could never receive the reply. */
	CHECK_RC(keel_call_then(keel_self(), probe_work, probe_done,
				probe_cancel, &p),
		 -ESHUTDOWN);
	CHECK_EQ(p.work + p.done + p.cancel, 0);
}

/* ---- The _ctx variants ---- */

static keel_ctx_t *_Atomic held_ctx;
static harness_event ctx_taken;

static void keep_ctx(keel_ctx_t *ctx, void *p)
{
	(void)p;
	atomic_store(&held_ctx, ctx);
	event_set(&ctx_taken);
}

static void *finish_held(void *p)
{
	(void)p;
	event_wait(&ctx_taken);
	CHECK_OK(keel_ctx_finish(atomic_load(&held_ctx)));
	return NULL;
}

TEST(call_ctx_finished_later_from_another_thread)
{
	struct server s;
	pthread_t th;

	event_init(&ctx_taken);
	server_start(&s);
	th = harness_thread(finish_held, NULL);
	CHECK_OK(keel_call_ctx(s.id, keep_ctx, NULL, KEEL_FOREVER));
	harness_join(th);
	/* Finishing twice is refused. */
	CHECK_RC(keel_ctx_finish(atomic_load(&held_ctx)), -ESTALE);
	server_stop(&s);
}

static void finish_at_once(keel_ctx_t *ctx, void *p)
{
	++*(int *)p;
	CHECK_OK(keel_ctx_finish(ctx));
	CHECK_RC(keel_ctx_finish(ctx), -ESTALE);
}

TEST(call_ctx_finished_inside_work)
{
	struct server s;
	int n = 0;

	server_start(&s);
	for (int i = 0; i < 50; i++)
		CHECK_OK(keel_call_ctx(s.id, finish_at_once, &n, KEEL_FOREVER));
	CHECK_EQ(n, 50);
	server_stop(&s);
}

/* More ctx calls than 2^16 through one record (a caller's records are
 * reused last-freed first): the first call's ctx, long finished, is
 * refused in every later call and never finishes the call in flight,
 * whatever the width of a pointer. */
struct stale_ctx {
	keel_ctx_t *stale;
	int calls;
};

static void finish_after_stale(keel_ctx_t *ctx, void *p)
{
	struct stale_ctx *st = p;

	st->calls++;
	if (!st->stale) {
		st->stale = ctx;
		CHECK_OK(keel_ctx_finish(ctx));
		return;
	}
	CHECK(ctx != st->stale);
	CHECK_RC(keel_ctx_finish(st->stale), -ESTALE);
	CHECK_OK(keel_ctx_finish(ctx));
}

TEST(stale_ctx_never_finishes_a_later_call)
{
	enum { CALLS = (1 << 16) + 1000 };
	struct stale_ctx st = {NULL, 0};
	struct server s;

	server_start(&s);
	for (int i = 0; i < CALLS; i++)
		CHECK_OK(keel_call_ctx(s.id, finish_after_stale, &st,
				       KEEL_FOREVER));
	CHECK_EQ(st.calls, CALLS);
	server_stop(&s);
	CHECK_RC(keel_ctx_finish(st.stale), -ESTALE);
}

TEST(call_ctx_target_ends_unfinished)
{
	struct server s;

	event_init(&ctx_taken);
	server_start(&s);
	/* The work keeps its ctx; then the target closes: the call is
	 * cancelled, and a late finish is refused. */
	CHECK_OK(keel_post(s.id, close_self, NULL, NULL)); /* after the ctx */
	{
		int rc = keel_call_ctx(s.id, keep_ctx, NULL, KEEL_FOREVER);

		/* Either queued behind the close (refused or cancelled) or
		 * run before it and then cancelled as in flight. */
		CHECK(rc == -ESHUTDOWN || rc == -ESRCH);
	}
	harness_join(s.th);
	if (event_is_set(&ctx_taken))
		CHECK_RC(keel_ctx_finish(atomic_load(&held_ctx)), -ESTALE);
}

static void keep_ctx_then_close(keel_ctx_t *ctx, void *p)
{
	keep_ctx(ctx, p);
	CHECK_OK(keel_mailbox_close());
}

TEST(call_ctx_in_flight_when_target_closes)
{
	struct server s;

	event_init(&ctx_taken);
	server_start(&s);
	CHECK_RC(keel_call_ctx(s.id, keep_ctx_then_close, NULL, KEEL_FOREVER),
		 -ESHUTDOWN);
	harness_join(s.th);
	CHECK(event_is_set(&ctx_taken));
	CHECK_RC(keel_ctx_finish(atomic_load(&held_ctx)), -ESTALE);
}

/* A target that closes its mailbox, then stays alive until released. */
struct lingering {
	keel_task_t id;
	pthread_t th;
	harness_event ready, closed, release;
};

static void keep_ctx_close_and_signal(keel_ctx_t *ctx, void *p)
{
	struct lingering *l = p;

	atomic_store(&held_ctx, ctx);
	CHECK_OK(keel_mailbox_close());
	event_set(&l->closed);
}

static void *linger_main(void *p)
{
	struct lingering *l = p;

	l->id = keel_self();
	event_set(&l->ready);
	CHECK_RC(keel_serve(KEEL_FOREVER), 1);
	CHECK_RC(keel_serve(KEEL_FOREVER), -ESHUTDOWN);
	event_wait(&l->release);
	return NULL;
}

static void *finish_after_close(void *p)
{
	struct lingering *l = p;

	event_wait(&l->closed);
	CHECK_OK(keel_ctx_finish(atomic_load(&held_ctx)));
	return NULL;
}

TEST(call_ctx_in_flight_survives_an_explicit_close)
{
	struct lingering l;
	pthread_t fin;

	event_init(&l.ready);
	event_init(&l.closed);
	event_init(&l.release);
	l.th = harness_thread(linger_main, &l);
	event_wait(&l.ready);
	fin = harness_thread(finish_after_close, &l);
	/* The target closed while the ctx was in flight, but it has not
	 * ended: the finish still completes the call. */
	CHECK_OK(keel_call_ctx(l.id, keep_ctx_close_and_signal, &l,
			       KEEL_FOREVER));
	harness_join(fin);
	event_set(&l.release);
	harness_join(l.th);
}

TEST(ctx_finish_bad_input)
{
	CHECK_RC(keel_ctx_finish(NULL), -EINVAL);
	/* An index far past every record made. */
	CHECK_RC(keel_ctx_finish((keel_ctx_t *)(uintptr_t)0xfffff0), -EINVAL);
}

struct ctx_then {
	struct then_probe p;
	keel_ctx_t *_Atomic ctx;
	harness_event taken;
};

static void then_keep_ctx(keel_ctx_t *ctx, void *arg)
{
	struct ctx_then *c = arg;

	atomic_fetch_add(&c->p.work, 1);
	atomic_store(&c->ctx, ctx);
	event_set(&c->taken);
}

TEST(call_then_ctx_done_after_finish)
{
	struct server s;
	struct ctx_then c;

	memset(&c, 0, sizeof c);
	log_init(&lg);
	event_init(&c.taken);
	c.p.caller = pthread_self();
	server_start(&s);
	CHECK_OK(keel_call_then_ctx(s.id, then_keep_ctx, probe_done,
				    probe_cancel, &c.p));
	event_wait(&c.taken);
	/* Not finished yet: nothing is delivered. */
	CHECK_RC(keel_serve(0), -ETIMEDOUT);
	CHECK_OK(keel_ctx_finish(atomic_load(&c.ctx)));
	CHECK_EQ(keel_serve(KEEL_FOREVER), 1);
	CHECK_LOG(&lg, "done");
	CHECK_EQ(c.p.cancel, 0);
	CHECK_RC(keel_ctx_finish(atomic_load(&c.ctx)), -ESTALE);
	server_stop(&s);
}

TEST(call_then_ctx_cancelled_when_target_ends)
{
	struct server s;
	struct ctx_then c;

	memset(&c, 0, sizeof c);
	log_init(&lg);
	event_init(&c.taken);
	c.p.caller = pthread_self();
	server_start(&s);
	CHECK_OK(keel_call_then_ctx(s.id, then_keep_ctx, probe_done,
				    probe_cancel, &c.p));
	event_wait(&c.taken);
	server_stop(&s); /* the target ends with the ctx in flight */
	CHECK_EQ(keel_serve(KEEL_FOREVER), 1);
	CHECK_LOG(&lg, "cancel");
	CHECK_EQ(c.p.done, 0);
	CHECK_RC(keel_ctx_finish(atomic_load(&c.ctx)), -ESTALE);
}

struct caller_ctx {
	keel_task_t target;
	struct ctx_then c;
};

static void *then_ctx_and_exit(void *arg)
{
	struct caller_ctx *cc = arg;

	cc->c.p.caller = pthread_self();
	CHECK_OK(keel_call_then_ctx(cc->target, then_keep_ctx, probe_done,
				    probe_cancel, &cc->c.p));
	/* Once the work holds the ctx, exit: the close must wait for the
	 * finish (arg must outlive the work), then run cancel. */
	event_wait(&cc->c.taken);
	return NULL;
}

static void *finish_when_taken(void *arg)
{
	struct ctx_then *c = arg;

	event_wait(&c->taken);
	CHECK_OK(keel_ctx_finish(atomic_load(&c->ctx)));
	return NULL;
}

TEST(call_then_ctx_caller_ends_while_in_flight)
{
	struct server s;
	struct caller_ctx cc;
	pthread_t th, fin;

	memset(&cc, 0, sizeof cc);
	log_init(&lg);
	event_init(&cc.c.taken);
	server_start(&s);
	cc.target = s.id;
	fin = harness_thread(finish_when_taken, &cc.c);
	th = harness_thread(then_ctx_and_exit, &cc);
	harness_join(th);
	harness_join(fin);
	/* The caller ended before done could be delivered: cancel ran on
	 * it, after the finish. */
	CHECK_LOG(&lg, "cancel");
	CHECK_EQ(cc.c.p.cancel, 1);
	CHECK_EQ(cc.c.p.done, 0);
	CHECK_EQ(cc.c.p.cancel_elsewhere, 0);
	server_stop(&s);
}

static void own_ctx_kept(keel_ctx_t *ctx, void *p)
{
	struct ctx_then *c = p;

	atomic_fetch_add(&c->p.work, 1);
	atomic_store(&c->ctx, ctx);
}

TEST(call_then_ctx_to_self_then_close)
{
	struct ctx_then c;

	memset(&c, 0, sizeof c);
	log_init(&lg);
	c.p.caller = pthread_self();
	CHECK_OK(keel_call_then_ctx(keel_self(), own_ctx_kept, probe_done,
				    probe_cancel, &c));
	CHECK_EQ(keel_serve(0), 1); /* the work ran and kept its ctx */
	/* Its reply could never be delivered once closed: cancelled, and the
	 * close does not wait for itself. */
	CHECK_OK(keel_mailbox_close());
	CHECK_LOG(&lg, "cancel");
	CHECK_RC(keel_ctx_finish(atomic_load(&c.ctx)), -ESTALE);
}
