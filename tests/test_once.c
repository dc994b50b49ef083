/*
 * test_once.c: the reclaimable once: one init, owners that die four ways,
 * a hung owner and its stale publish, the clobber window, bounded waits,
 * recursion, failure, fork, ranks, and the shared variant in one process.
 *
 * Deadlines in these tests are long (a minute) where the point is that
 * something happens before them, and short (tens of milliseconds) only
 * where a test waits them out on purpose.
 */
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <sched.h>

#include "harness.h"
#include "internal.h"

#if defined(__SANITIZE_THREAD__)
#define UNDER_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define UNDER_TSAN 1
#endif
#endif

static const keel_once_opts patient = {.deadline = KEEL_SEC(60)};

/* What init saw, and when. */
struct seen {
	_Atomic int inits;
	_Atomic int prev_died;
	_Atomic int64_t at;
	_Atomic uint64_t gen;
};

/* A value worth publishing: 4-aligned, recognisable. */
static int values[8];
#define VALUE(i) ((void *)&values[i])

/* ---- The basics ---- */

static _Atomic int plain_inits;

static int plain_init(keel_claim_t *c, void *arg)
{
	atomic_fetch_add(&plain_inits, 1);
	CHECK(keel_claim_is_current(c));
	CHECK_EQ(keel_claim_generation(c), 1);
	CHECK(!keel_claim_prev_owner_died(c));
	CHECK_OK(keel_claim_publish(c, arg));
	CHECK(!keel_claim_is_current(c));
	CHECK_RC(keel_claim_publish(c, arg), -EALREADY);
	return 0;
}

TEST(first_call_runs_init_and_later_calls_read_the_value)
{
	static keel_once_t o = KEEL_ONCE_INIT;
	void *v = NULL;

	CHECK(keel_once_value(&o) == NULL);
	CHECK_OK(keel_once(&o, plain_init, VALUE(0), NULL, &v));
	CHECK(v == VALUE(0));
	CHECK(keel_once_value(&o) == VALUE(0));
	CHECK_OK(keel_once(&o, plain_init, VALUE(1), NULL, &v));
	CHECK(v == VALUE(0));
	CHECK_EQ(atomic_load(&plain_inits), 1);
}

static int publish_odd(keel_claim_t *c, void *arg)
{
	(void)arg;
	CHECK_RC(keel_claim_publish(c, NULL), -EINVAL);
	/* A 64-bit pointer with its top bit set would read as a negative
	 * word (32-bit pointers are published whatever their top bit:
	 * top_bit_pointer_published_on_32_bit_targets). */
	if (sizeof(void *) == 8)
		CHECK_RC(keel_claim_publish(c, (void *)(uintptr_t)(UINT64_C(1) << 63 |
								    0x1000)),
			 -EINVAL);
	CHECK_RC(keel_claim_publish_handle(c, 7), -EINVAL);
	CHECK(keel_claim_is_current(c)); /* the refusals changed nothing */
	/* Any other pointer, aligned or not. */
	return keel_claim_publish(c, (char *)VALUE(0) + 1);
}

/* On a 32-bit target, pointers from 0x80000000 up are ordinary (the
 * stack of a 32-bit process on a 64-bit kernel is up there): the once
 * publishes them and gives them back unchanged. */
#define HIGH_POINTER ((void *)(uintptr_t)0x80001230u)

static int publish_high(keel_claim_t *c, void *arg)
{
	(void)arg;
	return keel_claim_publish(c, HIGH_POINTER);
}

TEST(top_bit_pointer_published_on_32_bit_targets)
{
	static keel_once_t o = KEEL_ONCE_INIT;
	void *v = NULL;

	if (sizeof(void *) != 4)
		harness_skip("needs 32-bit pointers");
	CHECK_OK(keel_once(&o, publish_high, NULL, NULL, &v));
	CHECK(v == HIGH_POINTER);
	CHECK(keel_once_value(&o) == HIGH_POINTER);
	CHECK_OK(keel_once(&o, plain_init, NULL, NULL, &v));
	CHECK(v == HIGH_POINTER);
}

static int returns_without_publishing(keel_claim_t *c, void *arg)
{
	(void)c;
	(void)arg;
	return 0;
}

TEST(bad_arguments_are_refused)
{
	static keel_once_t o = KEEL_ONCE_INIT;
	keel_once_opts bad;
	void *v = VALUE(3);

	CHECK_RC(keel_once(NULL, plain_init, NULL, NULL, &v), -EINVAL);
	CHECK_RC(keel_once(&o, NULL, NULL, NULL, &v), -EINVAL);
	bad = (keel_once_opts){.deadline = KEEL_SEC(2), .max_wait = KEEL_SEC(1)};
	CHECK_RC(keel_once(&o, plain_init, NULL, &bad, &v), -EINVAL);
	bad = (keel_once_opts){.deadline = -1};
	CHECK_RC(keel_once(&o, plain_init, NULL, &bad, &v), -EINVAL);
	bad = (keel_once_opts){.flags = 0x100};
	CHECK_RC(keel_once(&o, plain_init, NULL, &bad, &v), -EINVAL);
	bad = (keel_once_opts){.level = KEEL_LEVEL_MAX + 1};
	CHECK_RC(keel_once(&o, plain_init, NULL, &bad, &v), -EINVAL);
	CHECK(v == VALUE(3)); /* untouched by the refusals */
	CHECK_RC(keel_claim_publish(NULL, NULL), -EINVAL);
	/* An init that forgets to publish: its caller hears of it. */
	CHECK_RC(keel_once(&o, returns_without_publishing, NULL, NULL, &v),
		 -EPROTO);
	/* NULL and top-bit pointers are refused; odd pointers are fine. */
	CHECK_OK(keel_once(&o, publish_odd, NULL, NULL, &v));
	CHECK(v == (char *)VALUE(0) + 1);
	CHECK(keel_once_value(&o) == v);
}

static int plain_publish_arg(keel_claim_t *c, void *arg)
{
	return keel_claim_publish(c, arg);
}

static int publishes_five(keel_claim_t *c, void *arg)
{
	(void)arg;
	return keel_claim_publish_handle(c, 5);
}

/* The header promises -EINVAL for a NULL init or invalid opts: on a once
 * that is done already too, where the value is at hand. (The inlined
 * keel_once_value() stays a bare load; keel_once() checks.) */
TEST(bad_arguments_are_refused_once_done_too)
{
	static keel_once_t o = KEEL_ONCE_INIT;
	static keel_once_shared_t so;
	keel_once_opts bad;
	uint64_t h = 7;
	void *v = NULL;

	CHECK_OK(keel_once(&o, plain_publish_arg, VALUE(6), NULL, &v));
	CHECK(v == VALUE(6));
	v = VALUE(3);
	CHECK_RC(keel_once(&o, NULL, NULL, NULL, &v), -EINVAL);
	bad = (keel_once_opts){.deadline = KEEL_SEC(2), .max_wait = KEEL_SEC(1)};
	CHECK_RC(keel_once(&o, plain_publish_arg, NULL, &bad, &v), -EINVAL);
	bad = (keel_once_opts){.deadline = -1};
	CHECK_RC(keel_once(&o, plain_publish_arg, NULL, &bad, &v), -EINVAL);
	bad = (keel_once_opts){.flags = 0x100};
	CHECK_RC(keel_once(&o, plain_publish_arg, NULL, &bad, &v), -EINVAL);
	bad = (keel_once_opts){.level = KEEL_LEVEL_MAX + 1};
	CHECK_RC(keel_once(&o, plain_publish_arg, NULL, &bad, &v), -EINVAL);
	CHECK(v == VALUE(3)); /* untouched by the refusals */
	CHECK(keel_once_value(&o) == VALUE(6));
	/* The same for a shared once. */
	CHECK_OK(keel_once_shared_init(&so));
	CHECK_OK(keel_once_shared(&so, publishes_five, NULL, NULL, &h));
	CHECK_EQ(h, 5);
	h = 7;
	CHECK_RC(keel_once_shared(&so, NULL, NULL, NULL, &h), -EINVAL);
	bad = (keel_once_opts){.max_wait = -1};
	CHECK_RC(keel_once_shared(&so, publishes_five, NULL, &bad, &h), -EINVAL);
	CHECK_EQ(h, 7);
}

/* ---- Failure and recursion ---- */

static struct seen failing;

static int fails_first(keel_claim_t *c, void *arg)
{
	int n = atomic_fetch_add(&failing.inits, 1);

	(void)arg;
	if (n == 0)
		return -EIO;
	atomic_store(&failing.prev_died, keel_claim_prev_owner_died(c));
	atomic_store(&failing.gen, keel_claim_generation(c));
	return keel_claim_publish(c, VALUE(1));
}

TEST(failure_goes_to_its_caller_only_and_the_next_caller_retries)
{
	static keel_once_t o = KEEL_ONCE_INIT;
	void *v = NULL;

	CHECK_RC(keel_once(&o, fails_first, NULL, NULL, &v), -EIO);
	CHECK(v == NULL);
	CHECK(keel_once_value(&o) == NULL);
	CHECK_OK(keel_once(&o, fails_first, NULL, NULL, &v));
	CHECK(v == VALUE(1));
	CHECK_EQ(atomic_load(&failing.inits), 2);
	CHECK_EQ(atomic_load(&failing.prev_died), 0); /* failed, did not die */
	CHECK_EQ(atomic_load(&failing.gen), 2);
}

static keel_once_t recursive = KEEL_ONCE_INIT;
static _Atomic int recursion_rc = 1;

static int calls_itself(keel_claim_t *c, void *arg)
{
	void *v;

	(void)arg;
	atomic_store(&recursion_rc, keel_once(&recursive, calls_itself, NULL,
					      &patient, &v));
	return keel_claim_publish(c, VALUE(2));
}

TEST(recursion_is_edeadlk_at_once)
{
	void *v = NULL;

	CHECK_OK(keel_once(&recursive, calls_itself, NULL, &patient, &v));
	CHECK_EQ(atomic_load(&recursion_rc), -EDEADLK);
	CHECK(v == VALUE(2));
}

/* ---- Owner death, four ways ---- */

struct death {
	keel_once_t o;
	harness_event owning, go;
	int how;
	_Atomic int64_t died_at;
	_Atomic int64_t acted_at; /* the cancel acted on (its cleanup ran) */
	struct seen reclaim;
	harness_event never; /* set by nobody */
	keel_scope_t *scope;
};

/* The cancellation's cleanup: the owner has acted on the cancel. */
static void cancel_acted(void *arg)
{
	struct death *d = arg;

	atomic_store(&d->acted_at, keel_now());
	pthread_mutex_unlock(&d->never.mu);
}

enum { BY_PTHREAD_EXIT, BY_PTHREAD_CANCEL, BY_RAW_EXIT, BY_TASK_CANCEL };

static int dying_init(keel_claim_t *c, void *arg)
{
	struct death *d = arg;

	(void)c;
	event_set(&d->owning);
	switch (d->how) {
	case BY_PTHREAD_EXIT:
		event_wait(&d->go);
		atomic_store(&d->died_at, keel_now());
		pthread_exit(NULL);
	case BY_PTHREAD_CANCEL:
		/* pthread_cond_wait() is a cancellation point, and nothing
		 * signals this one. (Not a read() from an empty pipe: it
		 * returns at once where pipes never block, as Emscripten's.) */
		pthread_mutex_lock(&d->never.mu);
		pthread_cleanup_push(cancel_acted, d);
		while (!d->never.set)
			pthread_cond_wait(&d->never.cv, &d->never.mu);
		pthread_cleanup_pop(1);
		return -EIO;
	case BY_RAW_EXIT:
		event_wait(&d->go);
		atomic_store(&d->died_at, keel_now());
#if HARNESS_HAVE_SYSCALL
		syscall(SYS_exit, 0); /* no cleanup, no unwinding */
#endif
		return -EIO;
	default: /* BY_TASK_CANCEL: a keel wait, ended by cancellation */
		return keel_sleep_until(KEEL_FOREVER);
	}
}

static void *dying_thread(void *arg)
{
	struct death *d = arg;
	void *v;

	keel_once(&d->o, dying_init, d, &patient, &v);
	return NULL;
}

static int dying_task(void *arg)
{
	struct death *d = arg;
	void *v;

	return keel_once(&d->o, dying_init, d, &patient, &v);
}

static int reclaiming_init(keel_claim_t *c, void *arg)
{
	struct death *d = arg;

	atomic_store(&d->reclaim.at, keel_now());
	atomic_fetch_add(&d->reclaim.inits, 1);
	atomic_store(&d->reclaim.prev_died, keel_claim_prev_owner_died(c));
	atomic_store(&d->reclaim.gen, keel_claim_generation(c));
	return keel_claim_publish(c, VALUE(4));
}

static void *waiter_thread(void *arg)
{
	struct death *d = arg;
	void *v = NULL;

	CHECK_OK(keel_once(&d->o, reclaiming_init, d, &patient, &v));
	CHECK(v == VALUE(4));
	return NULL;
}

static void owner_dies(int how)
{
	struct death *d = calloc(1, sizeof *d);
	pthread_t owner = 0, waiter;
	int64_t latency;

	d->how = how;
	event_init(&d->owning);
	event_init(&d->go);
	event_init(&d->never);
	if (how == BY_TASK_CANCEL) {
		CHECK_OK(keel_scope_open(&d->scope, NULL));
		CHECK_OK(keel_spawn(d->scope, dying_task, d, NULL, NULL));
	} else {
		owner = harness_thread(dying_thread, d);
	}
	event_wait(&d->owning);
	waiter = harness_thread(waiter_thread, d);
	switch (how) {
	case BY_PTHREAD_CANCEL:
		atomic_store(&d->died_at, keel_now());
		CHECK_OK(pthread_cancel(owner));
		break;
	case BY_TASK_CANCEL:
		atomic_store(&d->died_at, keel_now());
		CHECK_OK(keel_scope_cancel(d->scope));
		break;
	default:
		event_set(&d->go);
	}
	harness_join(waiter);
	if (how != BY_TASK_CANCEL)
		harness_join(owner); /* a raw exit clears the tid too */
	else
		keel_scope_close(d->scope);
	latency = atomic_load(&d->reclaim.at) - atomic_load(&d->died_at);
	printf("owner death (%d) noticed in %.2f ms (poll interval %.0f ms)\n",
	       how, (double)latency / 1e6, (double)KEEL_ONCE_POLL / 1e6);
	if (how == BY_PTHREAD_CANCEL)
		/* Cancellation is delivered at the owner's next cancellation
		 * point: Emscripten's waits check for it every 100 ms. */
		printf("  of which the cancel took %.2f ms to act, reclaim "
		       "%.2f ms after\n",
		       (double)(atomic_load(&d->acted_at) -
				atomic_load(&d->died_at)) / 1e6,
		       (double)(atomic_load(&d->reclaim.at) -
				atomic_load(&d->acted_at)) / 1e6);
	CHECK_EQ(atomic_load(&d->reclaim.inits), 1);
	CHECK_EQ(atomic_load(&d->reclaim.prev_died), 1);
	CHECK_EQ(atomic_load(&d->reclaim.gen), 2);
	CHECK(keel_once_value(&d->o) == VALUE(4));
	/* Within two poll intervals (plus slack for a loaded machine), and
	 * nowhere near the 60 s deadline. */
	CHECK_INT(latency, <, 2 * KEEL_ONCE_POLL + KEEL_MS(500));
	free(d); /* every thread that used it has ended */
}

TEST(owner_pthread_exit_is_noticed_within_a_poll)
{
	owner_dies(BY_PTHREAD_EXIT);
}

TEST(owner_pthread_cancel_is_noticed_within_a_poll)
{
	owner_dies(BY_PTHREAD_CANCEL);
}

TEST(owner_raw_exit_is_noticed_within_a_poll)
{
	HARNESS_NEED(SYSCALL);
#ifdef UNDER_TSAN
	/* ThreadSanitizer's runtime cannot follow a thread that vanishes
	 * without its exit path. */
	exit(77);
#endif
	owner_dies(BY_RAW_EXIT);
}

/* One waiter at a time (the watch holder) looks at a running owner's
 * lifeline; the others sleep. When the holder stops waiting (here: its
 * task is cancelled) the watch passes to a waiter still there, which then
 * notices the owner's death within a poll, not at the owner's 60 s
 * deadline. (White-box: the test waits for k_watch and for two queued
 * waiters, so the hand-over is what is exercised.) */
static _Atomic int watching_rc = 1;

static int watching_task(void *arg)
{
	struct death *d = arg;
	void *v = NULL;

	atomic_store(&watching_rc,
		     keel_once(&d->o, reclaiming_init, d, &patient, &v));
	return 0;
}

static int queued(keel_once_t *o)
{
	int n = 0;

	keel__qlock(&o->k_qlock);
	for (struct keel__qnode *q = o->k_waitq; q; q = q->next)
		n++;
	keel__qunlock(&o->k_qlock);
	return n;
}

TEST(the_watch_passes_on_when_its_holder_leaves)
{
	struct death *d = calloc(1, sizeof *d);
	keel_scope_t *s;
	pthread_t owner, waiter;
	int64_t latency;

	d->how = BY_PTHREAD_EXIT;
	event_init(&d->owning);
	event_init(&d->go);
	owner = harness_thread(dying_thread, d);
	event_wait(&d->owning);
	CHECK_OK(keel_scope_open(&s, NULL));
	CHECK_OK(keel_spawn(s, watching_task, d, NULL, NULL));
	while (!__atomic_load_n(&d->o.k_watch, __ATOMIC_ACQUIRE))
		sched_yield();
	waiter = harness_thread(waiter_thread, d);
	while (queued(&d->o) < 2)
		sched_yield();
	CHECK_OK(keel_scope_cancel(s));
	CHECK_RC(keel_scope_close(s), -ECANCELED);
	CHECK_EQ(atomic_load(&watching_rc), -ECANCELED);
	atomic_store(&d->died_at, keel_now());
	event_set(&d->go);
	harness_join(waiter);
	harness_join(owner);
	latency = atomic_load(&d->reclaim.at) - atomic_load(&d->died_at);
	printf("owner death noticed %.2f ms after the watch passed on\n",
	       (double)latency / 1e6);
	CHECK_EQ(atomic_load(&d->reclaim.inits), 1);
	CHECK(keel_once_value(&d->o) == VALUE(4));
	CHECK_INT(latency, <, 2 * KEEL_ONCE_POLL + KEEL_MS(500));
	CHECK_EQ(__atomic_load_n(&d->o.k_watch, __ATOMIC_ACQUIRE), 0);
	free(d);
}

TEST(owner_task_cancelled_frees_the_claim_at_once)
{
	owner_dies(BY_TASK_CANCEL);
}

/* A thread that ends leaves its stack and thread-local storage to the next
 * thread created (glibc caches thread stacks; Emscripten reuses malloc'd
 * TLS the same way). A new thread that finds a dead owner's claim is not
 * that owner, whatever addresses they share: it must take over, not be
 * refused with -EDEADLK. */
static _Thread_local char tls_mark;

struct reuse {
	keel_once_t o;
	keel_once_shared_t so; /* the same, for a once shared by processes */
	int shared;
	uintptr_t mark[2];
	int rc;
	void *v;
	uint64_t h;
	struct seen reclaim;
};

static int reuse_once(struct reuse *r, keel_init_fn init)
{
	if (r->shared)
		return keel_once_shared(&r->so, init, r, &patient, &r->h);
	return keel_once(&r->o, init, r, &patient, &r->v);
}

static int exits_holding_the_claim(keel_claim_t *c, void *arg)
{
	(void)c;
	(void)arg;
	pthread_exit(NULL);
}

static void *first_owner(void *arg)
{
	struct reuse *r = arg;

	r->mark[0] = (uintptr_t)&tls_mark;
	reuse_once(r, exits_holding_the_claim);
	return NULL; /* not reached: init ends the thread */
}

static int takes_over(keel_claim_t *c, void *arg)
{
	struct reuse *r = arg;

	atomic_fetch_add(&r->reclaim.inits, 1);
	atomic_store(&r->reclaim.prev_died, keel_claim_prev_owner_died(c));
	atomic_store(&r->reclaim.gen, keel_claim_generation(c));
	return r->shared ? keel_claim_publish_handle(c, 5)
			 : keel_claim_publish(c, VALUE(5));
}

static void *next_thread(void *arg)
{
	struct reuse *r = arg;

	r->mark[1] = (uintptr_t)&tls_mark;
	r->rc = reuse_once(r, takes_over);
	return NULL;
}

static void new_thread_takes_over(int shared)
{
	struct reuse *r = calloc(1, sizeof *r);

	r->shared = shared;
	if (shared)
		CHECK_OK(keel_once_shared_init(&r->so));
	/* Joined: its stack (and its thread-local storage) is free for the
	 * next thread. */
	harness_join(harness_thread(first_owner, r));
	harness_join(harness_thread(next_thread, r));
	printf("the second thread %s the dead owner's thread-local storage\n",
	       r->mark[0] == r->mark[1] ? "reused" : "did not reuse");
	fflush(stdout);
	CHECK_OK(r->rc);
	CHECK_EQ(atomic_load(&r->reclaim.inits), 1);
	CHECK_EQ(atomic_load(&r->reclaim.prev_died), 1);
	CHECK_EQ(atomic_load(&r->reclaim.gen), 2);
	if (shared) {
		CHECK_EQ(r->h, 5);
	} else {
		CHECK(r->v == VALUE(5));
		CHECK(keel_once_value(&r->o) == VALUE(5));
	}
	free(r);
}

TEST(a_new_thread_on_a_dead_owners_stack_takes_over)
{
	new_thread_takes_over(0);
}

TEST(a_new_thread_on_a_dead_shared_owners_stack_takes_over)
{
	new_thread_takes_over(1);
}

/* ---- A hung owner, and the clobber window ---- */

struct hang {
	keel_once_t o;
	harness_event a_owning, a_release, a_tried, b_owning, b_release, c_calling;
	_Atomic int inits, teardowns, a_publish_rc;
	_Atomic int b_prev_died;
	void *a_got, *c_got;
	int block_b;
};

static int init_a(keel_claim_t *c, void *arg)
{
	struct hang *h = arg;
	int rc;

	atomic_fetch_add(&h->inits, 1);
	event_set(&h->a_owning);
	event_wait(&h->a_release); /* hung, as far as anyone can tell */
	rc = keel_claim_publish(c, VALUE(5));
	atomic_store(&h->a_publish_rc, rc);
	if (rc == -ESTALE)
		atomic_fetch_add(&h->teardowns, 1); /* tear down what it built */
	event_set(&h->a_tried);
	return rc;
}

static int init_b(keel_claim_t *c, void *arg)
{
	struct hang *h = arg;

	atomic_fetch_add(&h->inits, 1);
	atomic_store(&h->b_prev_died, keel_claim_prev_owner_died(c));
	if (h->block_b) {
		event_set(&h->b_owning);
		event_wait(&h->b_release);
	}
	return keel_claim_publish(c, VALUE(6));
}

static void *thread_a(void *arg)
{
	struct hang *h = arg;

	CHECK_OK(keel_once(&h->o, init_a, h, &patient, &h->a_got));
	return NULL;
}

static void *thread_b(void *arg)
{
	struct hang *h = arg;
	const keel_once_opts quick = {.deadline = KEEL_MS(50),
				      .max_wait = KEEL_SEC(60)};
	void *v = NULL;

	CHECK_OK(keel_once(&h->o, init_b, h, &quick, &v));
	CHECK(v == VALUE(6));
	return NULL;
}

static void *thread_c(void *arg)
{
	struct hang *h = arg;

	event_set(&h->c_calling);
	CHECK_OK(keel_once(&h->o, init_b, h, &patient, &h->c_got));
	return NULL;
}

static struct hang *hang_new(void)
{
	struct hang *h = calloc(1, sizeof *h);

	event_init(&h->a_owning);
	event_init(&h->a_release);
	event_init(&h->a_tried);
	event_init(&h->b_owning);
	event_init(&h->b_release);
	event_init(&h->c_calling);
	return h;
}

TEST(hung_owner_is_reclaimed_at_the_deadline_and_cannot_publish)
{
	struct hang *h = hang_new();
	pthread_t a, b;

	a = harness_thread(thread_a, h);
	event_wait(&h->a_owning);
	b = harness_thread(thread_b, h); /* reclaims after 50 ms */
	harness_join(b);
	CHECK(keel_once_value(&h->o) == VALUE(6));
	CHECK_EQ(atomic_load(&h->b_prev_died), 1);
	event_set(&h->a_release); /* the stale owner wakes up */
	harness_join(a);
	CHECK_EQ(atomic_load(&h->a_publish_rc), -ESTALE);
	CHECK_EQ(atomic_load(&h->teardowns), 1);
	CHECK(h->a_got == VALUE(6)); /* its caller got the winner's value */
	CHECK(keel_once_value(&h->o) == VALUE(6));
	CHECK_EQ(atomic_load(&h->inits), 2);
	free(h);
}

TEST(clobber_window_two_inits_one_value)
{
	struct hang *h = hang_new();
	pthread_t a, b, c;

	h->block_b = 1;
	a = harness_thread(thread_a, h);
	event_wait(&h->a_owning);
	b = harness_thread(thread_b, h);
	event_wait(&h->b_owning); /* the reclaimer is mid-init */
	c = harness_thread(thread_c, h);
	event_wait(&h->c_calling);
	event_set(&h->a_release); /* the stale owner finishes meanwhile */
	event_wait(&h->a_tried);
	CHECK_EQ(atomic_load(&h->a_publish_rc), -ESTALE);
	CHECK_EQ(atomic_load(&h->teardowns), 1);
	CHECK(keel_once_value(&h->o) == NULL); /* nothing clobbered */
	event_set(&h->b_release);
	harness_join(a); /* its caller waited for the winner */
	harness_join(b);
	harness_join(c);
	CHECK_EQ(atomic_load(&h->inits), 2);
	CHECK(h->a_got == VALUE(6));
	CHECK(h->c_got == VALUE(6));
	CHECK(keel_once_value(&h->o) == VALUE(6));
	free(h);
}

/* ---- Bounded waits ---- */

struct bounded {
	keel_once_t o;
	harness_event owning, release, waiting;
	_Atomic int owners;
	int rc;
	int64_t waited;
};

static int hangs_until_released(keel_claim_t *c, void *arg)
{
	struct bounded *b = arg;

	atomic_fetch_add(&b->owners, 1);
	event_set(&b->owning);
	event_wait(&b->release);
	keel_claim_publish(c, VALUE(7));
	return 0;
}

static void *bounded_owner(void *arg)
{
	struct bounded *b = arg;
	const keel_once_opts o = {.deadline = KEEL_MS(1), .max_wait = KEEL_SEC(60)};
	void *v;

	keel_once(&b->o, hangs_until_released, b, &o, &v);
	return NULL;
}

static void *bounded_waiter(void *arg)
{
	struct bounded *b = arg;
	const keel_once_opts o = {.deadline = KEEL_SEC(1), .max_wait = KEEL_SEC(1)};
	int64_t start;
	void *v;

	event_set(&b->waiting);
	start = keel_now();
	b->rc = keel_once(&b->o, hangs_until_released, b, &o, &v);
	b->waited = keel_now() - start;
	return NULL;
}

/* The waiter can never reclaim: a second owner takes over from the first
 * right after the waiter starts, so the current claim is always younger
 * than the waiter's own wait. It gives up at max_wait. */
TEST(waiting_past_max_wait_is_etimedout)
{
	struct bounded *b = calloc(1, sizeof *b);
	pthread_t first, second, waiter;

	event_init(&b->owning);
	event_init(&b->release);
	event_init(&b->waiting);
	first = harness_thread(bounded_owner, b);
	event_wait(&b->owning);
	waiter = harness_thread(bounded_waiter, b);
	event_wait(&b->waiting);
	/* Until it sleeps on the once (so its max_wait counts from before
	 * the second claim): its node in the once's queue says so. */
	while (!__atomic_load_n(&b->o.k_waitq, __ATOMIC_ACQUIRE))
		sched_yield();
	second = harness_thread(bounded_owner, b); /* reclaims at once */
	harness_join(waiter);
	printf("waited %.1f ms for a max_wait of 1000 ms\n",
	       (double)b->waited / 1e6);
	CHECK_EQ(b->rc, -ETIMEDOUT);
	CHECK_EQ(atomic_load(&b->owners), 2);
	CHECK_INT(b->waited, >=, KEEL_SEC(1));
	CHECK_INT(b->waited, <, KEEL_SEC(1) + KEEL_ONCE_POLL + KEEL_MS(500));
	event_set(&b->release);
	harness_join(first);
	harness_join(second);
	free(b);
}

/* ---- Cancellation of a waiter ---- */

struct cwait {
	keel_once_t o;
	harness_event owning, release;
	keel_scope_t *scope;
	_Atomic int waiter_rc;
};

static int blocks(keel_claim_t *c, void *arg)
{
	struct cwait *w = arg;

	event_set(&w->owning);
	event_wait(&w->release);
	return keel_claim_publish(c, VALUE(3));
}

static void *cwait_owner(void *arg)
{
	struct cwait *w = arg;
	void *v;

	keel_once(&w->o, blocks, w, &patient, &v);
	return NULL;
}

static int cwait_waiter(void *arg)
{
	struct cwait *w = arg;
	void *v;

	atomic_store(&w->waiter_rc, keel_once(&w->o, blocks, w, &patient, &v));
	return 0;
}

TEST(waiting_is_a_cancellation_point)
{
	struct cwait *w = calloc(1, sizeof *w);
	pthread_t owner;

	event_init(&w->owning);
	event_init(&w->release);
	atomic_store(&w->waiter_rc, 1);
	owner = harness_thread(cwait_owner, w);
	event_wait(&w->owning);
	CHECK_OK(keel_scope_open(&w->scope, NULL));
	CHECK_OK(keel_spawn(w->scope, cwait_waiter, w, NULL, NULL));
	CHECK_OK(keel_scope_cancel(w->scope));
	keel_scope_close(w->scope);
	CHECK_EQ(atomic_load(&w->waiter_rc), -ECANCELED);
	event_set(&w->release);
	harness_join(owner);
	CHECK(keel_once_value(&w->o) == VALUE(3));
	free(w);
}

/* ---- Fork while another thread owns ---- */

static struct hang forked;

static int child_init(keel_claim_t *c, void *arg)
{
	(void)arg;
	if (!keel_claim_prev_owner_died(c))
		return -EINVAL;
	return keel_claim_publish(c, VALUE(6));
}

TEST(fork_while_another_thread_owns)
{
	HARNESS_NEED(FORK);
	struct hang *h = &forked;
	pthread_t a;
	pid_t pid;
	int status;

	event_init(&h->a_owning);
	event_init(&h->a_release);
	event_init(&h->a_tried);
	a = harness_thread(thread_a, h);
	event_wait(&h->a_owning);
	pid = fork();
	CHECK(pid >= 0);
	if (pid == 0) {
		void *v = NULL;
		int rc = keel_once(&h->o, child_init, NULL, &patient, &v);

		/* The owner's thread is not in this process: reclaimed at
		 * once, by the pid in its record. */
		_exit(rc == 0 && v == VALUE(6) ? 0 : 1);
	}
	CHECK_EQ(waitpid(pid, &status, 0), pid);
	CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
	/* The parent is unaffected: its owner finishes and publishes. */
	CHECK(keel_once_value(&h->o) == NULL);
	event_set(&h->a_release);
	harness_join(a);
	CHECK_EQ(atomic_load(&h->a_publish_rc), 0);
	CHECK(keel_once_value(&h->o) == VALUE(5));
}

/* ---- Ranks ---- */

static keel_mutex_t low = KEEL_MUTEX_INIT(2, "once-test-low");
static keel_mutex_t high = KEEL_MUTEX_INIT(9, "once-test-high");

static int takes_a_lock(keel_claim_t *c, void *arg)
{
	keel_mutex_lock((keel_mutex_t *)arg);
	keel_mutex_unlock((keel_mutex_t *)arg);
	return keel_claim_publish(c, VALUE(0));
}

static int plain_publish(keel_claim_t *c, void *arg)
{
	(void)arg;
	return keel_claim_publish(c, VALUE(1));
}

TEST(a_ranked_once_is_checked_like_a_lock)
{
	static keel_once_t o1 = KEEL_ONCE_INIT, o2 = KEEL_ONCE_INIT;
	const keel_once_opts ranked = {.level = 5, .name = "config-once"};
	harness_capture cap;
	unsigned long before;
	void *v;

	keel_lockcheck_set(KEEL_LOCKCHECK_REPORT);
	before = keel_lockcheck_reports();
	/* Init may take a lower lock: silent. */
	CHECK_OK(keel_once(&o1, takes_a_lock, &low, &ranked, &v));
	CHECK_EQ(keel_lockcheck_reports(), before);
	/* A higher lock inside init, and calling it while holding a lower
	 * lock, are reported. */
	capture_begin(&cap);
	CHECK_OK(keel_once(&o2, takes_a_lock, &high, &ranked, &v));
	capture_end(&cap);
	CHECK_EQ(keel_lockcheck_reports(), before + 1);
	CHECK(strstr(cap.text, "taking 'once-test-high' (level 9)") != NULL);
	CHECK(strstr(cap.text, "while holding 'config-once' (level 5)") != NULL);
	{
		static keel_once_t o3 = KEEL_ONCE_INIT;

		keel_mutex_lock(&low);
		capture_begin(&cap);
		CHECK_OK(keel_once(&o3, plain_publish, NULL, &ranked, &v));
		capture_end(&cap);
		keel_mutex_unlock(&low);
		CHECK(strstr(cap.text, "taking 'config-once' (level 5)") != NULL);
	}
}

/* Two ranked onces are two resources: a rule broken with each is
 * reported for each, even from the same call site (where keel's token
 * for the once's rank sits at the same stack address both times). */
static void ranked_once_under_low(keel_once_t *o)
{
	const keel_once_opts ranked = {.level = 5, .name = "ranked-once"};
	void *v;

	keel_mutex_lock(&low);
	CHECK_OK(keel_once(o, plain_publish, NULL, &ranked, &v));
	keel_mutex_unlock(&low);
}

TEST(two_ranked_onces_are_two_reports)
{
	static keel_once_t a = KEEL_ONCE_INIT, b = KEEL_ONCE_INIT;
	unsigned long before;

	keel_lockcheck_set(KEEL_LOCKCHECK_REPORT);
	before = keel_lockcheck_reports();
	ranked_once_under_low(&a);
	CHECK_EQ(keel_lockcheck_reports() - before, 1);
	ranked_once_under_low(&b);
	CHECK_EQ(keel_lockcheck_reports() - before, 2);
}

/* ---- The shared variant, within one process ---- */

static int publishes_handle(keel_claim_t *c, void *arg)
{
	CHECK_RC(keel_claim_publish(c, VALUE(0)), -EINVAL);
	CHECK_RC(keel_claim_publish_handle(c, (UINT64_C(1) << 63) - 1), -EINVAL);
	return keel_claim_publish_handle(c, (uint64_t)(uintptr_t)arg);
}

TEST(shared_once_publishes_a_handle)
{
	keel_once_shared_t *o = mmap(NULL, sizeof *o, PROT_READ | PROT_WRITE,
				     MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	uint64_t h = 0;

	CHECK(o != MAP_FAILED);
	CHECK_RC(keel_once_shared(o, publishes_handle, TOKEN(42), NULL, &h),
		 -EINVAL); /* not set up */
	CHECK_OK(keel_once_shared_init(o));
	CHECK(!keel_once_shared_value(o, &h));
	CHECK_OK(keel_once_shared(o, publishes_handle, TOKEN(42), NULL, &h));
	CHECK_EQ(h, 42);
	CHECK(keel_once_shared_value(o, &h));
	CHECK_EQ(h, 42);
	CHECK_OK(keel_once_shared(o, publishes_handle, TOKEN(43), NULL, &h));
	CHECK_EQ(h, 42);
	munmap(o, sizeof *o);
}

/* ---- Anchored init ---- */

struct anchor {
	keel_once_t o;
	keel_mutex_t gate;
	harness_event in_init;
	keel_scope_t *scope;
	unsigned flags;
	_Atomic int lock_rc, once_rc;
};

static int waits_at_the_gate(keel_claim_t *c, void *arg)
{
	struct anchor *a = arg;
	int rc;

	event_set(&a->in_init);
	rc = keel_mutex_lock_until(&a->gate, KEEL_FOREVER);
	atomic_store(&a->lock_rc, rc);
	if (rc < 0)
		return rc;
	keel_mutex_unlock(&a->gate);
	return keel_claim_publish(c, VALUE(2));
}

static int anchored_caller(void *arg)
{
	struct anchor *a = arg;
	const keel_once_opts o = {.deadline = KEEL_SEC(60), .flags = a->flags};
	void *v;

	atomic_store(&a->once_rc, keel_once(&a->o, waits_at_the_gate, a, &o, &v));
	return 0;
}

static void run_anchor(unsigned flags, int want_lock_rc)
{
	struct anchor *a = calloc(1, sizeof *a);

	a->flags = flags;
	CHECK_OK(keel_mutex_init(&a->gate, 0, "gate", 0));
	event_init(&a->in_init);
	keel_mutex_lock(&a->gate);
	CHECK_OK(keel_scope_open(&a->scope, NULL));
	CHECK_OK(keel_spawn(a->scope, anchored_caller, a, NULL, NULL));
	event_wait(&a->in_init);
	CHECK_OK(keel_scope_cancel(a->scope)); /* the caller is cancelled */
	keel_mutex_unlock(&a->gate);
	keel_scope_close(a->scope);
	CHECK_EQ(atomic_load(&a->lock_rc), want_lock_rc);
	CHECK_EQ(atomic_load(&a->once_rc), want_lock_rc);
	CHECK(keel_once_value(&a->o) == (want_lock_rc == 0 ? VALUE(2) : NULL));
	CHECK_OK(keel_mutex_destroy(&a->gate));
	free(a);
}

TEST(anchored_init_runs_to_the_end_despite_its_callers_cancellation)
{
	run_anchor(0, -ECANCELED);             /* the control */
	run_anchor(KEEL_ONCE_ANCHOR, 0);
}

/* ---- Generations ---- */

static int never_runs(keel_claim_t *c, void *arg)
{
	(void)c;
	(void)arg;
	return -EIO;
}

TEST(generations_used_up_is_eoverflow)
{
	keel_once_t o = KEEL_ONCE_INIT;
	void *v = NULL;

	/* FREE with the last generation there is: no claim can follow. */
	o.k_word = UINT64_C(1) << 63 | ((UINT64_C(1) << 60) - 1) << 3;
	CHECK_RC(keel_once(&o, never_runs, NULL, NULL, &v), -EOVERFLOW);
	CHECK(v == NULL);
}
