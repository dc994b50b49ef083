/*
 * cancel.c: cancellation: frames and chains, the one way a task waits,
 * shields, keel_on_cancel(), and the public cancellation points.
 *
 * DESIGN
 * Cancellation is a property of frames, not of tasks. A task's chain runs
 * from its innermost frame outwards: shields it began, scopes it opened,
 * its base frame, then the scope it was spawned into and that scope's
 * chain, up to a root. A task is cancelled while some frame on its chain
 * is, looking no further out than the nearest shield. Cancelling a scope
 * therefore cancels its children, everything nested in them, and its
 * owner's waits inside it; when the owner closes the scope, its chain no
 * longer passes through it and the owner is not cancelled any more. That
 * is how "an inner scope's timeout does not cancel the outer scope".
 *
 * Checking is lock-free: a walk of the owner's own chain (keel__cancelled).
 * Chains only change on their owner's thread, and every frame outlives
 * every chain through it (a scope cannot close while a child runs in it),
 * so the walk never meets freed memory.
 *
 * Cancelling marks the frame (a CAS: the first cause wins, sticky), then
 * spreads: it wakes every task whose chain passes through the frame. That
 * is the frame's owner, every child of every scope the owner opened above
 * the frame (and of the frame, if it is a scope), and recursively what
 * runs inside those. Waking is an unpark, plus a write to the task's wake
 * fd if it waits in keel_fd_wait(); then, if the task is now cancelled,
 * its keel_on_cancel() callbacks run, on the cancelling thread.
 *
 * LOCKS. There is no lock over the whole tree. Each task's chain_lock
 * guards its chain as others see it; each scope's lock (scope.c) guards
 * its entries. The spread holds one of them at a time: under a task's
 * chain_lock it wakes the task and copies up to SPREAD_BATCH of the scopes
 * above the stop frame; under a scope's lock it copies up to SPREAD_BATCH
 * of its live children; then it lets go and recurses. So a cancellation
 * of 10,000 children holds no lock that an exiting child or the closing
 * owner needs for longer than a batch, and children end without taking
 * any lock of their scope's (scope.c). The rules, which also let fork()
 * take every lock (task.c):
 *   - a scope lock may be held while taking a task's chain_lock (setting
 *     up a child) or the registry's, thread cache's or pool's lock;
 *   - nothing but the same task's cb_lock and the platform layer's own
 *     locks (the portable futex buckets), leaves both, is taken while a
 *     chain_lock is held;
 *   - two scope locks are held at once only under the scope table's lock
 *     (keel_dump(), fork()).
 *
 * Why nothing is missed although the tree changes while the spread walks
 * it: a task that checked its chain before the mark and then parked is in
 * the subtree and stays there while parked, and the spread reaches it
 * through locks that order it after each change on its way. A task that
 * joins the subtree later does so under a lock the spread also takes (a
 * spawn under its scope's lock checks the chain; a scope opened under its
 * owner's chain_lock is seen by the spread or opened after the spread has
 * passed, hence after the mark), so it sees the mark itself. A copied
 * pointer may go stale once the lock is let go (the child ends and its
 * slot is reused; the scope closes): the wake is then spurious, which
 * every wait absorbs, and a reused scope is recognised by its generation.
 *
 * Deadlines are frames' too. Each task caches the earliest deadline on its
 * chain (up to and including the nearest shield) and the frame it belongs
 * to; a wait never sleeps past it, and whichever task first finds it
 * passed cancels that frame with cause KEEL_CANCEL_DEADLINE. No timer
 * thread is needed: every task inside the frame waits with that deadline.
 *
 * keel_on_cancel() callbacks run on the cancelling thread, holding no keel
 * lock, when the spread reaches their task and finds it cancelled (or at
 * once if it is cancelled already, or when keel_shield_end() uncovers a
 * cancellation). They belong to one incarnation of the task's slot: the
 * spread notes cb_epoch under the chain lock and runs none if it moved.
 * When the task ends, registrations still armed are dropped and running
 * ones waited for, so no callback runs after its task has ended.
 * A registration's state, under the task's cb_lock:
 *   FREE -> ARMED (keel_on_cancel) -> RUNNING (a canceller took it)
 *        -> DONE -> FREE (removed after it ran)
 *   ARMED -> FREE (removed before it ran)
 *   RUNNING -> RUNNING_REMOVED (removed from inside the callback itself)
 *        -> FREE (when the callback returns)
 *   keel_on_cancel_remove() of a RUNNING one on another thread waits on
 *   cb_cv for DONE. A DONE slot is not reused until removed, so a remove
 *   always finds its registration.
 */
#include <poll.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

enum { CB_FREE, CB_ARMED, CB_RUNNING, CB_DONE, CB_RUNNING_REMOVED };

/* Under t's chain_lock (the slot is being set up for a new task). */
void keel__cancel_reset(struct keel__task *t)
{
	store_relaxed(&t->base.cancelled, 0);
	t->base.kind = FRAME_BASE;
	t->base.deadline = KEEL_FOREVER;
	t->base.parent = NULL;
	t->base.owner = t;
	t->cur = &t->base;
	t->eff_deadline = KEEL_FOREVER;
	t->eff_frame = NULL;
	t->home = NULL;
	t->background = 0;
	t->joinable = 0;
	t->nshields = 0;
	store_relaxed(&t->blocked_in, NULL);
	store_relaxed(&t->ending_in, NULL);
	t->started_at = keel__clock_now();
	pthread_mutex_lock(&t->cb_lock);
	fetch_add_relaxed(&t->cb_epoch, 1);
	for (int i = 0; i < KEEL_MAX_ON_CANCEL; i++)
		t->cbs[i].state = CB_FREE;
	pthread_mutex_unlock(&t->cb_lock);
}

void keel__chain_changed(struct keel__task *t)
{
	keel_time_t best = KEEL_FOREVER;
	struct keel__frame *bf = NULL;

	for (struct keel__frame *f = t->cur; f; f = f->parent) {
		if (f->deadline < best) {
			best = f->deadline;
			bf = f;
		}
		if (f->kind == FRAME_SHIELD)
			break;
	}
	t->eff_deadline = best;
	t->eff_frame = bf;
}

/* ---- Cancelling ---------------------------------------------------------- */

/* Under t's cb_lock: the callback has returned. */
static void callback_done(struct keel__task *t, struct keel__on_cancel *cb)
{
	/* Removed from inside itself: nobody will remove it again. */
	cb->state = cb->state == CB_RUNNING_REMOVED ? CB_FREE : CB_DONE;
	pthread_cond_broadcast(&t->cb_cv);
}

/* The thread ends inside a callback (pthread_exit): it counts as done. */
static void callback_left(void *p)
{
	struct keel__on_cancel *cb = p;
	struct keel__task *t = cb->task;

	pthread_mutex_lock(&t->cb_lock);
	callback_done(t, cb);
	pthread_mutex_unlock(&t->cb_lock);
}

/* Run t's armed callbacks, if t is still the incarnation `epoch`. */
static void run_callbacks(struct keel__task *t, uint32_t epoch)
{
	pthread_mutex_lock(&t->cb_lock);
	for (int i = 0; i < KEEL_MAX_ON_CANCEL; i++) {
		if (load_relaxed(&t->cb_epoch) != epoch)
			break;
		struct keel__on_cancel *cb = &t->cbs[i];

		if (cb->state != CB_ARMED)
			continue;
		cb->state = CB_RUNNING;
		cb->runner = pthread_self();
		pthread_mutex_unlock(&t->cb_lock);
		/* A callback that ends the cancelling thread has still
		 * returned, as far as its task's remove and end can tell. */
		pthread_cleanup_push(callback_left, cb);
		cb->fn(cb->arg);
		pthread_cleanup_pop(0);
		pthread_mutex_lock(&t->cb_lock);
		callback_done(t, cb);
	}
	pthread_mutex_unlock(&t->cb_lock);
}

void keel__spread_task(struct keel__task *t, struct keel__frame *stop)
{
	struct keel__frame *found[SPREAD_BATCH];
	uint64_t gen[SPREAD_BATCH];
	unsigned skip = 0, n;

	for (int first = 1;; first = 0) {
		uint32_t cancelled = 0, epoch = 0;
		unsigned seen = 0;
		int on_chain = 0;

		n = 0;
		pthread_mutex_lock(&t->chain_lock);
		if (first) {
			keel__unpark(t);
			if (t->wake_wfd >= 0)
				keel__notify_signal(t->wake_wfd);
			/* t's chain is stable under its lock, so this walk is
			 * safe off t's thread too. */
			cancelled = keel__cancelled(t);
			epoch = load_relaxed(&t->cb_epoch);
			/* An event loop hears it through its mailbox fd. */
			if (cancelled)
				keel__mbox_wake_cancelled(t);
		}
		/* The scopes t opened above `stop`, innermost first; none if
		 * `stop` has left the chain (it was closed or ended, and all
		 * that was inside it with it). */
		for (struct keel__frame *g = t->cur; g; g = g->parent) {
			if (g == stop) {
				on_chain = 1;
				break;
			}
			if (g == &t->base)
				break;
			if (g->kind != FRAME_SCOPE || seen++ < skip)
				continue;
			if (n < SPREAD_BATCH) {
				found[n] = g;
				gen[n] = keel__scope_gen(g);
			}
			n++;
		}
		pthread_mutex_unlock(&t->chain_lock);
		if (cancelled)
			run_callbacks(t, epoch);
		if (!on_chain)
			return;
		for (unsigned i = 0; i < n && i < SPREAD_BATCH; i++)
			keel__spread_scope(found[i], gen[i]);
		if (n <= SPREAD_BATCH)
			return;
		skip += SPREAD_BATCH;
	}
}

struct spread {
	struct keel__frame *f;
	struct keel__task *owner;
	uint64_t gen;
};

static void spread_all(struct spread *sp)
{
	keel__spread_task(sp->owner, sp->f);
	/* A scope's frame comes with its generation (never 0); another
	 * frame with 0. Not f->kind: a task's base frame may belong to the
	 * slot's next task by now (keel__task_cancel()). */
	if (sp->gen)
		keel__spread_scope(sp->f, sp->gen);
}

/* The cancelling thread ends inside a callback the spread runs
 * (pthread_exit): spread again, so that the tasks it had not reached yet
 * are woken all the same (wakes are idempotent; callbacks that ran do not
 * run again). */
static void spread_left(void *p)
{
	spread_all(p);
}

void keel__spread_frame(struct keel__frame *f, struct keel__task *owner,
			uint64_t gen)
{
	struct spread sp = {f, owner, gen};

	KEEL_YIELD();
	pthread_cleanup_push(spread_left, &sp);
	spread_all(&sp);
	pthread_cleanup_pop(0);
}

int keel__frame_cancel(struct keel__frame *f, uint32_t cause)
{
	uint32_t none = 0;
	uint64_t gen = f->kind == FRAME_SCOPE ? keel__scope_gen(f) : 0;

	if (!atomic_compare_exchange_strong_explicit(
		    &f->cancelled, &none, cause, memory_order_acq_rel,
		    memory_order_acquire))
		return 0;
	keel__spread_frame(f, f->owner, gen);
	return 1;
}

void keel__expire(struct keel__task *t)
{
	struct keel__frame *f = t->eff_frame;

	/* A frame on t's own chain: alive while t runs. */
	if (f)
		keel__frame_cancel(f, KEEL_CANCEL_DEADLINE);
}

int keel__wait(struct keel__task *t, keel_time_t deadline, int cancellable,
	       const char *what)
{
	keel_time_t eff = deadline;
	int rc;

	if (cancellable) {
		if ((rc = keel__check(t)) < 0)
			return rc;
		if (t->eff_deadline < eff)
			eff = t->eff_deadline;
		/* The main JavaScript thread: refuse a wait that would
		 * sleep rather than spin there (a deadline already past only
		 * looks). */
		if (!keel__thread_may_block() && eff > keel__clock_now())
			return -EDEADLK;
	}
	store_relaxed(&t->blocked_in, what);
	rc = keel__park(t, eff);
	store_relaxed(&t->blocked_in, NULL);
	if (!cancellable)
		return rc;
	if (keel__cancelled(t))
		return -ECANCELED;
	if (rc == -ETIMEDOUT && eff < deadline) {
		keel__expire(t); /* the scope's deadline, not the caller's */
		return -ECANCELED;
	}
	return rc;
}

int keel__wait_for(struct keel__task *t, int (*cond)(void *), void *arg,
		   keel_time_t deadline, int cancellable, const char *what)
{
	keel_time_t stop = 0;
	int rc;

	/* Spin first, within the task's adaptive budget: what we wait for
	 * (a child ending, a reply) often comes within microseconds, and
	 * sleeping and being woken costs tens of them. */
	for (unsigned i = 1;; i++) {
		if (cond(arg)) {
			keel__spin_adapt(&t->spin_ns, 1);
			return 0;
		}
		keel__cpu_relax();
		if (i == 64) {
			stop = keel__clock_now() + t->spin_ns;
			if (deadline < stop)
				stop = deadline;
		} else if (i > 64 && (i & 15) == 0 &&
			   keel__clock_now() >= stop) {
			break;
		}
	}
	keel__spin_adapt(&t->spin_ns, 0);
	while (!cond(arg)) {
		rc = keel__wait(t, deadline, cancellable, what);
		if (rc < 0)
			return cond(arg) ? 0 : rc;
	}
	return 0;
}

int keel__task_cancel(keel_task_t id, uint32_t cause)
{
	struct keel__task *t = keel__task_slot(id);
	uint32_t none = 0;
	int live, won = 0;

	if (!t || id == KEEL_TASK_NONE || cause == 0)
		return -ESRCH;
	/* Checked and marked under the chain lock, which a new incarnation's
	 * set-up also takes: a stale handle cannot mark the slot's next
	 * task. */
	pthread_mutex_lock(&t->chain_lock);
	live = keel__task_is(t, id);
	if (live)
		won = atomic_compare_exchange_strong_explicit(
			&t->base.cancelled, &none, cause, memory_order_acq_rel,
			memory_order_acquire);
	pthread_mutex_unlock(&t->chain_lock);
	if (!live)
		return -ESRCH;
	if (won)
		keel__spread_frame(&t->base, t, 0);
	return 0;
}

/* ---- The public cancellation points --------------------------------------- */

int keel_checkpoint(void)
{
	struct keel__task *t = keel__self();

	if (!t)
		return -ENOMEM;
	return keel__check(t);
}

int keel_cancel_cause(void)
{
	struct keel__task *t = keel__self();

	if (!t)
		return KEEL_CANCEL_NONE;
	keel__check(t); /* a passed deadline cancels its frame first */
	return (int)keel__cancelled(t);
}

int keel_sleep_until(keel_time_t deadline)
{
	struct keel__task *t = keel__self();
	int rc;

	if (!t)
		return -ENOMEM;
	keel__lock_check_blocking("keel_sleep_until()");
	while ((rc = keel__wait(t, deadline, 1, "sleep")) == 0)
		;
	return rc == -ETIMEDOUT ? 0 : rc;
}

/* The task's wake fd, created on first use under its chain lock, so that
 * a canceller (which wakes it under that lock) either sees it or is seen
 * by our check. */
static int wake_fd(struct keel__task *t)
{
	int rc = 0, r, w;

	if (t->wake_rfd >= 0)
		return 0;
	if ((rc = keel__notify_open(&r, &w)) < 0)
		return rc;
	pthread_mutex_lock(&t->chain_lock);
	t->wake_rfd = r;
	t->wake_wfd = w;
	pthread_mutex_unlock(&t->chain_lock);
	return 0;
}

int keel_fd_wait(int fd, short events, keel_time_t deadline)
{
	struct keel__task *t = keel__self();
	struct pollfd p[2];
	int rc;

	if (fd < 0)
		return -EINVAL;
	if (!t)
		return -ENOMEM;
	keel__lock_check_blocking("keel_fd_wait()");
	if ((rc = wake_fd(t)) < 0)
		return rc;
	for (;;) {
		keel_time_t eff = deadline, now;
		int ms;

		if ((rc = keel__check(t)) < 0)
			return rc;
		if (t->eff_deadline < eff)
			eff = t->eff_deadline;
		now = keel__clock_now();
		if (eff == KEEL_FOREVER)
			ms = -1;
		else if (eff <= now)
			ms = 0;
		else if (eff - now > (keel_time_t)INT32_MAX * 1000000)
			ms = INT32_MAX;
		else /* round up: never wake before the deadline */
			ms = (int)((eff - now + 999999) / 1000000);
		p[0].fd = fd;
		p[0].events = events;
		p[0].revents = 0;
		p[1].fd = t->wake_rfd;
		p[1].events = POLLIN;
		p[1].revents = 0;
		store_relaxed(&t->blocked_in, "fd_wait");
		rc = poll(p, 2, ms);
		store_relaxed(&t->blocked_in, NULL);
		if (rc < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (p[1].revents)
			keel__notify_drain(t->wake_rfd);
		if (p[0].revents)
			return p[0].revents;
		if (rc == 0 && keel__clock_now() >= eff) {
			if (eff < deadline) {
				keel__expire(t);
				return -ECANCELED;
			}
			return -ETIMEDOUT;
		}
	}
}

/* ---- Shields ---------------------------------------------------------------- */

/* Push a shield frame; caller holds nothing. */
int keel__shield_push(struct keel__task *t, keel_time_t deadline,
		      int internal)
{
	struct keel__frame *f;

	if (t->nshields == KEEL_MAX_SHIELDS)
		return -ENOMEM;
	pthread_mutex_lock(&t->chain_lock);
	f = &t->shields[t->nshields++];
	store_relaxed(&f->cancelled, 0);
	f->kind = FRAME_SHIELD;
	f->internal = internal ? 1 : 0;
	f->deadline = deadline;
	f->parent = t->cur;
	f->owner = t;
	t->cur = f;
	pthread_mutex_unlock(&t->chain_lock);
	keel__chain_changed(t);
	return 0;
}

/* Pop the innermost shield; returns the cause it was cancelled with (its
 * own deadline), or 0. */
uint32_t keel__shield_pop(struct keel__task *t)
{
	struct keel__frame *f = t->cur;
	uint32_t cause;

	KEEL_ASSERT(f->kind == FRAME_SHIELD && t->nshields > 0 &&
		    f == &t->shields[t->nshields - 1]);
	pthread_mutex_lock(&t->chain_lock);
	cause = load_relaxed(&f->cancelled);
	t->cur = f->parent;
	t->nshields--;
	pthread_mutex_unlock(&t->chain_lock);
	keel__chain_changed(t);
	/* A cancellation the shield hid takes effect now. */
	if (keel__cancelled(t)) {
		keel__mbox_wake_cancelled(t);
		run_callbacks(t, load_relaxed(&t->cb_epoch));
	}
	return cause;
}

int keel_shield_begin(keel_time_t deadline)
{
	struct keel__task *t = keel__self();

	if (deadline == KEEL_FOREVER)
		return -EINVAL;
	if (!t)
		return -ENOMEM;
	return keel__shield_push(t, deadline, 0);
}

int keel_shield_end(void)
{
	struct keel__task *t = keel__self();

	/* Not keel's own shield around a running cleanup: the cleanup
	 * did not begin it. */
	if (!t || t->cur->kind != FRAME_SHIELD || t->cur->internal)
		return -EPERM;
	keel__shield_pop(t);
	return 0;
}

/* ---- keel_on_cancel -------------------------------------------------------- */

void keel__on_cancel_fork_child(struct keel__task *t)
{
	pthread_mutex_init(&t->cb_lock, NULL);
	pthread_cond_init(&t->cb_cv, NULL);
	/* A callback running at the fork ran on a thread that did not come
	 * along: here it has finished. */
	for (int i = 0; i < KEEL_MAX_ON_CANCEL; i++) {
		if (t->cbs[i].state == CB_RUNNING)
			t->cbs[i].state = CB_DONE;
		else if (t->cbs[i].state == CB_RUNNING_REMOVED)
			t->cbs[i].state = CB_FREE;
	}
}

void keel__on_cancel_end(struct keel__task *t)
{
	pthread_mutex_lock(&t->cb_lock);
	for (int i = 0; i < KEEL_MAX_ON_CANCEL; i++) {
		struct keel__on_cancel *cb = &t->cbs[i];

		/* One running on this very thread (the task ends from inside
		 * its own callback) frees itself when it returns. */
		while ((cb->state == CB_RUNNING ||
			cb->state == CB_RUNNING_REMOVED) &&
		       !pthread_equal(cb->runner, pthread_self()))
			pthread_cond_wait(&t->cb_cv, &t->cb_lock);
		if (cb->state == CB_ARMED || cb->state == CB_DONE)
			cb->state = CB_FREE;
	}
	pthread_mutex_unlock(&t->cb_lock);
}

/* Token: registration generation << 32 | task index << 4 | slot. */
#define CB_SLOT_BITS 4

int keel_on_cancel(keel_work_fn fn, void *arg, keel_cancel_token_t *token)
{
	struct keel__task *t = keel__self();
	struct keel__on_cancel *cb = NULL;
	int i;

	if (!fn || !token)
		return -EINVAL;
	if (!t)
		return -ENOMEM;
	/* cb_lock orders this against a spread, which marks the frame
	 * before it runs callbacks under cb_lock: either it sees the
	 * registration ARMED, or we see the cancellation below. */
	pthread_mutex_lock(&t->cb_lock);
	/* A DONE registration is not reused until its owner removes it, so
	 * that the remove still finds it. */
	for (i = 0; i < KEEL_MAX_ON_CANCEL; i++) {
		if (t->cbs[i].state == CB_FREE) {
			cb = &t->cbs[i];
			break;
		}
	}
	if (!cb) {
		pthread_mutex_unlock(&t->cb_lock);
		return -ENOMEM;
	}
	cb->fn = fn;
	cb->arg = arg;
	cb->gen++;
	cb->state = CB_ARMED;
	*token = (uint64_t)cb->gen << 32 | (uint64_t)t->idx << CB_SLOT_BITS |
		 (uint64_t)i;
	pthread_mutex_unlock(&t->cb_lock);
	if (keel__cancelled(t)) /* cancelled already: at once, here */
		run_callbacks(t, load_relaxed(&t->cb_epoch));
	return 0;
}

int keel_on_cancel_remove(keel_cancel_token_t token)
{
	struct keel__task *t = keel__self();
	struct keel__on_cancel *cb;
	unsigned i = (unsigned)(token & ((1u << CB_SLOT_BITS) - 1));
	int rc;

	if (!t || ((token >> CB_SLOT_BITS) & 0xfffffff) != t->idx ||
	    i >= KEEL_MAX_ON_CANCEL)
		return -EINVAL;
	cb = &t->cbs[i];
	pthread_mutex_lock(&t->cb_lock);
	if (cb->gen != (uint32_t)(token >> 32) || cb->state == CB_FREE) {
		pthread_mutex_unlock(&t->cb_lock);
		return -EINVAL;
	}
	if (cb->state == CB_ARMED) {
		cb->state = CB_FREE;
		rc = 0;
	} else if (cb->state == CB_RUNNING &&
		   pthread_equal(cb->runner, pthread_self())) {
		/* From inside the callback: its runner frees it after. */
		cb->state = CB_RUNNING_REMOVED;
		rc = 1;
	} else if (cb->state == CB_RUNNING_REMOVED) {
		rc = -EINVAL; /* removed already */
	} else {
		/* Ran or runs on another thread: wait for it to return. */
		while (cb->state == CB_RUNNING)
			pthread_cond_wait(&t->cb_cv, &t->cb_lock);
		if (cb->state == CB_DONE)
			cb->state = CB_FREE;
		rc = 1;
	}
	pthread_mutex_unlock(&t->cb_lock);
	return rc;
}
