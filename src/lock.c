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
 *   lock:    CAS 0 -> 1; else XCHG to 2 and futex-wait while the old value
 *            was not 0 (no spinning: see mutex_wait()).
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
 * Reports are formatted into a stack buffer with snprintf and written with
 * one write(2): no allocation, no keel lock, so they work when malloc is
 * broken. A fixed table of hashes deduplicates them per pair of locks, a
 * lock being known by its identity (lk_identity()), not its address: the
 * memory of a destroyed or freed lock may hold a new, unrelated one.
 */
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"

KEEL_TLS struct keel__lockstate keel__locks;

/* Test hook: called after each report is written, before the policy. */
void (*keel__lock_report_hook)(void);

static _Atomic int policy = KEEL_LOCKCHECK_ABORT;
static _Atomic unsigned long nreports;

#define NODE_TAKEN 0x80000000u
#define A_LOAD(p) __atomic_load_n((p), __ATOMIC_RELAXED)
#define A_LOAD_ACQ(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define A_STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELAXED)
#define A_STORE_REL(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)

/* The public structs keep their words as plain integers (so the header is
 * also C++); keel's futex calls take the C11 atomic type of the same
 * representation. */
static _Atomic uint32_t *fword(uint32_t *p)
{
	return (_Atomic uint32_t *)(void *)p;
}

__attribute__((constructor)) static void read_policy(void)
{
	const char *e = getenv("KEEL_LOCKCHECK");

	if (!e || !*e || strcmp(e, "abort") == 0)
		return;
	if (strcmp(e, "report") == 0)
		store_relaxed(&policy, KEEL_LOCKCHECK_REPORT);
	else if (strcmp(e, "off") == 0)
		store_relaxed(&policy, KEEL_LOCKCHECK_OFF);
	else
		keel__report("KEEL_LOCKCHECK=%s: unknown policy, using abort", e);
}

int keel_lockcheck_set(int p)
{
	if (p < KEEL_LOCKCHECK_ABORT || p > KEEL_LOCKCHECK_OFF)
		return -EINVAL;
	return atomic_exchange_explicit(&policy, p, memory_order_relaxed);
}

unsigned long keel_lockcheck_reports(void)
{
	return load_relaxed(&nreports);
}

static int checking(void)
{
	return load_relaxed(&policy) != KEEL_LOCKCHECK_OFF;
}

/* ---- A lock, whatever its kind ------------------------------------------ */

/* keel_mutex_t and keel_rwlock_t share their layout, so the fields checks
 * and reports need are read through one set of accessors, each at its
 * member's own type. */
#define SAME_PLACE(f)                                                      \
	_Static_assert(offsetof(keel_mutex_t, f) == offsetof(keel_rwlock_t, f), \
		       "keel_mutex_t and keel_rwlock_t differ at " #f)
SAME_PLACE(k_state);
SAME_PLACE(k_level);
SAME_PLACE(k_flags);
SAME_PLACE(k_name);
SAME_PLACE(k_owner);
SAME_PLACE(k_node);
SAME_PLACE(k_magic);

#define LK_FIELD(lock, f, type)                                            \
	(*(type *)(void *)((char *)(uintptr_t)(lock) + offsetof(keel_mutex_t, f)))

static inline unsigned lk_level(const void *lock)
{
	return LK_FIELD(lock, k_level, uint16_t);
}

/* k_flags changes while others read it (keel's own bits): atomically. */
static inline unsigned lk_flags(const void *lock)
{
	return __atomic_load_n(&LK_FIELD(lock, k_flags, uint16_t),
			       __ATOMIC_RELAXED);
}

#define USER_FLAGS                                                          \
	(KEEL_LOCK_LEAF | KEEL_LOCK_ROOT | KEEL_LOCK_NOBLOCK |              \
	 KEEL_LOCK_NOALLOC | KEEL_LOCK_RECURSIVE)

static inline void lk_flags_set(void *lock, unsigned bits)
{
	__atomic_or_fetch(&LK_FIELD(lock, k_flags, uint16_t), (uint16_t)bits,
			  __ATOMIC_RELAXED);
}

static inline void lk_flags_clear(void *lock, unsigned bits)
{
	__atomic_and_fetch(&LK_FIELD(lock, k_flags, uint16_t),
			   (uint16_t)~bits, __ATOMIC_RELAXED);
}

static inline const char *lk_name(const void *lock)
{
	const char *n = LK_FIELD(lock, k_name, const char *);

	return n ? n : "(unnamed)";
}

static inline uint32_t *lk_node(void *lock)
{
	return &LK_FIELD(lock, k_node, uint32_t);
}

/* ---- Reports ------------------------------------------------------------- */

/* Who a lock is, for deduplicating reports: its graph node with the
 * node's generation, which no other lock ever shares (a destroyed lock's
 * node takes a new generation before its id can go to another lock, and a
 * lock initialised in reused memory gets a node of its own). A once's
 * rank token is its once. A lock with no node (not initialised, or the
 * graph is full) is known by its address, all there is. */
static uint64_t lk_identity(const void *lock)
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

struct rbuf {
	char b[4096];
	size_t n;
};

__attribute__((format(printf, 2, 3))) static void rb_add(struct rbuf *r,
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

static void rb_level(struct rbuf *r, unsigned level)
{
	if (level)
		rb_add(r, "level %u", level);
	else
		rb_add(r, "learned order");
}

static void rb_held(struct rbuf *r, struct keel__lockstate *ls)
{
	uint32_t d = ls->depth, all = ls->depth + ls->unrec;
	char name[KEEL_TASK_NAME_MAX + 1] = "";

	if (keel__tls.self)
		keel__task_copy_name(keel__tls.self, name);
	if (name[0])
		rb_add(r, "\nkeel:   thread '%s' (%#lx)", name,
		       (unsigned long)pthread_self());
	else
		rb_add(r, "\nkeel:   thread %#lx", (unsigned long)pthread_self());
	rb_add(r, " holds %u lock%s%s", all, all == 1 ? "" : "s", all ? ":" : "");
	for (uint32_t i = 0; i < d; i++) {
		struct keel__held *h = &ls->stack[i];

		rb_add(r, "\nkeel:     #%u '%s' (", i, lk_name(h->lock));
		rb_level(r, lk_level(h->lock));
		rb_add(r, "%s), taken at %s%s", h->mode == LM_SHARED ? ", shared" : "",
		       h->site, h->bits & HELD_WAITING ? " (released: waiting on a cond)" : "");
	}
	if (ls->unrec)
		rb_add(r, "\nkeel:     ... and %u more, taken while the record "
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
static int first_time(int kind, uint64_t a, uint64_t b)
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

static void report_end(struct rbuf *r)
{
	rb_add(r, "\n");
	if (write(STDERR_FILENO, r->b, r->n) < 0) {
		/* Nothing more can be done. */
	}
	fetch_add_relaxed(&nreports, 1);
	if (keel__lock_report_hook)
		keel__lock_report_hook();
	if (load_relaxed(&policy) == KEEL_LOCKCHECK_ABORT)
		abort();
}

enum rkind {
	R_ORDER = 1,
	R_SAME_LEVEL,
	R_LEAF,
	R_ROOT,
	R_RECURSION,
	R_CYCLE,
	R_NOT_HELD,
	R_DESTROY_HELD,
	R_UNINIT,
	R_BLOCKING,
	R_SERVE,
	R_EXIT,
	R_COND,
	R_NOALLOC,
	R_ASSERT,
	R_OVERFLOW,
};

/* "<what>: taking 'x' (level n) at site" + the held stack. */
static void report_taking(int kind, const struct keel__held *against,
			  void *lock, const char *site, const char *what,
			  const char *rule)
{
	struct rbuf r;

	if (!first_time(kind, lk_identity(against ? against->lock : NULL),
			lk_identity(lock)))
		return;
	r.n = 0;
	rb_add(&r, "keel: %s: taking '%s' (", what, lk_name(lock));
	rb_level(&r, lk_level(lock));
	rb_add(&r, ") at %s", site);
	if (against) {
		rb_add(&r, "\nkeel:   while holding '%s' (",
		       lk_name(against->lock));
		rb_level(&r, lk_level(against->lock));
		rb_add(&r, "), taken at %s", against->site);
	}
	if (rule)
		rb_add(&r, "\nkeel:   rule: %s", rule);
	rb_held(&r, &keel__locks);
	report_end(&r);
}

/* A report about one lock (not about taking it). */
static void report_lock(int kind, void *lock, const char *name,
			const char *site, const char *what)
{
	struct rbuf r;

	if (!first_time(kind, lk_identity(lock), (uint64_t)(uintptr_t)site))
		return;
	r.n = 0;
	rb_add(&r, "keel: %s: '%s' at %s", what, name, site);
	rb_held(&r, &keel__locks);
	report_end(&r);
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
		report_lock(R_OVERFLOW, lock, lk_name(lock), site,
			    "more than 32 locks held: those taken while the "
			    "record is full go unrecorded, and locks taken "
			    "after them are not checked against them");
	}
}

static inline uint8_t *unrec_bucket(struct keel__lockstate *ls,
				    const void *lock)
{
	return &ls->unrec_read[((uint64_t)(uintptr_t)lock *
				0x9E3779B97F4A7C15ull) >>
			       (64 - 5)];
}

_Static_assert(UNREC_READ_BUCKETS == 32, "unrec_bucket() takes 5 bits");

/* A lock taken while the record is full. */
static __attribute__((noinline)) void held_unrecorded(struct keel__lockstate *ls,
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

/* An entry's last 8 bytes (min, node, mode LM_EXCL, bits for the leaf
 * flag), written as one store on the fast paths. */
static inline void held_tail(struct keel__held *h, uint32_t min, uint32_t node,
			     unsigned flags)
{
	uint8_t bits = flags & KEEL_LOCK_LEAF ? HELD_LEAF : 0;

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
	uint64_t w = (uint64_t)min | (uint64_t)(uint16_t)node << 32 |
		     (uint64_t)LM_EXCL << 48 | (uint64_t)bits << 56;

	_Static_assert(offsetof(struct keel__held, node) ==
				       offsetof(struct keel__held, min) + 4 &&
			       offsetof(struct keel__held, mode) ==
				       offsetof(struct keel__held, min) + 6 &&
			       offsetof(struct keel__held, bits) ==
				       offsetof(struct keel__held, min) + 7,
		       "min, node, mode, bits are 8 contiguous bytes");
	memcpy((char *)h + offsetof(struct keel__held, min), &w, sizeof w);
#else
	h->min = min;
	h->node = (uint16_t)node;
	h->mode = LM_EXCL;
	h->bits = bits;
#endif
}

/* The fast paths' rare case: a NOBLOCK or NOALLOC lock, counted. */
static __attribute__((noinline)) void held_count(struct keel__lockstate *ls,
						 struct keel__held *h,
						 unsigned flags)
{
	ls->noblock += !!(flags & KEEL_LOCK_NOBLOCK);
	ls->noalloc += !!(flags & KEEL_LOCK_NOALLOC);
	h->bits |= HELD_COUNTED;
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
		held_count(ls, h, flags);
}

/* Record lock as taken; flags and node are the lock's, as the caller
 * read them. 1 if recorded, 0 if it went unrecorded. */
static inline int held_push_as(struct keel__lockstate *ls, void *lock,
			       const char *site, int mode, unsigned flags,
			       uint32_t node)
{
	uint32_t d = ls->depth, prev, level = lk_level(lock);
	struct keel__held *h;

	if (unlikely(d >= KEEL_LOCK_STACK)) {
		held_unrecorded(ls, lock, site, mode);
		return 0;
	}
	ls->depth = d + 1;
	/* Counted only when recorded: held_remove() uncounts. */
	if (unlikely(flags & (KEEL_LOCK_NOBLOCK | KEEL_LOCK_NOALLOC))) {
		ls->noblock += !!(flags & KEEL_LOCK_NOBLOCK);
		ls->noalloc += !!(flags & KEEL_LOCK_NOALLOC);
	}
	h = &ls->stack[d];
	prev = d ? ls->stack[d - 1].min : LEVEL_NONE;
	h->lock = lock;
	h->site = site;
	h->min = level && level < prev ? level : prev;
	h->node = (uint16_t)node;
	h->mode = (uint8_t)mode;
	h->bits = (uint8_t)((flags & KEEL_LOCK_LEAF ? HELD_LEAF : 0) |
			    (flags & (KEEL_LOCK_NOBLOCK | KEEL_LOCK_NOALLOC)
				     ? HELD_COUNTED
				     : 0));
	return 1;
}

static inline int held_push(struct keel__lockstate *ls, void *lock,
			    const char *site, int mode)
{
	return held_push_as(ls, lock, site, mode, lk_flags(lock),
			    A_LOAD(lk_node(lock)) & ~NODE_TAKEN);
}

/* The index of lock in the record, searching from the top; -1. */
static int held_find(struct keel__lockstate *ls, const void *lock)
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
static void held_relock(struct keel__lockstate *ls, keel_mutex_t *m,
			const char *site)
{
	int i;

	if (held_push(ls, m, site, LM_EXCL))
		ls->stack[ls->depth - 1].bits |= HELD_RELOCK;
	else if ((i = held_find(ls, m)) >= 0)
		ls->stack[i].bits |= HELD_RELOCK;
}

static void held_remove(struct keel__lockstate *ls, int i)
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
		uint32_t level = lk_level(e->lock);

		e->min = level && level < prev ? level : prev;
	}
	ls->depth = d - 1;
}

/* 1 if the thread may hold lock for reading among its unrecorded locks
 * (always, if it does). */
static int unrec_may_read(struct keel__lockstate *ls, const void *lock)
{
	return ls->unrec && *unrec_bucket(ls, lock) != 0;
}

/* Release the record of a lock the caller holds in mode: its entry, or,
 * if it has none, one of the unrecorded locks (the caller has made sure
 * it holds it: by the owner field, or unrec_may_read()). 0, or -1 if
 * there is neither. */
static int held_release(struct keel__lockstate *ls, const void *lock, int mode)
{
	int i = held_find(ls, lock);

	if (i >= 0) {
		held_remove(ls, i);
		return 0;
	}
	if (!ls->unrec || (mode == LM_SHARED && !unrec_may_read(ls, lock)))
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
static void mark_taken(void *lock)
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
static inline int edge_known(struct keel__lockstate *ls, uint32_t from,
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
static uint32_t check_acquire(struct keel__lockstate *ls, void *lock,
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
		report_taking(R_LEAF, top, lock, site,
			      "lock taken under a leaf lock",
			      "nothing may be taken while a leaf lock is held");
		violation = 1;
	}
	if (unlikely(flags & KEEL_LOCK_ROOT)) {
		report_taking(R_ROOT, top, lock, site,
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
			report_taking(R_SAME_LEVEL, lowest, lock, site,
				      "two locks of one level",
				      "take two locks of one level together, "
				      "with keel_mutex_lock2()");
		else
			report_taking(R_ORDER, lowest, lock, site,
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
	if (!violation && edge_known(ls, from, to, lock))
		return from;
	if (keel__graph_edge(from, to, site, top->site, !level || !top_level,
			     violation, cycle, sizeof cycle)) {
		struct rbuf r;

		if (!first_time(R_CYCLE, lk_identity(top->lock), lk_identity(lock)))
			return 0;
		r.n = 0;
		rb_add(&r, "keel: lock order cycle: taking '%s' (", lk_name(lock));
		rb_level(&r, level);
		rb_add(&r, ") at %s while holding '%s' closes a cycle:%s", site,
		       lk_name(top->lock), cycle);
		rb_held(&r, ls);
		report_end(&r);
		return 0;
	}
	return violation ? 0 : from;
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
	report_lock(R_UNINIT, lock, "(unknown)", site,
		    "use of a lock that is not initialised, or destroyed");
	A_STORE(magic, KEEL__LOCK_MAGIC);
	lk_flags_set(lock, KEEL__LOCK_READY);
}

/* Wait for the lock word and take it (as 2: others may be waiting). No
 * spinning, like glibc's default mutex: a waiter that spun would take the
 * lock at each release, passing its cache line back and forth, where a
 * sleeper lets the running holder take it again and again. */
static __attribute__((noinline)) void mutex_wait(keel_mutex_t *m)
{
	if (A_LOAD(&m->k_state) == 2)
		keel__futex_wait(fword(&m->k_state), 2, KEEL_FOREVER);
	while (__atomic_exchange_n(&m->k_state, 2, __ATOMIC_ACQUIRE) != 0)
		keel__futex_wait(fword(&m->k_state), 2, KEEL_FOREVER);
}

/* ---- Queues of cancellable waiters ------------------------------------------ */

/* The queue lock: held for a few pointer moves, so a taker spins a
 * little, then sleeps (0 free, 1 held, 2 held and someone may sleep). A
 * pure spin lock convoys when threads outnumber CPUs: a holder preempted
 * inside leaves every spinner to burn its whole time slice before it runs
 * again (a thousand callers of one keel_once() stalled for minutes). */
#define QLOCK_SPINS 64

void keel__qlock(uint32_t *q)
{
	uint32_t z = 0;

	if (__atomic_compare_exchange_n(q, &z, 1, 0, __ATOMIC_ACQUIRE,
					__ATOMIC_RELAXED))
		return;
	for (int i = 0; i < QLOCK_SPINS; i++) {
		keel__cpu_relax();
		z = 0;
		if (A_LOAD(q) == 0 &&
		    __atomic_compare_exchange_n(q, &z, 1, 0, __ATOMIC_ACQUIRE,
						__ATOMIC_RELAXED))
			return;
	}
	while (__atomic_exchange_n(q, 2, __ATOMIC_ACQUIRE) != 0)
		keel__futex_wait(fword(q), 2, KEEL_FOREVER);
}

void keel__qunlock(uint32_t *q)
{
	if (__atomic_exchange_n(q, 0, __ATOMIC_RELEASE) == 2)
		keel__futex_wake(fword(q), 1);
}

void keel__q_append(void **head, struct keel__qnode *n)
{
	struct keel__qnode **pp = (struct keel__qnode **)head;

	n->next = NULL;
	A_STORE(&n->woken, 0);
	while (*pp)
		pp = &(*pp)->next;
	A_STORE_REL(pp, n);
}

void keel__q_remove(void **head, struct keel__qnode *n)
{
	for (struct keel__qnode **pp = (struct keel__qnode **)head; *pp; pp = &(*pp)->next)
		if (*pp == n) {
			A_STORE(pp, n->next);
			return;
		}
}

/* Wake the first queued waiter (or all); under nothing. */
void keel__q_wake(void **head, uint32_t *ql, int all)
{
	struct keel__qnode *n;

	if (!A_LOAD_ACQ(head))
		return;
	keel__qlock(ql);
	while ((n = *(struct keel__qnode **)head) != NULL) {
		struct keel__task *t = n->t;

		A_STORE(head, n->next);
		/* After this store the node's owner may return: read
		 * nothing from it afterwards. */
		A_STORE_REL(&n->woken, 1);
		keel__unpark(t);
		if (!all)
			break;
	}
	keel__qunlock(ql);
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
		mark_taken(lock);
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

	if (!(lk_flags(m) & KEEL_LOCK_RECURSIVE) && checking()) {
		int i = held_find(ls, m);

		report_taking(R_RECURSION, i >= 0 ? &ls->stack[i] : NULL, m,
			      site, "lock taken again by its holder",
			      "a non-recursive lock taken twice by one thread "
			      "deadlocks it");
	}
	m->k_depth++;
	held_relock(ls, m, site);
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
	if (ls->depth && checking())
		parent = check_acquire(ls, m, site, 0);
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
		    !checking()))) {
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
		held_relock(ls, m, site);
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
	if (ls->depth && checking())
		check_acquire(ls, m, site, 0);
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
	if (a->k_level != b->k_level && checking())
		report_taking(R_SAME_LEVEL, NULL, b, site,
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
	if (checking())
		check_acquire(ls, second, site, 1);
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
		if (checking())
			report_lock(R_NOT_HELD, m, lk_name(m), site,
				    A_LOAD(&m->k_owner)
					    ? "unlock of a lock another thread holds"
					    : "unlock of a lock that is not held");
		return; /* releasing someone else's lock would break it */
	}
	/* Ours (by the owner field), so in the record or unrecorded. */
	if (unlikely(held_release(ls, m, LM_EXCL) < 0))
		report_lock(R_NOT_HELD, m, lk_name(m), site,
			    "unlock of a lock missing from the held record");
	if (m->k_depth) {
		m->k_depth--;
		return;
	}
	mutex_release(m);
}

void keel_mutex_unlock_at(keel_mutex_t *m, const char *site)
{
	struct keel__lockstate *ls = &keel__locks;
	uint32_t d = ls->depth;

	/* The common case: the lock on top of the record, taken once (a
	 * relock marks the entry that could be on top: see held_relock()),
	 * not counted. The record is exact (an entry is pushed only when the
	 * lock word was taken), so it alone says the caller holds the lock,
	 * and the lock's cache line is first touched by the release's
	 * writes. */
	if (likely(d - 1 < KEEL_LOCK_STACK && ls->stack[d - 1].lock == m &&
		   !(ls->stack[d - 1].bits & (HELD_RELOCK | HELD_COUNTED)))) {
		ls->depth = d - 1;
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
		report_lock(R_DESTROY_HELD, m, m->k_name, "keel_mutex_destroy()",
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
	if (!keel_mutex_held(m) && checking())
		report_lock(R_ASSERT, (void *)(uintptr_t)m,
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
		report_lock(R_DESTROY_HELD, l, l->k_name, "keel_rwlock_destroy()",
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
	if ((unlikely(ls->depth) && (i = held_find(ls, l)) >= 0) ||
	    (i = -1, unlikely(A_LOAD(&l->k_owner) == (void *)ls))) {
		int held_mode = i >= 0 ? ls->stack[i].mode : LM_EXCL;

		if (!(mode == LM_SHARED && held_mode == LM_SHARED &&
		      (lk_flags(l) & KEEL_LOCK_RECURSIVE)) &&
		    checking())
			report_taking(R_RECURSION, i >= 0 ? &ls->stack[i] : NULL,
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
	if (unlikely(ls->depth) && checking())
		check_acquire(ls, l, site, 0);
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
	i = held_find(ls, l);
	if (i >= 0)
		mode = ls->stack[i].mode;
	else if (ls->unrec && A_LOAD(&l->k_owner) == (void *)ls)
		mode = LM_EXCL;
	else if (unrec_may_read(ls, l) &&
		 (A_LOAD(&l->k_state) & RW_COUNT) != 0)
		mode = LM_SHARED;
	else {
		if (checking())
			report_lock(R_NOT_HELD, l, l->k_name ? l->k_name : "(unnamed)",
				    site, "unlock of a lock the thread does not hold");
		return;
	}
	held_release(ls, l, mode);
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
		report_lock(R_COND, m, m->k_name ? m->k_name : "(unnamed)", site,
			    "keel_cond_wait() on a mutex the thread does not "
			    "hold");
		return -EPERM;
	}
	i = held_find(ls, m); /* -1: held, but taken while the record was full */
	if (!(t = keel__self()))
		return -ENOMEM;
	if (checking()) {
		uint32_t d = ls->depth;

		/* The mutex must be the lowest-level lock held: whatever is
		 * held below it stays held while this thread sleeps. */
		for (uint32_t j = 0; j < d; j++) {
			struct keel__held *h = &ls->stack[j];

			unsigned hl = lk_level(h->lock);

			if ((int)j != i && hl && m->k_level && hl < m->k_level) {
				report_taking(R_COND, h, m, site,
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

	if ((ls->depth || ls->unrec) && checking())
		report_lock(R_ASSERT, held_first(ls), held_first_name(ls), site,
			    "assertion failed: locks are held");
}

void keel_assert_may_alloc_at(const char *site)
{
	struct keel__lockstate *ls = &keel__locks;

	if (ls->noalloc && checking()) {
		int d = (int)ls->depth;

		while (d-- > 0)
			if (lk_flags(ls->stack[d].lock) & KEEL_LOCK_NOALLOC)
				break;
		report_lock(R_NOALLOC, d >= 0 ? ls->stack[d].lock : NULL,
			    d >= 0 ? lk_name(ls->stack[d].lock) : "?", site,
			    "allocation while holding a no-alloc lock");
	}
}

void keel__lock_check_blocking(const char *what)
{
	struct keel__lockstate *ls = &keel__locks;
	int d;

	if (likely(!ls->noblock) || !checking())
		return;
	d = (int)ls->depth;
	while (d-- > 0)
		if (lk_flags(ls->stack[d].lock) & KEEL_LOCK_NOBLOCK)
			break;
	if (d >= 0)
		report_lock(R_BLOCKING, ls->stack[d].lock, lk_name(ls->stack[d].lock),
			    ls->stack[d].site, what);
}

void keel__lock_check_serve(void)
{
	struct keel__lockstate *ls = &keel__locks;

	if (likely(!ls->depth && !ls->unrec) || !checking())
		return;
	report_lock(R_SERVE, held_first(ls), held_first_name(ls),
		    ls->depth ? ls->stack[0].site : "(unrecorded)",
		    "keel_serve() while holding a lock: messages would run "
		    "inside the critical section");
}

void keel__lock_check_exit(const char *who)
{
	struct keel__lockstate *ls = &keel__locks;

	if (likely(!ls->depth && !ls->unrec) || !checking())
		return;
	report_lock(R_EXIT, held_first(ls), held_first_name(ls),
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

	if (ls->depth && checking())
		check_acquire(ls, token, site, 0);
}

void keel__rank_enter(keel_mutex_t *token, const char *site)
{
	keel__rank_check(token, site);
	held_push(&keel__locks, token, site, LM_EXCL);
}

void keel__rank_leave(keel_mutex_t *token)
{
	/* Entered and left by the same call: its entry, or unrecorded. */
	held_release(&keel__locks, token, LM_EXCL);
}
