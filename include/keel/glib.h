/*
 * keel/glib.h: serve a task's mailbox from a GLib main loop, and quit the
 * loop when the task is cancelled.
 *
 * Optional and header-only: keel.h does not include it, and libkeel does
 * not depend on GLib. A program that includes it links glib-2.0 itself
 * (pkg-config glib-2.0).
 *
 * The task that runs the loop attaches its mailbox to it: a GSource
 * watches keel_mailbox_fd() and calls keel_serve(0) whenever messages
 * are pending. When the task is cancelled (or its mailbox closed), the
 * source calls g_main_loop_quit() from its own dispatch.
 *
 * No lost quit. g_main_loop_quit() on a loop that is not running is lost
 * (g_main_loop_run() starts by marking it running), so a quit sent from
 * another thread, or from a dispatch that ran outside g_main_loop_run(),
 * can be lost. Here the quit is made at every iteration of the context
 * while the task is cancelled: the source's prepare checks cancellation
 * (and a passed scope deadline) and asks to be dispatched, and the
 * dispatch quits. So the first iteration inside g_main_loop_run() quits
 * it, whenever the cancel came. Then:
 *
 *     keel_glib_t *src;
 *     GMainLoop *loop = g_main_loop_new(NULL, FALSE);
 *     keel_glib_attach(loop, &src);
 *     g_main_loop_run(loop);             returns once the task is cancelled
 *     keel_glib_detach(src);             before the task ends
 *     g_main_loop_unref(loop);
 *
 * Messages that arrive after the cancel are not run: the drain when the
 * task ends cancels them, so each still gets exactly one outcome.
 * See docs/mailbox.md, "Event loops".
 */
#ifndef KEEL_GLIB_H
#define KEEL_GLIB_H

#include <errno.h>
#include <glib.h>

#include "mailbox.h"
#include "scope.h"

#ifdef __cplusplus
extern "C" {
#endif

/**
 * typedef keel_glib_t - a task's mailbox attached to a GLib main loop.
 *
 * A GSource (its first member), allocated by keel_glib_attach() and freed
 * by keel_glib_detach(). Its fields are private: read them through
 * keel_glib_status().
 */
typedef struct keel_glib {
	GSource source;
	gpointer tag;
	GMainLoop *loop;
	int status;
} keel_glib_t;

/* Cancelled (or a scope deadline passed, which cancels): dispatch now,
 * without polling. */
static inline gboolean keel_glib__prepare(GSource *s, gint *timeout)
{
	(void)s;
	*timeout = -1;
	return keel_checkpoint() == -ECANCELED;
}

static inline gboolean keel_glib__check(GSource *s)
{
	keel_glib_t *a = (keel_glib_t *)s;

	return (g_source_query_unix_fd(s, a->tag) & G_IO_IN) != 0 ||
	       keel_checkpoint() == -ECANCELED;
}

static inline gboolean keel_glib__dispatch(GSource *s, GSourceFunc cb,
					   gpointer data)
{
	keel_glib_t *a = (keel_glib_t *)s;
	int rc = keel_serve(0);

	(void)cb;
	(void)data;
	if (rc == -ECANCELED || rc == -ESHUTDOWN) {
		/* Again at every iteration while the task stays so: a quit
		 * made while the loop was not running is made once more. */
		a->status = rc;
		g_main_loop_quit(a->loop);
	}
	return G_SOURCE_CONTINUE;
}

static inline void keel_glib__finalize(GSource *s)
{
	g_main_loop_unref(((keel_glib_t *)s)->loop);
}

/**
 * keel_glib_attach() - serve the calling task's mailbox from @loop.
 * @loop: a GLib main loop that this task runs.
 * @out:  where the new source is stored.
 *
 * Attaches a source to @loop's context: while the context iterates,
 * pending messages run from its dispatch, in order, through
 * keel_serve(0). When the task is cancelled or its mailbox is closed, the
 * source quits @loop (g_main_loop_quit()), at every iteration while it
 * stays attached. The source holds a reference to @loop.
 *
 * Context: the task that runs @loop; never blocks.
 * Return: 0; -EINVAL if @loop or @out is NULL; -ESHUTDOWN if the task's
 * mailbox is closed; another negative errno value from keel_mailbox_fd().
 * On error nothing is attached.
 */
static inline int keel_glib_attach(GMainLoop *loop, keel_glib_t **out)
{
	static GSourceFuncs funcs = {
		.prepare = keel_glib__prepare,
		.check = keel_glib__check,
		.dispatch = keel_glib__dispatch,
		.finalize = keel_glib__finalize,
	};
	keel_glib_t *a;
	GSource *s;
	int fd;

	if (!loop || !out)
		return -EINVAL;
	if ((fd = keel_mailbox_fd()) < 0)
		return fd;
	s = g_source_new(&funcs, sizeof(keel_glib_t));
	a = (keel_glib_t *)s;
	a->loop = g_main_loop_ref(loop);
	a->status = 0;
	a->tag = g_source_add_unix_fd(s, fd, G_IO_IN);
	g_source_set_name(s, "keel mailbox");
	g_source_attach(s, g_main_loop_get_context(loop));
	*out = a;
	return 0;
}

/**
 * keel_glib_status() - why the source quit the loop.
 * @src: an attached source.
 *
 * Context: the task that runs the loop; never blocks.
 * Return: 0 while it has not quit the loop; -ECANCELED if the task was
 * cancelled; -ESHUTDOWN if its mailbox was closed.
 */
static inline int keel_glib_status(const keel_glib_t *src)
{
	return src->status;
}

/**
 * keel_glib_detach() - stop serving the mailbox from the loop.
 * @src: the source keel_glib_attach() made.
 *
 * Removes the source from its context (the fd leaves the poll set at
 * once) and frees it. Detach before the task ends: keel closes the fd
 * then.
 *
 * Context: the task that runs the loop, not from inside the source's own
 * dispatch; never blocks.
 * Return: 0; -EINVAL if @src is NULL.
 */
static inline int keel_glib_detach(keel_glib_t *src)
{
	if (!src)
		return -EINVAL;
	g_source_destroy(&src->source);
	g_source_unref(&src->source);
	return 0;
}

#ifdef __cplusplus
}
#endif

#endif /* KEEL_GLIB_H */
