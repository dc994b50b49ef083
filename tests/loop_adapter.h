/*
 * loop_adapter.h: the scenario both event-loop adapter tests run
 * (test_uv.c, test_glib.c), each with its own loop task.
 *
 * A scope holds a loop task, which attaches its mailbox to a real loop
 * and runs it, and POSTERS tasks that post to it. Once every message has
 * run, the scope is cancelled: the loop must stop and the task return.
 * Variants: a message posted right after the cancel (it gets exactly one
 * outcome: the drain at the task's end cancels it); and a cancel that
 * comes before the loop has started running (the stop must not be lost).
 */
#ifndef KEEL_TEST_LOOP_ADAPTER_H
#define KEEL_TEST_LOOP_ADAPTER_H

#include <stdatomic.h>
#include <string.h>

#include "harness.h"

#define POSTERS 4
#define PER_POSTER 2000

enum variant {
	PLAIN,             /* cancel once everything ran */
	POST_AFTER_CANCEL, /* ... and post one more right after */
	CANCEL_BEFORE_RUN, /* cancel before the loop starts running */
};

struct run {
	enum variant variant;
	keel_task_t loop_id;
	harness_event ready;      /* attached; about to run the loop */
	harness_event cancelled;  /* CANCEL_BEFORE_RUN: the cancel is done */
	harness_event all_ran;    /* every posted message has run */
	harness_event posted;     /* POST_AFTER_CANCEL: the post is done */
	atomic_int ran, cancels, accepted;
	int status;               /* the adapter's status after the loop */
	int loop_returned;
};

static void adapter_msg_run(void *p)
{
	struct run *r = p;

	if (atomic_fetch_add(&r->ran, 1) + 1 == POSTERS * PER_POSTER)
		event_set(&r->all_ran);
}

static void adapter_msg_cancel(void *p)
{
	atomic_fetch_add(&((struct run *)p)->cancels, 1);
}

static int adapter_poster(void *p)
{
	struct run *r = p;

	for (int i = 0; i < PER_POSTER; i++) {
		CHECK_OK(keel_post(r->loop_id, adapter_msg_run,
				   adapter_msg_cancel, r));
		atomic_fetch_add(&r->accepted, 1);
	}
	return 0;
}

/* Called by the loop task once its loop has returned and the adapter is
 * detached. */
static void adapter_loop_done(struct run *r, int status)
{
	r->status = status;
	r->loop_returned = 1;
	/* Stay until the test's late post is accepted: the drain at this
	 * task's end is what gives it its outcome. */
	if (r->variant == POST_AFTER_CANCEL)
		event_wait(&r->posted);
}

static void adapter_scenario(enum variant v, keel_fn loop_task)
{
	keel_scope_t *s;
	struct run r;

	memset(&r, 0, sizeof r);
	r.variant = v;
	event_init(&r.ready);
	event_init(&r.cancelled);
	event_init(&r.all_ran);
	event_init(&r.posted);
	CHECK_OK(keel_scope_open(&s, NULL));
	CHECK_OK(keel_spawn(s, loop_task, &r, NULL, &r.loop_id));
	event_wait(&r.ready);
	if (v == CANCEL_BEFORE_RUN) {
		CHECK_OK(keel_scope_cancel(s));
		event_set(&r.cancelled);
	} else {
		for (int i = 0; i < POSTERS; i++)
			CHECK_OK(keel_spawn(s, adapter_poster, &r, NULL, NULL));
		event_wait(&r.all_ran);
		CHECK_OK(keel_scope_cancel(s));
		if (v == POST_AFTER_CANCEL) {
			CHECK_OK(keel_post(r.loop_id, adapter_msg_run,
					   adapter_msg_cancel, &r));
			atomic_fetch_add(&r.accepted, 1);
			event_set(&r.posted);
		}
	}
	CHECK_RC(keel_scope_close(s), -ECANCELED);
	CHECK_EQ(r.loop_returned, 1);
	CHECK_RC(r.status, -ECANCELED);
	/* Exactly one outcome per accepted message. */
	CHECK_EQ(atomic_load(&r.ran) + atomic_load(&r.cancels),
		 atomic_load(&r.accepted));
	/* The late message may run: a serve that was running the batch
	 * with the last of the others when the cancel came goes on with
	 * its batch. Or it is cancelled. */
	if (v == CANCEL_BEFORE_RUN)
		CHECK_EQ(atomic_load(&r.ran), 0);
	else
		CHECK_INT(atomic_load(&r.ran), >=, POSTERS * PER_POSTER);
	printf("%d ran, %d cancelled, status %s\n", atomic_load(&r.ran),
	       atomic_load(&r.cancels), keel_strerror(r.status));
}

#endif /* KEEL_TEST_LOOP_ADAPTER_H */
