/*
 * mailbox.c: per-task message queues: sending, serving, the event-loop fd
 * and closing.
 *
 * DESIGN
 * Each task's mailbox is an intrusive multi-producer, single-consumer queue
 * (Vyukov's): a sender swaps its record into the tail and then links the
 * previous record to it; only the owner reads from `head`. No sender ever
 * waits for another. A sender delayed between the two steps delays the
 * owner's view of later messages, never their acceptance.
 *
 * THE TAIL WORD. The tail is one 64-bit word, not a pointer:
 *
 *     63           27    26      25        24       23            0
 *     +---------------+------+--------+----------+----------------+
 *     | generation    | SLOW | CLOSED | SLEEPING | record index   |
 *     +---------------+------+--------+----------+----------------+
 *
 * the index of the last record (MSG_IDX_STUB for the stub), the low 37
 * bits of the task's generation, and three flags. A send is accepted by
 * one compare-and-swap of the tail word, from a value with the sender's
 * generation and neither CLOSED nor SLOW to its own record's index (same
 * generation, no flags). That CAS is the only read-modify-write of a send
 * on the fast path, and it is the moment of acceptance: the send is in
 * the queue from then on, whatever happens to the task, and only the
 * owner's drain can give it its outcome. So:
 *   - CLOSED (set by the owner's close with one CAS, never cleared in an
 *     incarnation) makes every later CAS fail: a send is accepted before
 *     the close (and drained) or refused, never lost in between.
 *   - The generation makes a send with a stale handle fail even if the
 *     slot was reused (a new incarnation starts with its own generation
 *     and the stub). Only the low 37 bits are kept: a sender would need
 *     to stall between its load and its CAS while one slot goes through
 *     2^37 incarnations; a handle already aliases at 2^40. The sender also
 *     checks the full generation in the mailbox word before the CAS.
 *   - SLEEPING asks for a wake-up. The owner sets it only on an empty,
 *     quiet queue (the tail is the stub and the stub is the head), with a
 *     CAS from exactly that value; the next sender's CAS replaces the word
 *     and returns the old value, so the one sender that clears SLEEPING
 *     knows it, and it alone unparks the owner, after linking. No
 *     wake-up is lost: a send after the arming sees SLEEPING in the value
 *     its own CAS replaced; a send before it changed the tail, so the
 *     arming CAS fails and the owner looks again. At most one wake-up per
 *     sleep, none while the owner is busy (guarantee 6).
 *   - SLOW sends every sender to the counted path below: the owner sets
 *     it while its mailbox is bounded or has an event-loop fd.
 * Records are named by index because the generation bits leave no room
 * for a pointer; the table (msg.c) turns an index into its record with
 * one load. Index reuse within an incarnation (a record popped, freed and
 * sent again while another sender still holds the old tail value) is
 * harmless: a CAS that succeeds from index i appends after the record
 * that is the tail now, which is all the expected value claims.
 *
 * The states of the tail word within one incarnation (gen fixed):
 *
 *   stub            --send CAS-->              r (a record)
 *   r               --send CAS-->              r' (r->next is linked after)
 *   r (head is r, r->next NULL, owner pops r)
 *                   --owner CAS-->             stub (r leaves; a failed CAS
 *                                              means a send is linking)
 *   stub            --owner arms (CAS)-->      stub|SLEEPING
 *   stub|SLEEPING   --send CAS-->              r (that sender unparks)
 *   stub|SLEEPING   --owner disarms (CAS)-->   stub (woken otherwise)
 *   any x           --owner sets SLOW-->       x|SLOW (senders then count)
 *   x|SLOW          --owner clears SLOW-->     x
 *   any x           --close (CAS)-->           x|CLOSED, SLEEPING cleared:
 *                                              final until the slot's next
 *                                              incarnation (reset: new
 *                                              generation, stub, no flags)
 *
 * Closing (owner only): CAS CLOSED into the tail word; the index it held
 * then is the last accepted record. Set CLOSED in the mailbox word (for
 * the counted path and room waiters), wait for the counted senders to
 * leave, and then wait until every record up to the last one is linked
 * (below). Draining then sees every accepted message and gives each its
 * cancel.
 *
 * WAITING FOR A LINK. A send between its CAS and its link holds up the
 * owner's view of the queue: the close above, a switch to the counted
 * path, and an owner that wants to sleep but finds the queue not quiet
 * (it cannot arm: that sender's CAS came before any arming, so it will
 * not see SLEEPING). The owner spins briefly; the link is a few
 * instructions away unless the sender was preempted there. Then it names
 * the last linked record in `link_wait` (its index), fences, looks at
 * that record's link once more and sleeps. Every fast sender, after its
 * link, loads `link_wait` (a plain load of the line its CAS took) and
 * wakes the owner if it names the record it just linked after: only the
 * one sender the owner waits for, not the ones queued behind it. That
 * sender has no fence between its link and its load, so both sides may
 * miss the other (its store still buffered): the owner's sleep is a nap
 * that ends by itself (20 us, doubling up to 1 ms), which bounds the
 * delay of that rare double race; the common case, a preempted sender
 * resuming, wakes the owner as soon as it links.
 *
 * THE COUNTED PATH (SLOW). The mailbox word counts senders in flight:
 *
 *     63          24   23      22       21        20        19        0
 *     +-------------+-------+--------+----------+---------+-----------+
 *     | generation  | ENDED | CLOSED | SLEEPING | BOUNDED | in flight |
 *     +-------------+-------+--------+----------+---------+-----------+
 *
 * A counted send starts with one fetch_add of 1, registering as in
 * flight, and reads the old value: a generation other than the handle's,
 * or ENDED, means the task is gone (-ESRCH); CLOSED means -ESHUTDOWN.
 * Either way the sender takes its 1 back and never touches the queue.
 * Otherwise it takes a place if the mailbox is bounded, makes the same
 * CAS of the tail word as a fast send (which may still find CLOSED: the
 * close sets it there first; the send is then refused and gives its place
 * back), links, and releases its count.
 *
 * Counted senders are what an owner with an event-loop fd or a bounded
 * mailbox needs: no sender may touch the eventfd unless counted in flight
 * (the owner closes it after close has waited out every counted sender),
 * and fd_drain() below relies on it too. The mailbox word's SLEEPING is
 * the arming for these owners (fd mode; and a blocking serve of a bounded
 * or fd-mode task). A counted sender, after linking its record, releases
 * its count with one fetch_sub and looks at the old value. If SLEEPING
 * was set, it registers in flight again, clears the bit with a
 * compare-and-swap, and the one sender that clears it notifies the owner
 * (unpark, and the eventfd if any) before releasing its count. Hence:
 *   - no lost wake-up: the sender's fetch_sub comes either after the owner's
 *     fetch_or in the word's modification order (the sender sees SLEEPING)
 *     or before it (the owner's acquiring fetch_or sees the sender's link);
 *   - at most one notification per sleep, and none while the owner is busy;
 *   - no sender touches the eventfd unless counted in flight, and close
 *     waits for those.
 * The last sender to leave a CLOSED mailbox unparks the owner, which waits
 * for the in-flight count to reach 0.
 *
 * Switching to the counted path (keel_mailbox_fd, keel_mailbox_limit), the
 * owner sets SLOW with a CAS and then waits until the queue is linked up
 * to the tail it replaced, as a close does: fast sends that were accepted
 * before the switch, and so look at neither SLEEPING, are linked before
 * the owner relies on the counted protocol. Switching back (a limit
 * removed, no fd) just clears SLOW: a counted send in flight also looks
 * at the SLEEPING its CAS replaced.
 *
 * BACKPRESSURE
 * A bounded mailbox (keel_mailbox_limit) sets MB_BOUNDED in the word, so
 * the sender's one fetch_add already tells it whether to count: an
 * unbounded send reads the bit in the value it has anyway and does
 * nothing more. A bounded send, still counted in flight and past the
 * CLOSED/ENDED check, takes a place: a compare-and-swap of `mb_queued`
 * from n to n + 1 while n < the limit, and marks its record `counted`.
 * No place: it takes its in-flight count back and the send is refused
 * with -EAGAIN, having touched nothing. The owner gives the place back
 * when it pops a counted record (serve or drain): one fetch_sub, and
 * ROOM_WAITERS in the old value says whether anyone waits for room; with
 * nobody waiting, that is all, no system call. Replies the owner is owed
 * (keel_call_then's done/cancel) take no place and are never refused:
 * their number is bounded by the owner's own calls, and refusing one
 * would lose its outcome.
 *
 * `mb_queued` = count | ROOM_WAITERS. The waiter list (room_q, under the
 * room_ql spin lock) has a node per sender waiting for room, on its stack;
 * ROOM_WAITERS is set or cleared only under room_ql, and is set whenever
 * the list is not empty (the lock queue of lock.c, the same way):
 *   waiter:  lock; append; fetch_or ROOM_WAITERS; unlock; look at the word
 *            (CLOSED, ENDED, a new generation: leave) and for room (retry
 *            the send); else sleep until woken, the deadline or a cancel;
 *            lock; take its node off unless a waker did; clear the bit if
 *            the list is empty; unlock.
 *   owner:   a pop of a counted record: fetch_sub; if the old value had
 *            ROOM_WAITERS, wake the first waiter (taken off the list).
 *            Closing: after CLOSED is set, wake every waiter.
 *   No lost wake-up for room: the waiter's fetch_or and the owner's
 *   fetch_sub are in one modification order; if the fetch_sub is first,
 *   the waiter's look sees the room; if it is second, it sees the bit.
 *   The same holds for close: the waiter appends under room_ql and looks
 *   at the word after; the closer sets CLOSED before it takes room_ql.
 *   A waiter woken for room that gives up (deadline, cancel) wakes the
 *   next one if room is left, so that no place is lost on it.
 * Slots are never freed, so a waiter may touch room_q whatever became of
 * the task; it checks the generation after every wake.
 *
 * THE EVENT-LOOP FD. Once keel_mailbox_fd() has been called, a sender that
 * clears SLEEPING also writes the fd. Its contract: after keel_serve()
 * returns, the fd is readable exactly while messages are pending, the task
 * is cancelled, or its mailbox is closed (the last two stay readable: the
 * loop is to leave). The owner keeps it so with two owner-only fields:
 * fd_armed (it set SLEEPING and has not seen it cleared since) and
 * fd_owed (signals of the fd since its last drain, made or owed). Each
 * arming gives at most one signal, by whoever clears SLEEPING: a sender,
 * a canceller (keel__mbox_wake_cancelled), or the owner itself (fd_take).
 *
 *   not serving, armed    --sender/canceller clears--> not serving, owed
 *   serve() starts        disarm: clear SLEEPING; if someone had, owed++
 *   serve() ends          disarm again (a blocking serve arms), drain the
 *                         fd until the owed signals have landed, arm, and
 *                         if something is pending or the task cancelled,
 *                         take the duty itself (clear SLEEPING, signal)
 *   serve() -ECANCELED    make sure a signal is made or owed; no drain
 *
 * Draining after disarming, and before arming again, is what leaves no
 * stale readiness: no signal can be owed for an arming that ended before
 * the drain and land after it, because the drain waits for those (their
 * signallers are counted in flight, so the wait ends even if the signal
 * was read by someone else). Arming before the last look at the queue is
 * what loses no wake-up, as for a sleeping owner. Disarming at the start
 * keeps senders from writing the fd while the owner is busy serving
 * (guarantee 6).
 *
 * THE JAVASCRIPT EVENT LOOP. A task served from its thread's event loop
 * (keel_mailbox_serve_from_loop(), WebAssembly threads) is notified the
 * same way, with the fd's "signal" being one scheduled call of
 * keel__mbox_loop_serve() on that loop (keel__loop_notify()), which runs
 * keel_serve(0). A signal is consumed by running, so nothing is drained;
 * instead the owner counts the serves scheduled and not yet run
 * (loop_owed: made by itself, or found made by whoever cleared SLEEPING)
 * and arms only when none is, so at most one is ever outstanding:
 *   serve() starts        disarm: clear SLEEPING; if someone had, owed++
 *   the scheduled serve   disarm as above, then owed-- for itself
 *   serve() ends          disarm; if owed is 0, arm, and if something is
 *                         pending, take the duty itself (clear SLEEPING,
 *                         schedule a serve: owed++)
 * A serve scheduled by a task that ends before it runs finds, on that
 * thread, no task in loop mode and does nothing.
 */
#include <sched.h>
#include <stdlib.h>

#include "internal.h"

/* The owner's naps while it waits for a link (WAITING FOR A LINK): the
 * first, and the longest they grow to. */
#define LINK_NAP_MIN KEEL_USEC(20)
#define LINK_NAP_MAX KEEL_MS(1)

/* Messages run per keel_serve() call before it returns, at most. */
#define SERVE_BATCH 1024

/* mb_queued: the count of places taken, and a flag (see BACKPRESSURE). */
#define ROOM_WAITERS ((uint64_t)1 << 32)
#define ROOM_COUNT_MASK (ROOM_WAITERS - 1)

/* The generation bits of the tail word for the task named id. */
static inline uint64_t tw_gen(keel_task_t id)
{
	return (id >> MB_GEN_SHIFT) << TW_GEN_SHIFT;
}

/* The record a tail word names. */
static inline struct keel__msg *tw_rec(struct keel__task *t, uint64_t tw)
{
	uint32_t idx = (uint32_t)(tw & TW_IDX_MASK);

	return idx == MSG_IDX_STUB ? &t->stub : keel__msg_at(idx);
}

void keel__mbox_reset(struct keel__task *t)
{
	store_relaxed(&t->stub.next, NULL);
	t->head = &t->stub;
	/* Published with the new generation by the release that opens the
	 * incarnation's mailbox word (keel__task_alloc). */
	store_relaxed(&t->tailw, tw_gen(t->id) | MSG_IDX_STUB);
	t->slow = 0;
	/* Every counted record was popped by the last incarnation's drain;
	 * ROOM_WAITERS belongs to the waiters, who clear it themselves. */
	store_relaxed(&t->mb_limit, 0);
	fetch_and_acq_rel(&t->mb_queued, ROOM_WAITERS);
	t->fd_armed = 0;
	t->fd_owed = 0;
}

/* ---- Sending ------------------------------------------------------------- */

static void notify(struct keel__task *t)
{
	/* Pairs with the release in keel_mailbox_fd(), and the one in
	 * keel_mailbox_serve_from_loop(). */
	int fd = load_acquire(&t->notify_wfd);

	keel__unpark(t);
	if (fd >= 0)
		keel__notify_signal(fd);
	if (KEEL__JS_LOOP) {
		uintptr_t loop = load_acquire(&t->loop_thread);

		if (loop)
			keel__loop_notify(loop);
	}
}

/* Release a count taken by a send that was refused. */
static void leave_refused(struct keel__task *t)
{
	uint64_t old = fetch_sub_acq_rel(&t->mword, 1);

	if ((old & MB_CLOSED) && (old & MB_COUNT_MASK) == 1)
		keel__unpark(t);
}

/* What moves once a record's outcome has run: its generation (the state
 * word's high bits; not the state, which a caller may move while the
 * record is queued), or a keel_msg_t's count of outcomes in its
 * registration (never the sender's memory, which may be gone by then). A
 * record is never unmapped, so reading a recycled (or released,
 * all-zero) one is safe and tells the same. */
struct outcome_gen {
	_Atomic uint64_t *w;
	unsigned shift;
};

static inline uint64_t outcome_gen_now(struct outcome_gen g)
{
	return load_acquire(g.w) >> g.shift;
}

/* A sender whose release found SLEEPING set: the owner asked to be told of
 * messages. Notify it, but only while counted in flight again, so that the
 * owner (which closes its eventfd only after close has waited out every
 * sender) can never have closed the fd under us.
 * Between the release and the count taken again, the owner may have served
 * the message, ended that serve and armed anew: clearing that new arming
 * would leave the fd readable for a message already run. So a sender whose
 * record has been freed since it linked it (its generation moved: the
 * owner popped it and its outcome ran) leaves the arming alone; the owner
 * looks at its queue after every arming, and whoever sends next signals. */
static void notify_sleeper(struct keel__task *t, keel_task_t id,
			   struct outcome_gen genw, uint64_t mgen)
{
	uint64_t old = fetch_add_acquire(&t->mword, 1), new;

	if (outcome_gen_now(genw) == mgen &&
	    (old >> MB_GEN_SHIFT) == (id >> MB_GEN_SHIFT) &&
	    !(old & (MB_CLOSED | MB_ENDED))) {
		old++;
		for (;;) {
			if (!(old & MB_SLEEPING))
				break; /* another sender took the duty */
			new = old & ~MB_SLEEPING;
			if (cas_weak_acq_rel(&t->mword, &old, new)) {
				KEEL_YIELD();
				notify(t);
				break;
			}
		}
	}
	leave_refused(t);
}

/* Release the count of a send that linked its record. One fetch_sub: it is
 * ordered after the link (release), and if the owner had set SLEEPING
 * before it in the word's modification order, it sees the bit. */
static void leave_linked(struct keel__task *t, keel_task_t id,
			 struct outcome_gen genw, uint64_t mgen)
{
	uint64_t old = fetch_sub_acq_rel(&t->mword, 1);

	if (likely(!(old & (MB_SLEEPING | MB_CLOSED))))
		return;
	if ((old & MB_CLOSED) && (old & MB_COUNT_MASK) == 1)
		keel__unpark(t); /* the owner waits in close for us */
	else if (old & MB_SLEEPING)
		notify_sleeper(t, id, genw, mgen);
}

/* Take a place in t's bounded mailbox, if one is free. */
static int take_place(struct keel__task *t)
{
	uint64_t q = load_relaxed(&t->mb_queued);
	uint32_t lim = load_relaxed(&t->mb_limit);

	do {
		/* A limit of 0 here: the mailbox is being unbounded; the
		 * record is still counted, since its pop gives a place back. */
		if (lim && (q & ROOM_COUNT_MASK) >= lim)
			return 0;
	} while (!cas_weak_acq_rel(&t->mb_queued, &q, q + 1));
	return 1;
}

/* Modes of a send. */
#define SEND_REQUEST 0 /* a new message: takes a place if bounded */
#define SEND_REPLY 1   /* a reply its target is owed: never refused */

_Atomic uint64_t keel__mbox_races[KEEL_MBOX_RACES];

static void race_seen(enum keel__mbox_race r)
{
	fetch_add_relaxed(&keel__mbox_races[r], 1);
}

/* A counted send refused at the tail word after it took a place. */
static void give_place(struct keel__task *t, struct keel__msg *m);

/* The counted path (see THE COUNTED PATH): for a SLOW or bounded mailbox,
 * and to tell why a fast send was refused. */
static __attribute__((noinline)) int
send_counted(struct keel__task *t, keel_task_t id, struct keel__msg *m,
	     int mode)
{
	uint64_t old, mgen, tw, want = tw_gen(id);
	struct outcome_gen genw;
	int rc = 0;

	/* The acquire pairs with the release that opened this incarnation
	 * (keel__task_alloc), which published its empty queue. */
	old = fetch_add_acquire(&t->mword, 1);
	if ((old >> MB_GEN_SHIFT) != (id >> MB_GEN_SHIFT) || (old & MB_ENDED))
		rc = -ESRCH;
	else if (old & MB_CLOSED)
		rc = -ESHUTDOWN;
	else if ((old & MB_BOUNDED) && mode == SEND_REQUEST) {
		if (!take_place(t))
			rc = -EAGAIN;
		else
			m->counted = 1;
	}
	if (rc < 0) {
		leave_refused(t);
		return rc;
	}
	KEEL_YIELD();
	/* What tells, after the link, whether m's outcome has run: read
	 * now, while m is ours (it is until it is linked). */
	if (m->kind == MSG_FOREIGN) {
		genw = (struct outcome_gen){
			&keel__foreign_at(m->idx)->served, 0};
		m->noted = 1;
	} else {
		genw = (struct outcome_gen){&m->state, MSG_STATE_BITS};
	}
	mgen = outcome_gen_now(genw);
	store_relaxed(&m->next, NULL);
	tw = load_relaxed(&t->tailw);
	do {
		/* Counted and past the word's check, the incarnation cannot
		 * change under us; CLOSED can: the close sets it here first. */
		if ((tw & (TW_GEN_MASK | TW_CLOSED)) != want) {
			give_place(t, m);
			leave_refused(t);
			return (tw & TW_GEN_MASK) != want ? -ESRCH : -ESHUTDOWN;
		}
	} while (!cas_weak_acq_rel(&t->tailw, &tw,
				   (tw & (TW_GEN_MASK | TW_SLOW)) | m->idx));
	KEEL_YIELD();
	/* Pairs with the acquire loads of `next` in pop() and poppable(). */
	store_release(&tw_rec(t, tw)->next, m);
	/* An arming of the fast path (SLOW was cleared meanwhile). */
	if (tw & TW_SLEEPING)
		keel__unpark(t);
	KEEL_YIELD();
	leave_linked(t, id, genw, mgen);
	return 0;
}

/*
 * A send: the fast path is one CAS of the tail word (see THE TAIL WORD).
 * The loads of the mailbox word and the tail word cost no read-modify-
 * write: they sit on the line the CAS takes anyway.
 */
static inline __attribute__((always_inline)) int
send_msg(keel_task_t id, struct keel__msg *m, int mode)
{
	struct keel__task *t = keel__task_slot(id);
	uint64_t w, tw, want;

	if (!t || id == KEEL_TASK_NONE)
		return -ESRCH;
	/* The acquire pairs with the release that opened this incarnation
	 * (keel__task_alloc), so the tail word read next is its reset or a
	 * later value. */
	w = load_acquire(&t->mword);
	if (unlikely((w >> MB_GEN_SHIFT) != (id >> MB_GEN_SHIFT) ||
		     (w & (MB_CLOSED | MB_ENDED | MB_BOUNDED))))
		return send_counted(t, id, m, mode);
	want = tw_gen(id);
	store_relaxed(&m->next, NULL);
	tw = load_relaxed(&t->tailw);
	KEEL_YIELD();
	do {
		if (unlikely((tw & (TW_GEN_MASK | TW_CLOSED | TW_SLOW)) != want)) {
			if (tw & TW_CLOSED)
				race_seen(RACE_SEND_SAW_SEAL);
			return send_counted(t, id, m, mode);
		}
		/* Release: m's contents (next == NULL included) for the next
		 * sender and the owner; acquire: the previous record is the
		 * tail's, ours to link. */
	} while (!cas_weak_acq_rel(&t->tailw, &tw, want | m->idx));
	KEEL_YIELD();
	/* Pairs with the acquire loads of `next` in pop() and poppable(). */
	store_release(&tw_rec(t, tw)->next, m);
	/* We cleared the owner's arming: we alone wake it. Or the owner waits
	 * for this very link (WAITING FOR A LINK). The slot is never freed,
	 * so this is safe whatever became of the task (a wake of a later
	 * incarnation is spurious, which parkers allow). */
	if (unlikely(tw & TW_SLEEPING)) {
		race_seen(RACE_SEND_WOKE);
		keel__unpark(t);
	} else if (unlikely(load_relaxed(&t->link_wait) ==
			    (uint32_t)(tw & TW_IDX_MASK))) {
		race_seen(RACE_LINK_WOKE);
		keel__unpark(t);
	}
	return 0;
}

int keel__mbox_send(keel_task_t id, struct keel__msg *m)
{
	return send_msg(id, m, SEND_REQUEST);
}

int keel__mbox_reply(keel_task_t id, struct keel__msg *m)
{
	return send_msg(id, m, SEND_REPLY);
}

/* Is there room in t's mailbox now (a hint: the send decides)? */
static int has_room(struct keel__task *t)
{
	uint32_t lim = load_relaxed(&t->mb_limit);

	return !lim || (load_relaxed(&t->mb_queued) & ROOM_COUNT_MASK) < lim;
}

/* Wake the first sender waiting for room in t's mailbox (or all). */
static void wake_room(struct keel__task *t, int all)
{
	keel__q_wake(&t->room_q, &t->room_ql, all);
}

/* Under room_ql: a waiter leaves the list (if a waker has not taken it
 * off); the last one out clears ROOM_WAITERS. */
static void room_dequeue(struct keel__task *t, struct keel__qnode *n)
{
	if (!__atomic_load_n(&n->woken, __ATOMIC_RELAXED))
		keel__q_remove(&t->room_q, n);
	if (!__atomic_load_n(&t->room_q, __ATOMIC_RELAXED))
		fetch_and_acq_rel(&t->mb_queued, ~ROOM_WAITERS);
}

/* The send to id found its mailbox full: wait for room, the deadline, a
 * cancel, or the target's close or end. 1 (it slept) or 0: try the send
 * again. */
static int wait_room(keel_task_t id, keel_time_t deadline)
{
	struct keel__task *c = keel__self(), *t = keel__task_slot(id);
	struct keel__qnode n = {.t = c};
	uint64_t w;
	int rc;

	if (deadline != KEEL_FOREVER && keel__clock_now() >= deadline)
		return -ETIMEDOUT;
	if (!c)
		return -ENOMEM;
	if (id == c->id)
		return -EDEADLK; /* only this task could make the room */
	keel__qlock(&t->room_ql);
	keel__q_append(&t->room_q, &n);
	fetch_or_acq_rel(&t->mb_queued, ROOM_WAITERS);
	keel__qunlock(&t->room_ql);
	KEEL_YIELD();
	w = load_acquire(&t->mword);
	if ((w >> MB_GEN_SHIFT) != (id >> MB_GEN_SHIFT) || (w & MB_ENDED))
		rc = -ESRCH;
	else if (w & MB_CLOSED)
		rc = -ESHUTDOWN;
	else if (has_room(t))
		rc = 0;
	else if ((rc = keel__wait(c, deadline, 1, "post: waiting for room")) ==
		 0)
		rc = 1;
	keel__qlock(&t->room_ql);
	room_dequeue(t, &n);
	keel__qunlock(&t->room_ql);
	/* Woken for a place we will not take: pass it on. */
	if (rc < 0 && __atomic_load_n(&n.woken, __ATOMIC_ACQUIRE) &&
	    has_room(t))
		wake_room(t, 0);
	return rc;
}

_Atomic uint64_t keel__room_waits_ok;

int keel__mbox_send_wait(keel_task_t id, struct keel__msg *m,
			 keel_time_t deadline)
{
	int rc, waited = 0;

	while ((rc = send_msg(id, m, SEND_REQUEST)) == -EAGAIN) {
		if ((rc = wait_room(id, deadline)) < 0)
			return rc;
		waited |= rc;
	}
	if (waited && rc == 0)
		fetch_add_relaxed(&keel__room_waits_ok, 1);
	return rc;
}

/* The owner popped m: if it held a place, give the place back and wake a
 * sender waiting for it, if any. */
static inline void room_freed(struct keel__task *t, struct keel__msg *m)
{
	if (likely(!m->counted))
		return;
	m->counted = 0;
	if (fetch_sub_acq_rel(&t->mb_queued, 1) & ROOM_WAITERS)
		wake_room(t, 0);
}

static void give_place(struct keel__task *t, struct keel__msg *m)
{
	room_freed(t, m);
}

int keel_post(keel_task_t target, keel_work_fn work, keel_work_fn cancel,
	      void *arg)
{
	struct keel__msg *m;
	int rc;

	if (!work)
		return -EINVAL;
	if (!(m = keel__msg_alloc()))
		return -ENOMEM;
	m->kind = MSG_POST;
	m->fn.work = work;
	m->cancel = cancel;
	m->arg = arg;
	if ((rc = keel__mbox_send(target, m)) < 0)
		keel__msg_free(m);
	return rc;
}

_Static_assert(sizeof(keel_msg_t) == KEEL_CACHELINE &&
		       offsetof(struct keel__msg, key) +
				       sizeof(((struct keel__msg *)0)->key) <=
			       sizeof(keel_msg_t) &&
		       _Alignof(keel_msg_t) >= _Alignof(struct keel__msg),
	       "a keel_msg_t holds line 0 of a record");

/* Take a registered keel_msg_t for a send: -EINVAL if it is not one,
 * -EBUSY if it is queued already (or being finished). */
static int foreign_take(struct keel__msg *m, keel_work_fn work,
			keel_work_fn cancel, void *arg)
{
	uint64_t st;

	if (!work || !m || m->kind != MSG_FOREIGN ||
	    m->key != keel__foreign_key(m, m->idx))
		return -EINVAL;
	/* Acquire: the previous outcome's reads of m are done. A load and a
	 * store, not a CAS: a locked instruction on the message's line,
	 * cold in a stream of them, cost 70 ns a send (1p1c); it would
	 * catch only two threads sending one message at once, which is
	 * their race (mailbox.h). */
	st = load_acquire(&m->state);
	if ((st & MSG_STATE_MASK) != ST_FREE)
		return -EBUSY;
	store_relaxed(&m->state, st | ST_QUEUED);
	m->fn.work = work;
	m->cancel = cancel;
	m->arg = arg;
	return 0;
}

/* A send of m was refused: it is the sender's again, unchanged. */
static void foreign_refused(struct keel__msg *m)
{
	store_release(&m->state, load_relaxed(&m->state) & ~MSG_STATE_MASK);
}

int keel_post_msg(keel_task_t target, keel_msg_t *msg, keel_work_fn work,
		  keel_work_fn cancel, void *arg)
{
	struct keel__msg *m = (struct keel__msg *)(void *)msg;
	int rc;

	if ((rc = foreign_take(m, work, cancel, arg)) < 0)
		return rc;
	if ((rc = keel__mbox_send(target, m)) < 0)
		foreign_refused(m);
	return rc;
}

int keel_post_msg_until(keel_task_t target, keel_msg_t *msg,
			keel_work_fn work, keel_work_fn cancel, void *arg,
			keel_time_t deadline)
{
	struct keel__msg *m = (struct keel__msg *)(void *)msg;
	int rc;

	keel__lock_check_blocking("keel_post_msg_until()");
	if ((rc = foreign_take(m, work, cancel, arg)) < 0)
		return rc;
	if ((rc = keel__mbox_send_wait(target, m, deadline)) < 0)
		foreign_refused(m);
	return rc;
}

int keel_post_until(keel_task_t target, keel_work_fn work, keel_work_fn cancel,
		    void *arg, keel_time_t deadline)
{
	struct keel__msg *m;
	int rc;

	if (!work)
		return -EINVAL;
	keel__lock_check_blocking("keel_post_until()");
	if (!(m = keel__msg_alloc()))
		return -ENOMEM;
	m->kind = MSG_POST;
	m->fn.work = work;
	m->cancel = cancel;
	m->arg = arg;
	if ((rc = keel__mbox_send_wait(target, m, deadline)) < 0)
		keel__msg_free(m);
	return rc;
}

/* ---- The owner's side -------------------------------------------------- */

/* Would pop() return a record now? */
static int poppable(struct keel__task *t)
{
	struct keel__msg *h = t->head;

	if (load_acquire(&h->next))
		return 1;
	if (h == &t->stub)
		return 0;
	/* h is the last record: poppable unless a send is linking after it. */
	return (load_acquire(&t->tailw) & TW_IDX_MASK) == h->idx;
}

/* How far ahead pop() fetches along a run of neighbouring records. */
#ifndef POP_AHEAD
#define POP_AHEAD 16
#endif

/* Vyukov's pop with the stub record. NULL when the queue is empty or the
 * only records behind `head` are still being linked by their senders. */
static struct keel__msg *pop(struct keel__task *t)
{
	struct keel__msg *h = t->head, *next = load_acquire(&h->next);
	uintptr_t step;
	uint64_t tw;

	if (h == &t->stub) {
		if (!next)
			return NULL;
		t->head = h = next;
		next = load_acquire(&h->next);
	}
	if (next) {
		t->head = next;
		/* The record after this one is most likely the next to run.
		 * A deep queue is mostly runs of neighbouring records, in
		 * either direction (msg.c), each a miss by the time it runs:
		 * and a sender's own keel_msg_t's are often an array: when
		 * these two are near neighbours, fetch the one POP_AHEAD
		 * steps further along the same way too, so that its miss
		 * overlaps the work in between (a deep 1p1c serve went from
		 * 12 to 8.5 ns a message). A guess: a prefetch cannot
		 * fault. */
		__builtin_prefetch(next);
		step = (uintptr_t)next - (uintptr_t)h;
		if (step + 2 * sizeof *h <= 4 * sizeof *h)
			__builtin_prefetch(
				(const void *)((uintptr_t)next +
					       POP_AHEAD * step));
		return h;
	}
	tw = load_acquire(&t->tailw);
	if ((tw & TW_IDX_MASK) != h->idx)
		return NULL; /* a send is linking after h */
	store_relaxed(&t->stub.next, NULL);
	if (tw & TW_CLOSED) {
		/* h is the last record the mailbox accepted. */
		t->head = &t->stub;
		return h;
	}
	/* h is the last record: the stub takes its place as the tail, so h
	 * can leave. If a send took the tail first, it links after h. */
	KEEL_YIELD();
	if (cas_acq_rel(&t->tailw, &tw, (tw & ~TW_IDX_MASK) | MSG_IDX_STUB)) {
		t->head = &t->stub;
		return h;
	}
	race_seen(RACE_POP_STUB_LOST);
	next = load_acquire(&h->next);
	if (next) {
		t->head = next;
		return h;
	}
	return NULL;
}

/* Is every record accepted up to the tail word value tw linked, so that
 * pop() reaches it? (Owner only.) Walks the queue from *from, a record in
 * it (head at first), and leaves there the last one reached, so that
 * asking again does not walk the same records again. */
static int linked_to(struct keel__task *t, uint64_t tw, struct keel__msg **from)
{
	uint32_t last = (uint32_t)(tw & TW_IDX_MASK);
	struct keel__msg *m = *from, *next;

	if (last == MSG_IDX_STUB)
		return 1; /* the stub was the tail: nothing was in flight */
	for (;; m = next) {
		if (m != &t->stub && m->idx == last)
			return 1;
		if (!(next = load_acquire(&m->next))) {
			*from = m;
			return 0;
		}
	}
}

/* Sleep until `at`, a record in the queue whose next is NULL (the stub
 * included), is linked to its successor, or until `until`; see WAITING FOR
 * A LINK. keel__wait()'s result if cancellable, else keel__park()'s. */
static int nap_for_link(struct keel__task *t, struct keel__msg *at,
			keel_time_t until, int cancellable)
{
	int rc = 0;

	store_relaxed(&t->link_wait, at->idx);
	/* Our store before our look at the link; the sender links, then
	 * looks at link_wait without a fence, so both may miss the other:
	 * the nap's end covers that. */
	fence_seq_cst();
	if (!load_acquire(&at->next))
		rc = cancellable ? keel__wait(t, until, 1, "serve")
				 : keel__park(t, until);
	store_relaxed(&t->link_wait, LINK_WAIT_NONE);
	return rc;
}

/* Wait until every record accepted up to tw is linked. Not a
 * cancellation point. */
static void wait_linked(struct keel__task *t, uint64_t tw)
{
	keel_time_t nap = LINK_NAP_MIN;
	struct keel__msg *from = t->head;

	if (linked_to(t, tw, &from))
		return;
	if (t->closed)
		race_seen(RACE_CLOSE_WAITED);
	for (unsigned i = 0; !linked_to(t, tw, &from); i++) {
		if (i < 64) {
			keel__cpu_relax();
			continue;
		}
		/* `from` is the last linked record: the gap is after it. */
		nap_for_link(t, from, keel__clock_now() + nap, 0);
		if (nap < LINK_NAP_MAX)
			nap *= 2;
	}
}

/* Fast path: ask senders for a wake-up, if the queue is empty and quiet
 * (see THE TAIL WORD). 1 if armed; 0 if a record is queued or a send is
 * linking. */
static int arm_fast(struct keel__task *t)
{
	uint64_t tw = load_acquire(&t->tailw);

	if ((tw & TW_IDX_MASK) != MSG_IDX_STUB || t->head != &t->stub ||
	    load_acquire(&t->stub.next))
		return 0;
	KEEL_YIELD();
	if (cas_acq_rel(&t->tailw, &tw, tw | TW_SLEEPING))
		return 1;
	race_seen(RACE_ARM_LOST);
	return 0;
}

/* Woken, or gave up waiting: take the arming back unless a sender took it
 * (it then unparks us, a spurious wake for a later park). */
static void disarm_fast(struct keel__task *t)
{
	uint64_t tw = load_relaxed(&t->tailw);

	while ((tw & TW_SLEEPING) &&
	       !cas_weak_acq_rel(&t->tailw, &tw, tw & ~TW_SLEEPING))
		;
}

/* The owner wants to sleep on the fast path but a send is between its CAS
 * and its link after the head: wait for the link (WAITING FOR A LINK), the
 * deadline or cancellation, whichever is first. */
static int wait_linking(struct keel__task *t, keel_time_t deadline)
{
	keel_time_t nap = LINK_NAP_MIN, until;
	int rc;

	if (!poppable(t))
		race_seen(RACE_SLEEP_LINKING);
	for (unsigned i = 0; !poppable(t); i++) {
		if (i < 64) {
			keel__cpu_relax();
			continue;
		}
		until = keel__clock_now() + nap;
		if (deadline < until)
			until = deadline;
		rc = nap_for_link(t, t->head, until, 1);
		if (rc == -ECANCELED || (rc == -ETIMEDOUT && until == deadline))
			return rc;
		if (nap < LINK_NAP_MAX)
			nap *= 2;
	}
	return 0;
}

/* Owner only: send every sender to the counted path (fd mode, a bound),
 * and wait until the fast sends accepted before are linked. */
static void go_slow(struct keel__task *t)
{
	uint64_t tw = load_relaxed(&t->tailw);

	if (t->slow)
		return;
	while (!cas_weak_acq_rel(&t->tailw, &tw, (tw & ~TW_SLEEPING) | TW_SLOW))
		;
	t->slow = 1;
	wait_linked(t, tw);
}

/* Owner only: back to the fast path (a bound removed, no fd). */
static void go_fast(struct keel__task *t)
{
	if (!t->slow || t->fd_mode || t->loop_mode || load_relaxed(&t->mb_limit))
		return;
	fetch_and_acq_rel(&t->tailw, ~TW_SLOW);
	t->slow = 0;
}

/* The slow path's arming, on the mailbox word. */
static void arm(struct keel__task *t)
{
	fetch_or_acq_rel(&t->mword, MB_SLEEPING);
}

/* The outcome of a keel_msg_t begins: it is the sender's again from the
 * release on, so read what the outcome needs first, and touch it no more
 * (CALLER-OWNED MESSAGES). */
static void foreign_done(struct keel__msg *m)
{
	uint64_t st = load_relaxed(&m->state);

	if (m->noted) {
		m->noted = 0;
		fetch_add_acq_rel(&keel__foreign_at(m->idx)->served, 1);
	}
	store_release(&m->state, st & ~MSG_STATE_MASK);
}

/* A post's outcome begins: its record is freed, or a keel_msg_t given
 * back to its sender, once what the outcome needs has been read. */
static void post_done(struct keel__msg *m)
{
	if (m->kind == MSG_FOREIGN)
		foreign_done(m);
	else
		keel__msg_free(m);
}

static int is_post(const struct keel__msg *m)
{
	return m->kind == MSG_POST || m->kind == MSG_FOREIGN;
}

static void run_msg(struct keel__task *t, struct keel__msg *m)
{
	if (is_post(m)) {
		keel_work_fn work = m->fn.work;
		void *arg = m->arg;

		post_done(m);
		work(arg);
	} else {
		keel__proxy_run(t, m);
	}
}

static void cancel_msg(struct keel__task *t, struct keel__msg *m)
{
	if (is_post(m)) {
		keel_work_fn cancel = m->cancel;
		void *arg = m->arg;

		post_done(m);
		if (cancel)
			cancel(arg);
	} else {
		keel__proxy_cancel(t, m);
	}
}

static int run_batch(struct keel__task *t)
{
	struct keel__msg *m;
	int n = 0;

	/* A message may close the mailbox; the rest were drained then. */
	while (n < SERVE_BATCH && !t->closed && (m = pop(t))) {
		room_freed(t, m);
		run_msg(t, m);
		n++;
	}
	/* Counted for the wait (spin_pauses), saturating. */
	t->run_len += (uint32_t)n;
	if (t->run_len < (uint32_t)n)
		t->run_len = UINT32_MAX;
	return n;
}

/* Pauses before the spin starts reading the clock: a sender that is busy
 * sending usually links its next message within them, and a clock read
 * costs as much as a message. */
#define SPIN_UNTIMED 64
/* The pauses between two looks at a queue with a record at its head (a
 * pause is 26 ns on the EPYC the benchmarks ran on; compile-time knobs
 * for measuring), and at most, in a stream. */
#ifndef SPIN_BACKOFF
#define SPIN_BACKOFF 32
#endif
#ifndef STREAM_BACKOFF_MAX
#define STREAM_BACKOFF_MAX 512
#endif
/* A stream: at least this many records ran since the owner last spun,
 * and at least one for every STREAM_RATE pauses of that spin's wait. */
#define STREAM_MIN 16
#define STREAM_RATE 4

/* How long the owner waits between looks; see spin_for_message(). What
 * decides is the run: the records run since the last spin. A spin with
 * no run before it (a wake that found nothing) keeps the choice. */
static unsigned spin_pauses(struct keel__task *t)
{
	uint32_t p = t->stream_pauses ? t->stream_pauses : SPIN_BACKOFF,
		 run = t->run_len;

	if (run) {
		t->run_len = 0;
		if (run < STREAM_MIN) {
			t->stream_pauses = 0; /* not a stream */
		} else if ((uint64_t)run * STREAM_RATE >= p) {
			if (t->stream_pauses && p < STREAM_BACKOFF_MAX)
				p *= 2; /* faster than the wait: wait more */
			t->stream_pauses = p;
		} else {
			/* Slower: wait less, or end the stream. */
			t->stream_pauses = p / 2 >= SPIN_BACKOFF ? p / 2 : 0;
		}
	}
	if (t->stream_pauses)
		return t->stream_pauses;
	return t->head == &t->stub ? 1 : SPIN_BACKOFF;
}

/* Spin for a poppable message within the adaptive budget. A look reads
 * the lines a sender writes (the last record's link, the tail word), so
 * an owner that has caught up with a busy sender and looks again at once
 * takes those lines from under each send: it slowed a 1p1c stream of
 * keel_msg_t's from 10 to 70 ns a message, the owner finding the queue
 * empty every third message and serving two at a time. So:
 *
 * - While a record is at the head (a send linking after it, or about
 *   to), the owner waits SPIN_BACKOFF pauses before each look: a batch
 *   builds up meanwhile, and a message that arrives during the spin
 *   waits at most that long.
 * - An empty queue (the stub at the head) the owner looks at after every
 *   pause: its link is written once, by the next send, and a call waits
 *   on it.
 * - In a stream, where the run since the last spin was STREAM_MIN
 *   records or more and at least one for every STREAM_RATE pauses of
 *   that spin's wait (a sender keeping ten million messages a second
 *   coming), the owner waits twice as long each time it catches up, up
 *   to STREAM_BACKOFF_MAX pauses (about 13 us): each catching up takes
 *   the sender's lines once and then leaves it alone for a longer batch,
 *   and each message of the stream waits about as long as it would in a
 *   queue that deep anyway. A saturated 1p1c stream of keel_msg_t's
 *   went from 25-37 to 10-16 ns a message. A slower run halves the wait
 *   (below SPIN_BACKOFF: no stream); one of fewer than STREAM_MIN
 *   records ends the stream, so calls (one record a run) never start
 *   one. tests/test_mailbox.c follows the wait through such runs.
 *
 *   A run is counted from spin to spin, not from one empty queue to the
 *   next: a first version did the latter, and a keel_serve() called
 *   again right after a drain found the few messages sent meanwhile, a
 *   "drain" of two or three that ended the stream. Counted from spin to
 *   spin, a saturated 1p1c stream of keel_msg_t's went from 16.0 to
 *   13.0 ns a message (2p1c: 18.1 to 14.8), and its repetitions from
 *   14-28 to 10-15 ns.
 *
 * The head does not move during the spin (only pop() moves it), so
 * neither does the choice. */
static int spin_for_message(struct keel__task *t, keel_time_t deadline)
{
	keel_time_t stop = 0;
	unsigned pauses = spin_pauses(t), since_clock = 0;

	/* The caller has just found nothing: wait before the first look. */
	for (;;) {
		for (unsigned k = 0; k < pauses; k++)
			keel__cpu_relax();
		if (poppable(t)) {
			keel__spin_adapt(&t->spin_ns, 1);
			return 1;
		}
		since_clock += pauses;
		if (!stop) {
			if (since_clock >= SPIN_UNTIMED) {
				stop = keel__clock_now() + t->spin_ns;
				if (deadline < stop)
					stop = deadline;
				since_clock = 0;
			}
		} else if (since_clock >= 16) {
			if (keel__clock_now() >= stop)
				break;
			since_clock = 0;
		}
	}
	keel__spin_adapt(&t->spin_ns, 0);
	return 0;
}

/* ---- The event-loop fd (owner only; see the top of the file) ---------- */

static void fd_arm(struct keel__task *t)
{
	uint64_t old = fetch_or_acq_rel(&t->mword, MB_SLEEPING);

	if (t->fd_armed && !(old & MB_SLEEPING))
		t->fd_owed++; /* the previous arming was taken */
	t->fd_armed = 1;
}

/* Take back an arming of the fd or the loop, if one is out: a sender that
 * took it first owes the owner a signal, counted in *owed. */
static void disarm_counting(struct keel__task *t, uint32_t *owed)
{
	uint64_t old;

	if (!t->fd_armed)
		return;
	old = fetch_and_acq_rel(&t->mword, ~MB_SLEEPING);
	if (!(old & MB_SLEEPING))
		(*owed)++;
	t->fd_armed = 0;
}

static void fd_disarm(struct keel__task *t)
{
	disarm_counting(t, &t->fd_owed);
}

/* Something is pending, or the task is cancelled or closed: the fd must be
 * readable. Clear SLEEPING ourselves and signal, unless a sender or a
 * canceller cleared it first (then they signal). */
static void fd_take(struct keel__task *t)
{
	uint64_t old = fetch_and_acq_rel(&t->mword, ~MB_SLEEPING);

	t->fd_armed = 0;
	t->fd_owed++;
	if (old & MB_SLEEPING)
		keel__notify_signal(load_relaxed(&t->notify_wfd));
}

/* Disarmed: consume every signal made so far, waiting for the owed ones
 * still on their way. A signaller is counted in flight until its write is
 * done, so once none is, whatever has not landed was read by someone else
 * (the fd is keel's, but a program may read it): stop waiting then. */
static void fd_drain(struct keel__task *t)
{
	uint64_t got = keel__notify_drain(t->notify_rfd);

	for (unsigned i = 0; got < t->fd_owed; i++) {
		if ((load_acquire(&t->mword) & MB_COUNT_MASK) == 0) {
			keel__notify_drain(t->notify_rfd);
			break;
		}
		if (i < 64)
			keel__cpu_relax();
		else
			sched_yield();
		got += keel__notify_drain(t->notify_rfd);
	}
	t->fd_owed = 0;
}

/* The fd must stay readable (cancelled, closed): see that a signal is made
 * or owed, without a system call if one is. */
static void fd_keep_readable(struct keel__task *t)
{
	if (t->fd_armed) {
		fd_take(t);
	} else if (t->fd_owed == 0) {
		fd_arm(t);
		fd_take(t);
	}
}

/* The end of a serve: no stale readiness, no lost wake-up. */
static void fd_settle(struct keel__task *t)
{
	fd_disarm(t);
	fd_drain(t);
	fd_arm(t);
	/* The acquire of fd_arm's fetch_or pairs with the release of a
	 * sender's (or canceller's) count that came before it in the word's
	 * order, so its message (or its cancellation) is seen here; one that
	 * came after saw SLEEPING and signals. */
	if (poppable(t) || keel__cancelled(t))
		fd_take(t);
}

/* ---- The JavaScript event loop (owner only; see the top of the file) --- */

static void loop_arm(struct keel__task *t)
{
	fetch_or_acq_rel(&t->mword, MB_SLEEPING);
	t->fd_armed = 1;
}

static void loop_disarm(struct keel__task *t)
{
	/* A sender that took the arming scheduled a serve. */
	disarm_counting(t, &t->loop_owed);
}

static void loop_settle(struct keel__task *t)
{
	uint64_t old;

	loop_disarm(t);
	if (t->loop_owed)
		return; /* a serve is on its way */
	loop_arm(t);
	/* As in fd_settle(): what a sender linked before the arming is
	 * seen here; one after saw SLEEPING and schedules the serve. */
	if (!poppable(t))
		return;
	old = fetch_and_acq_rel(&t->mword, ~MB_SLEEPING);
	t->fd_armed = 0;
	t->loop_owed++;
	if (old & MB_SLEEPING)
		keel__loop_notify(load_relaxed(&t->loop_thread));
}

void keel__mbox_loop_serve(void)
{
	struct keel__task *t = keel__tls.self;

	/* Scheduled for a task of this thread that has ended since: the
	 * thread's task now, if any, was not served from the loop, or
	 * counted nothing. */
	if (!t || !t->loop_mode || t->serving)
		return;
	loop_disarm(t);
	if (t->loop_owed)
		t->loop_owed--;
	(void)keel_serve(0);
}

void keel__mbox_wake_cancelled(struct keel__task *t)
{
	keel_task_t id = load_acquire(&t->live);
	uint64_t old;

	if (!id)
		return;
	/* Counted in flight, like a sender, so that the fd cannot be closed
	 * under us. The release pairs with the acquire of the owner's next
	 * arming (fd_arm), which then sees the cancellation; if the owner
	 * armed first, we see SLEEPING and its fd (published before). */
	old = fetch_add_acq_rel(&t->mword, 1);
	if ((old >> MB_GEN_SHIFT) == (id >> MB_GEN_SHIFT) &&
	    !(old & (MB_CLOSED | MB_ENDED)) &&
	    load_acquire(&t->notify_wfd) >= 0) {
		old++;
		while (old & MB_SLEEPING) {
			if (cas_weak_acq_rel(&t->mword, &old,
					     old & ~MB_SLEEPING)) {
				KEEL_YIELD();
				keel__notify_signal(
					load_relaxed(&t->notify_wfd));
				break;
			}
		}
	}
	leave_refused(t);
}

int keel_serve(keel_time_t deadline)
{
	struct keel__task *t = keel__self();
	int n, rc = 0;

	if (!t)
		return -ENOMEM;
	if (t->serving)
		return -EBUSY;
	keel__lock_check_serve();
	keel__lock_check_blocking("keel_serve()");
	if (t->closed)
		return -ESHUTDOWN;
	if ((rc = keel__check(t)) < 0) {
		if (t->fd_mode)
			fd_keep_readable(t); /* the loop is to leave */
		return rc;
	}
	t->serving = 1;
	if (t->fd_mode)
		fd_disarm(t);
	else if (t->loop_mode)
		loop_disarm(t);
	n = run_batch(t);
	while (n == 0) {
		if (t->closed) {
			rc = -ESHUTDOWN;
			break;
		}
		if ((rc = keel__check(t)) < 0)
			break;
		if (deadline != KEEL_FOREVER && keel__clock_now() >= deadline) {
			rc = -ETIMEDOUT;
			break;
		}
		if (spin_for_message(t, deadline)) {
			n = run_batch(t);
			continue;
		}
		if (t->fd_mode) {
			fd_arm(t);
		} else if (t->loop_mode) {
			loop_arm(t);
		} else if (t->slow) {
			arm(t);
		} else if (!arm_fast(t)) {
			/* Queued meanwhile, or a send is linking and will
			 * not wake us: wait for its link. */
			if ((n = run_batch(t)) > 0)
				break;
			rc = wait_linking(t, deadline);
			n = run_batch(t);
			if (n == 0 && rc == -ECANCELED)
				break;
			continue;
		}
		if ((n = run_batch(t)) > 0)
			break;
		rc = keel__wait(t, deadline, 1, "serve");
		if (!t->slow)
			disarm_fast(t);
		n = run_batch(t);
		if (n == 0 && (rc == -ECANCELED || rc == -EDEADLK))
			break; /* -EDEADLK: a thread that must not wait */
	}
	if (t->fd_mode && !t->closed)
		fd_settle(t);
	else if (t->loop_mode && !t->closed)
		loop_settle(t);
	t->serving = 0;
	return n > 0 ? n : rc;
}

int keel_mailbox_fd(void)
{
	struct keel__task *t = keel__self();
	int rc, rfd, wfd;

	if (!t)
		return -ENOMEM;
	if (t->closed)
		return -ESHUTDOWN;
	if (t->loop_mode)
		return -EBUSY;
	if (t->notify_rfd < 0) {
		if ((rc = keel__notify_open(&rfd, &wfd)) < 0)
			return rc;
		t->notify_rfd = rfd;
		/* Pairs with the acquire in notify(). */
		store_release(&t->notify_wfd, wfd);
	}
	/* Senders must be counted to touch the fd: the counted path. */
	go_slow(t);
	/* Armed from now on, outside a serve; inside one (called from a
	 * message), the serve's end arms it. */
	if (!t->fd_mode && !t->serving) {
		fd_arm(t);
		if (poppable(t) || keel__cancelled(t))
			fd_take(t);
	}
	t->fd_mode = 1;
	return t->notify_rfd;
}

int keel_mailbox_serve_from_loop(void)
{
	struct keel__task *t;

	if (!keel__loop_supported())
		return -ENOTSUP;
	if (!(t = keel__self()))
		return -ENOMEM;
	if (t->closed)
		return -ESHUTDOWN;
	if (t->fd_mode)
		return -EBUSY;
	if (t->loop_mode)
		return 0;
	t->loop_owed = 0;
	/* A serve is scheduled by the sender that clears SLEEPING in the
	 * mailbox word: senders must take the counted path, as for the fd. */
	go_slow(t);
	/* Pairs with the acquire in notify(). */
	store_release(&t->loop_thread, (uintptr_t)pthread_self());
	t->loop_mode = 1;
	/* Armed from now on; inside a serve (called from a message), the
	 * serve's end arms. */
	if (!t->serving)
		loop_settle(t);
	return 0;
}

/* ---- Closing -------------------------------------------------------------- */

/* Set CLOSED in the tail word (see THE TAIL WORD); returns the value it
 * replaced, whose index is the last record accepted. */
static uint64_t seal(struct keel__task *t)
{
	uint64_t tw = load_relaxed(&t->tailw);

	while (!(tw & TW_CLOSED) &&
	       !cas_weak_acq_rel(&t->tailw, &tw,
				 (tw & ~TW_SLEEPING) | TW_CLOSED))
		;
	return tw;
}

void keel__mbox_seal(struct keel__task *t)
{
	(void)seal(t);
}

void keel__mbox_fork_child(struct keel__task *t)
{
	struct keel__msg *m = t->head, *next;
	uint64_t tw = load_relaxed(&t->tailw);

	while ((next = load_relaxed(&m->next)) != NULL)
		m = next;
	/* Records linked after a vanished sender's are lost with it here
	 * (they are the parent's); the queue ends where the links end. */
	store_relaxed(&t->tailw,
		      (tw & ~TW_IDX_MASK) |
			      (m == &t->stub ? MSG_IDX_STUB : m->idx));
}

static void close_and_wait(struct keel__task *t)
{
	int64_t spins = 0;
	uint64_t last;

	t->closed = 1;
	/* From here every send is refused (tail word first, then the
	 * mailbox word for the counted path and the room waiters). */
	last = seal(t);
	fetch_or_acq_rel(&t->mword, MB_CLOSED);
	/* Senders waiting for room leave with -ESHUTDOWN. */
	wake_room(t, 1);
	/* Wait out the senders that registered before CLOSED. The acquire
	 * pairs with each sender's release of its count, so their links are
	 * visible once the count is 0. */
	while ((load_acquire(&t->mword) & MB_COUNT_MASK) != 0) {
		if (spins++ < 64) {
			keel__cpu_relax();
			continue;
		}
		keel__park(t, KEEL_FOREVER);
	}
	/* And the fast sends accepted before the seal: their links. */
	wait_linked(t, last);
}

void keel__mbox_shutdown(struct keel__task *t)
{
	struct keel__msg *m;

	if (!t->closed)
		close_and_wait(t);
	/* Cancel handlers run one at a time, so if one of them exits the
	 * thread, the exit hook comes back here and finishes the drain. */
	while ((m = pop(t)) != NULL) {
		room_freed(t, m);
		cancel_msg(t, m);
	}
	keel__proxy_close(t);
}

void keel__mbox_close_fd(struct keel__task *t)
{
	int wfd = load_relaxed(&t->notify_wfd);

	if (t->notify_rfd < 0)
		return;
	/* No sender can reach the fd: the mailbox is closed and the senders
	 * registered before that are gone (close_and_wait). */
	store_relaxed(&t->notify_wfd, -1);
	keel__notify_close(t->notify_rfd, wfd);
	t->notify_rfd = -1;
	t->fd_mode = 0;
}

/* ---- Bounding ------------------------------------------------------------ */

/* A limit is set on an unbounded mailbox: the messages queued so far take
 * their places too (owner only; replies excepted, as when they are sent).
 * Records stay in the queue until the owner pops them, so walking it from
 * head is safe; it stops at a send still linking, whose record then holds
 * no place. */
static void count_queued(struct keel__task *t)
{
	struct keel__msg *m = t->head;
	uint64_t n = 0;

	for (; m; m = load_acquire(&m->next)) {
		uint64_t st = load_relaxed(&m->state) & MSG_STATE_MASK;

		if (m == &t->stub || m->counted)
			continue;
		if (!is_post(m) &&
		    (st == ST_REPLY_DONE || st == ST_REPLY_CANCEL))
			continue;
		m->counted = 1;
		n++;
	}
	if (n)
		fetch_add_acq_rel(&t->mb_queued, n);
}

int keel_mailbox_limit(size_t max)
{
	struct keel__task *t = keel__self();
	uint32_t old;

	if (!t)
		return -ENOMEM;
	if (max > UINT32_MAX)
		return -EINVAL;
	if (t->closed)
		return -ESHUTDOWN;
	old = load_relaxed(&t->mb_limit);
	/* A bounded mailbox's senders take places: the counted path. */
	if (max)
		go_slow(t);
	if (max && !old)
		count_queued(t);
	store_relaxed(&t->mb_limit, (uint32_t)max);
	/* Senders read the limit after their fetch_add on the word, which
	 * these acq_rel updates order after the store above. */
	if (max)
		fetch_or_acq_rel(&t->mword, MB_BOUNDED);
	else
		fetch_and_acq_rel(&t->mword, ~MB_BOUNDED);
	go_fast(t); /* unless still bounded, or in fd mode */
	if (!max || max > old)
		wake_room(t, 1);
	return 0;
}

int keel_mailbox_close(void)
{
	struct keel__task *t = keel__self();

	if (!t)
		return -ENOMEM;
	keel__lock_check_blocking("keel_mailbox_close()");
	if (t->closed)
		return -ESHUTDOWN;
	close_and_wait(t);
	keel__mbox_shutdown(t);
	/* A loop watching the fd wakes and sees -ESHUTDOWN from keel_serve():
	 * closed, the fd stays readable. No sender writes it any more. */
	if (t->fd_mode)
		keel__notify_signal(load_relaxed(&t->notify_wfd));
	return 0;
}
