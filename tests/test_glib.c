/*
 * test_glib.c: keel/glib.h against the real GLib: a loop task serves what
 * other tasks post, and quits when its scope is cancelled
 * (loop_adapter.h), a quit made before g_main_loop_run() included.
 */
#include <keel/glib.h>

#include "loop_adapter.h"

static int glib_loop_task(void *p)
{
	struct run *r = p;
	GMainContext *ctx = g_main_context_new();
	GMainLoop *loop = g_main_loop_new(ctx, FALSE);
	keel_glib_t *src;
	int status;

	g_main_context_push_thread_default(ctx);
	CHECK_OK(keel_glib_attach(loop, &src));
	CHECK_RC(keel_glib_attach(NULL, &src), -EINVAL);
	event_set(&r->ready);
	if (r->variant == CANCEL_BEFORE_RUN) {
		event_wait(&r->cancelled);
		/* An iteration outside g_main_loop_run() dispatches the
		 * source, whose quit is lost (the loop is not running)... */
		g_main_context_iteration(ctx, FALSE);
		CHECK_RC(keel_glib_status(src), -ECANCELED);
	}
	/* ... and g_main_loop_run() still returns. */
	g_main_loop_run(loop);
	status = keel_glib_status(src);
	CHECK_RC(status, -ECANCELED);
	/* Still cancelled: a second run quits too. */
	g_main_loop_run(loop);
	CHECK_OK(keel_glib_detach(src));
	g_main_context_pop_thread_default(ctx);
	g_main_loop_unref(loop);
	g_main_context_unref(ctx);
	adapter_loop_done(r, status);
	return 0;
}

TEST(serves_then_quits_on_cancel)
{
	adapter_scenario(PLAIN, glib_loop_task);
}

TEST(quits_on_cancel_then_posted_to)
{
	adapter_scenario(POST_AFTER_CANCEL, glib_loop_task);
}

TEST(cancel_before_run_is_not_lost)
{
	adapter_scenario(CANCEL_BEFORE_RUN, glib_loop_task);
}
