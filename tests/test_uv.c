/*
 * test_uv.c: keel/uv.h against the real libuv: a loop task serves what
 * other tasks post, and stops when its scope is cancelled (loop_adapter.h).
 */
#include <keel/uv.h>

#include "loop_adapter.h"

static int uv_loop_task(void *p)
{
	struct run *r = p;
	uv_loop_t loop;
	keel_uv_t a;

	CHECK_EQ(uv_loop_init(&loop), 0);
	CHECK_OK(keel_uv_attach(&a, &loop));
	CHECK_RC(keel_uv_attach(&a, NULL), -EINVAL);
	event_set(&r->ready);
	if (r->variant == CANCEL_BEFORE_RUN)
		event_wait(&r->cancelled);
	/* Only the adapter's poll keeps the loop alive: uv_run() returns
	 * when the adapter stops it. */
	uv_run(&loop, UV_RUN_DEFAULT);
	CHECK_RC(keel_uv_status(&a), -ECANCELED);
	/* Still cancelled: a second run stops too, after one iteration. */
	uv_run(&loop, UV_RUN_DEFAULT);
	CHECK_OK(keel_uv_detach(&a));
	CHECK_RC(keel_uv_detach(&a), -EINVAL);
	CHECK_EQ(uv_run(&loop, UV_RUN_DEFAULT), 0); /* completes the close */
	CHECK_EQ(uv_loop_close(&loop), 0);
	adapter_loop_done(r, keel_uv_status(&a));
	return 0;
}

TEST(serves_then_stops_on_cancel)
{
	adapter_scenario(PLAIN, uv_loop_task);
}

TEST(stops_on_cancel_then_posted_to)
{
	adapter_scenario(POST_AFTER_CANCEL, uv_loop_task);
}

TEST(cancel_before_run_is_not_lost)
{
	adapter_scenario(CANCEL_BEFORE_RUN, uv_loop_task);
}
