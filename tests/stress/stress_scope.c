/*
 * stress_scope.c: scopes under random programs and racing cancellation.
 *
 * stress_teardown_order: for each seed, a random stack of foreground and
 *   background children (some with scopes of their own, holding cleanups
 *   and grandchildren), resources and cleanups, with failures injected at
 *   every kind of position: a setup that fails, a child that fails, a
 *   cleanup that fails. Two variants per seed:
 *   - teardown failures only (children fail as they are cancelled): the
 *     teardown log must be exactly the reverse of registration, children's
 *     own teardown nested in place, and the result the first failure;
 *   - an early failure under fail-fast, which cancels everything at once:
 *     children then exit in any order, and the log must still show every
 *     cleanup after every child registered after it, cleanups in reverse
 *     order, each child's own teardown before its exit.
 *   KEEL_ITERS seeds (300; 10,000 under KEEL_STRESS=long), from KEEL_SEED.
 *
 * stress_cancel_races_every_wait: a cancellation lands at a random moment
 *   around a task entering each cancellation point; every wait must end
 *   with -ECANCELED (a lost wake-up hangs the test, which the CTest timeout
 *   turns into a failure). KEEL_ITERS rounds per point (200; 5,000 long).
 *
 * stress_spawners_race_the_owner: two foreign threads spawn into one
 *   scope as fast as they can (each spawn may move the scope's entries)
 *   while its owner joins their children by handle, cancels some of them
 *   one by one, and finally cancels and closes the scope with the spawners
 *   still going. Every spawn that succeeded started its child exactly once
 *   and was joined or closed exactly once; the rest were refused with
 *   -ECANCELED; joins, cancels and spawns all happened in numbers (the
 *   test fails if a kind of race was not exercised). KEEL_ITERS joins
 *   (5,000; 100,000 long).
 *
 * stress_close_10k_blocked_tasks_under_load: KEEL_THREADS tasks (10,000;
 *   2,000 under sanitizers) in one scope, each blocked in a keel wait
 *   (sleep, serve, condition variable, lock), with two busy-loop
 *   processes on the machine; the scope is cancelled and closed. Every
 *   wait must end with -ECANCELED, and the close must not report a child
 *   "still running" (each child's join ends within the scope's
 *   cleanup_deadline, 5 s): keel's own bookkeeping must not hold the
 *   exiting children up. Prints the time from the cancel to the last
 *   child's exit and to the close's return.
 *
 * stress_churn_cancels_and_closes: a long-lived scope under churn. Two
 *   foreign threads spawn short children into it without keeping them
 *   joinable (reaped as they end, their slots reused at once): victims,
 *   which wait to be cancelled (or 20 ms), and bystanders, which must
 *   never be.
 *   A third thread cancels victims by handle with keel_task_cancel(),
 *   often after they ended and their slot went to a bystander. Children
 *   end by every route (return, pthread_exit from the body, pthread_exit
 *   from the on_exit hook). The owner closes the scope at a random
 *   moment with the spawners still going. Every spawn that succeeded
 *   gets exactly one on_exit call; no bystander is ever cancelled before
 *   the close; when the close returns, every task slot is back; and the
 *   races happened both ways (cancels that hit, and stale ones refused
 *   with -ESRCH; children reaped before the close, and during it; every
 *   end route). KEEL_ITERS rounds (20; 300 long).
 */
#include <poll.h>
#include <signal.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include "harness.h"
#include "internal.h"

/* ---- A growable log of small integers, for the teardown order ---- */

#define MAX_EVENTS 4096

struct evlog {
	pthread_mutex_t mu;
	int ev[MAX_EVENTS];
	int n;
};

static struct evlog elog = {.mu = PTHREAD_MUTEX_INITIALIZER};

/* Event codes: kind * 10000 + id. */
enum { EV_CHILD_END = 1, EV_CLEANUP = 2, EV_RESOURCE = 3, EV_NESTED = 4 };

static void ev_add(int code)
{
	pthread_mutex_lock(&elog.mu);
	CHECK_INT(elog.n, <, MAX_EVENTS);
	elog.ev[elog.n++] = code;
	pthread_mutex_unlock(&elog.mu);
}

static int ev_pos(int code)
{
	for (int i = 0; i < elog.n; i++)
		if (elog.ev[i] == code)
			return i;
	return -1;
}

/* ---- The random program ---- */

enum kind { K_FG, K_BG, K_RESOURCE, K_CLEANUP, K_KINDS };

#define MAX_ENTRIES 10
#define MAX_NESTED 3

struct node {
	enum kind kind;
	int id;
	int fail;            /* inject: setup/child/cleanup fails */
	int registered;      /* the body managed to register it */
	int nnested;         /* children: entries of their own scope */
	int nested_child[MAX_NESTED]; /* 1: a grandchild, 0: a cleanup */
};

struct program {
	struct node e[MAX_ENTRIES];
	int n;
	int early_fail; /* variant 2: index of the child failing at once */
	atomic_int ready;
	int expected_ready;
};

static struct program prog;

static int cleanup_fn(void *arg)
{
	struct node *nd = arg;

	ev_add(EV_CLEANUP * 10000 + nd->id);
	return nd->fail ? -EPIPE : 0;
}

static int nested_cleanup(void *arg)
{
	ev_add(EV_NESTED * 10000 + (int)(intptr_t)arg);
	return 0;
}

static int grandchild(void *arg)
{
	keel_sleep_until(KEEL_FOREVER);
	ev_add(EV_NESTED * 10000 + (int)(intptr_t)arg);
	return 0;
}

static int child_fn(void *arg)
{
	struct node *nd = arg;
	keel_scope_t *mine = NULL;
	int rc = 0;

	if (prog.early_fail >= 0 && nd == &prog.e[prog.early_fail]) {
		ev_add(EV_CHILD_END * 10000 + nd->id);
		return -EIO; /* fails at once: cancels the whole scope */
	}
	if (nd->nnested) {
		CHECK_OK(keel_scope_open(&mine, NULL));
		for (int j = 0; j < nd->nnested; j++) {
			/* Nested events: id * 10 + j. */
			void *tag = (void *)(intptr_t)(nd->id * 10 + j);

			if (nd->nested_child[j])
				CHECK_OK(keel_spawn(mine, grandchild, tag,
						    NULL, NULL));
			else
				CHECK_OK(keel_defer(mine, nested_cleanup, tag));
		}
	}
	atomic_fetch_add(&prog.ready, 1);
	keel_sleep_until(KEEL_FOREVER);
	if (mine)
		rc = keel_scope_close(mine);
	ev_add(EV_CHILD_END * 10000 + nd->id);
	return nd->fail ? -EIO - nd->id : rc == -ECANCELED ? 0 : rc;
}

static int setup_fn(void *arg, void **out)
{
	struct node *nd = arg;

	*out = nd;
	return nd->fail ? -ENOENT : 0;
}

static int teardown_fn(void *res)
{
	struct node *nd = res;

	ev_add(EV_RESOURCE * 10000 + nd->id);
	return 0;
}

static void generate(uint64_t *rng, int early)
{
	memset(&prog.e, 0, sizeof prog.e);
	prog.n = 1 + (int)(rng_next(rng) % MAX_ENTRIES);
	prog.early_fail = -1;
	for (int i = 0; i < prog.n; i++) {
		struct node *nd = &prog.e[i];

		nd->kind = (enum kind)(rng_next(rng) % K_KINDS);
		nd->id = i;
		nd->fail = rng_next(rng) % 4 == 0;
		if (nd->kind == K_FG || nd->kind == K_BG) {
			nd->nnested = (int)(rng_next(rng) % (MAX_NESTED + 1));
			/* A child is cancelled as a whole when its turn comes,
			 * so its own children exit at once, in any order:
			 * only the variant checked by invariants has them. */
			for (int j = 0; j < nd->nnested; j++)
				nd->nested_child[j] =
					early ? (int)(rng_next(rng) % 2) : 0;
		}
	}
	if (early) {
		for (int i = 0; i < prog.n; i++)
			if (prog.e[i].kind == K_FG || prog.e[i].kind == K_BG) {
				prog.early_fail = i;
				break;
			}
	}
}

/* The expected log of variant 1: the reverse of registration. */
static int expected_log(int *out)
{
	int n = 0;

	for (int i = prog.n - 1; i >= 0; i--) {
		struct node *nd = &prog.e[i];

		switch (nd->kind) {
		case K_FG:
		case K_BG:
			for (int j = nd->nnested - 1; j >= 0; j--)
				out[n++] = EV_NESTED * 10000 + nd->id * 10 + j;
			out[n++] = EV_CHILD_END * 10000 + nd->id;
			break;
		case K_RESOURCE:
			if (!nd->fail)
				out[n++] = EV_RESOURCE * 10000 + nd->id;
			break;
		case K_CLEANUP:
			out[n++] = EV_CLEANUP * 10000 + nd->id;
			break;
		default:
			break;
		}
	}
	return n;
}

static int expected_result(void)
{
	/* Children fail as their turn comes (top first); a cleanup's failure
	 * counts only if no child failed. */
	for (int i = prog.n - 1; i >= 0; i--)
		if ((prog.e[i].kind == K_FG || prog.e[i].kind == K_BG) &&
		    prog.e[i].fail)
			return -EIO - prog.e[i].id;
	for (int i = prog.n - 1; i >= 0; i--)
		if (prog.e[i].kind == K_CLEANUP && prog.e[i].fail)
			return -EPIPE;
	return 0;
}

static void print_program(uint64_t seed)
{
	static const char *kn[] = {"fg", "bg", "resource", "cleanup"};

	fprintf(stderr, "program of seed %llu (early failure at %d):\n",
		(unsigned long long)seed, prog.early_fail);
	for (int i = 0; i < prog.n; i++)
		fprintf(stderr, "  #%d %s%s nested=%d registered=%d\n", i,
			kn[prog.e[i].kind], prog.e[i].fail ? " failing" : "",
			prog.e[i].nnested, prog.e[i].registered);
	fprintf(stderr, "log:");
	for (int i = 0; i < elog.n; i++)
		fprintf(stderr, " %d", elog.ev[i]);
	fprintf(stderr, "\n");
}

static int run_program(void)
{
	keel_scope_t *s;
	int children = 0;

	CHECK_OK(keel_scope_open(&s, NULL));
	for (int i = 0; i < prog.n; i++) {
		struct node *nd = &prog.e[i];
		keel_spawn_opts bg = {.background = 1};
		keel_task_t t;
		int rc = 0;

		switch (nd->kind) {
		case K_FG:
		case K_BG:
			rc = keel_spawn(s, child_fn, nd,
					nd->kind == K_BG ? &bg : NULL, &t);
			if (rc == 0 && i != prog.early_fail)
				children++;
			if (rc == 0 && i == prog.early_fail) {
				/* Wait for the failure: from here the scope
				 * is cancelled, deterministically. */
				int st;

				nd->registered = 1;
				CHECK_OK(keel_join(t, &st, KEEL_FOREVER));
				CHECK_RC(st, -EIO);
				CHECK_RC(keel_checkpoint(), -ECANCELED);
				continue;
			}
			break;
		case K_RESOURCE:
			rc = keel_resource(s, setup_fn, teardown_fn, nd, NULL);
			if (rc == -ENOENT) {
				CHECK(nd->fail);
				continue;
			}
			break;
		case K_CLEANUP:
			rc = keel_defer(s, cleanup_fn, nd);
			break;
		default:
			break;
		}
		if (rc == 0)
			nd->registered = 1;
		else
			CHECK_RC(rc, -ECANCELED); /* after an early failure */
	}
	/* Let the children get going (set up their own scopes) before the
	 * teardown starts; a cancelled child may exit without reaching its
	 * ready point, so in variant 2 we do not wait. */
	if (prog.early_fail < 0)
		while (atomic_load(&prog.ready) < children)
			sched_yield();
	return keel_scope_close(s);
}

static void check_invariants(void)
{
	/* Cleanups and resources in reverse registration order; every one
	 * after every child registered after it; each child's own teardown
	 * before its end. */
	int last_pos = elog.n;

	for (int i = 0; i < prog.n; i++) {
		struct node *nd = &prog.e[i];
		int pos;

		if (!nd->registered)
			continue;
		if (nd->kind == K_CLEANUP || nd->kind == K_RESOURCE) {
			pos = ev_pos((nd->kind == K_CLEANUP ? EV_CLEANUP
							    : EV_RESOURCE) *
					     10000 +
				     nd->id);
			CHECK_INT(pos, >=, 0);
			CHECK_INT(pos, <, last_pos);
			last_pos = pos;
			for (int k = i + 1; k < prog.n; k++) {
				struct node *later = &prog.e[k];

				if (!later->registered ||
				    (later->kind != K_FG && later->kind != K_BG))
					continue;
				CHECK_INT(ev_pos(EV_CHILD_END * 10000 +
						 later->id),
					  <, pos);
			}
		} else {
			int end = ev_pos(EV_CHILD_END * 10000 + nd->id);

			CHECK_INT(end, >=, 0);
			for (int j = 0; j < nd->nnested; j++) {
				int np = ev_pos(EV_NESTED * 10000 +
						nd->id * 10 + j);

				/* A child cancelled before it set up its
				 * scope has no nested events. */
				if (np < 0)
					continue;
				CHECK_INT(np, <, end);
				/* The same rule one level down: a nested
				 * cleanup after every later grandchild. */
				if (nd->nested_child[j])
					continue;
				for (int k = j + 1; k < nd->nnested; k++) {
					int gp = ev_pos(EV_NESTED * 10000 +
							nd->id * 10 + k);

					if (nd->nested_child[k] && gp >= 0)
						CHECK_INT(gp, <, np);
				}
			}
		}
	}
}

TEST(stress_teardown_order)
{
	long iters = harness_param("KEEL_ITERS", 300, 10000);
	uint64_t seed = harness_seed(), rng = seed;
	int want[MAX_EVENTS];

	for (long it = 0; it < iters; it++) {
		uint64_t this_seed = rng;
		int early = (int)(it % 2);
		int rc, n;

		generate(&rng, early);
		elog.n = 0;
		atomic_store(&prog.ready, 0);
		rc = run_program();
		if (!early || prog.early_fail < 0) {
			n = expected_log(want);
			if (n != elog.n ||
			    memcmp(want, elog.ev, (size_t)n * sizeof *want) != 0 ||
			    rc != expected_result()) {
				print_program(this_seed);
				fprintf(stderr, "expected:");
				for (int i = 0; i < n; i++)
					fprintf(stderr, " %d", want[i]);
				fprintf(stderr, "\nresult %d, expected %d\n", rc,
					expected_result());
				harness_fail(__FILE__, __LINE__,
					     "teardown log or result differs");
			}
		} else {
			if (rc != -EIO)
				print_program(this_seed);
			CHECK_RC(rc, -EIO); /* the early failure comes first */
			check_invariants();
		}
	}
	printf("%ld random programs torn down in order\n", iters);
}

/* ---- Cancellation racing every wait ---- */

static _Atomic keel_task_t idle_task;

enum point {
	P_CHECKPOINT,
	P_SLEEP,
	P_FD,
	P_SERVE,
	P_CALL,
	P_JOIN,
	P_SCOPE_JOIN,
	P_COUNT
};

struct race {
	enum point p;
	int fd;
	keel_task_t never_serves;
	int result;
	harness_event go, release;
};

static void nothing(void *arg)
{
	(void)arg;
}

/* An adopted task that never serves: calls to it wait until cancelled. */
static void *never_serving(void *arg)
{
	harness_event *up = arg;

	atomic_store(&idle_task, keel_self());
	event_set(up);
	for (;;)
		pause();
	return NULL;
}

/* Ends only when released, so that only the cancellation can end the
 * join that waits for it. */
static int hold_until_released(void *arg)
{
	event_wait(&((struct race *)arg)->release);
	return 0;
}

static int race_wait(void *arg)
{
	struct race *r = arg;
	keel_scope_t *inner = NULL;
	keel_task_t held = KEEL_TASK_NONE;
	int rc = 0;

	if (r->p == P_SCOPE_JOIN || r->p == P_JOIN) {
		/* A foreground grandchild to wait for. */
		CHECK_OK(keel_scope_open(&inner, NULL));
		CHECK_OK(keel_spawn(inner, hold_until_released, r, NULL, &held));
	}
	event_set(&r->go);
	switch (r->p) {
	case P_CHECKPOINT:
		while ((rc = keel_checkpoint()) == 0)
			;
		break;
	case P_SLEEP:
		rc = keel_sleep_until(KEEL_FOREVER);
		break;
	case P_FD:
		rc = keel_fd_wait(r->fd, POLLIN, KEEL_FOREVER);
		break;
	case P_SERVE:
		rc = keel_serve(KEEL_FOREVER);
		break;
	case P_CALL:
		rc = keel_call(r->never_serves, nothing, NULL, KEEL_FOREVER);
		break;
	case P_JOIN:
	case P_SCOPE_JOIN:
		rc = r->p == P_JOIN ? keel_join(held, NULL, KEEL_FOREVER)
				    : keel_scope_join(inner, KEEL_FOREVER);
		event_set(&r->release);
		keel_scope_close(inner);
		break;
	default:
		break;
	}
	r->result = rc;
	return 0;
}

TEST(stress_cancel_races_every_wait)
{
	long iters = harness_param("KEEL_ITERS", 200, 5000);
	uint64_t rng = harness_seed();
	harness_event up;
	pthread_t idle;
	int fds[2];

	CHECK_EQ(pipe(fds), 0);
	event_init(&up);
	idle = harness_thread(never_serving, &up);
	event_wait(&up);
	pthread_detach(idle); /* ends with the process */
	for (int p = 0; p < P_COUNT; p++) {
		for (long it = 0; it < iters; it++) {
			struct race r = {.p = (enum point)p, .fd = fds[0],
					 .never_serves = atomic_load(&idle_task)};
			keel_scope_t *s;
			unsigned spin = (unsigned)(rng_next(&rng) % 4000);

			event_init(&r.go);
			event_init(&r.release);
			CHECK_OK(keel_scope_open(&s, NULL));
			CHECK_OK(keel_spawn(s, race_wait, &r, NULL, NULL));
			event_wait(&r.go);
			/* Land the cancel anywhere from before the wait is
			 * entered to well inside it. */
			for (volatile unsigned i = 0; i < spin; i++)
				;
			CHECK_OK(keel_scope_cancel(s));
			CHECK_RC(keel_scope_close(s), -ECANCELED);
			if (r.result != -ECANCELED)
				harness_fail(__FILE__, __LINE__,
					     "point %d round %ld: %d (%s)", p, it,
					     r.result, keel_strerror(r.result));
		}
	}
	close(fds[0]);
	close(fds[1]);
	printf("%ld cancellations raced each of %d waits\n", iters,
	       (int)P_COUNT);
}

/* ---- Closing 10,000 blocked tasks on a loaded machine ---- */

#ifdef KEEL_UNDER_SANITIZER
#define BIG_DEFAULT 2000
#else
#define BIG_DEFAULT 10000
#endif

static keel_mutex_t big_mu = KEEL_MUTEX_INIT(0, "big_mu");
static keel_mutex_t big_held = KEEL_MUTEX_INIT(0, "big_held");
static keel_cond_t big_cv = KEEL_COND_INIT;
static atomic_int big_cancelled, big_wrong;
static _Atomic keel_time_t big_last_exit;

static int big_wait(void *arg)
{
	int rc = -1;

	switch ((intptr_t)arg % 4) {
	case 0:
		rc = keel_sleep_until(KEEL_FOREVER);
		break;
	case 1:
		rc = keel_serve(KEEL_FOREVER);
		break;
	case 2:
		keel_mutex_lock(&big_mu);
		rc = keel_cond_wait_until(&big_cv, &big_mu, KEEL_FOREVER);
		keel_mutex_unlock(&big_mu);
		break;
	case 3:
		/* big_held is held by the test for the whole run. */
		rc = keel_mutex_lock_until(&big_held, KEEL_FOREVER);
		break;
	}
	atomic_fetch_add(rc == -ECANCELED ? &big_cancelled : &big_wrong, 1);
	{
		keel_time_t now = keel_now(),
			    seen = atomic_load(&big_last_exit);

		while (seen < now &&
		       !atomic_compare_exchange_weak(&big_last_exit, &seen, now))
			;
	}
	return 0;
}

static pid_t busy_loop(void)
{
	pid_t pid = fork();

	CHECK(pid >= 0);
	if (pid == 0) {
		volatile unsigned long x = 0;

#if HARNESS_HAVE_PRCTL
		prctl(PR_SET_PDEATHSIG, SIGKILL);
#endif
		for (;;)
			x++;
	}
	return pid;
}

TEST(stress_close_10k_blocked_tasks_under_load)
{
	HARNESS_NEED(FORK);
	HARNESS_NEED(PRCTL);
	long n = harness_param("KEEL_THREADS", BIG_DEFAULT, BIG_DEFAULT);
	keel_spawn_opts o = {.name = "big", .stack_size = 64 << 10};
	keel_task_t *ids = calloc((size_t)n, sizeof *ids);
	harness_capture cap;
	keel_scope_t *s;
	keel_time_t t0, closed;
	pid_t busy[2];
	long blocked;

	CHECK(ids != NULL);
	for (int i = 0; i < 2; i++)
		busy[i] = busy_loop();
	keel_mutex_lock(&big_held);
	CHECK_OK(keel_scope_open(&s, &(keel_scope_opts){.name = "big"}));
	for (long i = 0; i < n; i++) {
		int rc = keel_spawn(s, big_wait, (void *)(intptr_t)i, &o,
				    &ids[i]);

		if (rc == -ENOMEM) {
			/* The machine's limit on threads (or memory maps) is
			 * below n: say so, rather than fail. */
			printf("only %ld threads could be started\n", i);
			CHECK_OK(keel_scope_cancel(s));
			keel_scope_close(s);
			keel_mutex_unlock(&big_held);
			for (int k = 0; k < 2; k++) {
				kill(busy[k], SIGKILL);
				waitpid(busy[k], NULL, 0);
			}
			harness_skip("not enough threads for the test");
		}
		CHECK_OK(rc);
	}
	/* Every one of them is inside its wait. */
	do {
		blocked = 0;
		for (long i = 0; i < n; i++)
			if (load_relaxed(&keel__task_slot(ids[i])->blocked_in))
				blocked++;
		if (blocked < n)
			sched_yield();
	} while (blocked < n);
	capture_begin(&cap);
	t0 = keel_now();
	CHECK_OK(keel_scope_cancel(s));
	CHECK_RC(keel_scope_close(s), -ECANCELED);
	closed = keel_now();
	capture_end(&cap);
	keel_mutex_unlock(&big_held);
	/* The load was there all along. */
	for (int i = 0; i < 2; i++) {
		CHECK_EQ(waitpid(busy[i], NULL, WNOHANG), 0);
		kill(busy[i], SIGKILL);
		CHECK_EQ(waitpid(busy[i], NULL, 0), busy[i]);
	}
	CHECK_EQ(atomic_load(&big_wrong), 0);
	CHECK_EQ(atomic_load(&big_cancelled), n);
	printf("%ld blocked tasks beside 2 busy loops: the last exited %.0f ms "
	       "after the cancel, the close returned after %.0f ms\n",
	       n, (double)(atomic_load(&big_last_exit) - t0) / 1e6,
	       (double)(closed - t0) / 1e6);
	if (strstr(cap.text, "still running"))
		harness_fail(__FILE__, __LINE__, "the close reported a child "
			     "still running:\n%.400s", cap.text);
	free(ids);
}

/* ---- Spawners racing the owner's joins and cancels ---- */

#define RACE_QUEUE 256

struct spawn_race {
	keel_scope_t *s;
	atomic_int stop, closing;
	pthread_mutex_t mu;
	keel_task_t q[RACE_QUEUE];
	unsigned head, tail;
	atomic_long spawned, refused, started, ended_cancelled, ended_ok;
};

static int race_child(void *arg)
{
	struct spawn_race *r = arg;
	int rc;

	atomic_fetch_add(&r->started, 1);
	/* Half return at once; half wait to be cancelled (by the owner's
	 * cancel of this one task, or the scope's). */
	if (atomic_load(&r->started) & 1) {
		atomic_fetch_add(&r->ended_ok, 1);
		return 0;
	}
	rc = keel_sleep_until(KEEL_FOREVER);
	CHECK_RC(rc, -ECANCELED);
	atomic_fetch_add(&r->ended_cancelled, 1);
	return rc;
}

static void *race_spawner(void *p)
{
	struct spawn_race *r = p;

	while (!atomic_load(&r->stop)) {
		keel_task_t t;
		unsigned queued;
		int rc;

		/* Ahead of the owner by at most a queue's worth (live threads
		 * are the limit), unless the scope is cancelled: then spawn
		 * on, to be refused. */
		pthread_mutex_lock(&r->mu);
		queued = r->tail - r->head;
		pthread_mutex_unlock(&r->mu);
		if (queued >= RACE_QUEUE / 2 && !atomic_load(&r->closing)) {
			sched_yield();
			continue;
		}
		rc = keel_spawn(r->s, race_child, r, NULL, &t);

		if (rc == -ECANCELED) {
			atomic_fetch_add(&r->refused, 1);
			continue;
		}
		CHECK_OK(rc);
		atomic_fetch_add(&r->spawned, 1);
		pthread_mutex_lock(&r->mu);
		if (r->tail - r->head < RACE_QUEUE)
			r->q[r->tail++ % RACE_QUEUE] = t;
		pthread_mutex_unlock(&r->mu);
	}
	return NULL;
}

TEST(stress_spawners_race_the_owner)
{
	long iters = harness_param("KEEL_ITERS", 5000, 100000);
	uint64_t rng = harness_seed();
	struct spawn_race r = {.mu = PTHREAD_MUTEX_INITIALIZER};
	long joined = 0, cancelled_one = 0;
	pthread_t th[2];

	CHECK_OK(keel_scope_open(&r.s, &(keel_scope_opts){
					       .policy = KEEL_SUPERVISE}));
	for (int i = 0; i < 2; i++)
		th[i] = harness_thread(race_spawner, &r);
	while (joined < iters) {
		keel_task_t t = KEEL_TASK_NONE;
		int st = 1;

		pthread_mutex_lock(&r.mu);
		if (r.head != r.tail)
			t = r.q[r.head++ % RACE_QUEUE];
		pthread_mutex_unlock(&r.mu);
		if (t == KEEL_TASK_NONE) {
			sched_yield();
			continue;
		}
		if (rng_next(&rng) % 3 == 0) {
			CHECK_OK(keel__task_cancel(t, KEEL_CANCEL_EXPLICIT));
			cancelled_one++;
		}
		/* A child that waits for its cancel: cancel it now. */
		if (keel_join(t, &st, keel_after(KEEL_MS(1))) == -ETIMEDOUT) {
			CHECK_OK(keel__task_cancel(t, KEEL_CANCEL_EXPLICIT));
			cancelled_one++;
			CHECK_OK(keel_join(t, &st, KEEL_FOREVER));
		}
		CHECK(st == 0 || st == -ECANCELED);
		/* Reaped: the handle is stale now. */
		CHECK_RC(keel_join(t, NULL, 0), -ESRCH);
		joined++;
	}
	/* Close with the spawners still going: the children not joined are
	 * cancelled and joined by the close; spawns after it are refused. */
	atomic_store(&r.closing, 1);
	CHECK_OK(keel_scope_cancel(r.s));
	CHECK_RC(keel_scope_close(r.s), -ECANCELED);
	while (atomic_load(&r.refused) == 0)
		sched_yield();
	atomic_store(&r.stop, 1);
	for (int i = 0; i < 2; i++)
		harness_join(th[i]);
	CHECK_EQ(atomic_load(&r.started), atomic_load(&r.spawned));
	CHECK_EQ(atomic_load(&r.ended_ok) + atomic_load(&r.ended_cancelled),
		 atomic_load(&r.spawned));
	/* The races happened, each kind in numbers. */
	CHECK_INT(joined, >=, iters);
	CHECK_INT(cancelled_one, >, 0);
	CHECK_INT(atomic_load(&r.refused), >, 0);
	CHECK_INT(atomic_load(&r.ended_cancelled), >, 0);
	printf("%ld spawned, %ld joined one by one (%ld cancelled one by one), "
	       "%ld refused after the cancel\n",
	       atomic_load(&r.spawned), joined, cancelled_one,
	       atomic_load(&r.refused));
}

/* ---- stress_churn_cancels_and_closes ---- */

#define CHURN_RING 64

enum { ROUTE_RETURN, ROUTE_EXIT_BODY, ROUTE_EXIT_HOOK, ROUTES };

struct churn_round {
	keel_scope_t *s;
	pthread_mutex_t mu;
	keel_task_t ring[CHURN_RING];
	unsigned long pushed;
	uint64_t seed;
	atomic_int stop, closing;
	atomic_long spawned, refused, hooks, ended_open, ended_closing;
	atomic_long hit, stale, wrongly_cancelled;
	atomic_long route[ROUTES];
};

static _Thread_local int churn_route;
static _Thread_local struct churn_round *churn_me;

struct churn_arg {
	struct churn_round *r;
	int victim, route;
};

static void churn_hook(keel_task_t child, int status, void *arg)
{
	struct churn_round *r = arg;

	(void)child;
	(void)status;
	atomic_fetch_add(&r->hooks, 1);
	atomic_fetch_add(atomic_load(&r->closing) ? &r->ended_closing
						  : &r->ended_open,
			 1);
	if (churn_me == r && churn_route == ROUTE_EXIT_HOOK) {
		churn_me = NULL;
		pthread_exit(NULL);
	}
}

static int churn_body(void *p)
{
	struct churn_arg a = *(struct churn_arg *)p;
	struct churn_round *r = a.r;

	free(p);
	atomic_fetch_add(&r->route[a.route], 1);
	if (a.victim) {
		/* Until cancelled, or a moment: victims the canceller does not
		 * reach must not pile up (thousands of threads are more than a
		 * sanitizer's memory allows). */
		keel_sleep_until(keel_after(KEEL_MS(20)));
	} else {
		for (int i = 0; i < 4; i++) {
			if (keel_checkpoint() == -ECANCELED &&
			    !atomic_load(&r->closing))
				atomic_fetch_add(&r->wrongly_cancelled, 1);
			sched_yield();
		}
	}
	churn_route = a.route;
	churn_me = r;
	if (a.route == ROUTE_EXIT_BODY)
		pthread_exit(NULL);
	return 0;
}

static void *churn_spawner(void *p)
{
	struct churn_round *r = p;
	uint64_t rng = r->seed ^ (uint64_t)(uintptr_t)&rng;

	while (!atomic_load(&r->stop)) {
		struct churn_arg *a = malloc(sizeof *a);
		keel_task_t t;
		uint64_t x = rng_next(&rng);
		int rc;

		CHECK(a != NULL);
		*a = (struct churn_arg){r, (int)(x & 1), (int)((x >> 1) % ROUTES)};
		/* Small stacks where the address space is small: a round
		 * may have hundreds of tasks alive, and 32 bits of address
		 * space hold only some hundreds of default-sized stacks. */
		rc = keel_spawn(r->s, churn_body, a,
				&(keel_spawn_opts){
					.detached = 1,
					.stack_size = sizeof(void *) < 8
							      ? (size_t)256 << 10
							      : 0},
				&t);
		if (rc == -ECANCELED) {
			free(a);
			atomic_fetch_add(&r->refused, 1);
			continue;
		}
		CHECK_OK(rc);
		atomic_fetch_add(&r->spawned, 1);
		if (x & 1) {
			pthread_mutex_lock(&r->mu);
			r->ring[r->pushed++ % CHURN_RING] = t;
			pthread_mutex_unlock(&r->mu);
		}
	}
	return NULL;
}

static void *churn_canceller(void *p)
{
	struct churn_round *r = p;
	uint64_t rng = r->seed * 31 + 7;

	while (!atomic_load(&r->stop)) {
		keel_task_t t = KEEL_TASK_NONE;
		int rc;

		pthread_mutex_lock(&r->mu);
		if (r->pushed)
			t = r->ring[rng_next(&rng) %
				    (r->pushed < CHURN_RING ? r->pushed
							    : CHURN_RING)];
		pthread_mutex_unlock(&r->mu);
		if (t == KEEL_TASK_NONE) {
			sched_yield();
			continue;
		}
		rc = keel_task_cancel(t);
		if (rc == 0)
			atomic_fetch_add(&r->hit, 1);
		else if (rc == -ESRCH)
			atomic_fetch_add(&r->stale, 1);
		else
			CHECK_OK(rc);
	}
	return NULL;
}

TEST(stress_churn_cancels_and_closes)
{
	long rounds = harness_param("KEEL_ITERS", 20, 300);
	uint64_t rng = harness_seed();
	long total[ROUTES] = {0}, hit = 0, stale = 0, open_ = 0, closing = 0,
	     spawned = 0;
	keel_stats base, after;

	CHECK(keel_self() != KEEL_TASK_NONE);
	CHECK_OK(keel_stats_get(&base));
	for (long round = 0; round < rounds; round++) {
		static struct churn_round r;
		pthread_t th[3];
		long want = 200 + (long)(rng_next(&rng) % 2000);

		memset(&r, 0, sizeof r);
		pthread_mutex_init(&r.mu, NULL);
		r.seed = rng_next(&rng);
		CHECK_OK(keel_scope_open(&r.s, &(keel_scope_opts){
						       .policy = KEEL_SUPERVISE,
						       .on_exit = churn_hook,
						       .on_exit_arg = &r}));
		th[0] = harness_thread(churn_spawner, &r);
		th[1] = harness_thread(churn_spawner, &r);
		th[2] = harness_thread(churn_canceller, &r);
		while (atomic_load(&r.spawned) < want)
			sched_yield();
		atomic_store(&r.closing, 1);
		CHECK_OK(keel_scope_cancel(r.s));
		CHECK_RC(keel_scope_close(r.s), -ECANCELED);
		CHECK_OK(keel_stats_get(&after));
		CHECK_EQ(after.tasks_live, base.tasks_live);
		while (atomic_load(&r.refused) == 0)
			sched_yield();
		atomic_store(&r.stop, 1);
		for (int i = 0; i < 3; i++)
			harness_join(th[i]);
		CHECK_EQ(atomic_load(&r.hooks), atomic_load(&r.spawned));
		CHECK_EQ(atomic_load(&r.wrongly_cancelled), 0);
		for (int i = 0; i < ROUTES; i++)
			total[i] += atomic_load(&r.route[i]);
		hit += atomic_load(&r.hit);
		stale += atomic_load(&r.stale);
		open_ += atomic_load(&r.ended_open);
		closing += atomic_load(&r.ended_closing);
		spawned += atomic_load(&r.spawned);
	}
	printf("%ld children in %ld rounds; cancels: %ld hit, %ld stale; "
	       "ended before the close %ld, during it %ld; routes: return "
	       "%ld, pthread_exit in body %ld, in hook %ld\n",
	       spawned, rounds, hit, stale, open_, closing, total[0],
	       total[1], total[2]);
	CHECK_INT(hit, >, 0);
	CHECK_INT(stale, >, 0);
	CHECK_INT(open_, >, 0);
	CHECK_INT(closing, >, 0);
	for (int i = 0; i < ROUTES; i++)
		CHECK_INT(total[i], >, 0);
}
