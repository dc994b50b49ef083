/*
 * uv-loop: a libuv event loop that serves a keel task's mailbox, fed by
 * worker tasks, and shut down by cancelling its scope.
 *
 * The loop task runs an ordinary libuv loop (here a timer that reports
 * progress) and attaches its mailbox to it with keel/uv.h: jobs that the
 * workers post run on the loop's thread, between its other callbacks, so
 * the loop's state needs no lock. After a while (or at Ctrl-C), main
 * cancels the scope: the workers stop in their sleep, the adapter stops
 * the loop, the loop task closes its handles and returns. Jobs still
 * queued then are cancelled by the loop task's mailbox as it ends, so the
 * tally closes: every accepted job was either served or cancelled, never
 * lost or run twice, and each worker's jobs were served in the order it
 * posted them.
 */
#define _POSIX_C_SOURCE 200809L
#include <keel.h>
#include <keel/uv.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#define WORKERS 3
#define RUN_MS 300

struct job {
	int worker;
	long seq;
};

static keel_task_t loop_task;
static atomic_long accepted, served, cancelled;

/* Owned by the loop task: only messages and loop callbacks touch it. */
static long last_seq[WORKERS];
static long out_of_order;

static void run_job(void *arg) /* on the loop task, from uv_run() */
{
	struct job *j = arg;

	if (j->seq != last_seq[j->worker] + 1)
		out_of_order++;
	last_seq[j->worker] = j->seq;
	atomic_fetch_add(&served, 1);
	free(j);
}

static void drop_job(void *arg) /* on the loop task, as it ends */
{
	atomic_fetch_add(&cancelled, 1);
	free(arg);
}

static void on_tick(uv_timer_t *t)
{
	(void)t;
	printf("loop: %ld jobs served so far\n", atomic_load(&served));
}

static int run_loop(void *arg)
{
	uv_loop_t loop;
	uv_timer_t tick;
	keel_uv_t mbox;
	int rc;

	(void)arg;
	uv_loop_init(&loop);
	if ((rc = keel_uv_attach(&mbox, &loop)) < 0) {
		fprintf(stderr, "loop: attach: %s\n", keel_strerror(rc));
		uv_loop_close(&loop);
		return rc;
	}
	uv_timer_init(&loop, &tick);
	uv_timer_start(&tick, on_tick, 100, 100);

	uv_run(&loop, UV_RUN_DEFAULT); /* until the task is cancelled */

	printf("loop: stopped (%s)\n", keel_strerror(keel_uv_status(&mbox)));
	uv_close((uv_handle_t *)&tick, NULL);
	keel_uv_detach(&mbox); /* before the task ends */
	uv_run(&loop, UV_RUN_DEFAULT); /* completes the closes */
	uv_loop_close(&loop);
	return 0;
}

static int worker(void *arg)
{
	int w = (int)(intptr_t)arg;

	for (long seq = 1;; seq++) {
		struct job *j = malloc(sizeof *j);
		int rc;

		if (!j)
			return -ENOMEM;
		j->worker = w;
		j->seq = seq;
		if ((rc = keel_post(loop_task, run_job, drop_job, j)) < 0) {
			free(j); /* refused: nothing will run */
			return rc == -ESHUTDOWN || rc == -ESRCH ? 0 : rc;
		}
		atomic_fetch_add(&accepted, 1);
		if (keel_sleep_until(keel_after(KEEL_USEC(200))) < 0)
			return 0; /* cancelled */
	}
}

static int body(keel_scope_t *root, void *arg)
{
	keel_scope_opts opts = {.name = "loop and workers"};
	keel_spawn_opts lopts = {.name = "uv-loop"};
	keel_scope_t *s;
	int rc;

	(void)root;
	(void)arg;
	if ((rc = keel_scope_open(&s, &opts)) < 0)
		return rc;
	if ((rc = keel_spawn(s, run_loop, NULL, &lopts, &loop_task)) < 0)
		goto out;
	for (int w = 0; w < WORKERS; w++) {
		keel_spawn_opts wopts = {.name = "worker"};

		if ((rc = keel_spawn(s, worker, (void *)(intptr_t)w, &wopts,
				     NULL)) < 0)
			goto out;
	}
	/* Run for a while, or until Ctrl-C cancels the root scope. */
	keel_sleep_until(keel_after(KEEL_MS(RUN_MS)));
	printf("main: cancelling the loop and the workers\n");
out:
	keel_scope_cancel(s);
	keel_scope_close(s); /* -ECANCELED: we cancelled it */
	printf("jobs accepted %ld = served %ld + cancelled %ld; "
	       "out of order: %ld\n",
	       atomic_load(&accepted), atomic_load(&served),
	       atomic_load(&cancelled), out_of_order);
	if (rc < 0)
		return rc;
	return atomic_load(&accepted) ==
				       atomic_load(&served) +
					       atomic_load(&cancelled) &&
			       out_of_order == 0
		       ? 0
		       : -EPROTO;
}

int main(void)
{
	return keel_main(body, NULL);
}
