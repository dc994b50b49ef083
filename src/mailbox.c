/*
 * mailbox.c: per-task message queues: sending, serving, the event-loop fd
 * and closing.
 *
 * DESIGN
 * Each task's mailbox is an intrusive multi-producer, single-consumer queue
 * (Vyukov's): a sender exchanges its record into `tail` and then links the
 * previous record to it; only the owner reads from `head`. No sender ever
 * waits for another. A sender preempted between its exchange and its link
 * delays the owner's view of later messages, never their acceptance, and
 * the owner then sleeps rather than spins: that sender notifies it (below).
 *
 * The mailbox word admits senders:
 *
 *     63          24   23      22       21        20         0
 *     +-------------+-------+--------+----------+------------+
 *     | generation  | ENDED | CLOSED | SLEEPING | in flight  |
 *     +-------------+-------+--------+----------+------------+
 *
 * A send starts with one fetch_add of 1, registering as in flight, and reads
 * the old value: a generation other than the handle's, or ENDED, means the
 * task is gone (-ESRCH); CLOSED means -ESHUTDOWN. Either way the sender
 * takes its 1 back and never touches the queue. Otherwise it enqueues and
 * then releases its count.
 *
 * Closing (owner only): fetch_or CLOSED, then wait until the in-flight count
 * is 0. From then on no sender is inside the queue, so draining it until
 * empty sees every accepted message and each gets its cancel. That is the
 * whole of "nothing slips in after close": a send racing close either
 * registered before CLOSED (and is drained) or saw CLOSED (and was refused).
 *
 * SLEEPING asks for a notification. The owner sets it (fetch_or) before it
 * sleeps, or when it leaves keel_serve() with an fd for its event loop, and
 * then looks at the queue once more. A sender, after linking its record,
 * releases its count with one fetch_sub and looks at the old value. If
 * SLEEPING was set, it registers in flight again, clears the bit with a
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
 */
#include <sched.h>
#include <stdlib.h>

#include "internal.h"

/* Messages run per keel_serve() call before it returns, at most. */
#define SERVE_BATCH 1024

void keel__mbox_reset(struct keel__task *t)
{
	store_relaxed(&t->stub.next, NULL);
	t->head = &t->stub;
	store_relaxed(&t->tail, &t->stub);
	t->fd_armed = 0;
	t->fd_owed = 0;
}

/* ---- Sending ------------------------------------------------------------- */

static void notify(struct keel__task *t)
{
	/* Pairs with the release in keel_mailbox_fd(). */
	int fd = load_acquire(&t->notify_wfd);

	keel__unpark(t);
	if (fd >= 0)
		keel__notify_signal(fd);
}

/* Release a count taken by a send that was refused. */
static void leave_refused(struct keel__task *t)
{
	uint64_t old = fetch_sub_acq_rel(&t->mword, 1);

	if ((old & MB_CLOSED) && (old & MB_COUNT_MASK) == 1)
		keel__unpark(t);
}

/* A sender whose release found SLEEPING set: the owner asked to be told of
 * messages. Notify it, but only while counted in flight again, so that the
 * owner (which closes its eventfd only after close has waited out every
 * sender) can never have closed the fd under us. */
static void notify_sleeper(struct keel__task *t, keel_task_t id)
{
	uint64_t old = fetch_add_acquire(&t->mword, 1), new;

	if ((old >> MB_GEN_SHIFT) == (id >> MB_GEN_SHIFT) &&
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
static void leave_linked(struct keel__task *t, keel_task_t id)
{
	uint64_t old = fetch_sub_acq_rel(&t->mword, 1);

	if (likely(!(old & (MB_SLEEPING | MB_CLOSED))))
		return;
	if ((old & MB_CLOSED) && (old & MB_COUNT_MASK) == 1)
		keel__unpark(t); /* the owner waits in close for us */
	else if (old & MB_SLEEPING)
		notify_sleeper(t, id);
}

int keel__mbox_send(keel_task_t id, struct keel__msg *m)
{
	struct keel__task *t = keel__task_slot(id);
	struct keel__msg *prev;
	uint64_t old;

	if (!t || id == KEEL_TASK_NONE)
		return -ESRCH;
	/* The acquire pairs with the release that opened this incarnation
	 * (keel__task_alloc), which published its empty queue. */
	old = fetch_add_acquire(&t->mword, 1);
	if (unlikely((old >> MB_GEN_SHIFT) != (id >> MB_GEN_SHIFT) ||
		     (old & (MB_CLOSED | MB_ENDED)))) {
		int rc = (old >> MB_GEN_SHIFT) != (id >> MB_GEN_SHIFT) ||
				 (old & MB_ENDED)
			 ? -ESRCH
			 : -ESHUTDOWN;

		leave_refused(t);
		return rc;
	}
	KEEL_YIELD();
	store_relaxed(&m->next, NULL);
	prev = xchg_acq_rel(&t->tail, m);
	KEEL_YIELD();
	/* Pairs with the acquire loads of `next` in pop() and poppable(). */
	store_release(&prev->next, m);
	leave_linked(t, id);
	return 0;
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
	return load_acquire(&t->tail) == h;
}

/* Vyukov's pop with the stub record. NULL when the queue is empty or the
 * only records behind `head` are still being linked by their senders. */
static struct keel__msg *pop(struct keel__task *t)
{
	struct keel__msg *h = t->head, *next = load_acquire(&h->next);
	struct keel__msg *tail;

	if (h == &t->stub) {
		if (!next)
			return NULL;
		t->head = h = next;
		next = load_acquire(&h->next);
	}
	if (next) {
		t->head = next;
		/* The record after this one is most likely the next to run. */
		__builtin_prefetch(next);
		return h;
	}
	tail = load_acquire(&t->tail);
	if (h != tail)
		return NULL;
	/* h is the last record: put the stub behind it so h can leave. */
	store_relaxed(&t->stub.next, NULL);
	tail = xchg_acq_rel(&t->tail, &t->stub);
	store_release(&tail->next, &t->stub);
	next = load_acquire(&h->next);
	if (next) {
		t->head = next;
		return h;
	}
	return NULL;
}

static void arm(struct keel__task *t)
{
	fetch_or_acq_rel(&t->mword, MB_SLEEPING);
}

static void run_msg(struct keel__task *t, struct keel__msg *m)
{
	if (m->kind == MSG_POST) {
		keel_work_fn work = m->fn.work;
		void *arg = m->arg;

		keel__msg_free(m);
		work(arg);
	} else {
		keel__proxy_run(t, m);
	}
}

static void cancel_msg(struct keel__task *t, struct keel__msg *m)
{
	if (m->kind == MSG_POST) {
		keel_work_fn cancel = m->cancel;
		void *arg = m->arg;

		keel__msg_free(m);
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
		run_msg(t, m);
		n++;
	}
	return n;
}

/* Polls before the spin starts reading the clock: a sender that is busy
 * sending usually links its next message within them, and a clock read
 * costs as much as a message. */
#define SPIN_UNTIMED 64

/* Spin for a poppable message within the adaptive budget. */
static int spin_for_message(struct keel__task *t, keel_time_t deadline)
{
	keel_time_t stop = 0;

	for (unsigned i = 1;; i++) {
		if (poppable(t)) {
			keel__spin_adapt(&t->spin_ns, 1);
			return 1;
		}
		keel__cpu_relax();
		if (i == SPIN_UNTIMED) {
			stop = keel__clock_now() + t->spin_ns;
			if (deadline < stop)
				stop = deadline;
		} else if (i > SPIN_UNTIMED && (i & 15) == 0 &&
			   keel__clock_now() >= stop) {
			break;
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

static void fd_disarm(struct keel__task *t)
{
	uint64_t old;

	if (!t->fd_armed)
		return;
	old = fetch_and_acq_rel(&t->mword, ~MB_SLEEPING);
	if (!(old & MB_SLEEPING))
		t->fd_owed++;
	t->fd_armed = 0;
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
		if (t->fd_mode)
			fd_arm(t);
		else
			arm(t);
		if ((n = run_batch(t)) > 0)
			break;
		rc = keel__wait(t, deadline, 1, "serve");
		n = run_batch(t);
		if (n == 0 && rc == -ECANCELED)
			break;
	}
	if (t->fd_mode && !t->closed)
		fd_settle(t);
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
	if (t->notify_rfd < 0) {
		if ((rc = keel__notify_open(&rfd, &wfd)) < 0)
			return rc;
		t->notify_rfd = rfd;
		/* Pairs with the acquire in notify(). */
		store_release(&t->notify_wfd, wfd);
	}
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

/* ---- Closing -------------------------------------------------------------- */

static void close_and_wait(struct keel__task *t)
{
	int64_t spins = 0;

	t->closed = 1;
	fetch_or_acq_rel(&t->mword, MB_CLOSED);
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
}

void keel__mbox_shutdown(struct keel__task *t)
{
	struct keel__msg *m;

	if (!t->closed)
		close_and_wait(t);
	/* Cancel handlers run one at a time, so if one of them exits the
	 * thread, the exit hook comes back here and finishes the drain. */
	while ((m = pop(t)) != NULL)
		cancel_msg(t, m);
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
