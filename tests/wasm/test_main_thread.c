/*
 * test_main_thread.c: keel on the main JavaScript thread (WebAssembly).
 *
 * Built without -sPROXY_TO_PTHREAD (tests/CMakeLists.txt), so main() and
 * every case run on the thread that a browser's main thread is: the one
 * that must never block. keel's blocking calls refuse there with -EDEADLK
 * (and do nothing), while the calls that never block work, and a reply
 * comes back through the thread's own mailbox, served with keel_serve(0).
 * Nothing here waits: the cases poll with calls that only look.
 */
#include <emscripten/threading.h>
#include <errno.h>
#include <stdatomic.h>

#include "harness.h"
#include "platform.h"

static _Atomic int ran, done_runs, cancels;

static void count_run(void *arg)
{
	(void)arg;
	atomic_fetch_add(&ran, 1);
}

static void count_done(void *arg)
{
	(void)arg;
	atomic_fetch_add(&done_runs, 1);
}

static void count_cancel(void *arg)
{
	(void)arg;
	atomic_fetch_add(&cancels, 1);
}

static void close_own_mailbox(void *arg)
{
	(void)arg;
	keel_mailbox_close();
}

/* A worker task: serves its mailbox until a message closes it. */
static int worker(void *arg)
{
	(void)arg;
	while (keel_serve(KEEL_FOREVER) > 0)
		;
	return 0;
}

/* Serve our own mailbox without waiting until `*counter` reaches want. */
static void serve_until(_Atomic int *counter, int want)
{
	while (atomic_load(counter) < want) {
		int rc = keel_serve(0);

		CHECK(rc > 0 || rc == -ETIMEDOUT);
	}
}

static keel_scope_t *start_worker(keel_task_t *w)
{
	keel_scope_t *s;

	CHECK_OK(keel_scope_open(&s, NULL));
	CHECK_OK(keel_spawn(s, worker, NULL, NULL, w));
	return s;
}

/* End the worker by a message, then join and close by looking only. */
static void stop_worker(keel_scope_t *s, keel_task_t w)
{
	int rc, status = -1;

	CHECK_OK(keel_post(w, close_own_mailbox, NULL, NULL));
	while ((rc = keel_join(w, &status, 0)) == -ETIMEDOUT)
		;
	CHECK_OK(rc);
	CHECK_EQ(status, 0);
	CHECK_OK(keel_scope_close(s));
}

TEST(main_thread_is_the_browser_thread)
{
	CHECK(emscripten_is_main_browser_thread());
	CHECK_EQ(keel__thread_may_block(), 0);
}

TEST(main_thread_refuses_blocking_calls)
{
	keel_task_t w;
	keel_scope_t *s = start_worker(&w);
	int status = -1;

	/* Refused before anything is sent: the work never runs. */
	CHECK_RC(keel_call(w, count_run, NULL, KEEL_FOREVER), -EDEADLK);
	CHECK_RC(keel_call(w, count_run, NULL, keel_after(KEEL_MS(100))),
		 -EDEADLK);
	/* Nothing pending: a serve that would wait is refused; one that
	 * only looks is not. */
	CHECK_RC(keel_serve(KEEL_FOREVER), -EDEADLK);
	CHECK_RC(keel_serve(keel_after(KEEL_MS(100))), -EDEADLK);
	CHECK_RC(keel_serve(0), -ETIMEDOUT);
	CHECK_RC(keel_sleep_until(keel_after(KEEL_MS(100))), -EDEADLK);
	/* The worker runs: joining it or closing its scope would wait. */
	CHECK_RC(keel_join(w, &status, KEEL_FOREVER), -EDEADLK);
	CHECK_EQ(status, -1);
	CHECK_RC(keel_scope_close(s), -EDEADLK);
	/* The scope is still open and the worker still serves: a call_then
	 * reaches it, and its reply comes back. */
	CHECK_OK(keel_call_then(w, count_run, count_done, count_cancel, NULL));
	serve_until(&done_runs, 1);
	CHECK_EQ(atomic_load(&ran), 1); /* the refused calls never ran */
	CHECK_EQ(atomic_load(&cancels), 0);
	stop_worker(s, w);
	atomic_store(&ran, 0);
	atomic_store(&done_runs, 0);
}

static int body_runs(keel_scope_t *s, void *arg)
{
	(void)s;
	(void)arg;
	atomic_fetch_add(&ran, 1);
	return 0;
}

/* They wait for their children by design: refused, and nothing runs. */
TEST(main_thread_refuses_scope_run_and_main)
{
	CHECK_RC(keel_scope_run(body_runs, NULL, NULL), -EDEADLK);
	CHECK_EQ(keel_main(body_runs, NULL), 1);
	CHECK_EQ(atomic_load(&ran), 0);
}

/* A once whose init runs on the worker: waiting for it is refused. */
static keel_once_t the_once = KEEL_ONCE_INIT;
static _Atomic int init_started, init_release;

static int slow_init(keel_claim_t *claim, void *arg)
{
	(void)arg;
	atomic_store(&init_started, 1);
	while (!atomic_load(&init_release))
		keel_checkpoint();
	return keel_claim_publish(claim, &the_once);
}

static void run_once(void *arg)
{
	void *v;

	(void)arg;
	CHECK_OK(keel_once(&the_once, slow_init, NULL, NULL, &v));
}

static int never_init(keel_claim_t *claim, void *arg)
{
	(void)arg;
	(void)claim;
	atomic_fetch_add(&ran, 1);
	return -EIO;
}

TEST(main_thread_refuses_waiting_for_a_once)
{
	keel_task_t w;
	keel_scope_t *s = start_worker(&w);
	void *v = NULL;

	CHECK_OK(keel_post(w, run_once, NULL, NULL));
	while (!atomic_load(&init_started))
		;
	/* The worker's init runs: waiting for it is refused, and ours
	 * never runs. */
	CHECK_RC(keel_once(&the_once, never_init, NULL, NULL, &v), -EDEADLK);
	CHECK_EQ(atomic_load(&ran), 0);
	atomic_store(&init_release, 1);
	while (!keel_once_value(&the_once))
		;
	CHECK_OK(keel_once(&the_once, never_init, NULL, NULL, &v));
	CHECK(v == &the_once);
	CHECK_EQ(atomic_load(&ran), 0);
	stop_worker(s, w);
}
