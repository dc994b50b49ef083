/*
 * lock.c: ranked locks: mutexes, reader-writer locks, condition variables,
 * and the per-thread record that checks the order they are taken in.
 *
 * DESIGN
 * Each thread keeps a fixed stack of the locks it holds (keel__locks, in
 * initial-exec TLS, so reaching it is one thread-pointer-relative access).
 * Each entry stores the running minimum of the ranked levels held up to it,
 * so the order check is O(1): a lock of level l may be taken only if
 * l < the minimum (level 0, learned, takes no part). Everything is checked
 * before the thread blocks on the lock, so an inversion is reported on the
 * very run where it would deadlock. The stack never allocates; see THE
 * HELD RECORD below for what happens past its capacity.
 *
 * The mutex is its own futex lock (Drepper's three states):
 *   0 free, 1 held, 2 held and someone may be waiting.
 *   lock:    CAS 0 -> 1; else spin a while reading it, CAS 0 -> 1 when
 *            it reads 0 (no spin for the mutex this thread released
 *            last, unless to wait on a condition variable: see
 *            mutex_wait()); then XCHG to 2 and futex-wait while the old
 *            value was not 0.
 *   unlock:  XCHG to 0; if the old value was 2, wake one futex waiter and
 *            one queued waiter.
 * k_owner is the holder's lock record (its keel__locks address), so
 * "held by me" is exact. A holder inside keel_cond_wait() has let the word
 * go but will take it back: k_cwait counts such holders, so that
 * keel_mutex_destroy() still finds the mutex held. Waits that must be cancellable (lock_until,
 * condition variables) cannot sleep on the lock's futex word: a
 * canceller's wake-up could come just before the sleep and be lost. They
 * queue a node on the lock (k_waitq, guarded by the k_qlock spin bit) and
 * sleep on their task's parker, which cancellation wakes; they set
 * KEEL__LOCK_QUEUED in k_flags and then the state to 2 after queueing, so
 * the unlocker, seeing 2, looks at the queue if the bit says to (the queue
 * is out of the lock's hot cache line; the bit is in it).
 *
 * THE FAST PATHS
 * A checked lock costs what an unchecked one does when its checks read
 * only words already at hand. keel_mutex_lock() takes the lock word first
 * (a contended cache line is then fetched once, for writing), then reads
 * the lock's first 16 bytes (state, level, flags, owner: one cache line)
 * and, when nested, the next 16 (k_node and the lock's known parents) and
 * the thread's record: keel's own bits in k_flags say "initialised" and
 * "in the graph"; each held entry keeps the lock's node id and leaf flag;
 * and the lock's short list of parents whose edge to it the graph has
 * recorded answers "is this nesting known and allowed" without the graph.
 * If the checks do not pass (a first nesting, a violation, a learned
 * lock's new edge, a lock not initialised), the word is given back and
 * the general way checks everything, reporting before it waits. keel_mutex_unlock() of the lock
 * on top of the record trusts the record (entries are pushed only for
 * lock words taken) and is a store and an XCHG on the lock.
 *
 * The checker (the record's slow parts, the order check, the reports) is
 * lockcheck.c, shared with the pthread interposer; the queues of
 * cancellable waiters are waitq.c.
 *
 * Reports are formatted into a stack buffer with snprintf and written with
 * one write(2): no allocation, no keel lock, so they work when malloc is
 * broken. A fixed table of hashes deduplicates them per pair of locks, a
 * lock being known by its identity (keel__lc_identity()), not its address: the
 * memory of a destroyed or freed lock may hold a new, unrelated one.
 */
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "lockcheck.h"

KEEL_TLS struct keel__lockstate keel__locks;
KEEL_TLS struct keel__spinstate keel__spin;

/* The public structs keep their words as plain integers (so the header is
 * also C++); keel's futex calls take the C11 atomic type of the same
 * representation. */
static _Atomic uint32_t *fword(uint32_t *p)
{
	return (_Atomic uint32_t *)(void *)p;
}
static void thread_name(char name[KEEL_TASK_NAME_MAX + 1])
{
	if (keel__tls.self)
		keel__task_copy_name(keel__tls.self, name);
}

__attribute__((constructor)) static void read_policy(void)
{
	keel__lc_thread_name = thread_name;
	keel__lc_read_policy(KEEL_LOCKCHECK_ABORT);
}

int keel_lockcheck_set(int p)
{
	if (p < KEEL_LOCKCHECK_ABORT || p > KEEL_LOCKCHECK_OFF)
		return -EINVAL;
	return atomic_exchange_explicit(&keel__lc_policy, p, memory_order_relaxed);
}

unsigned long keel_lockcheck_reports(void)
{
	return load_relaxed(&keel__lc_nreports);
}

/* The fast paths' record of a mutex just taken with d < KEEL_LOCK_STACK
 * held (the caller checked): its owner, then the entry at d. */
static inline void held_push_fast(struct keel__lockstate *ls, uint32_t d,
				  keel_mutex_t *m, const char *site,
				  uint32_t min, uint32_t node, unsigned flags)
{
	struct keel__held *h = &ls->stack[d];

	A_STORE(&m->k_owner, (void *)ls);
	ls->depth = d + 1;
	h->lock = m;
	h->site = site;
	held_tail(h, min, node, flags);
	if (unlikely(flags & (KEEL_LOCK_NOBLOCK | KEEL_LOCK_NOALLOC)))
		keel__held_count(ls, h, flags);
}

/* ---- Mutexes ----------------------------------------------------------------- */

static int valid_init(const void *p, unsigned level, const char *name,
		      unsigned flags)
{
	return p && name && level <= KEEL_LEVEL_MAX &&
	       !(flags & ~(unsigned)(KEEL_LOCK_LEAF | KEEL_LOCK_ROOT |
				     KEEL_LOCK_NOBLOCK | KEEL_LOCK_NOALLOC |
				     KEEL_LOCK_RECURSIVE)) &&
	       !((flags & KEEL_LOCK_LEAF) && (flags & KEEL_LOCK_ROOT));
}

/* keel_mutex_init() and keel_rwlock_init(): one layout, one way. */
static int lock_init(void *lock, unsigned level, const char *name,
		     unsigned flags)
{
	struct keel__lockinfo li;

	if (!valid_init(lock, level, name, flags))
		return -EINVAL;
	_Static_assert(sizeof(keel_mutex_t) == sizeof(keel_rwlock_t),
		       "one layout");
	memset(lock, 0, sizeof(keel_mutex_t));
	LK_FIELD(lock, k_level, uint16_t) = (uint16_t)level;
	LK_FIELD(lock, k_flags, uint16_t) = (uint16_t)(flags | KEEL__LOCK_READY);
	LK_FIELD(lock, k_name, const char *) = name;
	A_STORE_REL(&LK_FIELD(lock, k_magic, uint32_t), KEEL__LOCK_MAGIC);
	/* Known to the graph from now on: "never taken" until it is. */
	li = (struct keel__lockinfo){lock, name, lk_node(lock), (uint16_t)level,
				     (uint16_t)flags};
	keel__graph_node(&li, 0);
	return 0;
}

int keel_mutex_init(keel_mutex_t *m, unsigned level, const char *name,
		    unsigned flags)
{
	return lock_init(m, level, name, flags);
}

/* A lock whose magic is wrong: report; under the report policy use it as
 * a learned, unnamed lock so the program can go on. */
static void bad_lock(void *lock, uint32_t *magic, const char *site)
{
	keel__lc_report_lock(R_UNINIT, lock, "(unknown)", site,
		    "use of a lock that is not initialised, or destroyed");
	A_STORE(magic, KEEL__LOCK_MAGIC);
	lk_flags_set(lock, KEEL__LOCK_READY);
}

/* The contended mutex's spin, in pauses: 25 ns each on the AMD EPYC the
 * benchmarks run on (0.4 to 6.4 us a spin), about 40 ns on recent Intel
 * x86-64, a few ns on older Intel and AArch64 (whose spins are short). */
#define SPIN_LOCK_MIN 16
#define SPIN_LOCK_MAX 256

/* Wait for the lock word and take it.
 *
 * First a spin. Most critical sections are shorter than a futex wait and
 * its wake-up (a system call on each side, and tens of microseconds to
 * wake an idle CPU on a VM), so a waiter that watches the word for a few
 * microseconds, reading it only, and takes it with a CAS 0 -> 1 when it
 * reads 0 makes no system call, and neither does its holder's unlock (the
 * word stays 1, not 2). The spin adapts per thread: up to twice the
 * running average of the pauses its won spins took, plus SPIN_LOCK_MIN,
 * at most SPIN_LOCK_MAX; a lost spin (the holder kept the lock: it was
 * preempted, or its critical section is long) halves the average, so a
 * thread whose spins fail spins little.
 *
 * No spin for the mutex this thread released last: it is then most
 * likely taking turns with another thread at one lock, and a spinning
 * waiter would take the lock at each release, passing its cache line back
 * and forth at every turn, where a sleeper lets the running holder take
 * it again and again (throughput over fairness, as glibc's default mutex
 * does; lock_contended measures that case). keel_cond_wait() forgets
 * it: a thread woken there waited for a signaller, not for its turn. The
 * record of that mutex is an address compared, never read through: a
 * lock freed and another made at its address costs at most one spin not
 * made.
 *
 * Then the sleep: take the word as 2 (others may be waiting). */
static __attribute__((noinline)) void mutex_wait(keel_mutex_t *m)
{
	struct keel__spinstate *sp = &keel__spin;

	if (sp->released != m) {
		uint32_t budget = 2 * sp->avg + SPIN_LOCK_MIN;

		if (budget > SPIN_LOCK_MAX)
			budget = SPIN_LOCK_MAX;
		for (uint32_t i = 0; i < budget; i++) {
			uint32_t z = 0;

			if (A_LOAD(&m->k_state) == 0 &&
			    __atomic_compare_exchange_n(&m->k_state, &z, 1, 0,
							__ATOMIC_ACQUIRE,
							__ATOMIC_RELAXED)) {
				sp->avg = (sp->avg * 7 + i) / 8;
				sp->won++;
				return;
			}
			keel__cpu_relax();
		}
		sp->avg /= 2;
		sp->lost++;
	}
	if (A_LOAD(&m->k_state) == 2)
		keel__futex_wait(fword(&m->k_state), 2, KEEL_FOREVER);
	while (__atomic_exchange_n(&m->k_state, 2, __ATOMIC_ACQUIRE) != 0)
		keel__futex_wait(fword(&m->k_state), 2, KEEL_FOREVER);
}

/* Called by the thread that released the word and saw 2 (acquiring what
 * the waiter that wrote the 2 published). The queue is looked at only
 * when KEEL__LOCK_QUEUED says it may hold someone: k_waitq is out of the
 * hot line, often in the next lock's, and reading it on every contended
 * unlock cost a cache miss. */
static __attribute__((noinline)) void mutex_wake(keel_mutex_t *m)
{
	keel__futex_wake(fword(&m->k_state), 1);
	if (lk_flags(m) & KEEL__LOCK_QUEUED)
		keel__q_wake(&m->k_waitq, &m->k_qlock, 0);
}

/* Give the lock word back. Acquire too: a 2 read here may come from a
 * queued waiter, whose KEEL__LOCK_QUEUED must be seen. */
static inline void mutex_give(keel_mutex_t *m)
{
	if (__atomic_exchange_n(&m->k_state, 0, __ATOMIC_ACQ_REL) == 2)
		mutex_wake(m);
}

/* Release the lock word itself (no record). */
static inline void mutex_release(keel_mutex_t *m)
{
	A_STORE(&m->k_owner, NULL);
	mutex_give(m);
}

/* Under k_qlock: a queued waiter leaves the queue (if still in it); the
 * last one out clears KEEL__LOCK_QUEUED. Only under k_qlock is the flag
 * set or cleared, so it is set whenever the queue is not empty. */
static void mutex_dequeue(keel_mutex_t *m, struct keel__qnode *n)
{
	if (!A_LOAD(&n->woken))
		keel__q_remove(&m->k_waitq, n);
	if (!A_LOAD(&m->k_waitq))
		lk_flags_clear(m, KEEL__LOCK_QUEUED);
}

/* Take the lock word, cancellably; 0 or -ECANCELED/-ETIMEDOUT. */
static int mutex_wait_until(keel_mutex_t *m, struct keel__task *t,
			    keel_time_t deadline, const char *what)
{
	struct keel__qnode n = {.t = t};
	int rc = 0;

	for (;;) {
		keel__qlock(&m->k_qlock);
		keel__q_append(&m->k_waitq, &n);
		lk_flags_set(m, KEEL__LOCK_QUEUED);
		keel__qunlock(&m->k_qlock);
		/* Queued (and flagged) before marking the lock contended, and
		 * the 2 written with release: an unlocker that reads it sees
		 * the flag and finds us in the queue. */
		if (__atomic_exchange_n(&m->k_state, 2, __ATOMIC_ACQ_REL) == 0) {
			keel__qlock(&m->k_qlock);
			mutex_dequeue(m, &n);
			keel__qunlock(&m->k_qlock);
			return 0;
		}
		while (!A_LOAD_ACQ(&n.woken) && rc == 0)
			rc = keel__wait(t, deadline, 1, what);
		keel__qlock(&m->k_qlock);
		mutex_dequeue(m, &n);
		keel__qunlock(&m->k_qlock);
		if (rc < 0) {
			/* A wake-up meant for us would be lost: pass it on. */
			if (A_LOAD_ACQ(&n.woken))
				mutex_wake(m);
			return rc;
		}
	}
}

/* What every acquisition does before the lock word, off the fast path: a
 * lock that is not initialised, or not yet in the graph. */
static __attribute__((noinline)) void lock_first(void *lock, const char *site)
{
	uint32_t *magic = &LK_FIELD(lock, k_magic, uint32_t);

	if (A_LOAD(magic) != KEEL__LOCK_MAGIC ||
	    !(lk_flags(lock) & KEEL__LOCK_READY))
		bad_lock(lock, magic, site);
	if (!(lk_flags(lock) & KEEL__LOCK_GRAPHED)) {
		keel__lc_mark_taken(lock);
		lk_flags_set(lock, KEEL__LOCK_GRAPHED);
	}
}

static inline int lock_ready(void *lock)
{
	return likely((lk_flags(lock) & (KEEL__LOCK_READY | KEEL__LOCK_GRAPHED)) ==
		      (KEEL__LOCK_READY | KEEL__LOCK_GRAPHED));
}

/* A mutex's known parents: the graph nodes of the last four locks it was
 * taken under whose edge to it the graph has recorded, as 16-bit ids in
 * k_parents, valid while k_epoch equals keel__graph_epoch (which moves
 * when a forgotten node id is given to another lock). Only the mutex's
 * holder reads or writes them, so plain accesses suffice, and the nested
 * fast path reads them right after its CAS, from the line the CAS has just
 * fetched: "is this nesting known" costs no load of its own that could
 * miss or conflict. Id 0 (no node) is never a parent: empty slots are 0. */
static inline int parent_known(uint64_t parents, uint32_t from)
{
	uint64_t x = parents ^ ((uint64_t)from * 0x0001000100010001ull);

	/* Nonzero iff some 16-bit lane of x is zero. */
	return ((x - 0x0001000100010001ull) & ~x & 0x8000800080008000ull) != 0;
}

static void parent_add(keel_mutex_t *m, uint32_t from)
{
	uint32_t epoch = load_relaxed(&keel__graph_epoch);

	if (m->k_epoch != epoch) {
		m->k_epoch = epoch;
		m->k_parents = 0;
	}
	if (!parent_known(m->k_parents, from))
		m->k_parents = m->k_parents << 16 | from;
}

/* Its holder taking a mutex again: recursive, or reported and treated as
 * recursive (waiting would deadlock the thread on itself). */
static __attribute__((noinline)) void mutex_relock(keel_mutex_t *m,
						   const char *site)
{
	struct keel__lockstate *ls = &keel__locks;

	if (!(lk_flags(m) & KEEL_LOCK_RECURSIVE) && keel__lc_checking()) {
		int i = keel__held_find(ls, m);

		keel__lc_report_taking(R_RECURSION, i >= 0 ? &ls->stack[i] : NULL, m,
			      site, "lock taken again by its holder",
			      "a non-recursive lock taken twice by one thread "
			      "deadlocks it");
	}
	m->k_depth++;
	keel__held_relock(ls, m, site);
}

/* Take the lock word and record it, after the checks. */
static inline void mutex_take(struct keel__lockstate *ls, keel_mutex_t *m,
			      const char *site)
{
	uint32_t z = 0;

	if (unlikely(!__atomic_compare_exchange_n(&m->k_state, &z, 1, 0,
						  __ATOMIC_ACQUIRE,
						  __ATOMIC_RELAXED)))
		mutex_wait(m);
	A_STORE(&m->k_owner, (void *)ls);
	held_push(ls, m, site, LM_EXCL);
}

static __attribute__((noinline)) void mutex_lock_slow(keel_mutex_t *m,
						      const char *site)
{
	struct keel__lockstate *ls = &keel__locks;
	uint32_t parent = 0;

	if (unlikely(!lock_ready(m)))
		lock_first(m, site);
	if (unlikely(A_LOAD(&m->k_owner) == (void *)ls)) {
		mutex_relock(m, site);
		return;
	}
	if (ls->depth && keel__lc_checking())
		parent = keel__lc_check_acquire(ls, m, site, 0);
	mutex_take(ls, m, site);
	if (parent)
		parent_add(m, parent);
}

/* Give back a lock word taken by a fast path whose checks then failed. */
static __attribute__((noinline)) void mutex_unwind(keel_mutex_t *m,
						   const char *site)
{
	mutex_give(m);
	mutex_lock_slow(m, site);
}

/* Taking a lock with d > 0 held. What the checks need from the thread's
 * record (the top entry) and the graph epoch are read first: after the
 * lock word's CAS, which waits for every earlier store, only the lock's
 * own words (in the line the CAS just fetched, or the next) are left to
 * read. The lock is kept if the levels allow the nesting (a learned
 * lock's level 0 is below every running minimum, which is at least 1) and
 * the lock on top is one of this lock's known parents, or if checking is
 * off; otherwise the word is given back and the general way checks (and
 * reports) before it waits. A known parent is one whose edge to this lock
 * passed every check when it was recorded, and what those checks read
 * besides the levels (the top's leaf flag, this lock's root flag) cannot
 * change while the ids stand for the same locks: the epoch says they do. */
static __attribute__((noinline)) void mutex_lock_nested(keel_mutex_t *m,
							const char *site,
							uint32_t d)
{
	struct keel__lockstate *ls = &keel__locks;
	const struct keel__held *top;
	uint32_t tmin, z = 0, node, from, epoch;
	unsigned flags, level;

	if (unlikely(d >= KEEL_LOCK_STACK)) {
		mutex_lock_slow(m, site);
		return;
	}
	top = &ls->stack[d - 1];
	tmin = top->min;
	from = top->node;
	epoch = load_relaxed(&keel__graph_epoch);
	if (unlikely(!__atomic_compare_exchange_n(&m->k_state, &z, 1, 0,
						  __ATOMIC_ACQUIRE,
						  __ATOMIC_RELAXED))) {
		mutex_lock_slow(m, site);
		return;
	}
	flags = lk_flags(m);
	level = m->k_level;
	node = A_LOAD(&m->k_node) & ~NODE_TAKEN;
	if (likely((flags & (KEEL__LOCK_READY | KEEL__LOCK_GRAPHED)) ==
			   (KEEL__LOCK_READY | KEEL__LOCK_GRAPHED) &&
		   ((level < tmin && from && m->k_epoch == epoch &&
		     /* the newest parent alone first: most locks have
		      * one, and one compare resolves sooner */
		     ((uint16_t)m->k_parents == from ||
		      parent_known(m->k_parents, from))) ||
		    !keel__lc_checking()))) {
		held_push_fast(ls, d, m, site, level ? level : tmin, node, flags);
		return;
	}
	mutex_unwind(m, site);
}

void keel_mutex_lock_at(keel_mutex_t *m, const char *site)
{
	struct keel__lockstate *ls = &keel__locks;
	uint32_t d = ls->depth, z = 0;
	unsigned flags;

	if (d != 0) {
		mutex_lock_nested(m, site, d);
		return;
	}
	/* Nothing held: nothing to check, and the caller cannot be the
	 * holder. The lock word first: under contention the lock's cache
	 * line is fetched once, for writing, instead of read and then
	 * upgraded. If the lock turns out not to be ready (not initialised,
	 * not yet in the graph) the word is given back before the general
	 * way reports or registers it. */
	if (likely(__atomic_compare_exchange_n(&m->k_state, &z, 1, 0,
					       __ATOMIC_ACQUIRE,
					       __ATOMIC_RELAXED))) {
		flags = lk_flags(m);
		if (unlikely((flags & (KEEL__LOCK_READY | KEEL__LOCK_GRAPHED)) !=
			     (KEEL__LOCK_READY | KEEL__LOCK_GRAPHED))) {
			mutex_unwind(m, site);
			return;
		}
		held_push_fast(ls, 0, m, site,
			       m->k_level ? m->k_level : LEVEL_NONE,
			       A_LOAD(&m->k_node) & ~NODE_TAKEN, flags);
		return;
	}
	mutex_lock_slow(m, site);
}

int keel_mutex_trylock_at(keel_mutex_t *m, const char *site)
{
	struct keel__lockstate *ls = &keel__locks;
	uint32_t z = 0;

	if (unlikely(!lock_ready(m)))
		lock_first(m, site);
	if (A_LOAD(&m->k_owner) == (void *)ls) {
		if (!(lk_flags(m) & KEEL_LOCK_RECURSIVE))
			return -EBUSY;
		m->k_depth++;
		keel__held_relock(ls, m, site);
		return 0;
	}
	if (!__atomic_compare_exchange_n(&m->k_state, &z, 1, 0,
					 __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
		return -EBUSY;
	/* Not checked, and no edge: a trylock cannot deadlock. */
	A_STORE(&m->k_owner, (void *)ls);
	held_push(ls, m, site, LM_EXCL);
	return 0;
}

int keel_mutex_lock_until_at(keel_mutex_t *m, keel_time_t deadline,
			     const char *site)
{
	struct keel__lockstate *ls = &keel__locks;
	struct keel__task *t;
	uint32_t z = 0;
	int rc;

	if (unlikely(!lock_ready(m)))
		lock_first(m, site);
	if (!(t = keel__self()))
		return -ENOMEM;
	if ((rc = keel__check(t)) < 0)
		return rc;
	keel__lock_check_blocking("keel_mutex_lock_until()");
	if (A_LOAD(&m->k_owner) == (void *)ls) {
		mutex_relock(m, site);
		return 0;
	}
	if (ls->depth && keel__lc_checking())
		keel__lc_check_acquire(ls, m, site, 0);
	if (!__atomic_compare_exchange_n(&m->k_state, &z, 1, 0,
					 __ATOMIC_ACQUIRE, __ATOMIC_RELAXED) &&
	    (rc = mutex_wait_until(m, t, deadline, "mutex_lock")) < 0)
		return rc;
	A_STORE(&m->k_owner, (void *)ls);
	held_push(ls, m, site, LM_EXCL);
	return 0;
}

void keel_mutex_lock2_at(keel_mutex_t *a, keel_mutex_t *b, const char *site)
{
	struct keel__lockstate *ls = &keel__locks;
	keel_mutex_t *first = a, *second = b;

	if (a == b) {
		keel_mutex_lock_at(a, site);
		return;
	}
	if (unlikely(!lock_ready(a)))
		lock_first(a, site);
	if (unlikely(!lock_ready(b)))
		lock_first(b, site);
	if (a->k_level != b->k_level && keel__lc_checking())
		keel__lc_report_taking(R_SAME_LEVEL, NULL, b, site,
			      "keel_mutex_lock2() of two levels",
			      "keel_mutex_lock2() takes two locks of one level");
	/* Address order: any two threads take the pair the same way. */
	if ((uintptr_t)b < (uintptr_t)a) {
		first = b;
		second = a;
	}
	keel_mutex_lock_at(first, site);
	if (A_LOAD(&second->k_owner) == (void *)ls) {
		mutex_relock(second, site);
		return;
	}
	if (keel__lc_checking())
		keel__lc_check_acquire(ls, second, site, 1);
	mutex_take(ls, second, site);
}

/* Unlock, the general way: reports, recursion, out-of-order release. */
static __attribute__((noinline)) void mutex_unlock_slow(keel_mutex_t *m,
							const char *site)
{
	struct keel__lockstate *ls = &keel__locks;

	if (unlikely(A_LOAD(&m->k_magic) != KEEL__LOCK_MAGIC ||
		     !(lk_flags(m) & KEEL__LOCK_READY)))
		bad_lock(m, &m->k_magic, site);
	if (unlikely(A_LOAD(&m->k_owner) != (void *)ls)) {
		if (keel__lc_checking())
			keel__lc_report_lock(R_NOT_HELD, m, lk_name(m), site,
				    A_LOAD(&m->k_owner)
					    ? "unlock of a lock another thread holds"
					    : "unlock of a lock that is not held");
		return; /* releasing someone else's lock would break it */
	}
	/* Ours (by the owner field), so in the record or unrecorded. */
	if (unlikely(keel__held_release(ls, m, LM_EXCL) < 0))
		keel__lc_report_lock(R_NOT_HELD, m, lk_name(m), site,
			    "unlock of a lock missing from the held record");
	if (m->k_depth) {
		m->k_depth--;
		return;
	}
	keel__spin.released = m;
	mutex_release(m);
}

void keel_mutex_unlock_at(keel_mutex_t *m, const char *site)
{
	struct keel__lockstate *ls = &keel__locks;
	uint32_t d = ls->depth;

	/* The common case: the lock on top of the record, taken once (a
	 * relock marks the entry that could be on top: see keel__held_relock()),
	 * not counted. The record is exact (an entry is pushed only when the
	 * lock word was taken), so it alone says the caller holds the lock,
	 * and the lock's cache line is first touched by the release's
	 * writes. */
	if (likely(d - 1 < KEEL_LOCK_STACK && ls->stack[d - 1].lock == m &&
		   !(ls->stack[d - 1].bits & (HELD_RELOCK | HELD_COUNTED)))) {
		ls->depth = d - 1;
		keel__spin.released = m;
		mutex_release(m);
		return;
	}
	mutex_unlock_slow(m, site);
}

int keel_mutex_destroy(keel_mutex_t *m)
{
	if (!m || A_LOAD(&m->k_magic) != KEEL__LOCK_MAGIC)
		return -EINVAL;
	/* Held: by a thread, or by one inside keel_cond_wait(), whose count
	 * is raised before it lets the word go (a free word read with
	 * acquire here shows that count). */
	if (A_LOAD_ACQ(&m->k_state) != 0 || A_LOAD(&m->k_owner) ||
	    A_LOAD(&m->k_cwait) != 0) {
		keel__lc_report_lock(R_DESTROY_HELD, m, m->k_name, "keel_mutex_destroy()",
			    "destroying a lock that is held");
		return -EBUSY;
	}
	keel__graph_forget(&m->k_node);
	/* Its known parents were parents of the forgotten node. */
	m->k_parents = 0;
	lk_flags_clear(m, KEEL__LOCK_READY | KEEL__LOCK_GRAPHED);
	A_STORE_REL(&m->k_magic, 0u);
	return 0;
}

int keel_mutex_held(const keel_mutex_t *m)
{
	return m && A_LOAD(&m->k_owner) == (void *)&keel__locks;
}

void keel_mutex_assert_held_at(const keel_mutex_t *m, const char *site)
{
	if (!keel_mutex_held(m) && keel__lc_checking())
		keel__lc_report_lock(R_ASSERT, (void *)(uintptr_t)m,
			    m && m->k_name ? m->k_name : "(unnamed)", site,
			    "assertion failed: the calling thread does not hold "
			    "the lock");
}

/* ---- Reader-writer locks ------------------------------------------------------- */

#define RW_WRITER 0x40000000u
#define RW_WWAIT 0x80000000u
#define RW_COUNT 0x3fffffffu

int keel_rwlock_init(keel_rwlock_t *l, unsigned level, const char *name,
		     unsigned flags)
{
	return lock_init(l, level, name, flags);
}

int keel_rwlock_destroy(keel_rwlock_t *l)
{
	if (!l || A_LOAD(&l->k_magic) != KEEL__LOCK_MAGIC)
		return -EINVAL;
	if (A_LOAD(&l->k_state) != 0) {
		keel__lc_report_lock(R_DESTROY_HELD, l, l->k_name, "keel_rwlock_destroy()",
			    "destroying a lock that is held");
		return -EBUSY;
	}
	keel__graph_forget(&l->k_node);
	lk_flags_clear(l, KEEL__LOCK_READY | KEEL__LOCK_GRAPHED);
	A_STORE_REL(&l->k_magic, 0u);
	return 0;
}

/* Checks for an rwlock; 1 if the caller already holds it (for reading,
 * recursively allowed, or reported). */
static int rw_checks(keel_rwlock_t *l, const char *site, int mode)
{
	struct keel__lockstate *ls = &keel__locks;
	int i;

	if (unlikely(!lock_ready(l)))
		lock_first(l, site);
	/* Held already: in the record, or write-held past its capacity (the
	 * owner field says so). */
	if ((unlikely(ls->depth) && (i = keel__held_find(ls, l)) >= 0) ||
	    (i = -1, unlikely(A_LOAD(&l->k_owner) == (void *)ls))) {
		int held_mode = i >= 0 ? ls->stack[i].mode : LM_EXCL;

		if (!(mode == LM_SHARED && held_mode == LM_SHARED &&
		      (lk_flags(l) & KEEL_LOCK_RECURSIVE)) &&
		    keel__lc_checking())
			keel__lc_report_taking(R_RECURSION, i >= 0 ? &ls->stack[i] : NULL,
				      l, site,
				      "lock taken again by its holder",
				      mode == LM_SHARED
					      ? "a reader taking a non-recursive "
						"rwlock again deadlocks behind a "
						"waiting writer"
					      : "a holder taking it for writing "
						"deadlocks itself");
		return 1;
	}
	if (unlikely(ls->depth) && keel__lc_checking())
		keel__lc_check_acquire(ls, l, site, 0);
	return 0;
}

void keel_rwlock_rdlock_at(keel_rwlock_t *l, const char *site)
{
	uint32_t s;

	if (rw_checks(l, site, LM_SHARED)) {
		/* Held already: one more reader (it would deadlock behind a
		 * waiting writer if we waited, so do not). */
		__atomic_add_fetch(&l->k_state, 1, __ATOMIC_ACQUIRE);
		held_push(&keel__locks, l, site, LM_SHARED);
		return;
	}
	for (;;) {
		s = A_LOAD(&l->k_state);
		if (!(s & (RW_WRITER | RW_WWAIT))) {
			if (__atomic_compare_exchange_n(&l->k_state, &s, s + 1, 1,
							__ATOMIC_ACQUIRE,
							__ATOMIC_RELAXED))
				break;
			continue;
		}
		keel__futex_wait(fword(&l->k_state), s, KEEL_FOREVER);
	}
	held_push(&keel__locks, l, site, LM_SHARED);
}

void keel_rwlock_wrlock_at(keel_rwlock_t *l, const char *site)
{
	uint32_t s;

	if (rw_checks(l, site, LM_EXCL)) {
		/* Waiting would deadlock: go on without the lock word (its
		 * unlock only drops this record). */
		held_push(&keel__locks, l, site, LM_EXCL);
		l->k_depth++;
		return;
	}
	for (;;) {
		s = A_LOAD(&l->k_state);
		if ((s & ~RW_WWAIT) == 0) {
			if (__atomic_compare_exchange_n(&l->k_state, &s, RW_WRITER,
							1, __ATOMIC_ACQUIRE,
							__ATOMIC_RELAXED))
				break;
			continue;
		}
		if (!(s & RW_WWAIT) &&
		    !__atomic_compare_exchange_n(&l->k_state, &s, s | RW_WWAIT, 1,
						 __ATOMIC_RELAXED,
						 __ATOMIC_RELAXED))
			continue;
		keel__futex_wait(fword(&l->k_state), s | RW_WWAIT, KEEL_FOREVER);
	}
	A_STORE(&l->k_owner, (void *)&keel__locks);
	held_push(&keel__locks, l, site, LM_EXCL);
}

void keel_rwlock_unlock_at(keel_rwlock_t *l, const char *site)
{
	struct keel__lockstate *ls = &keel__locks;
	int i, mode;
	uint32_t s;

	if (unlikely(A_LOAD(&l->k_magic) != KEEL__LOCK_MAGIC))
		bad_lock(l, &l->k_magic, site);
	/* How the caller holds it: its newest entry says; without one, it is
	 * one of the unrecorded locks: write-held if the owner field is the
	 * caller's, else read-held if the caller may hold it so. */
	i = keel__held_find(ls, l);
	if (i >= 0)
		mode = ls->stack[i].mode;
	else if (ls->unrec && A_LOAD(&l->k_owner) == (void *)ls)
		mode = LM_EXCL;
	else if (keel__unrec_may_read(ls, l) &&
		 (A_LOAD(&l->k_state) & RW_COUNT) != 0)
		mode = LM_SHARED;
	else {
		if (keel__lc_checking())
			keel__lc_report_lock(R_NOT_HELD, l, l->k_name ? l->k_name : "(unnamed)",
				    site, "unlock of a lock the thread does not hold");
		return;
	}
	keel__held_release(ls, l, mode);
	if (mode == LM_EXCL) {
		if (l->k_depth) {
			l->k_depth--;
			return;
		}
		A_STORE(&l->k_owner, NULL);
		/* Writers waiting set WWAIT again when they wake. */
		__atomic_store_n(&l->k_state, 0, __ATOMIC_RELEASE);
		keel__futex_wake(fword(&l->k_state), INT32_MAX);
		return;
	}
	s = __atomic_fetch_sub(&l->k_state, 1, __ATOMIC_RELEASE);
	if ((s & RW_COUNT) == 1 && (s & RW_WWAIT))
		keel__futex_wake(fword(&l->k_state), INT32_MAX);
}

/* ---- Condition variables ---------------------------------------------------------- */

int keel_cond_init(keel_cond_t *c)
{
	if (!c)
		return -EINVAL;
	memset(c, 0, sizeof *c);
	A_STORE_REL(&c->k_magic, KEEL__LOCK_MAGIC);
	return 0;
}

int keel_cond_destroy(keel_cond_t *c)
{
	if (!c || A_LOAD(&c->k_magic) != KEEL__LOCK_MAGIC)
		return -EINVAL;
	if (A_LOAD_ACQ(&c->k_waiters))
		return -EBUSY;
	A_STORE_REL(&c->k_magic, 0u);
	return 0;
}

int keel_cond_signal(keel_cond_t *c)
{
	if (!c || A_LOAD(&c->k_magic) != KEEL__LOCK_MAGIC)
		return -EINVAL;
	keel__q_wake(&c->k_waiters, &c->k_qlock, 0);
	return 0;
}

int keel_cond_broadcast(keel_cond_t *c)
{
	if (!c || A_LOAD(&c->k_magic) != KEEL__LOCK_MAGIC)
		return -EINVAL;
	keel__q_wake(&c->k_waiters, &c->k_qlock, 1);
	return 0;
}

int keel_cond_wait_until_at(keel_cond_t *c, keel_mutex_t *m,
			    keel_time_t deadline, const char *site)
{
	struct keel__lockstate *ls = &keel__locks;
	struct keel__task *t;
	struct keel__qnode n;
	int i, rc = 0;

	if (!c || A_LOAD(&c->k_magic) != KEEL__LOCK_MAGIC || !m)
		return -EINVAL;
	if (!keel_mutex_held(m)) {
		keel__lc_report_lock(R_COND, m, m->k_name ? m->k_name : "(unnamed)", site,
			    "keel_cond_wait() on a mutex the thread does not "
			    "hold");
		return -EPERM;
	}
	i = keel__held_find(ls, m); /* -1: held, but taken while the record was full */
	if (!(t = keel__self()))
		return -ENOMEM;
	if (keel__lc_checking()) {
		uint32_t d = ls->depth;

		/* The mutex must be the lowest-level lock held: whatever is
		 * held below it stays held while this thread sleeps. */
		for (uint32_t j = 0; j < d; j++) {
			struct keel__held *h = &ls->stack[j];

			unsigned hl = lk_level(h->lock);

			if ((int)j != i && hl && m->k_level && hl < m->k_level) {
				keel__lc_report_taking(R_COND, h, m, site,
					      "keel_cond_wait() while holding a "
					      "lower-level lock",
					      "wait only on the lowest-level lock "
					      "held: the others stay held while "
					      "the thread sleeps");
				break;
			}
		}
		keel__lock_check_blocking("keel_cond_wait()");
	}
	n.t = t;
	keel__qlock(&c->k_qlock);
	keel__q_append(&c->k_waiters, &n);
	keel__qunlock(&c->k_qlock);
	/* Release the lock word, keeping its record (and site) in place;
	 * the mutex stays held to keel_mutex_destroy() through k_cwait,
	 * raised before the word's release store. */
	if (i >= 0)
		ls->stack[i].bits |= HELD_WAITING;
	__atomic_add_fetch(&m->k_cwait, 1, __ATOMIC_RELAXED);
	/* Woken, it waited for a signaller, not taking turns at the mutex:
	 * it may spin to take it back (see mutex_wait()), whatever it
	 * released before. */
	keel__spin.released = NULL;
	mutex_release(m);
	while (!A_LOAD_ACQ(&n.woken) && rc == 0)
		rc = keel__wait(t, deadline, 1, "cond_wait");
	keel__qlock(&c->k_qlock);
	if (!A_LOAD(&n.woken))
		keel__q_remove(&c->k_waiters, &n);
	keel__qunlock(&c->k_qlock);
	if (rc < 0 && A_LOAD_ACQ(&n.woken)) {
		/* Woken and gave up at once: the signal counts as taken, as
		 * a wake-up of a waiter that then returns is allowed to be. */
		rc = 0;
	}
	/* Take it back, not cancellably: the caller holds it on return. */
	{
		uint32_t z = 0;

		if (!__atomic_compare_exchange_n(&m->k_state, &z, 1, 0,
						 __ATOMIC_ACQUIRE,
						 __ATOMIC_RELAXED))
			mutex_wait(m);
	}
	A_STORE(&m->k_owner, (void *)ls);
	__atomic_sub_fetch(&m->k_cwait, 1, __ATOMIC_RELAXED);
	if (i >= 0)
		ls->stack[i].bits &= (uint8_t)~HELD_WAITING;
	return rc;
}

/* ---- Assertions and integration ------------------------------------------------------ */

/* The oldest lock in the record, to name in a report about all of them;
 * NULL if every lock held was taken while the record was full. */
static void *held_first(struct keel__lockstate *ls)
{
	return ls->depth ? ls->stack[0].lock : NULL;
}

static const char *held_first_name(struct keel__lockstate *ls)
{
	return ls->depth ? lk_name(ls->stack[0].lock)
			 : "(taken while the record was full)";
}

void keel_assert_no_locks_at(const char *site)
{
	struct keel__lockstate *ls = &keel__locks;

	if ((ls->depth || ls->unrec) && keel__lc_checking())
		keel__lc_report_lock(R_ASSERT, held_first(ls), held_first_name(ls), site,
			    "assertion failed: locks are held");
}

void keel_assert_may_alloc_at(const char *site)
{
	struct keel__lockstate *ls = &keel__locks;

	if (ls->noalloc && keel__lc_checking()) {
		int d = (int)ls->depth;

		while (d-- > 0)
			if (lk_flags(ls->stack[d].lock) & KEEL_LOCK_NOALLOC)
				break;
		keel__lc_report_lock(R_NOALLOC, d >= 0 ? ls->stack[d].lock : NULL,
			    d >= 0 ? lk_name(ls->stack[d].lock) : "?", site,
			    "allocation while holding a no-alloc lock");
	}
}

void keel__lock_check_blocking(const char *what)
{
	struct keel__lockstate *ls = &keel__locks;
	int d;

	if (likely(!ls->noblock) || !keel__lc_checking())
		return;
	d = (int)ls->depth;
	while (d-- > 0)
		if (lk_flags(ls->stack[d].lock) & KEEL_LOCK_NOBLOCK)
			break;
	if (d >= 0)
		keel__lc_report_lock(R_BLOCKING, ls->stack[d].lock, lk_name(ls->stack[d].lock),
			    ls->stack[d].site, what);
}

void keel__lock_check_serve(void)
{
	struct keel__lockstate *ls = &keel__locks;

	if (likely(!ls->depth && !ls->unrec) || !keel__lc_checking())
		return;
	keel__lc_report_lock(R_SERVE, held_first(ls), held_first_name(ls),
		    ls->depth ? ls->stack[0].site : "(unrecorded)",
		    "keel_serve() while holding a lock: messages would run "
		    "inside the critical section");
}

void keel__lock_check_exit(const char *who)
{
	struct keel__lockstate *ls = &keel__locks;

	if (likely(!ls->depth && !ls->unrec) || !keel__lc_checking())
		return;
	keel__lc_report_lock(R_EXIT, held_first(ls), held_first_name(ls),
		    ls->depth ? ls->stack[0].site : "(unrecorded)", who);
}

/* ---- Ranked resources that are not locks ------------------------------------- */

void keel__rank_token(keel_mutex_t *token, unsigned level, const char *name,
		      const void *resource)
{
	memset(token, 0, sizeof *token);
	token->k_level = (uint16_t)level;
	/* Ready, and "in the graph" so nothing registers it: with no node it
	 * takes part in the level rule only. It lives on its caller's stack,
	 * so reports know it by its resource (kept where a lock keeps its
	 * queue, which a token never has). */
	token->k_flags = KEEL__LOCK_READY | KEEL__LOCK_GRAPHED | KEEL__LOCK_TOKEN;
	token->k_waitq = (void *)(uintptr_t)resource;
	token->k_name = name;
	token->k_magic = KEEL__LOCK_MAGIC;
}

void keel__rank_check(keel_mutex_t *token, const char *site)
{
	struct keel__lockstate *ls = &keel__locks;

	if (ls->depth && keel__lc_checking())
		keel__lc_check_acquire(ls, token, site, 0);
}

void keel__rank_enter(keel_mutex_t *token, const char *site)
{
	keel__rank_check(token, site);
	held_push(&keel__locks, token, site, LM_EXCL);
}

void keel__rank_leave(keel_mutex_t *token)
{
	/* Entered and left by the same call: its entry, or unrecorded. */
	keel__held_release(&keel__locks, token, LM_EXCL);
}
