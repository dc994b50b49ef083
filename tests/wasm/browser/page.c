/*
 * page.c: the browser check (tests/wasm/browser-check.sh).
 *
 * Runs on the page's main thread, which must never block: it is linked
 * without PROXY_TO_PTHREAD. main() starts worker tasks, has its own
 * mailbox served from the JavaScript event loop
 * (keel_mailbox_serve_from_loop()), sends, and returns to the event loop;
 * everything after that happens in messages served there.
 *
 * Phase 1: ROUNDS x WORKERS keel_call_then() to the workers, each
 * answered through the main thread's mailbox; each reply must come once,
 * on the main thread, with the value its work computed.
 * Phase 2: a victim worker is held inside a message while the main thread
 * queues POSTS keel_post() and CALLS keel_call_then() behind it, then
 * lets it close its own mailbox: every message must get exactly one
 * outcome (work or cancel; done or cancel), counted per message.
 * A blocking call is refused there too (keel_call(): -EDEADLK).
 *
 * The result goes to the page (Module.keelReport, index.html), which
 * tells the server; under Node the program exits with it.
 */
#include <emscripten.h>
#include <emscripten/threading.h>
#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

#include "keel.h"

#define WORKERS 3
#define ROUNDS 200
#define POSTS 300
#define CALLS 300

static keel_task_t main_task, workers[WORKERS], victim;
static char failure[256];

/* Phase 1. */
static struct reply {
	int in, out;
	int worker;
	_Atomic int done, cancelled;
	_Atomic int wrong_thread;
} replies[WORKERS * ROUNDS];
static int replies_seen;

/* Phase 2: per message, how many outcomes of each kind. */
static struct outcome {
	_Atomic int work, cancel, done;
} posts[POSTS], calls[CALLS];
static _Atomic int gate, gate_entered, outcomes;
static int sent_posts, sent_calls;

static void fail(const char *why)
{
	if (!failure[0])
		snprintf(failure, sizeof failure, "%s", why);
}

/* On the main thread (every caller is): the page hears it through
 * Module.keelReport (index.html); under Node the program exits. */
static void report(void)
{
	const char *result = failure[0] ? failure : "pass";
	char script[400];

	printf("browser check: %s\n", result);
	fflush(stdout);
	/* The messages hold no quote or backslash. */
	snprintf(script, sizeof script,
		 "if (Module.keelReport) Module.keelReport('%s');", result);
	emscripten_run_script(script);
	if (!emscripten_run_script_int("typeof window !== 'undefined'"))
		emscripten_force_exit(failure[0] ? 1 : 0);
}

/* ---- the victim's messages (phase 2) ---- */

static void hold_then_close(void *arg)
{
	(void)arg;
	atomic_store(&gate_entered, 1);
	while (!atomic_load(&gate))
		emscripten_futex_wait(&gate, 0, 1000); /* a Worker may wait */
	keel_mailbox_close(); /* what is queued behind gets its cancel */
}

static void check_phase2(void *arg);

static void one_outcome(void)
{
	if (atomic_fetch_add(&outcomes, 1) + 1 ==
	    sent_posts + sent_calls)
		/* The last outcome: the main thread checks, in its loop. */
		if (keel_post(main_task, check_phase2, NULL, NULL) != 0)
			fail("the last outcome could not reach the main thread");
}

static void post_work(void *arg)
{
	atomic_fetch_add(&((struct outcome *)arg)->work, 1);
	one_outcome();
}

static void post_cancel(void *arg)
{
	atomic_fetch_add(&((struct outcome *)arg)->cancel, 1);
	one_outcome();
}

static void call_work(void *arg)
{
	atomic_fetch_add(&((struct outcome *)arg)->work, 1);
}

static void call_done(void *arg)
{
	if (!emscripten_is_main_browser_thread())
		fail("a reply ran off the main thread");
	atomic_fetch_add(&((struct outcome *)arg)->done, 1);
	one_outcome();
}

static void call_cancel(void *arg)
{
	atomic_fetch_add(&((struct outcome *)arg)->cancel, 1);
	one_outcome();
}

static void check_phase2(void *arg)
{
	struct outcome late = {0};
	int rc;

	(void)arg;
	for (int i = 0; i < POSTS; i++) {
		int w = atomic_load(&posts[i].work),
		    c = atomic_load(&posts[i].cancel);
		int accepted = i < sent_posts;

		if (w + c != accepted)
			fail("a post did not get exactly one outcome");
		if (w != 0)
			fail("a post queued behind the close ran");
	}
	for (int i = 0; i < CALLS; i++) {
		int w = atomic_load(&calls[i].work),
		    d = atomic_load(&calls[i].done),
		    c = atomic_load(&calls[i].cancel);

		if (d + c != (i < sent_calls) || w != d)
			fail("a call_then did not get exactly one outcome");
	}
	if (sent_posts == 0 || sent_calls == 0)
		fail("nothing was queued behind the close");
	rc = keel_post(victim, post_work, post_cancel, &late);
	if (rc != -ESHUTDOWN && rc != -ESRCH)
		fail("a post after the close was not refused");
	printf("phase 2: %d posts and %d calls queued behind a close, each "
	       "one outcome\n",
	       sent_posts, sent_calls);
	report();
}

static void phase2(void)
{
	victim = workers[WORKERS - 1];
	if (keel_post(victim, hold_then_close, NULL, NULL) != 0)
		{
			fail("the hold message was refused");
			return;
		}
	/* Queued behind the hold: the victim is inside it or about to be. */
	for (int i = 0; i < POSTS; i++) {
		int rc = keel_post(victim, post_work, post_cancel, &posts[i]);

		if (rc == 0)
			sent_posts = i + 1;
		else
			{
			fail("a post before the close was refused");
			return;
		}
	}
	for (int i = 0; i < CALLS; i++) {
		int rc = keel_call_then(victim, call_work, call_done,
					call_cancel, &calls[i]);

		if (rc == 0)
			sent_calls = i + 1;
		else
			{
			fail("a call_then before the close was refused");
			return;
		}
	}
	atomic_store(&gate, 1);
	emscripten_futex_wake(&gate, 1);
}

/* ---- phase 1 ---- */

static void square(void *arg)
{
	struct reply *r = arg;

	if (emscripten_is_main_browser_thread())
		atomic_fetch_add(&r->wrong_thread, 1);
	r->out = r->in * r->in;
}

static void got_reply(void *arg)
{
	struct reply *r = arg;

	if (!emscripten_is_main_browser_thread())
		atomic_fetch_add(&r->wrong_thread, 1);
	atomic_fetch_add(&r->done, 1);
	if (++replies_seen < WORKERS * ROUNDS)
		return;
	for (int i = 0; i < WORKERS * ROUNDS; i++) {
		struct reply *q = &replies[i];

		if (atomic_load(&q->done) != 1 ||
		    atomic_load(&q->cancelled) != 0)
			{
			fail("a call_then did not get exactly one reply");
			return;
		}
		if (q->out != q->in * q->in)
			{
			fail("a reply carries the wrong value");
			return;
		}
		if (atomic_load(&q->wrong_thread))
			{
			fail("work or reply on the wrong thread");
			return;
		}
	}
	printf("phase 1: %d calls answered through the main thread's loop\n",
	       WORKERS * ROUNDS);
	phase2();
	if (failure[0])
		report();
}

static void reply_cancelled(void *arg)
{
	atomic_fetch_add(&((struct reply *)arg)->cancelled, 1);
	fail("a call_then to a live worker was cancelled");
	report();
}

static int worker(void *arg)
{
	(void)arg;
	while (keel_serve(KEEL_FOREVER) > 0)
		;
	return 0;
}

int main(void)
{
	keel_scope_t *s;
	int rc;

	main_task = keel_self();
	if (!emscripten_is_main_browser_thread())
		fail("main() is not on the main thread");
	if ((rc = keel_mailbox_serve_from_loop()) != 0)
		fail("keel_mailbox_serve_from_loop() failed");
	if (keel_scope_open(&s, NULL) != 0)
		fail("no scope");
	for (int i = 0; i < WORKERS && !failure[0]; i++)
		if (keel_spawn(s, worker, NULL, NULL, &workers[i]) != 0)
			fail("keel_spawn() failed");
	/* The main thread may not wait: a blocking call is refused. */
	if (!failure[0] &&
	    keel_call(workers[0], square, &replies[0], KEEL_FOREVER) != -EDEADLK)
		fail("keel_call() on the main thread was not refused");
	for (int i = 0; i < WORKERS * ROUNDS && !failure[0]; i++) {
		replies[i].in = i;
		replies[i].worker = i % WORKERS;
		if (keel_call_then(workers[i % WORKERS], square, got_reply,
				   reply_cancelled, &replies[i]) != 0)
			fail("keel_call_then() refused");
	}
	if (failure[0]) {
		report();
		return 1;
	}
	/* Back to the event loop, the runtime alive: the replies are
	 * served there. */
	emscripten_exit_with_live_runtime();
	return 0;
}
