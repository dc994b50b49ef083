/*
 * keel/uv.h: serve a task's mailbox from a libuv loop, and stop the loop
 * when the task is cancelled.
 *
 * Optional and header-only: keel.h does not include it, and libkeel does
 * not depend on libuv. A program that includes it links libuv itself
 * (pkg-config libuv).
 *
 * The task that runs the loop attaches its mailbox to it; a uv_poll_t on
 * keel_mailbox_fd() then calls keel_serve(0) whenever messages are
 * pending. When the task is cancelled (or its mailbox closed), the fd
 * becomes readable, keel_serve(0) says so, and the adapter calls
 * uv_stop(): uv_run() returns. While attached to a cancelled task, every
 * uv_run() returns after one iteration, so a stop cannot be lost. Then:
 *
 *     keel_uv_t a;
 *     uv_loop_init(&loop);
 *     keel_uv_attach(&a, &loop);
 *     uv_run(&loop, UV_RUN_DEFAULT);     returns once the task is cancelled
 *     keel_uv_detach(&a);                before the task ends
 *     ... close your own handles ...
 *     uv_run(&loop, UV_RUN_DEFAULT);     completes the closes
 *     uv_loop_close(&loop);
 *
 * Messages that arrive after the cancel are not run: the drain when the
 * task ends cancels them, so each still gets exactly one outcome.
 * See docs/mailbox.md, "Event loops".
 */
#ifndef KEEL_UV_H
#define KEEL_UV_H

#include <errno.h>
#include <uv.h>

#include "mailbox.h"

#ifdef __cplusplus
extern "C" {
#endif

/**
 * typedef keel_uv_t - a task's mailbox attached to a libuv loop.
 *
 * Caller-allocated; must stay valid from keel_uv_attach() until the loop
 * has run the close that keel_uv_detach() starts. Its fields are private:
 * read them through keel_uv_status().
 */
typedef struct keel_uv {
	uv_poll_t poll;
	int status;
} keel_uv_t;

/* The poll callback: serve what is pending; stop the loop for good once
 * the task is cancelled or its mailbox closed. */
static inline void keel_uv__readable(uv_poll_t *p, int status, int events)
{
	keel_uv_t *a = (keel_uv_t *)p->data;
	int rc;

	(void)events;
	if (status < 0) {
		a->status = status;
		uv_poll_stop(p);
		uv_stop(p->loop);
		return;
	}
	rc = keel_serve(0);
	if (rc == -ECANCELED || rc == -ESHUTDOWN) {
		/* The fd stays readable: every later iteration comes back
		 * here and stops the loop again. */
		a->status = rc;
		uv_stop(p->loop);
	}
}

/**
 * keel_uv_attach() - serve the calling task's mailbox from @loop.
 * @a:    caller-allocated adapter state.
 * @loop: a libuv loop that this task runs.
 *
 * Starts a uv_poll_t on keel_mailbox_fd(): while @loop runs, pending
 * messages run from its poll phase, in order, through keel_serve(0). When
 * the task is cancelled or its mailbox is closed, the adapter stops @loop
 * (uv_stop()), at every iteration while it stays attached.
 *
 * Context: the task that runs @loop; never blocks.
 * Return: 0; -EINVAL if @a or @loop is NULL; -ESHUTDOWN if the task's
 * mailbox is closed; another negative errno value (from
 * keel_mailbox_fd() or uv_poll_init(), e.g. -EEXIST if the mailbox is
 * attached to @loop already). On error nothing is attached.
 */
static inline int keel_uv_attach(keel_uv_t *a, uv_loop_t *loop)
{
	int fd, rc;

	if (!a || !loop)
		return -EINVAL;
	if ((fd = keel_mailbox_fd()) < 0)
		return fd;
	if ((rc = uv_poll_init(loop, &a->poll, fd)) < 0)
		return rc;
	a->poll.data = a;
	a->status = 0;
	/* Cannot fail on an initialised handle (libuv returns 0). */
	uv_poll_start(&a->poll, UV_READABLE, keel_uv__readable);
	return 0;
}

/**
 * keel_uv_status() - why the adapter stopped the loop.
 * @a: an attached adapter.
 *
 * Context: the task that runs the loop; never blocks.
 * Return: 0 while it has not stopped the loop; -ECANCELED if the task
 * was cancelled; -ESHUTDOWN if its mailbox was closed; a libuv error
 * (negative errno value) if polling the fd failed.
 */
static inline int keel_uv_status(const keel_uv_t *a)
{
	return a->status;
}

/**
 * keel_uv_detach() - stop serving the mailbox from the loop.
 * @a: an attached adapter.
 *
 * Stops the poll and starts closing its handle; the fd leaves the loop at
 * once. @a must stay valid until the loop has run once more (the close
 * completes there). Detach before the task ends: keel closes the fd then.
 *
 * Context: the task that runs the loop; never blocks.
 * Return: 0; -EINVAL if @a is NULL or is being detached already.
 */
static inline int keel_uv_detach(keel_uv_t *a)
{
	if (!a || uv_is_closing((uv_handle_t *)&a->poll))
		return -EINVAL;
	uv_close((uv_handle_t *)&a->poll, NULL);
	return 0;
}

#ifdef __cplusplus
}
#endif

#endif /* KEEL_UV_H */
