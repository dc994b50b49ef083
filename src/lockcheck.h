/*
 * lockcheck.h: the lock-order checker's internal interface, shared by
 * keel's own locks (lock.c) and the pthread interposer (lockcheck_preload.c).
 *
 * The checker is: each thread's held-lock record (keel__locks), the order
 * check made before a thread blocks (levels, leaf/root rules, the learned
 * order graph of lockgraph.c), and the reports with their policy. It
 * knows a keel lock by its layout (the lk_* accessors read keel_mutex_t and
 * keel_rwlock_t alike); an entry marked HELD_FOREIGN is a lock that is not
 * keel's (a pthread lock seen by the interposer): a learned (level 0) lock
 * whose name and flags the checker never reads from its memory, and which
 * the interposer describes in reports (keel__lc_describe).
 *
 * The inline functions here are the ones keel's fast paths are built from:
 * they stay inline so that splitting the checker out costs the fast paths
 * nothing.
 */
#ifndef KEEL_LOCKCHECK_H
#define KEEL_LOCKCHECK_H

#include <string.h>

#include "internal.h"

#define NODE_TAKEN 0x80000000u
#define A_LOAD(p) __atomic_load_n((p), __ATOMIC_RELAXED)
#define A_LOAD_ACQ(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define A_STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELAXED)
#define A_STORE_REL(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)

#define HELD_FOREIGN 16 /* not a keel lock: see the top of this file */

/* ---- Policy ----------------------------------------------------------------- */

extern _Atomic int keel__lc_policy;
extern _Atomic unsigned long keel__lc_nreports;

/* Read KEEL_LOCKCHECK (abort, report, off), dflt if unset. */
void keel__lc_read_policy(int dflt);

static inline int keel__lc_checking(void)
{
	return load_relaxed(&keel__lc_policy) != KEEL_LOCKCHECK_OFF;
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

/* ---- Reports ----------------------------------------------------------------
 * Formatted into a buffer on the stack, written with one write(2): no
 * allocation, no keel lock. */
struct keel__rbuf {
	char b[4096];
	size_t n;
};

enum keel__rkind {
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

__attribute__((format(printf, 2, 3))) void keel__rb_add(struct keel__rbuf *r,
							 const char *fmt, ...);
/* The held record, one line per entry. */
void keel__rb_held(struct keel__rbuf *r, struct keel__lockstate *ls);
/* 1 if this (kind, a, b) was not reported before. */
int keel__lc_first_time(int kind, uint64_t a, uint64_t b);
/* Write the report, count it, apply the policy. */
void keel__lc_report_end(struct keel__rbuf *r);
/* Who a lock is, for deduplicating reports (see lockcheck.c). */
uint64_t keel__lc_identity(const void *lock);
void keel__lc_report_taking(int kind, const struct keel__held *against,
			    void *lock, const char *site, const char *what,
			    const char *rule);
void keel__lc_report_lock(int kind, void *lock, const char *name,
			  const char *site, const char *what);
/* Set by keel's task layer: the calling thread's task name, or "". */
extern void (*keel__lc_thread_name)(char name[KEEL_TASK_NAME_MAX + 1]);
/* Set by the interposer: describe a HELD_FOREIGN entry (lock, site). */
extern void (*keel__lc_describe)(struct keel__rbuf *r, const struct keel__held *h);

/* ---- The held record -------------------------------------------------------- */

__attribute__((noinline)) void keel__held_unrecorded(struct keel__lockstate *ls,
						     void *lock, const char *site,
						     int mode);
__attribute__((noinline)) void keel__held_count(struct keel__lockstate *ls,
						struct keel__held *h,
						unsigned flags);
int keel__held_find(struct keel__lockstate *ls, const void *lock);
void keel__held_relock(struct keel__lockstate *ls, void *lock, const char *site);
void keel__held_remove(struct keel__lockstate *ls, int i);
int keel__unrec_may_read(struct keel__lockstate *ls, const void *lock);
int keel__held_release(struct keel__lockstate *ls, const void *lock, int mode);

static inline uint8_t *unrec_bucket(struct keel__lockstate *ls,
				    const void *lock)
{
	return &ls->unrec_read[((uint64_t)(uintptr_t)lock *
				0x9E3779B97F4A7C15ull) >>
			       (64 - 5)];
}

_Static_assert(UNREC_READ_BUCKETS == 32, "unrec_bucket() takes 5 bits");

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

/* Record lock as taken; flags and node are the lock's, as the caller
 * read them. 1 if recorded, 0 if it went unrecorded. */
static inline int held_push_as(struct keel__lockstate *ls, void *lock,
			       const char *site, int mode, unsigned flags,
			       uint32_t node)
{
	uint32_t d = ls->depth, prev, level = lk_level(lock);
	struct keel__held *h;

	if (unlikely(d >= KEEL_LOCK_STACK)) {
		keel__held_unrecorded(ls, lock, site, mode);
		return 0;
	}
	ls->depth = d + 1;
	/* Counted only when recorded: keel__held_remove() uncounts. */
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

/* ---- The order check -------------------------------------------------------- */

/* The first time a keel lock is taken (or it is not in the graph yet). */
void keel__lc_mark_taken(void *lock);
/* The order check, before blocking; called with something held. Returns
 * the node id of the lock on top when the edge from it to this lock is
 * allowed and recorded in the graph, else 0. */
uint32_t keel__lc_check_acquire(struct keel__lockstate *ls, void *lock,
				const char *site, int same_ok);
/* 1 if from -> to is known recorded by this thread; else 0, and it is
 * known from now on (the caller records it in the graph). */
int keel__lc_edge_known(struct keel__lockstate *ls, uint32_t from, uint32_t to,
			const void *lock);

#endif /* KEEL_LOCKCHECK_H */
