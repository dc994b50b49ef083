/*
 * wasm_proxy.c: keel's mailbox beside Emscripten's proxying queues, on
 * WebAssembly threads under Node (`make bench-wasm`,
 * docs/webassembly.md).
 *
 * One target thread returns to its JavaScript event loop and is served
 * there by both: keel through keel_mailbox_serve_from_loop(), Emscripten
 * through a proxying queue of its own (em_proxying_queue_create()). A
 * second target serves keel's mailbox the native way, blocked in
 * keel_serve(). The sender is main() (a Worker: PROXY_TO_PTHREAD).
 *
 *   post->serve  POSTS messages sent back to back, timed until the
 *                target has run the last (the last wakes the sender);
 *                ns per message: keel_post() vs emscripten_proxy_async()
 *   call         CALLS round trips one after another; ns per call:
 *                keel_call() vs emscripten_proxy_sync()
 *
 * Each row is measured REPS times, interleaved, and reported as its median
 * with the ratio to Emscripten's in the same run.
 */
#include <emscripten.h>
#include <emscripten/threading.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>

#include "keel.h"

#if __has_include(<emscripten/proxying.h>)
#include <emscripten/proxying.h>
#else
/* Emscripten 3.1.6 has the functions, not the header. */
typedef struct em_proxying_queue em_proxying_queue;
em_proxying_queue *em_proxying_queue_create(void);
int emscripten_proxy_async(em_proxying_queue *q, pthread_t target_thread,
			   void (*func)(void *), void *arg);
int emscripten_proxy_sync(em_proxying_queue *q, pthread_t target_thread,
			  void (*func)(void *), void *arg);
#endif

#define REPS 9

static long posts = 20000, calls = 2000;

struct target {
	pthread_t thread;
	keel_task_t task;
	_Atomic uint32_t ready;
	int loop; /* served from its event loop, else by keel_serve() */
};

static _Atomic uint32_t ran, finished;
static uint32_t want;

static void work(void *arg)
{
	(void)arg;
	if (atomic_fetch_add_explicit(&ran, 1, memory_order_relaxed) + 1 ==
	    want) {
		atomic_store(&finished, 1);
		emscripten_futex_wake(&finished, 1);
	}
}

static void nothing(void *arg)
{
	(void)arg;
}

static void *target_main(void *p)
{
	struct target *t = p;

	t->task = keel_self();
	if (t->loop && keel_mailbox_serve_from_loop() != 0)
		abort();
	atomic_store(&t->ready, 1);
	emscripten_futex_wake(&t->ready, 1);
	if (t->loop)
		emscripten_exit_with_live_runtime(); /* back to its loop */
	while (keel_serve(KEEL_FOREVER) > 0)
		;
	return NULL;
}

static void start(struct target *t, int loop)
{
	t->loop = loop;
	if (pthread_create(&t->thread, NULL, target_main, t) != 0)
		abort();
	while (!atomic_load(&t->ready))
		emscripten_futex_wait(&t->ready, 0, 100);
}

static void wait_finished(void)
{
	while (!atomic_load(&finished))
		emscripten_futex_wait(&finished, 0, 100);
}

enum impl { KEEL_LOOP, KEEL_SERVE, EM_QUEUE, NIMPL };
static const char *impl_name[NIMPL] = {
	"keel, served from the event loop",
	"keel, keel_serve() in the thread",
	"emscripten proxying queue (event loop)",
};

static struct target loop_target, serve_target;
static em_proxying_queue *queue;

/* ns per message */
static double run_posts(enum impl i)
{
	double t0;

	atomic_store(&ran, 0);
	atomic_store(&finished, 0);
	want = (uint32_t)posts;
	t0 = emscripten_get_now();
	for (long n = 0; n < posts; n++) {
		int ok;

		if (i == EM_QUEUE)
			ok = emscripten_proxy_async(queue, loop_target.thread,
						    work, NULL) == 1;
		else
			ok = keel_post(i == KEEL_LOOP ? loop_target.task
						      : serve_target.task,
				       work, NULL, NULL) == 0;
		if (!ok)
			abort();
	}
	wait_finished();
	return (emscripten_get_now() - t0) * 1e6 / (double)posts;
}

/* ns per round trip */
static double run_calls(enum impl i)
{
	double t0 = emscripten_get_now();

	for (long n = 0; n < calls; n++) {
		int ok;

		if (i == EM_QUEUE)
			ok = emscripten_proxy_sync(queue, loop_target.thread,
						   nothing, NULL) == 1;
		else
			ok = keel_call(i == KEEL_LOOP ? loop_target.task
						      : serve_target.task,
				       nothing, NULL, KEEL_FOREVER) == 0;
		if (!ok)
			abort();
	}
	return (emscripten_get_now() - t0) * 1e6 / (double)calls;
}

static int cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return x < y ? -1 : x > y;
}

static double median(double *v)
{
	qsort(v, REPS, sizeof *v, cmp);
	return v[REPS / 2];
}

static void row(const char *what, double (*run)(enum impl), long n)
{
	double v[NIMPL][REPS], med[NIMPL];

	for (int r = 0; r < REPS; r++)
		for (int i = 0; i < NIMPL; i++)
			v[i][r] = run((enum impl)i);
	for (int i = 0; i < NIMPL; i++)
		med[i] = median(v[i]);
	printf("%s (%ld per rep, median of %d reps)\n", what, n, REPS);
	for (int i = 0; i < NIMPL; i++)
		printf("  %-40s %9.0f ns   %5.2fx emscripten\n", impl_name[i],
		       med[i], med[i] / med[EM_QUEUE]);
}

int main(int argc, char **argv)
{
	if (argc > 1)
		posts = atol(argv[1]);
	if (argc > 2)
		calls = atol(argv[2]);
	if (!(queue = em_proxying_queue_create()))
		abort();
	start(&loop_target, 1);
	start(&serve_target, 0);
	/* Warm up both paths (Workers, message tables, JIT). */
	run_posts(KEEL_LOOP);
	run_posts(KEEL_SERVE);
	run_posts(EM_QUEUE);
	row("post->serve, ns per message", run_posts, posts);
	row("call round trip, ns per call", run_calls, calls);
	fflush(stdout);
	emscripten_force_exit(0);
	return 0;
}
