/*
 * proxy.c: keel_call, keel_call_then and their _ctx variants.
 *
 * DESIGN
 * A call is a message with a second party: the caller waits for it
 * (keel_call) or expects a reply in its own mailbox (keel_call_then). The
 * record's state word decides, one compare-and-swap per contested
 * transition, which party owns each outcome, so none is lost or doubled
 * whatever the order of events.
 *
 * State word: generation (56 bits) << 8 | state (8 bits). The generation
 * changes every time the record is freed.
 *
 * CTX HANDLES. A keel_ctx_t is (ctx_gen << MSG_IDX_BITS | index) as a
 * pointer-sized value, issued once. A record's ctx_gen counts its uses as
 * a _ctx call: T raises it, under T->ctx_lock, just before the CAS that
 * makes the record INFLIGHT (whose release publishes it), and
 * keel_ctx_finish() accepts a handle only if the record is INFLIGHT with
 * that ctx_gen. ctx_gen only rises, and plain messages do not touch it, so
 * a handle whose use has ended never matches again. It has 40 bits in a
 * handle on 64-bit targets and 10 on 32-bit ones: a record whose ctx_gen
 * reached MSG_CTX_GEN_LAST is retired by the next _ctx call that draws it
 * (kept out of use for good, one record per 2^40, or 2^10, _ctx uses of
 * it). So a stale ctx never finishes a later call on any width; on 32-bit
 * targets the price is that a process can make about 2^32 _ctx calls in
 * its life, since no 32-bit value can tell more apart.
 *
 * T is the target task, C the calling task, F any thread that calls
 * keel_ctx_finish().
 *
 *   QUEUED     in T's queue.
 *     T pops:       QUEUED -> RUNNING (CAS)            call, then
 *                   QUEUED -> INFLIGHT (CAS, under T->ctx_lock, linking
 *                             the record on T's in-flight list)  _ctx kinds
 *     T closes:     QUEUED -> SHUT (CAS), unpark C      call kinds
 *                   QUEUED -> RESOLVING (CAS), cancel reply   then kinds
 *     C gives up:   QUEUED -> ABANDONED (CAS)           keel_call on a
 *                   deadline or cancellation; C's close for then kinds
 *   ABANDONED  T frees the record when it pops it or drains it.
 *   RUNNING    T runs work (T->running points at it), then
 *                   call: RUNNING -> DONE (store), unpark C
 *                   then: RUNNING -> RESOLVING (store), done reply
 *              If T's thread exits inside work, T's close resolves it as
 *              if it were still queued.
 *   INFLIGHT   every transition out happens under T->ctx_lock, which also
 *              guards the list:
 *     F finishes:   INFLIGHT -> RESOLVING, then DONE / done reply
 *     T ends:       INFLIGHT -> RESOLVING, then SHUT / cancel reply
 *              (closing T's mailbox does not end work in flight; T's
 *              close cancels only its own _ctx calls to itself, whose
 *              reply could no longer be delivered)
 *   RESOLVING  owned by whoever set it; nobody else touches the record.
 *   DONE, SHUT C, waiting in keel_call*, sees it and frees the record.
 *   Replies: the resolver stores REPLY_DONE or REPLY_CANCEL and sends the
 *              record to C's mailbox (as a reply: it takes no place in a
 *              bounded mailbox and is never refused for want of room). If C's mailbox refuses it (C is
 *              closing), the resolver stores ORPHANED and unparks C.
 *   REPLY_*    in C's queue: C's serve runs done or cancel; C's drain runs
 *              cancel. Either way C frees the record.
 *   ORPHANED   C's close runs cancel and frees the record.
 *
 * Neither T nor F touches a record after the store or send that hands it
 * to C (DONE, SHUT, REPLY_*, ORPHANED): they read what they need first.
 * Waking C touches only C's task slot, which is never freed.
 *
 * C keeps its then-kind records on an owner-only "outstanding" list (linked
 * before the send, so a reply can never arrive for an unlisted record). Its
 * close abandons the QUEUED ones and runs their cancel at once (work will
 * never run); RUNNING, INFLIGHT and RESOLVING ones it waits for, since arg
 * must outlive work; those end ORPHANED because C's mailbox is closed by
 * then.
 */
#include <stdlib.h>

#include "internal.h"

/* A call record's line 1 (internal.h). */
static inline struct keel__msg_call *mc(struct keel__msg *m)
{
	return keel__msg_call(m);
}

/* A ctx handle (see CTX HANDLES above). */
#define CTX_IDX_BITS MSG_IDX_BITS

static uint64_t st_of(uint64_t w)
{
	return w & MSG_STATE_MASK;
}

static uint64_t with_st(uint64_t w, enum keel__msg_state st)
{
	return (w & ~MSG_STATE_MASK) | (uint64_t)st;
}

static int claim(struct keel__msg *m, enum keel__msg_state from,
		 enum keel__msg_state to)
{
	uint64_t w = load_relaxed(&m->state);

	w = with_st(w, from);
	return cas_acq_rel(&m->state, &w, with_st(w, to));
}

static keel_ctx_t *ctx_encode(struct keel__msg *m)
{
	/* 1 <= ctx_gen <= MSG_CTX_GEN_LAST: the handle is never NULL and
	 * loses no bit. */
	uintptr_t gen = (uintptr_t)load_relaxed(&mc(m)->ctx_gen);

	return (keel_ctx_t *)(gen << CTX_IDX_BITS | m->idx);
}

/* ---- Handing a record back to the caller --------------------------------- */

/* For call kinds: publish the outcome; C frees the record. */
static void complete_call(struct keel__msg *m, enum keel__msg_state st)
{
	struct keel__task *c = mc(m)->caller;

	/* Pairs with the acquire load in call_wait(). After this store the
	 * record is C's. */
	store_release(&m->state, with_st(load_relaxed(&m->state), st));
	keel__unpark(c);
}

/* For then kinds: deliver done or cancel to C's mailbox. */
static void reply(struct keel__msg *m, enum keel__msg_state st)
{
	struct keel__task *c = mc(m)->caller;
	uint64_t w = load_relaxed(&m->state);

	/* Published to C by the send's release. */
	store_relaxed(&m->state, with_st(w, st));
	if (keel__mbox_reply(mc(m)->caller_id, m) == 0)
		return;
	store_release(&m->state, with_st(w, ST_ORPHANED));
	keel__unpark(c);
}

static void outstanding_link(struct keel__task *c, struct keel__msg *m)
{
	struct keel__msg_call *mcall = mc(m);

	mcall->oprev = NULL;
	mcall->onext = c->outstanding;
	if (c->outstanding)
		mc(c->outstanding)->oprev = m;
	c->outstanding = m;
}

static void outstanding_unlink(struct keel__task *c, struct keel__msg *m)
{
	struct keel__msg_call *mcall = mc(m);

	if (mcall->oprev)
		mc(mcall->oprev)->onext = mcall->onext;
	else
		c->outstanding = mcall->onext;
	if (mcall->onext)
		mc(mcall->onext)->oprev = mcall->oprev;
}

/* The target's in-flight ctx list; under t->ctx_lock. */
static void inflight_link(struct keel__task *t, struct keel__msg *m)
{
	struct keel__msg_call *mcall = mc(m);

	mcall->iprev = NULL;
	mcall->inext = t->inflight;
	if (t->inflight)
		mc(t->inflight)->iprev = m;
	t->inflight = m;
}

static void inflight_unlink(struct keel__task *t, struct keel__msg *m)
{
	struct keel__msg_call *mcall = mc(m);

	if (mcall->iprev)
		mc(mcall->iprev)->inext = mcall->inext;
	else
		t->inflight = mcall->inext;
	if (mcall->inext)
		mc(mcall->inext)->iprev = mcall->iprev;
}

/* ---- Target side ------------------------------------------------------ */

static void run_reply(struct keel__task *t, struct keel__msg *m, uint64_t st)
{
	keel_work_fn fn = st == ST_REPLY_DONE ? m->done : m->cancel;
	void *arg = m->arg;

	outstanding_unlink(t, m);
	keel__msg_free(m);
	if (fn)
		fn(arg);
}

void keel__proxy_run(struct keel__task *t, struct keel__msg *m)
{
	uint64_t st = st_of(load_acquire(&m->state));

	if (st == ST_REPLY_DONE || st == ST_REPLY_CANCEL) {
		run_reply(t, m, st);
		return;
	}
	switch (m->kind) {
	case MSG_CALL:
	case MSG_THEN:
		if (!claim(m, ST_QUEUED, ST_RUNNING)) {
			keel__msg_free(m); /* ABANDONED */
			return;
		}
		KEEL_YIELD();
		t->running = m;
		m->fn.work(m->arg);
		t->running = NULL;
		if (m->kind == MSG_CALL)
			complete_call(m, ST_DONE);
		else
			reply(m, ST_REPLY_DONE);
		return;
	case MSG_CALL_CTX:
	case MSG_THEN_CTX: {
		struct keel__msg_call *call = mc(m);
		int ok;

		pthread_mutex_lock(&t->ctx_lock);
		/* Before the CAS: a finish that sees INFLIGHT sees the new
		 * ctx_gen (CTX HANDLES). Below MSG_CTX_GEN_LAST (new_call). */
		store_relaxed(&call->ctx_gen, load_relaxed(&call->ctx_gen) + 1);
		ok = claim(m, ST_QUEUED, ST_INFLIGHT);
		if (ok)
			inflight_link(t, m);
		pthread_mutex_unlock(&t->ctx_lock);
		if (!ok) {
			keel__msg_free(m);
			return;
		}
		KEEL_YIELD();
		/* From here F may finish and free the record at any moment:
		 * read nothing from it after handing out the ctx. */
		m->fn.ctx_work(ctx_encode(m), m->arg);
		return;
	}
	default:
		keel__panic(__FILE__, __LINE__, "message record %u has kind %u",
			    m->idx, m->kind);
	}
}

/* A record popped by T's close drain. */
void keel__proxy_cancel(struct keel__task *t, struct keel__msg *m)
{
	uint64_t st = st_of(load_acquire(&m->state));

	if (st == ST_REPLY_DONE || st == ST_REPLY_CANCEL) {
		/* A reply to T as caller that T will no longer serve. */
		run_reply(t, m, ST_REPLY_CANCEL);
		return;
	}
	if (m->kind == MSG_CALL || m->kind == MSG_CALL_CTX) {
		struct keel__task *c = mc(m)->caller;

		if (claim(m, ST_QUEUED, ST_SHUT)) {
			/* The claim published SHUT and C may free the record
			 * now: wake C through the pointer read before. */
			keel__unpark(c);
			return;
		}
	} else if (claim(m, ST_QUEUED, ST_RESOLVING)) {
		reply(m, ST_REPLY_CANCEL);
		return;
	}
	keel__msg_free(m); /* ABANDONED by its caller */
}

void keel__proxy_abort_running(struct keel__task *t, struct keel__msg *m)
{
	(void)t;
	if (m->kind == MSG_CALL)
		complete_call(m, ST_SHUT);
	else
		reply(m, ST_REPLY_CANCEL);
}

/* Take the in-flight ctx records of T (as target) that `which` selects off
 * the list, under the lock so no finisher can reach them, and resolve them
 * as cancelled. which(m, t) is called with the lock held. */
static void cancel_inflight(struct keel__task *t,
			    int (*which)(struct keel__msg *, struct keel__task *))
{
	struct keel__msg *m, *next, *list = NULL;

	pthread_mutex_lock(&t->ctx_lock);
	for (m = t->inflight; m; m = next) {
		uint64_t w = load_relaxed(&m->state);

		next = mc(m)->inext;
		if (!which(m, t))
			continue;
		KEEL_ASSERT(st_of(w) == ST_INFLIGHT);
		inflight_unlink(t, m);
		store_relaxed(&m->state, with_st(w, ST_RESOLVING));
		mc(m)->inext = list;
		list = m;
	}
	pthread_mutex_unlock(&t->ctx_lock);
	for (m = list; m; m = next) {
		next = mc(m)->inext;
		if (m->kind == MSG_CALL_CTX)
			complete_call(m, ST_SHUT);
		else
			reply(m, ST_REPLY_CANCEL);
	}
}

static int any_record(struct keel__msg *m, struct keel__task *t)
{
	(void)m;
	(void)t;
	return 1;
}

static int own_record(struct keel__msg *m, struct keel__task *t)
{
	return mc(m)->caller == t;
}

/* T's mailbox has closed and drained: settle the replies T is owed. */
void keel__proxy_close(struct keel__task *t)
{
	struct keel__msg *m, *next, *list;

	/* T's own _ctx calls to itself can never deliver now: cancel them
	 * here, or the wait below would wait for itself. */
	cancel_inflight(t, own_record);

	/* Then-kind records T is owed replies for, as caller. */
	while ((list = t->outstanding) != NULL) {
		int progress = 0;

		t->outstanding = NULL;
		for (m = list; m; m = next) {
			keel_work_fn cancel = m->cancel;
			void *arg = m->arg;
			uint64_t st;

			next = mc(m)->onext;
			if (claim(m, ST_QUEUED, ST_ABANDONED)) {
				/* Work will never run; the target frees the
				 * record, which must not be touched now. */
				progress = 1;
				if (cancel)
					cancel(arg);
				continue;
			}
			st = st_of(load_acquire(&m->state));
			if (st == ST_ORPHANED) {
				progress = 1;
				keel__msg_free(m);
				if (cancel)
					cancel(arg);
				continue;
			}
			/* Work runs or is in flight: wait for it to end. */
			outstanding_link(t, m);
		}
		if (!progress && t->outstanding)
			keel__park(t, KEEL_FOREVER);
	}
}

/* T is ending: a ctx still unfinished is cancelled. */
void keel__proxy_end(struct keel__task *t)
{
	cancel_inflight(t, any_record);
}

/* ---- Caller side -------------------------------------------------------- */

static struct keel__msg *new_call(struct keel__task *c, enum keel__msg_kind kind,
				  keel_task_t target)
{
	struct keel__msg *m = keel__msg_alloc();

	/* A record that has no ctx generation left is retired: its handle
	 * would have to wrap (CTX HANDLES). */
	if (kind == MSG_CALL_CTX || kind == MSG_THEN_CTX)
		while (m && load_relaxed(&mc(m)->ctx_gen) >= MSG_CTX_GEN_LAST)
			m = keel__msg_alloc();
	if (!m)
		return NULL;
	m->kind = (uint8_t)kind;
	mc(m)->caller = c;
	mc(m)->caller_id = c->id;
	m->cancel = NULL;
	m->done = NULL;
	store_relaxed(&mc(m)->target, keel__task_slot(target));
	store_relaxed(&m->state, with_st(load_relaxed(&m->state), ST_QUEUED));
	return m;
}

static int call_settled(struct keel__msg *m)
{
	uint64_t st = st_of(load_acquire(&m->state));

	return st == ST_DONE || st == ST_SHUT;
}

static int call_wait(struct keel__task *c, struct keel__msg *m,
		     keel_time_t deadline)
{
	keel_time_t stop = keel__clock_now() + c->spin_ns;

	if (stop > deadline)
		stop = deadline;

	/* Spin first: a target that is serving answers within a few
	 * microseconds, far less than the cost of sleeping and being woken. */
	for (unsigned i = 1; !call_settled(m); i++) {
		keel__cpu_relax();
		if ((i & 15) == 0 && keel__clock_now() >= stop)
			break;
	}
	keel__spin_adapt(&c->spin_ns, call_settled(m));
	for (;;) {
		uint64_t st = st_of(load_acquire(&m->state));
		int give_up;

		if (st == ST_DONE || st == ST_SHUT) {
			keel__msg_free(m);
			return st == ST_DONE ? 0 : -ESHUTDOWN;
		}
		if (st != ST_QUEUED) {
			/* Work has started: wait for it whatever happens. */
			keel__wait(c, KEEL_FOREVER, 0, "call: running");
			continue;
		}
		give_up = keel__check(c);
		if (!give_up && keel__clock_now() >= deadline)
			give_up = -ETIMEDOUT;
		if (!give_up)
			give_up = keel__wait(c, deadline, 1, "call");
		if (give_up < 0) {
			if (claim(m, ST_QUEUED, ST_ABANDONED))
				return give_up; /* the target frees it */
		}
	}
}

static int call_common(keel_task_t target, enum keel__msg_kind kind,
		       union keel__fn fn, void *arg, keel_time_t deadline)
{
	struct keel__task *c;
	struct keel__msg *m;
	int rc;

	if (!fn.work)
		return -EINVAL;
	if (!(c = keel__self()))
		return -ENOMEM;
	/* To itself, or from a thread that must not wait for the reply (the
	 * main JavaScript thread: keel_call_then() is for it). */
	if (target == c->id || !keel__thread_may_block())
		return -EDEADLK;
	keel__lock_check_blocking("keel_call()");
	if (!(m = new_call(c, kind, target)))
		return -ENOMEM;
	m->fn = fn;
	m->arg = arg;
	/* A bounded target's full mailbox: wait for room within the same
	 * deadline, as for the work to start. */
	if ((rc = keel__mbox_send_wait(target, m, deadline)) < 0) {
		keel__msg_free(m);
		return rc;
	}
	return call_wait(c, m, deadline);
}

int keel_call(keel_task_t target, keel_work_fn work, void *arg,
	      keel_time_t deadline)
{
	union keel__fn fn = {.work = work};

	return call_common(target, MSG_CALL, fn, arg, deadline);
}

int keel_call_ctx(keel_task_t target, keel_ctx_work_fn work, void *arg,
		  keel_time_t deadline)
{
	union keel__fn fn = {.ctx_work = work};

	return call_common(target, MSG_CALL_CTX, fn, arg, deadline);
}

static int then_common(keel_task_t target, enum keel__msg_kind kind,
		       union keel__fn fn, keel_work_fn done, keel_work_fn cancel,
		       void *arg)
{
	struct keel__task *c;
	struct keel__msg *m;
	int rc;

	if (!fn.work)
		return -EINVAL;
	if (!(c = keel__self()))
		return -ENOMEM;
	if (c->closed)
		return -ESHUTDOWN; /* no reply could ever be delivered */
	if (!(m = new_call(c, kind, target)))
		return -ENOMEM;
	m->fn = fn;
	m->done = done;
	m->cancel = cancel;
	m->arg = arg;
	outstanding_link(c, m);
	if ((rc = keel__mbox_send(target, m)) < 0) {
		outstanding_unlink(c, m);
		keel__msg_free(m);
	}
	return rc;
}

int keel_call_then(keel_task_t target, keel_work_fn work, keel_work_fn done,
		   keel_work_fn cancel, void *arg)
{
	union keel__fn fn = {.work = work};

	return then_common(target, MSG_THEN, fn, done, cancel, arg);
}

int keel_call_then_ctx(keel_task_t target, keel_ctx_work_fn work,
		       keel_work_fn done, keel_work_fn cancel, void *arg)
{
	union keel__fn fn = {.ctx_work = work};

	return then_common(target, MSG_THEN_CTX, fn, done, cancel, arg);
}

int keel_ctx_finish(keel_ctx_t *ctx)
{
	uintptr_t v = (uintptr_t)ctx;
	struct keel__msg *m;
	struct keel__task *t;
	uint64_t w;

	if (!v)
		return -EINVAL;
	if (!(m = keel__msg_at_checked((uint32_t)(v & ((1u << CTX_IDX_BITS) - 1)))))
		return -EINVAL;
	/* The record may be in any later use by now; `target` and `state`
	 * are atomics, and the state check under the lock is what decides. */
	if (!(t = load_relaxed(&mc(m)->target)))
		return -ESTALE;
	pthread_mutex_lock(&t->ctx_lock);
	w = load_acquire(&m->state);
	if (st_of(w) != ST_INFLIGHT ||
	    load_relaxed(&mc(m)->ctx_gen) != (uint64_t)(v >> CTX_IDX_BITS)) {
		pthread_mutex_unlock(&t->ctx_lock);
		return -ESTALE;
	}
	inflight_unlink(t, m);
	store_relaxed(&m->state, with_st(w, ST_RESOLVING));
	pthread_mutex_unlock(&t->ctx_lock);
	if (m->kind == MSG_CALL_CTX)
		complete_call(m, ST_DONE);
	else
		reply(m, ST_REPLY_DONE);
	return 0;
}
