/*
 * glib-loop: a GLib main loop that serves a keel task's mailbox, fed by
 * worker tasks, and shut down by cancelling its scope.
 *
 * The loop task runs a GMainLoop (here with a timeout source that reports
 * progress) and attaches its mailbox to it with keel/glib.h: jobs that
 * the workers post run on the loop's thread, between its other sources,
 * so the loop's state needs no lock. After a while (or at Ctrl-C), main
 * cancels the scope: the workers stop in their sleep, the keel source
 * quits the loop from its own dispatch (a quit that cannot be lost), the
 * loop task removes its sources and returns. Jobs still queued then are
 * cancelled by the loop task's mailbox as it ends, so the tally closes:
 * every accepted job was either served or cancelled, never lost or run
 * twice, and each worker's jobs were served in the order it posted them.
 */
#define _POSIX_C_SOURCE 200809L
#include <keel.h>
#include <keel/glib.h>
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

static void run_job(void *arg) /* on the loop task, from the main loop */
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

static gboolean on_tick(gpointer data)
{
	(void)data;
	printf("loop: %ld jobs served so far\n", atomic_load(&served));
	return G_SOURCE_CONTINUE;
}

static int run_loop(void *arg)
{
	GMainContext *ctx = g_main_context_new();
	GMainLoop *loop = g_main_loop_new(ctx, FALSE);
	GSource *tick = g_timeout_source_new(100);
	keel_glib_t *mbox;
	int rc;

	(void)arg;
	g_main_context_push_thread_default(ctx);
	g_source_set_callback(tick, on_tick, NULL, NULL);
	g_source_attach(tick, ctx);
	if ((rc = keel_glib_attach(loop, &mbox)) < 0) {
		fprintf(stderr, "loop: attach: %s\n", keel_strerror(rc));
	} else {
		g_main_loop_run(loop); /* until the task is cancelled */
		printf("loop: quit (%s)\n",
		       keel_strerror(keel_glib_status(mbox)));
		keel_glib_detach(mbox); /* before the task ends */
	}
	g_source_destroy(tick);
	g_source_unref(tick);
	g_main_context_pop_thread_default(ctx);
	g_main_loop_unref(loop);
	g_main_context_unref(ctx);
	return rc < 0 ? rc : 0;
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
	keel_spawn_opts lopts = {.name = "glib-loop"};
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
