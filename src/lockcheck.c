/*
 * lockcheck.c: the lock-order checker: the policy, each thread's held-lock
 * record, the order check made before a thread blocks, and the reports.
 * Called by keel's locks (lock.c) and by the pthread interposer
 * (lockcheck_preload.c); the learned order itself is lockgraph.c.
 *
 * DESIGN
 * See lock.c for the record and the fast paths built on it (the inline
 * parts are in lockcheck.h). Here is everything off the fast paths.
 *
 * Reports are formatted into a stack buffer with snprintf and written with
 * one write(2): no allocation, no keel lock, so they work when malloc is
 * broken. A fixed table of hashes deduplicates them per pair of locks, a
 * lock being known by its identity (keel__lc_identity()), not its address:
 * the memory of a destroyed or freed lock may hold a new, unrelated one.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "lockcheck.h"

/* keel__locks, the record, is defined beside the fast paths that use it
 * (lock.c; the interposer defines its own): there the compiler knows its
 * address is the thread pointer's plus a constant. */

/* Test hook: called after each report is written, before the policy. */
void (*keel__lock_report_hook)(void);
void (*keel__lc_thread_name)(char name[KEEL_TASK_NAME_MAX + 1]);
void (*keel__lc_describe)(struct keel__rbuf *r, const struct keel__held *h);

_Atomic int keel__lc_policy = KEEL_LOCKCHECK_ABORT;
_Atomic unsigned long keel__lc_nreports;

void keel__lc_read_policy(int dflt)
{
	const char *e = getenv("KEEL_LOCKCHECK");
	const char *names[] = {"abort", "report", "off"};

	_Static_assert(KEEL_LOCKCHECK_ABORT == 0 && KEEL_LOCKCHECK_REPORT == 1 &&
			       KEEL_LOCKCHECK_OFF == 2,
		       "names[] follows the policies");
	store_relaxed(&keel__lc_policy, dflt);
	if (!e || !*e)
		return;
	if (strcmp(e, "abort") == 0)
		store_relaxed(&keel__lc_policy, KEEL_LOCKCHECK_ABORT);
	else if (strcmp(e, "report") == 0)
		store_relaxed(&keel__lc_policy, KEEL_LOCKCHECK_REPORT);
	else if (strcmp(e, "off") == 0)
		store_relaxed(&keel__lc_policy, KEEL_LOCKCHECK_OFF);
	else
		keel__report("KEEL_LOCKCHECK=%s: unknown policy, using %s", e,
			     names[dflt]);
}

/* Who a lock is, for deduplicating reports: its graph node with the
 * node's generation, which no other lock ever shares (a destroyed lock's
 * node takes a new generation before its id can go to another lock, and a
 * lock initialised in reused memory gets a node of its own). A once's
 * rank token is its once. A lock with no node (not initialised, or the
 * graph is full) is known by its address, all there is. */
uint64_t keel__lc_identity(const void *lock)
{
	uint64_t id = 0;

	if (!lock)
		return 0;
	if (lk_flags(lock) & KEEL__LOCK_TOKEN)
		return (uint64_t)(uintptr_t)LK_FIELD(lock, k_waitq, void *);
	if (A_LOAD(&LK_FIELD(lock, k_magic, uint32_t)) == KEEL__LOCK_MAGIC)
		id = keel__graph_identity(A_LOAD(lk_node((void *)(uintptr_t)lock)) &
					  ~NODE_TAKEN);
	return id ? id : (uint64_t)(uintptr_t)lock;
}


__attribute__((format(printf, 2, 3))) void keel__rb_add(struct keel__rbuf *r,
							 const char *fmt, ...)
{
	va_list ap;
	int w;

	if (r->n >= sizeof r->b - 1)
		return;
	va_start(ap, fmt);
	w = vsnprintf(r->b + r->n, sizeof r->b - r->n, fmt, ap);
	va_end(ap);
	if (w > 0)
		r->n += (size_t)w < sizeof r->b - r->n ? (size_t)w
						       : sizeof r->b - r->n - 1;
}

static void rb_level(struct keel__rbuf *r, unsigned level)
{
	if (level)
		keel__rb_add(r, "level %u", level);
	else
		keel__rb_add(r, "learned order");
}

void keel__rb_held(struct keel__rbuf *r, struct keel__lockstate *ls)
{
	uint32_t d = ls->depth, all = ls->depth + ls->unrec;
	char name[KEEL_TASK_NAME_MAX + 1] = "";

	if (keel__lc_thread_name)
		keel__lc_thread_name(name);
	if (name[0])
		keel__rb_add(r, "\nkeel:   thread '%s' (%#lx)", name,
		       (unsigned long)pthread_self());
	else
		keel__rb_add(r, "\nkeel:   thread %#lx", (unsigned long)pthread_self());
	keel__rb_add(r, " holds %u lock%s%s", all, all == 1 ? "" : "s", all ? ":" : "");
	for (uint32_t i = 0; i < d; i++) {
		struct keel__held *h = &ls->stack[i];

		if ((h->bits & HELD_FOREIGN) && keel__lc_describe) {
			keel__rb_add(r, "\nkeel:     #%u ", i);
			keel__lc_describe(r, h);
			continue;
		}
		keel__rb_add(r, "\nkeel:     #%u '%s' (", i, lk_name(h->lock));
		rb_level(r, lk_level(h->lock));
		keel__rb_add(r, "%s), taken at %s%s", h->mode == LM_SHARED ? ", shared" : "",
		       h->site, h->bits & HELD_WAITING ? " (released: waiting on a cond)" : "");
	}
	if (ls->unrec)
		keel__rb_add(r, "\nkeel:     ... and %u more, taken while the record "
			  "was full", ls->unrec);
}

/* What has been reported: hashes of (kind, a, b), open addressing over a
 * neighbourhood of 8 slots. Fixed size, so that reports never allocate: a
 * process that makes more distinct reports than it holds overwrites an
 * old one in the neighbourhood, which may then be reported again (rather
 * than filling up and reporting everything again from then on). */
#define SEEN_SLOTS 2048
static _Atomic uint64_t seen[SEEN_SLOTS];

/* 1 if this (kind, a, b) was not reported before; a and b are lock
 * identities, or a site's address. */
int keel__lc_first_time(int kind, uint64_t a, uint64_t b)
{
	uint64_t h = a * 0x9E3779B97F4A7C15ull ^ b * 0xC2B2AE3D27D4EB4Full ^
		     (uint64_t)kind * 0x165667B19E3779F9ull;

	h |= 1;
	for (size_t i = 0; i < 8; i++) {
		_Atomic uint64_t *slot = &seen[(h + i) % SEEN_SLOTS];
		uint64_t cur = load_relaxed(slot);

		if (cur == h)
			return 0;
		if (cur == 0 && cas_acq_rel(slot, &cur, h))
			return 1;
		if (cur == h)
			return 0;
	}
	/* Crowded: take the place of one of the neighbours, picked by the
	 * hash's high bits. */
	store_relaxed(&seen[(h + (h >> 61)) % SEEN_SLOTS], h);
	return 1;
}

void keel__lock_reports_forget(void)
{
	for (size_t i = 0; i < SEEN_SLOTS; i++)
		store_relaxed(&seen[i], 0);
}

void keel__lc_report_end(struct keel__rbuf *r)
{
	keel__rb_add(r, "\n");
	/* A report cut short by the buffer's end still ends its line. */
	if (r->n && r->b[r->n - 1] != '\n')
		r->b[r->n - 1] = '\n';
	if (write(STDERR_FILENO, r->b, r->n) < 0) {
		/* Nothing more can be done. */
	}
	fetch_add_relaxed(&keel__lc_nreports, 1);
	if (keel__lock_report_hook)
		keel__lock_report_hook();
	if (load_relaxed(&keel__lc_policy) == KEEL_LOCKCHECK_ABORT)
		abort();
}


/* "<what>: taking 'x' (level n) at site" + the held stack. */
void keel__lc_report_taking(int kind, const struct keel__held *against,
			  void *lock, const char *site, const char *what,
			  const char *rule)
{
	struct keel__rbuf r;

	if (!keel__lc_first_time(kind, keel__lc_identity(against ? against->lock : NULL),
			keel__lc_identity(lock)))
		return;
	r.n = 0;
	keel__rb_add(&r, "keel: %s: taking '%s' (", what, lk_name(lock));
	rb_level(&r, lk_level(lock));
	keel__rb_add(&r, ") at %s", site);
	if (against) {
		keel__rb_add(&r, "\nkeel:   while holding '%s' (",
		       lk_name(against->lock));
		rb_level(&r, lk_level(against->lock));
		keel__rb_add(&r, "), taken at %s", against->site);
	}
	if (rule)
		keel__rb_add(&r, "\nkeel:   rule: %s", rule);
	keel__rb_held(&r, &keel__locks);
	keel__lc_report_end(&r);
}

/* A report about one lock (not about taking it). */
void keel__lc_report_lock(int kind, void *lock, const char *name,
			const char *site, const char *what)
{
	struct keel__rbuf r;

	if (!keel__lc_first_time(kind, keel__lc_identity(lock), (uint64_t)(uintptr_t)site))
		return;
	r.n = 0;
	keel__rb_add(&r, "keel: %s: '%s' at %s", what, name, site);
	keel__rb_held(&r, &keel__locks);
	keel__lc_report_end(&r);
}

/* ---- The held-lock record --------------------------------------------------
 *
 * THE HELD RECORD
 * stack[0 .. depth) are locks the thread holds, in the order it took them;
 * every entry stands for a lock word (or a relock of one) that is really
 * held, so an edge from an entry is an edge from a held lock. A lock taken
 * while all KEEL_LOCK_STACK entries are in use is checked against them as
 * usual, then goes unrecorded: counted in `unrec` (one warning per
 * episode), with nothing checked against it and no edge from it later.
 * Released entries close up (unlock order is free), and a lock taken once
 * there is room again is recorded and checked against the recorded ones;
 * the unrecorded ones stay counted until released.
 *
 * Releasing a lock not in the record: it is one of the unrecorded ones,
 * in any order, if the thread really holds it, which keel knows exactly
 * for a mutex or a write-held rwlock (k_owner is the thread's record), and
 * for a read hold through unrec_read: a count of unrecorded read holds per
 * bucket of lock addresses, never below the true count for any bucket
 * (a bucket saturates rather than wraps), so no unrecorded read hold is
 * refused. Both reset when `unrec` is back to 0, which also re-arms the
 * warning.
 *
 * A relock (a recursive lock taken again) past capacity goes unrecorded
 * while its first taking is in the record: that entry is marked
 * HELD_RELOCK, so its unlock takes the general way and only counts down.
 */

static void held_overflow(struct keel__lockstate *ls, void *lock,
			  const char *site)
{
	if (!ls->overflow_warned) {
		ls->overflow_warned = 1;
		keel__lc_report_lock(R_OVERFLOW, lock, lk_name(lock), site,
			    "more than 32 locks held: those taken while the "
			    "record is full go unrecorded, and locks taken "
			    "after them are not checked against them");
	}
}

/* A lock taken while the record is full. */
__attribute__((noinline)) void keel__held_unrecorded(struct keel__lockstate *ls,
						      void *lock,
						      const char *site, int mode)
{
	ls->unrec++;
	if (mode == LM_SHARED) {
		uint8_t *b = unrec_bucket(ls, lock);

		if (*b < UINT8_MAX)
			(*b)++;
	}
	held_overflow(ls, lock, site);
}

/* The fast paths' rare case: a NOBLOCK or NOALLOC lock, counted. */
__attribute__((noinline)) void keel__held_count(struct keel__lockstate *ls,
						 struct keel__held *h,
						 unsigned flags)
{
	ls->noblock += !!(flags & KEEL_LOCK_NOBLOCK);
	ls->noalloc += !!(flags & KEEL_LOCK_NOALLOC);
	h->bits |= HELD_COUNTED;
}

/* The index of lock in the record, searching from the top; -1. */
int keel__held_find(struct keel__lockstate *ls, const void *lock)
{
	int d = (int)ls->depth;

	while (d-- > 0)
		if (ls->stack[d].lock == lock)
			return d;
	return -1;
}

/* Record a relock of a mutex its holder took again: its unlock only
 * counts down, so every entry that may be on top when it comes must send
 * the unlock the general way: the new entry, or, if the relock went
 * unrecorded, the one for its first taking. */
void keel__held_relock(struct keel__lockstate *ls, void *m,
			const char *site)
{
	int i;

	if (held_push(ls, m, site, LM_EXCL))
		ls->stack[ls->depth - 1].bits |= HELD_RELOCK;
	else if ((i = keel__held_find(ls, m)) >= 0)
		ls->stack[i].bits |= HELD_RELOCK;
}

void keel__held_remove(struct keel__lockstate *ls, int i)
{
	uint32_t d = ls->depth;
	struct keel__held *h = &ls->stack[i];

	if (h->bits & HELD_COUNTED) {
		unsigned flags = lk_flags(h->lock);

		ls->noblock -= !!(flags & KEEL_LOCK_NOBLOCK);
		ls->noalloc -= !!(flags & KEEL_LOCK_NOALLOC);
	}
	/* Unlock order is free: close the gap and redo the minima above. */
	memmove(h, h + 1, (d - (uint32_t)i - 1) * sizeof *h);
	for (uint32_t j = (uint32_t)i; j + 1 < d; j++) {
		uint32_t prev = j ? ls->stack[j - 1].min : LEVEL_NONE;
		struct keel__held *e = &ls->stack[j];
		uint32_t level = e->bits & HELD_FOREIGN ? 0 : lk_level(e->lock);

		e->min = level && level < prev ? level : prev;
	}
	ls->depth = d - 1;
}

/* 1 if the thread may hold lock for reading among its unrecorded locks
 * (always, if it does). */
int keel__unrec_may_read(struct keel__lockstate *ls, const void *lock)
{
	return ls->unrec && *unrec_bucket(ls, lock) != 0;
}

/* Release the record of a lock the caller holds in mode: its entry, or,
 * if it has none, one of the unrecorded locks (the caller has made sure
 * it holds it: by the owner field, or keel__unrec_may_read()). 0, or -1 if
 * there is neither. */
int keel__held_release(struct keel__lockstate *ls, const void *lock, int mode)
{
	int i = keel__held_find(ls, lock);

	if (i >= 0) {
		keel__held_remove(ls, i);
		return 0;
	}
	if (!ls->unrec || (mode == LM_SHARED && !keel__unrec_may_read(ls, lock)))
		return -1;
	if (mode == LM_SHARED) {
		uint8_t *b = unrec_bucket(ls, lock);

		if (*b < UINT8_MAX) /* a full bucket no longer counts */
			(*b)--;
	}
	if (--ls->unrec == 0) {
		memset(ls->unrec_read, 0, sizeof ls->unrec_read);
		ls->overflow_warned = 0;
	}
	return 0;
}

/* The first time a lock is taken (or it is not in the graph yet). */
void keel__lc_mark_taken(void *lock)
{
	struct keel__lockinfo li = {lock, lk_name(lock), lk_node(lock),
				    (uint16_t)lk_level(lock),
				    (uint16_t)(lk_flags(lock) & USER_FLAGS)};

	keel__graph_node(&li, 1);
}

/* Graph edges a thread knows are recorded, as node ids (from << 32 | to):
 * a lock-free, thread-local shortcut for the nested pairs a thread takes
 * over and over. Two ways per set, the set chosen by the taken lock's
 * address, so the fast path can read it before it touches the lock. A new
 * edge goes in way 0, the older one moving to way 1. keel__graph_epoch
 * moves whenever a forgotten node id is given to another lock, which
 * clears them all. */
static inline uint64_t *edge_set(struct keel__lockstate *ls, const void *lock)
{
	_Static_assert(sizeof ls->edges_known / sizeof ls->edges_known[0] == 64,
		       "edges_known is 32 sets of 2");
	/* The top bits of the product mix every bit of the address. */
	return &ls->edges_known[(((uint64_t)(uintptr_t)lock *
				  0x9E3779B97F4A7C15ull) >> 59) * 2];
}

/* 1 if from -> to (lock) is known recorded; else 0, and it is known from
 * now on: the caller passes it to keel__graph_edge(), which records it. */
int keel__lc_edge_known(struct keel__lockstate *ls, uint32_t from,
			     uint32_t to, const void *lock)
{
	uint64_t key = (uint64_t)from << 32 | to, *set;
	uint32_t epoch = load_relaxed(&keel__graph_epoch);

	if (unlikely(ls->edges_epoch != epoch)) {
		memset(ls->edges_known, 0, sizeof ls->edges_known);
		ls->edges_epoch = epoch;
	}
	set = edge_set(ls, lock);
	if (set[0] == key || set[1] == key)
		return 1;
	set[1] = set[0];
	set[0] = key;
	return 0;
}

/* The order check, before blocking; called with something held. Returns
 * the node id of the lock on top when the edge from it to this lock is
 * allowed and recorded in the graph (so the taker may remember it as a
 * known parent of the lock), else 0. */
uint32_t keel__lc_check_acquire(struct keel__lockstate *ls, void *lock,
			      const char *site, int same_ok)
{
	uint32_t d = ls->depth;
	struct keel__held *top = &ls->stack[d - 1];
	unsigned level = lk_level(lock), flags = lk_flags(lock);
	unsigned top_level = lk_level(top->lock);
	uint32_t from = top->node, to = A_LOAD(lk_node(lock)) & ~NODE_TAKEN;
	int violation = 0;
	char cycle[1024];

	if (unlikely(top->bits & HELD_LEAF)) {
		keel__lc_report_taking(R_LEAF, top, lock, site,
			      "lock taken under a leaf lock",
			      "nothing may be taken while a leaf lock is held");
		violation = 1;
	}
	if (unlikely(flags & KEEL_LOCK_ROOT)) {
		keel__lc_report_taking(R_ROOT, top, lock, site,
			      "root lock taken with locks held",
			      "a root lock is taken only with nothing held");
		violation = 1;
	}
	if (unlikely(level && level >= top->min &&
		     !(same_ok && level == top->min))) {
		struct keel__held *lowest = top;

		for (uint32_t i = 0; i < d; i++)
			if (lk_level(ls->stack[i].lock) == top->min) {
				lowest = &ls->stack[i];
				break;
			}
		if (level == top->min)
			keel__lc_report_taking(R_SAME_LEVEL, lowest, lock, site,
				      "two locks of one level",
				      "take two locks of one level together, "
				      "with keel_mutex_lock2()");
		else
			keel__lc_report_taking(R_ORDER, lowest, lock, site,
				      "lock order violation",
				      "a thread may take only a lock of a lower "
				      "level than every lock it holds");
		violation = 1;
	}
	/* The order observed, for the graph: an edge from the lock on top.
	 * The held stack is a chain of such edges, so a cycle in the order
	 * ever taken is a cycle in the graph. Ranked-to-ranked edges follow
	 * the levels, so a cycle must pass through a learned lock: an edge
	 * with a learned end is checked for one, across all locks. */
	if (!from || !to)
		return 0;
	if (!violation && keel__lc_edge_known(ls, from, to, lock))
		return from;
	if (keel__graph_edge(from, to, site, top->site, !level || !top_level,
			     violation, cycle, sizeof cycle)) {
		struct keel__rbuf r;

		if (!keel__lc_first_time(R_CYCLE, keel__lc_identity(top->lock), keel__lc_identity(lock)))
			return 0;
		r.n = 0;
		keel__rb_add(&r, "keel: lock order cycle: taking '%s' (", lk_name(lock));
		rb_level(&r, level);
		keel__rb_add(&r, ") at %s while holding '%s' closes a cycle:%s", site,
		       lk_name(top->lock), cycle);
		keel__rb_held(&r, ls);
		keel__lc_report_end(&r);
		return 0;
	}
	return violation ? 0 : from;
}
