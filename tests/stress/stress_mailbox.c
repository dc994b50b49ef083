/*
 * stress_mailbox.c: exactly-once under chaos.
 *
 * Senders post to targets that close at random moments while the sends
 * race the close; targets come and go (new tasks reuse old slots), so
 * stale handles are in play too. Afterwards every message is accounted:
 *   - accepted + refused = sent;
 *   - every accepted message had exactly one of work or cancel, once;
 *   - no refused message ran either;
 *   - work ran only on the task it was sent to, never after that task's
 *     close had returned, and cancel ran on that task too.
 *
 * Sizes: KEEL_THREADS senders (4), KEEL_ITERS messages each (100,000;
 * 2,500,000 under KEEL_STRESS=long, 10^7 in all), KEEL_SEED.
 *
 * A third of the messages are keel_msg_t's of the sender's (keel_post_msg,
 * keel_post_msg_until), registered just before their send and finished
 * by their outcome or refusal, which then scribbles over them.
 *
 * The _bounded variants run the same chaos with small mailbox limits that
 * the targets set (and change) at random: sends are also refused with
 * -EAGAIN, blocking sends (keel_post_until, keel_call) wait for room and
 * race the close and the end, and the callers' own mailboxes are kept
 * full so that every reply arrives at a full mailbox.
 */
#include <stdatomic.h>
#include <string.h>

#include "harness.h"
#include "internal.h"

#define LANES 3
#define MAX_SLOTS 4096

struct msg_rec {
	/* Sent with keel_post_msg() (if `own`): registered just before,
	 * finished by the sender if refused, else by its outcome. */
	keel_msg_t km;
	keel_task_t target;  /* written by the sender before the post */
	atomic_uchar ran, cancelled, wrong_task, after_close;
	unsigned char accepted, refused; /* written by its sender only */
	unsigned char own;
};

/* Its outcome began: a keel_msg_t is the sender's again. Finish it and
 * scribble over it, so that any later touch by keel shows. */
static void own_again(struct msg_rec *m)
{
	if (!m->own)
		return;
	CHECK_OK(keel_msg_fini(&m->km));
	memset(&m->km, 0x5a, sizeof m->km);
}

struct lane {
	_Atomic keel_task_t current;
	pthread_t controller;
	uint64_t rng;
	long spawned;
};

static struct msg_rec *msgs;
static struct lane lanes[LANES];
/* The _bounded variants: targets bound their mailboxes. */
static int bounded;
static atomic_int stop_lanes;
/* Senders start once every lane has published its first target. */
static harness_barrier lanes_up;
/* Per slot index: the handle of the task whose close has returned. */
static _Atomic keel_task_t close_returned[MAX_SLOTS];

static void check_place(struct msg_rec *m)
{
	keel_task_t self = keel_self();

	if (self != m->target)
		atomic_store(&m->wrong_task, 1);
	if (atomic_load(&close_returned[self & (MAX_SLOTS - 1)]) == self)
		atomic_store(&m->after_close, 1);
}

static void chaos_work(void *p)
{
	struct msg_rec *m = p;

	check_place(m);
	own_again(m);
	atomic_fetch_add(&m->ran, 1);
}

static void chaos_cancel(void *p)
{
	struct msg_rec *m = p;

	if (keel_self() != m->target)
		atomic_store(&m->wrong_task, 1);
	own_again(m);
	atomic_fetch_add(&m->cancelled, 1);
}

static int target_fn(void *p)
{
	struct lane *l = p;
	uint64_t r = rng_next(&l->rng);
	long budget = (long)(r % 3000);
	long ran = 0;

	if (bounded)
		CHECK_OK(keel_mailbox_limit(1 + (r >> 12) % 8));
	/* Serve a random number of messages, with random short deadlines,
	 * then close while senders keep sending. */
	while (ran < budget && !atomic_load(&stop_lanes)) {
		int rc = keel_serve(keel_after((keel_time_t)(r >> 40) % 200000));

		if (rc > 0)
			ran += rc;
		else
			CHECK_RC(rc, -ETIMEDOUT);
		/* Now and then another limit, smaller or larger. */
		if (bounded && (rng_next(&l->rng) & 63) == 0)
			CHECK_OK(keel_mailbox_limit(1 + rng_next(&l->rng) % 8));
	}
	/* A bounded mailbox is seldom deep: half the time, let it fill (as
	 * the senders go on) before closing, so the close has messages to
	 * cancel and senders waiting for room to turn away. */
	if (bounded && (r >> 30) % 2) {
		struct keel__task *self = keel__self();

		while (!atomic_load(&stop_lanes) &&
		       (load_relaxed(&self->mb_queued) & 0xffffffffu) <
			       load_relaxed(&self->mb_limit))
			sched_yield();
	}
	CHECK_OK(keel_mailbox_close());
	atomic_store(&close_returned[keel_self() & (MAX_SLOTS - 1)],
		     keel_self());
	return 0;
}

static void *lane_controller(void *p)
{
	struct lane *l = p;

	while (!atomic_load(&stop_lanes)) {
		keel_task_t t;

		CHECK_OK(keel__task_spawn(&t, target_fn, l, "chaos-target", 0));
		atomic_store(&l->current, t);
		if (l->spawned == 0)
			barrier_wait(&lanes_up);
		CHECK_OK(keel__task_join(t, NULL));
		l->spawned++;
	}
	return NULL;
}

struct sender {
	long first, count;
	uint64_t rng;
	pthread_t th;
};

static atomic_long refused_full;

static void *sender_main(void *p)
{
	struct sender *s = p;

	for (long i = s->first; i < s->first + s->count; i++) {
		struct msg_rec *m = &msgs[i];
		struct lane *l = &lanes[rng_next(&s->rng) % LANES];
		int rc;

		uint64_t r = rng_next(&s->rng);

		m->target = atomic_load(&l->current);
		/* A third of the messages are the sender's own keel_msg_t. */
		m->own = (r >> 4) % 3 == 0;
		if (m->own)
			CHECK_OK(keel_msg_init(&m->km));
		if (bounded && (r & 1)) {
			/* Wait for room: forever, or up to 100 us. */
			keel_time_t d = (r >> 1) & 1 ? KEEL_FOREVER
					 : keel_after((keel_time_t)(r >> 8) %
						      100000);

			rc = m->own ? keel_post_msg_until(m->target, &m->km,
							  chaos_work,
							  chaos_cancel, m, d)
				    : keel_post_until(m->target, chaos_work,
						      chaos_cancel, m, d);
			CHECK(rc != -EAGAIN && rc != -ECANCELED);
		} else {
			rc = m->own ? keel_post_msg(m->target, &m->km,
						    chaos_work, chaos_cancel, m)
				    : keel_post(m->target, chaos_work,
						chaos_cancel, m);
		}
		if (rc == 0) {
			m->accepted = 1;
		} else {
			if (m->own)
				CHECK_OK(keel_msg_fini(&m->km));
			CHECK(rc == -ESHUTDOWN || rc == -ESRCH ||
			      (bounded && (rc == -EAGAIN || rc == -ETIMEDOUT)));
			m->refused = 1;
			if (rc == -EAGAIN)
				atomic_fetch_add(&refused_full, 1);
		}
	}
	return NULL;
}

/* What a run exercised: messages that ran, were cancelled, were refused. */
struct chaos_counts {
	long ran, cancelled, refused;
};

/* One chaos run, checked for exactly-once. With `out` NULL it must also
 * have exercised every outcome; else the counts go to *out (added), for a
 * caller that runs rounds until it has them. */
static void exactly_once_chaos(int bound, long iters_default,
			       struct chaos_counts *out)
{
	long nthreads = harness_param("KEEL_THREADS", 4, 4);
	long iters = harness_param("KEEL_ITERS", iters_default,
				   25 * iters_default);
	uint64_t seed = harness_seed();
	struct sender *senders = calloc((size_t)nthreads, sizeof *senders);
	long total = nthreads * iters, accepted = 0, refused = 0, ran = 0;
	long cancelled = 0, spawned = 0;
	long own[3] = {0, 0, 0}; /* keel_msg_t's ran, cancelled, refused */
	keel_time_t start = keel_now();

	uint64_t waits_before = atomic_load(&keel__room_waits_ok);

	CHECK_INT(nthreads, >=, 4);
	bounded = bound;
	atomic_store(&stop_lanes, 0);
	atomic_store(&refused_full, 0);
	msgs = calloc((size_t)total, sizeof *msgs);
	CHECK(msgs && senders);
	barrier_init(&lanes_up, LANES + 1);
	for (int i = 0; i < LANES; i++) {
		lanes[i].rng = seed ^ (0x1000u + (unsigned)i);
		/* Each lane's first target meets the others at lanes_up. */
		lanes[i].spawned = 0;
		lanes[i].controller = harness_thread(lane_controller, &lanes[i]);
	}
	barrier_wait(&lanes_up);
	for (long i = 0; i < nthreads; i++) {
		senders[i].first = i * iters;
		senders[i].count = iters;
		senders[i].rng = seed ^ (uint64_t)(i + 1) * 0x9E37u;
		senders[i].th = harness_thread(sender_main, &senders[i]);
	}
	for (long i = 0; i < nthreads; i++)
		harness_join(senders[i].th);
	atomic_store(&stop_lanes, 1);
	for (int i = 0; i < LANES; i++) {
		harness_join(lanes[i].controller);
		spawned += lanes[i].spawned;
	}
	pthread_barrier_destroy(&lanes_up); /* initialised again next round */

	for (long i = 0; i < total; i++) {
		struct msg_rec *m = &msgs[i];
		int r = atomic_load(&m->ran), c = atomic_load(&m->cancelled);

		CHECK_EQ(m->accepted + m->refused, 1);
		if (m->accepted)
			CHECK_EQ(r + c, 1);
		else
			CHECK_EQ(r + c, 0);
		CHECK_EQ(atomic_load(&m->wrong_task), 0);
		CHECK_EQ(atomic_load(&m->after_close), 0);
		accepted += m->accepted;
		refused += m->refused;
		if (m->own) {
			own[0] += r;
			own[1] += c;
			own[2] += m->refused;
		}
		ran += r;
		cancelled += c;
	}
	printf("sent %ld: accepted %ld (ran %ld, cancelled %ld), refused %ld; "
	       "%ld target tasks; %.1f ms\n",
	       total, accepted, ran, cancelled, refused, spawned,
	       (double)(keel_now() - start) / 1e6);
	printf("of them keel_msg_t's: ran %ld, cancelled %ld, refused %ld\n",
	       own[0], own[1], own[2]);
	CHECK_EQ(accepted + refused, total);
	CHECK_EQ(ran + cancelled, accepted);
	/* Every keel_msg_t was finished by its outcome or its refusal. */
	CHECK_EQ(atomic_load(&keel__foreign_live), 0);
	if (out) {
		out->ran += ran;
		out->cancelled += cancelled;
		out->refused += refused;
	} else {
		/* The run must have exercised both outcomes and refusals,
		 * with keel_msg_t's too. */
		CHECK_INT(ran, >, 0);
		CHECK_INT(cancelled, >, 0);
		CHECK_INT(refused, >, 0);
		for (int k = 0; k < 3; k++)
			CHECK_INT(own[k], >, 0);
	}
	if (bound) {
		long waited = (long)(atomic_load(&keel__room_waits_ok) -
				     waits_before);

		printf("bounded: %ld refused as full (-EAGAIN), %ld blocking "
		       "sends waited for room and were accepted\n",
		       (long)atomic_load(&refused_full), waited);
		CHECK_INT(atomic_load(&refused_full), >, 0);
		CHECK_INT(waited, >, 0);
	}
	free(msgs);
	free(senders);
}

TEST(stress_exactly_once_chaos)
{
	exactly_once_chaos(0, 100000, NULL);
}

TEST(stress_exactly_once_chaos_bounded)
{
	exactly_once_chaos(1, 100000, NULL);
}

/*
 * The races of the fast send (mailbox.c, THE TAIL WORD), each of which
 * has a common way and a rare one:
 *   - a send racing the close: accepted before the seal (and cancelled
 *     by the drain; with the close waiting for its link if it was between
 *     its CAS and its link), or refused at the seal after passing the
 *     mailbox word's check;
 *   - a send racing the owner's sleep: it takes the owner's arming and
 *     wakes it, or the owner finds it between its CAS and its link and
 *     waits for the link instead of sleeping;
 *   - a send racing the pop of the last record (the stub takes its
 *     place) or the owner's arming CAS: the owner's CAS wins, or the
 *     send's does and the owner looks again;
 *   - an owner waiting for a link: the sender's link comes before the
 *     owner names the record it waits on (the owner sees it), or after,
 *     and the sender wakes the owner.
 * The same chaos as above, exactly-once checked the same way, with the
 * yield injection turned high (in builds that compile it) so that each
 * window is wide; each rare way must then have happened. A build without
 * the injection points still runs the chaos and prints the counts.
 */
TEST(stress_send_races_both_ways)
{
	const char *names[KEEL_MBOX_RACES] = {
		"send refused at the seal", "close waited for a link",
		"send woke the owner", "owner waited for a link",
		"pop lost the tail to a send", "arming lost to a send",
		"a waited-for link woke the owner",
	};
	uint64_t before[KEEL_MBOX_RACES];

#ifdef KEEL_DEBUG_YIELD
	/* Before keel's first yield point reads it. */
	setenv("KEEL_YIELD", "100000", 1);
#endif
	struct chaos_counts seen = {0, 0, 0};
	int rounds = 0, missing;

	for (int i = 0; i < KEEL_MBOX_RACES; i++)
		before[i] = atomic_load(&keel__mbox_races[i]);
	/* Rounds until every outcome and every rare way has happened (each
	 * round is checked for exactly-once on its own): on a loaded machine
	 * one round may miss one (a run with no refusal was seen, seed
	 * 1883916541027738). At most 20 rounds; one still missing then fails
	 * the case. At least two, so that a later round's start is tested
	 * every time: it hung once when only a loaded machine reached it (the
	 * lanes' counts of targets were not reset, so no lane waited at the
	 * start barrier; seed 1883948854162384). */
	do {
		exactly_once_chaos(0, 20000, &seen);
		rounds++;
		missing = !seen.ran + !seen.cancelled + !seen.refused;
#ifdef KEEL_DEBUG_YIELD
		/* Without the injection the rare ways are only counted. */
		for (int i = 0; i < KEEL_MBOX_RACES; i++)
			missing += atomic_load(&keel__mbox_races[i]) == before[i];
#endif
	} while ((missing || rounds < 2) && rounds < 20);
	printf("rounds: %d\n", rounds);
	CHECK_INT(seen.ran, >, 0);
	CHECK_INT(seen.cancelled, >, 0);
	CHECK_INT(seen.refused, >, 0);
	for (int i = 0; i < KEEL_MBOX_RACES; i++) {
		uint64_t n = atomic_load(&keel__mbox_races[i]) - before[i];

		printf("%s: %llu\n", names[i], (unsigned long long)n);
#ifdef KEEL_DEBUG_YIELD
		CHECK_INT(n, >, 0);
#endif
	}
#ifndef KEEL_DEBUG_YIELD
	printf("(yield injection not compiled in: rare ways counted only)\n");
#endif
}

/* ---- Calls under chaos ---- */

enum { OP_CALL, OP_THEN };

struct op_rec {
	int kind, rc;
	atomic_int work, done, cancel, misplaced;
	keel_task_t caller;
};

static void op_work(void *p)
{
	atomic_fetch_add(&((struct op_rec *)p)->work, 1);
}

static void op_done(void *p)
{
	struct op_rec *o = p;

	if (keel_self() != o->caller)
		atomic_store(&o->misplaced, 1);
	atomic_fetch_add(&o->done, 1);
}

static void op_cancel(void *p)
{
	struct op_rec *o = p;

	if (keel_self() != o->caller)
		atomic_store(&o->misplaced, 1);
	atomic_fetch_add(&o->cancel, 1);
}

static struct op_rec *ops;

static atomic_long filler_sent, filler_outcomes, then_full;

static void filler_outcome(void *p)
{
	(void)p;
	atomic_fetch_add(&filler_outcomes, 1);
}

/* Bounded: keep the caller's own mailbox full of a filler message, so
 * that replies arrive at a full mailbox (they must never be refused). */
static void refill(void)
{
	if (keel_post(keel_self(), filler_outcome, filler_outcome, NULL) == 0)
		atomic_fetch_add(&filler_sent, 1);
}

static void *caller_main(void *p)
{
	struct sender *s = p;
	keel_task_t self = keel_self();

	if (bounded) {
		CHECK_OK(keel_mailbox_limit(1));
		refill();
	}

	for (long i = s->first; i < s->first + s->count; i++) {
		struct op_rec *o = &ops[i];
		uint64_t r = rng_next(&s->rng);
		keel_task_t t = atomic_load(&lanes[r % LANES].current);

		o->caller = self;
		o->kind = (r >> 8) % 2 ? OP_CALL : OP_THEN;
		if (o->kind == OP_CALL)
			o->rc = keel_call(t, op_work, o,
					  keel_after((keel_time_t)(r >> 20) %
						     50000));
		else
			o->rc = keel_call_then(t, op_work, op_done, op_cancel,
					       o);
		if (o->rc == -EAGAIN)
			atomic_fetch_add(&then_full, 1);
		if ((r >> 16) % 8 == 0) {
			int rc = keel_serve(0);

			CHECK(rc >= 1 || rc == -ETIMEDOUT);
			if (bounded)
				refill();
		}
	}
	/* Whatever replies are still owed arrive as cancels here. */
	CHECK_OK(keel_mailbox_close());
	return NULL;
}

static void calls_under_chaos(int bound)
{
	long nthreads = harness_param("KEEL_THREADS", 4, 4);
	long iters = harness_param("KEEL_ITERS", 20000, 500000);
	uint64_t seed = harness_seed();
	struct sender *callers = calloc((size_t)nthreads, sizeof *callers);
	long total = nthreads * iters, n[6] = {0};

	uint64_t waits_before = atomic_load(&keel__room_waits_ok);

	ops = calloc((size_t)total, sizeof *ops);
	CHECK(ops && callers);
	bounded = bound;
	atomic_store(&filler_sent, 0);
	atomic_store(&filler_outcomes, 0);
	atomic_store(&then_full, 0);
	atomic_store(&stop_lanes, 0);
	barrier_init(&lanes_up, LANES + 1);
	for (int i = 0; i < LANES; i++) {
		lanes[i].rng = seed ^ (0x2000u + (unsigned)i);
		lanes[i].spawned = 0;
		lanes[i].controller = harness_thread(lane_controller, &lanes[i]);
	}
	barrier_wait(&lanes_up);
	for (long i = 0; i < nthreads; i++) {
		callers[i].first = i * iters;
		callers[i].count = iters;
		callers[i].rng = seed ^ (uint64_t)(i + 7) * 0x9E37u;
		callers[i].th = harness_thread(caller_main, &callers[i]);
	}
	for (long i = 0; i < nthreads; i++)
		harness_join(callers[i].th);
	atomic_store(&stop_lanes, 1);
	for (int i = 0; i < LANES; i++)
		harness_join(lanes[i].controller);
	pthread_barrier_destroy(&lanes_up);

	for (long i = 0; i < total; i++) {
		struct op_rec *o = &ops[i];
		int w = atomic_load(&o->work), d = atomic_load(&o->done);
		int c = atomic_load(&o->cancel);

		CHECK_EQ(atomic_load(&o->misplaced), 0);
		if (o->kind == OP_CALL) {
			/* 0: the work ran once. An error: it never ran, even
			 * after keel_call returned. */
			CHECK_EQ(w, o->rc == 0 ? 1 : 0);
			CHECK_EQ(d + c, 0);
			n[o->rc == 0 ? 0 : 1]++;
		} else if (o->rc == 0) {
			/* Exactly one of done/cancel; done only after work;
			 * work at most once. */
			CHECK_EQ(d + c, 1);
			CHECK_INT(w, <=, 1);
			if (d)
				CHECK_EQ(w, 1);
			n[d ? 2 : 3]++;
		} else {
			CHECK_EQ(w + d + c, 0);
			n[4]++;
		}
	}
	printf("calls: %ld ran, %ld refused/timed out/cancelled; then: %ld "
	       "done, %ld cancelled, %ld refused\n",
	       n[0], n[1], n[2], n[3], n[4]);
	CHECK_INT(n[0], >, 0);
	CHECK_INT(n[2], >, 0);
	CHECK_EQ(atomic_load(&filler_outcomes), atomic_load(&filler_sent));
	if (bound) {
		long waited = (long)(atomic_load(&keel__room_waits_ok) -
				     waits_before);

		printf("bounded: %ld call_then refused as full, %ld calls "
		       "waited for room and were accepted, %ld fillers\n",
		       (long)atomic_load(&then_full), waited,
		       (long)atomic_load(&filler_sent));
		CHECK_INT(atomic_load(&then_full), >, 0);
		CHECK_INT(waited, >, 0);
		CHECK_INT(atomic_load(&filler_sent), >, 0);
	}
	free(ops);
	free(callers);
}

TEST(stress_calls_under_chaos)
{
	calls_under_chaos(0);
}

TEST(stress_calls_under_chaos_bounded)
{
	calls_under_chaos(1);
}

/* ---- Message memory given back under load ---- */


#define TRIM_TARGETS 2
#define TRIM_STALE 512

static harness_barrier trim_round;
static atomic_long trim_ran[TRIM_TARGETS];
static keel_task_t trim_target_id[TRIM_TARGETS];
static harness_event trim_targets_up[TRIM_TARGETS];
static keel_ctx_t *stale_ctx[TRIM_STALE];
static atomic_int trim_stop;
static atomic_long stale_checked;

static void trim_count_run(void *p)
{
	atomic_fetch_add((atomic_long *)p, 1);
}

static void trim_count_cancel(void *p)
{
	(void)p;
	CHECK(!"a message was cancelled");
}

struct trim_target {
	int idx;
	long rounds, per_round;
};

static void *trim_target_main(void *p)
{
	struct trim_target *tt = p;

	trim_target_id[tt->idx] = keel_self();
	event_set(&trim_targets_up[tt->idx]);
	for (long r = 0; r < tt->rounds; r++) {
		barrier_wait(&trim_round); /* the burst is queued */
		while (atomic_load(&trim_ran[tt->idx]) < tt->per_round * (r + 1))
			CHECK(keel_serve(KEEL_FOREVER) > 0);
		barrier_wait(&trim_round); /* drained */
	}
	return NULL;
}

struct trim_producer {
	long burst, rounds;
	int idx;
};

static void *trim_producer_main(void *p)
{
	struct trim_producer *tp = p;
	int t = tp->idx % TRIM_TARGETS;

	for (long r = 0; r < tp->rounds; r++) {
		for (long i = 0; i < tp->burst; i++)
			CHECK_OK(keel_post(trim_target_id[t], trim_count_run,
					   trim_count_cancel, &trim_ran[t]));
		barrier_wait(&trim_round);
		barrier_wait(&trim_round);
	}
	return NULL;
}

/* Stale ctx handles stay stale while their records' chunks are given
 * back and carved again (the table stays type-stable). */
static void *stale_checker_main(void *p)
{
	(void)p;
	while (!atomic_load(&trim_stop))
		for (int i = 0; i < TRIM_STALE; i++) {
			CHECK_RC(keel_ctx_finish(stale_ctx[i]), -ESTALE);
			atomic_fetch_add(&stale_checked, 1);
		}
	return NULL;
}

static void save_and_finish(keel_ctx_t *ctx, void *arg)
{
	*(keel_ctx_t **)arg = ctx;
	CHECK_OK(keel_ctx_finish(ctx));
}

static keel_task_t stale_helper_id;
static harness_event stale_helper_up, stale_helper_stop;

static void *stale_helper(void *p)
{
	(void)p;
	stale_helper_id = keel_self();
	event_set(&stale_helper_up);
	while (!event_is_set(&stale_helper_stop))
		(void)keel_serve(keel_now() + KEEL_MS(1));
	return NULL;
}

/* Producers post bursts that queue up (the targets drain only once a
 * round's bursts are in), so that the drains free whole chunks and the
 * pool gives them back while other threads allocate, carve released
 * chunks again, and look up stale ctx handles. Every message runs once. */
TEST(stress_message_memory_given_back)
{
	long rounds = harness_param("KEEL_ITERS", 6, 40);
	long burst = harness_param("KEEL_BURST", 40000, 100000);
	uint64_t released = atomic_load(&keel__msg_chunks_released);
	struct trim_target tt[TRIM_TARGETS];
	struct trim_producer tp[2 * TRIM_TARGETS];
	pthread_t tth[TRIM_TARGETS], pth[2 * TRIM_TARGETS], checker, helper;

	printf("seed: none (the schedule is the OS's); rounds %ld, burst %ld\n",
	       rounds, burst);
	/* No decay: trim whenever the pool has grown. */
	atomic_store(&keel__msg_decay_ns, 0);
	event_init(&stale_helper_up);
	event_init(&stale_helper_stop);
	helper = harness_thread(stale_helper, NULL);
	event_wait(&stale_helper_up);
	for (int i = 0; i < TRIM_STALE; i++)
		CHECK_OK(keel_call_ctx(stale_helper_id, save_and_finish,
				       &stale_ctx[i], KEEL_FOREVER));
	event_set(&stale_helper_stop);
	harness_join(helper);
	checker = harness_thread(stale_checker_main, NULL);

	barrier_init(&trim_round, 3 * TRIM_TARGETS);
	for (int i = 0; i < TRIM_TARGETS; i++) {
		tt[i].idx = i;
		tt[i].rounds = rounds;
		tt[i].per_round = 2 * burst; /* two producers each */
		event_init(&trim_targets_up[i]);
		tth[i] = harness_thread(trim_target_main, &tt[i]);
		event_wait(&trim_targets_up[i]);
	}
	for (int i = 0; i < 2 * TRIM_TARGETS; i++) {
		tp[i].idx = i;
		tp[i].burst = burst;
		tp[i].rounds = rounds;
	}
	for (int i = 0; i < 2 * TRIM_TARGETS; i++)
		pth[i] = harness_thread(trim_producer_main, &tp[i]);
	for (int i = 0; i < 2 * TRIM_TARGETS; i++)
		harness_join(pth[i]);
	for (int i = 0; i < TRIM_TARGETS; i++)
		harness_join(tth[i]);
	atomic_store(&trim_stop, 1);
	harness_join(checker);
	released = atomic_load(&keel__msg_chunks_released) - released;
	printf("%ld messages in bursts; %lu chunks given back; %ld stale ctx "
	       "checks\n",
	       2 * TRIM_TARGETS * burst * rounds, (unsigned long)released,
	       (long)atomic_load(&stale_checked));
	for (int i = 0; i < TRIM_TARGETS; i++)
		CHECK_EQ(atomic_load(&trim_ran[i]), 2 * burst * rounds);
	CHECK_INT(released, >, 0);
	CHECK_INT(atomic_load(&stale_checked), >, 0);
}
