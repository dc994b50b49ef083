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
 * very run where it would deadlock. The stack never allocates; past its
 * capacity, locks go unrecorded (reported once) and checking resumes when
 * the depth is back under it.
 *
 * The mutex is its own futex lock (Drepper's three states):
 *   0 free, 1 held, 2 held and someone may be waiting.
 *   lock:    CAS 0 -> 1; else spin a little; else XCHG to 2 and futex-wait
 *            while the old value was not 0.
 *   unlock:  XCHG to 0; if the old value was 2, wake one futex waiter and
 *            one queued waiter.
 * k_owner is the holder's lock record (its keel__locks address), so
 * "held by me" is exact. Waits that must be cancellable (lock_until,
 * condition variables) cannot sleep on the lock's futex word: a
 * canceller's wake-up could come just before the sleep and be lost. They
 * queue a node on the lock (k_waitq, guarded by the k_qlock spin bit) and
 * sleep on their task's parker, which cancellation wakes; they set the
 * state to 2 after queueing, so the unlocker, seeing 2, looks at the queue.
 *
 * Reports are formatted into a stack buffer with snprintf and written with
 * one write(2): no allocation, no keel lock, so they work when malloc is
 * broken. A fixed table of hashes deduplicates them per pair of locks.
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

/* The fields keel_mutex_t and keel_rwlock_t share, in the same places. */
struct lk {
	uint32_t *state;
	uint16_t level, flags;
	const char *name;
	void **owner;
	uint32_t *node;
	uint32_t *depth;
	uint32_t magic;
	uint8_t kind;
};

#define LK_OF(l, k)                                                        \
	((struct lk){&(l)->k_state, (l)->k_level, (l)->k_flags,            \
		     (l)->k_name ? (l)->k_name : "(unnamed)", &(l)->k_owner, \
		     &(l)->k_node, &(l)->k_depth, (l)->k_magic, (k)})

static struct keel__lockinfo info_of(void *lock, const struct lk *k)
{
	return (struct keel__lockinfo){lock, k->name, k->node, k->level,
				       k->flags};
}

/* ---- Reports ------------------------------------------------------------- */

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
	uint32_t d = ls->depth < KEEL_LOCK_STACK ? ls->depth : KEEL_LOCK_STACK;
	char name[KEEL_TASK_NAME_MAX + 1] = "";

	if (keel__tls.self)
		keel__task_copy_name(keel__tls.self, name);
	if (name[0])
		rb_add(r, "\nkeel:   thread '%s' (%#lx)", name,
		       (unsigned long)pthread_self());
	else
		rb_add(r, "\nkeel:   thread %#lx", (unsigned long)pthread_self());
	rb_add(r, " holds %u lock%s%s", ls->depth, ls->depth == 1 ? "" : "s",
	       ls->depth ? ":" : "");
	for (uint32_t i = 0; i < d; i++) {
		struct keel__held *h = &ls->stack[i];

		rb_add(r, "\nkeel:     #%u '%s' (", i, h->name);
		rb_level(r, h->level);
		rb_add(r, "%s), taken at %s%s", h->mode == LM_SHARED ? ", shared" : "",
		       h->site, h->waiting ? " (released: waiting on a cond)" : "");
	}
	if (ls->depth > d)
		rb_add(r, "\nkeel:     ... and %u more, past the record's capacity",
		       ls->depth - d);
}

static _Atomic uint64_t seen[2048];

/* 1 if this (kind, a, b) was not reported before. */
static int first_time(int kind, const void *a, const void *b)
{
	uint64_t h = (uint64_t)(uintptr_t)a * 0x9E3779B97F4A7C15ull ^
		     (uint64_t)(uintptr_t)b * 0xC2B2AE3D27D4EB4Full ^
		     (uint64_t)kind * 0x165667B19E3779F9ull;
	size_t n = sizeof seen / sizeof seen[0];

	h |= 1;
	for (size_t i = 0; i < 8; i++) {
		_Atomic uint64_t *slot = &seen[(h + i) % n];
		uint64_t cur = load_relaxed(slot);

		if (cur == h)
			return 0;
		if (cur == 0 && cas_acq_rel(slot, &cur, h))
			return 1;
		if (cur == h)
			return 0;
	}
	return 1; /* a crowded neighbourhood: report again rather than miss */
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
			  const struct lk *k, void *lock, const char *site,
			  const char *what, const char *rule)
{
	struct rbuf r;

	if (!first_time(kind, against ? against->lock : NULL, lock))
		return;
	r.n = 0;
	rb_add(&r, "keel: %s: taking '%s' (", what, k->name);
	rb_level(&r, k->level);
	rb_add(&r, ") at %s", site);
	if (against) {
		rb_add(&r, "\nkeel:   while holding '%s' (", against->name);
		rb_level(&r, against->level);
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

	if (!first_time(kind, lock, site))
		return;
	r.n = 0;
	rb_add(&r, "keel: %s: '%s' at %s", what, name, site);
	rb_held(&r, &keel__locks);
	report_end(&r);
}

/* ---- The held-lock record -------------------------------------------------- */

static void held_push(struct keel__lockstate *ls, void *lock, const struct lk *k,
		      const char *site, int mode)
{
	uint32_t d = ls->depth++, prev;
	struct keel__held *h;

	if (k->flags & KEEL_LOCK_NOBLOCK)
		ls->noblock++;
	if (k->flags & KEEL_LOCK_NOALLOC)
		ls->noalloc++;
	if (unlikely(d >= KEEL_LOCK_STACK)) {
		if (!ls->overflow_warned) {
			ls->overflow_warned = 1;
			report_lock(R_OVERFLOW, lock, k->name, site,
				    "more than 32 locks held: those past the "
				    "32nd are not checked until the count is "
				    "back under it");
		}
		return;
	}
	h = &ls->stack[d];
	prev = d ? ls->stack[d - 1].min : LEVEL_NONE;
	h->lock = lock;
	h->site = site;
	h->name = k->name;
	h->level = k->level;
	h->flags = k->flags;
	h->kind = k->kind;
	h->mode = (uint8_t)mode;
	h->waiting = 0;
	h->min = k->level && k->level < prev ? k->level : prev;
}

/* The index of lock in the record, searching from the top; -1. */
static int held_find(struct keel__lockstate *ls, const void *lock)
{
	int d = (int)(ls->depth < KEEL_LOCK_STACK ? ls->depth : KEEL_LOCK_STACK);

	while (d-- > 0)
		if (ls->stack[d].lock == lock)
			return d;
	return -1;
}

static void held_remove(struct keel__lockstate *ls, int i)
{
	uint32_t d = ls->depth < KEEL_LOCK_STACK ? ls->depth : KEEL_LOCK_STACK;
	struct keel__held *h = &ls->stack[i];

	if (h->flags & KEEL_LOCK_NOBLOCK)
		ls->noblock--;
	if (h->flags & KEEL_LOCK_NOALLOC)
		ls->noalloc--;
	/* Unlock order is free: close the gap and redo the minima above. */
	memmove(h, h + 1, (d - (uint32_t)i - 1) * sizeof *h);
	for (uint32_t j = (uint32_t)i; j + 1 < d; j++) {
		uint32_t prev = j ? ls->stack[j - 1].min : LEVEL_NONE;
		struct keel__held *e = &ls->stack[j];

		e->min = e->level && e->level < prev ? e->level : prev;
	}
	ls->depth--;
	if (ls->depth < KEEL_LOCK_STACK)
		ls->overflow_warned = 0;
}

/* Release the record of a lock the caller holds; 0, or -1 if it is not in
 * the record (and not plausibly one of the unrecorded ones). */
static int held_release(struct keel__lockstate *ls, const void *lock)
{
	int i = held_find(ls, lock);

	if (i >= 0) {
		held_remove(ls, i);
		return 0;
	}
	if (ls->depth > KEEL_LOCK_STACK) {
		ls->depth--; /* one of the unrecorded ones */
		return 0;
	}
	return -1;
}

static void mark_taken(void *lock, const struct lk *k)
{
	struct keel__lockinfo li = info_of(lock, k);

	keel__graph_node(&li, 1);
}

/* The order check, before blocking; called with something held. */
static void check_acquire(struct keel__lockstate *ls, void *lock,
			  const struct lk *k, const char *site, int same_ok)
{
	uint32_t d = ls->depth < KEEL_LOCK_STACK ? ls->depth : KEEL_LOCK_STACK;
	struct keel__held *top = &ls->stack[d - 1];
	uint32_t from, to = A_LOAD(k->node) & ~NODE_TAKEN;
	int violation = 0;
	char cycle[1024];

	if (top->flags & KEEL_LOCK_LEAF) {
		report_taking(R_LEAF, top, k, lock, site,
			      "lock taken under a leaf lock",
			      "nothing may be taken while a leaf lock is held");
		violation = 1;
	}
	if (k->flags & KEEL_LOCK_ROOT) {
		report_taking(R_ROOT, top, k, lock, site,
			      "root lock taken with locks held",
			      "a root lock is taken only with nothing held");
		violation = 1;
	}
	if (k->level && k->level >= top->min && !(same_ok && k->level == top->min)) {
		struct keel__held *lowest = top;

		for (uint32_t i = 0; i < d; i++)
			if (ls->stack[i].level == top->min) {
				lowest = &ls->stack[i];
				break;
			}
		if (k->level == top->min)
			report_taking(R_SAME_LEVEL, lowest, k, lock, site,
				      "two locks of one level",
				      "take two locks of one level together, "
				      "with keel_mutex_lock2()");
		else
			report_taking(R_ORDER, lowest, k, lock, site,
				      "lock order violation",
				      "a thread may take only a lock of a lower "
				      "level than every lock it holds");
		violation = 1;
	}
	/* The order observed, for the graph: an edge from the lock on top.
	 * The held stack is a chain of such edges, so a cycle in the order
	 * ever taken is a cycle in the graph. Ranked-to-ranked edges follow
	 * the levels, so a cycle must pass through a learned lock: an edge
	 * with a learned end is checked for one, across all locks. (keel_mutex_t
	 * and keel_rwlock_t keep k_node at the same place.) */
	from = A_LOAD(&((keel_mutex_t *)top->lock)->k_node) & ~NODE_TAKEN;
	if (from && to &&
	    keel__graph_edge(from, to, site, top->site,
			     !k->level || !top->level, violation, cycle,
			     sizeof cycle)) {
		struct rbuf r;

		if (!first_time(R_CYCLE, top->lock, lock))
			return;
		r.n = 0;
		rb_add(&r,
		       "keel: lock order cycle: taking '%s' (", k->name);
		rb_level(&r, k->level);
		rb_add(&r, ") at %s while holding '%s' closes a cycle:%s", site,
		       top->name, cycle);
		rb_held(&r, ls);
		report_end(&r);
	}
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

int keel_mutex_init(keel_mutex_t *m, unsigned level, const char *name,
		    unsigned flags)
{
	struct keel__lockinfo li;

	if (!valid_init(m, level, name, flags))
		return -EINVAL;
	memset(m, 0, sizeof *m);
	m->k_level = (uint16_t)level;
	m->k_flags = (uint16_t)flags;
	m->k_name = name;
	A_STORE_REL(&m->k_magic, KEEL__LOCK_MAGIC);
	/* Known to the graph from now on: "never taken" until it is. */
	li = (struct keel__lockinfo){m, name, &m->k_node, (uint16_t)level,
				     (uint16_t)flags};
	keel__graph_node(&li, 0);
	return 0;
}

/* A lock whose magic is wrong: report; under the report policy use it as
 * a learned, unnamed lock so the program can go on. */
static void bad_lock(void *lock, uint32_t *magic, const char *site)
{
	report_lock(R_UNINIT, lock, "(unknown)", site,
		    "use of a lock that is not initialised, or destroyed");
	A_STORE(magic, KEEL__LOCK_MAGIC);
}

static void mutex_wait(keel_mutex_t *m)
{
	uint32_t z;

	/* A short spin: critical sections are often shorter than a sleep. */
	for (int i = 0; i < 100; i++) {
		z = 0;
		if (A_LOAD(&m->k_state) == 0 &&
		    __atomic_compare_exchange_n(&m->k_state, &z, 1, 0,
						__ATOMIC_ACQUIRE,
						__ATOMIC_RELAXED))
			return;
		keel__cpu_relax();
	}
	while (__atomic_exchange_n(&m->k_state, 2, __ATOMIC_ACQUIRE) != 0)
		keel__futex_wait(fword(&m->k_state), 2, KEEL_FOREVER);
}

/* ---- Queues of cancellable waiters ------------------------------------------ */

struct qnode {
	struct qnode *next;
	struct keel__task *t;
	uint32_t woken;
};

static void qlock(uint32_t *q)
{
	while (__atomic_exchange_n(q, 1, __ATOMIC_ACQUIRE))
		while (A_LOAD(q))
			keel__cpu_relax();
}

static void qunlock(uint32_t *q)
{
	A_STORE_REL(q, 0);
}

static void q_append(void **head, struct qnode *n)
{
	struct qnode **pp = (struct qnode **)head;

	n->next = NULL;
	A_STORE(&n->woken, 0);
	while (*pp)
		pp = &(*pp)->next;
	A_STORE_REL(pp, n);
}

static void q_remove(void **head, struct qnode *n)
{
	for (struct qnode **pp = (struct qnode **)head; *pp; pp = &(*pp)->next)
		if (*pp == n) {
			A_STORE(pp, n->next);
			return;
		}
}

/* Wake the first queued waiter (or all); under nothing. */
static void q_wake(void **head, uint32_t *ql, int all)
{
	struct qnode *n;

	if (!A_LOAD_ACQ(head))
		return;
	qlock(ql);
	while ((n = *(struct qnode **)head) != NULL) {
		struct keel__task *t = n->t;

		A_STORE(head, n->next);
		/* After this store the node's owner may return: read
		 * nothing from it afterwards. */
		A_STORE_REL(&n->woken, 1);
		keel__unpark(t);
		if (!all)
			break;
	}
	qunlock(ql);
}

static void mutex_wake(keel_mutex_t *m)
{
	keel__futex_wake(fword(&m->k_state), 1);
	q_wake(&m->k_waitq, &m->k_qlock, 0);
}

/* Release the lock word itself (no record). */
static void mutex_release(keel_mutex_t *m)
{
	A_STORE(&m->k_owner, NULL);
	if (__atomic_exchange_n(&m->k_state, 0, __ATOMIC_RELEASE) == 2)
		mutex_wake(m);
}

/* Take the lock word, cancellably; 0 or -ECANCELED/-ETIMEDOUT. */
static int mutex_wait_until(keel_mutex_t *m, struct keel__task *t,
			    keel_time_t deadline, const char *what)
{
	struct qnode n = {.t = t};
	int rc = 0;

	for (;;) {
		qlock(&m->k_qlock);
		q_append(&m->k_waitq, &n);
		qunlock(&m->k_qlock);
		/* Queued before marking the lock contended: an unlocker that
		 * sees the 2 finds us in the queue. */
		if (__atomic_exchange_n(&m->k_state, 2, __ATOMIC_ACQUIRE) == 0) {
			qlock(&m->k_qlock);
			q_remove(&m->k_waitq, &n);
			qunlock(&m->k_qlock);
			return 0;
		}
		while (!A_LOAD_ACQ(&n.woken) && rc == 0)
			rc = keel__wait(t, deadline, 1, what);
		qlock(&m->k_qlock);
		if (!A_LOAD(&n.woken))
			q_remove(&m->k_waitq, &n);
		qunlock(&m->k_qlock);
		if (rc < 0) {
			/* A wake-up meant for us would be lost: pass it on. */
			if (A_LOAD_ACQ(&n.woken))
				mutex_wake(m);
			return rc;
		}
	}
}

/* The checks before taking a mutex. Returns 1 if it is a relock by its
 * holder (recursive, or reported and treated as recursive). */
static int mutex_checks(keel_mutex_t *m, const struct lk *k, const char *site,
			int same_ok)
{
	struct keel__lockstate *ls = &keel__locks;

	if (unlikely(!(A_LOAD(&m->k_node) & NODE_TAKEN)))
		mark_taken(m, k);
	if (unlikely(A_LOAD(&m->k_owner) == (void *)ls)) {
		if (!(m->k_flags & KEEL_LOCK_RECURSIVE) && checking()) {
			int i = held_find(ls, m);

			report_taking(R_RECURSION, i >= 0 ? &ls->stack[i] : NULL,
				      k, m, site,
				      "lock taken again by its holder",
				      "a non-recursive lock taken twice by one "
				      "thread deadlocks it");
		}
		return 1;
	}
	if (unlikely(ls->depth) && checking())
		check_acquire(ls, m, k, site, same_ok);
	return 0;
}

static void mutex_relock(keel_mutex_t *m, const struct lk *k, const char *site)
{
	m->k_depth++;
	held_push(&keel__locks, m, k, site, LM_EXCL);
}

void keel_mutex_lock_at(keel_mutex_t *m, const char *site)
{
	struct lk k;
	uint32_t z = 0;

	if (unlikely(A_LOAD(&m->k_magic) != KEEL__LOCK_MAGIC))
		bad_lock(m, &m->k_magic, site);
	k = LK_OF(m, LK_MUTEX);
	if (unlikely(mutex_checks(m, &k, site, 0))) {
		mutex_relock(m, &k, site);
		return;
	}
	if (unlikely(!__atomic_compare_exchange_n(&m->k_state, &z, 1, 0,
						  __ATOMIC_ACQUIRE,
						  __ATOMIC_RELAXED)))
		mutex_wait(m);
	A_STORE(&m->k_owner, (void *)&keel__locks);
	held_push(&keel__locks, m, &k, site, LM_EXCL);
}

int keel_mutex_trylock_at(keel_mutex_t *m, const char *site)
{
	struct lk k;
	uint32_t z = 0;

	if (unlikely(A_LOAD(&m->k_magic) != KEEL__LOCK_MAGIC))
		bad_lock(m, &m->k_magic, site);
	k = LK_OF(m, LK_MUTEX);
	if (A_LOAD(&m->k_owner) == (void *)&keel__locks) {
		if (!(m->k_flags & KEEL_LOCK_RECURSIVE))
			return -EBUSY;
		mutex_relock(m, &k, site);
		return 0;
	}
	if (!__atomic_compare_exchange_n(&m->k_state, &z, 1, 0,
					 __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
		return -EBUSY;
	if (unlikely(!(A_LOAD(&m->k_node) & NODE_TAKEN)))
		mark_taken(m, &k);
	/* Not checked, and no edge: a trylock cannot deadlock. */
	A_STORE(&m->k_owner, (void *)&keel__locks);
	held_push(&keel__locks, m, &k, site, LM_EXCL);
	return 0;
}

int keel_mutex_lock_until_at(keel_mutex_t *m, keel_time_t deadline,
			     const char *site)
{
	struct keel__task *t;
	struct lk k;
	uint32_t z = 0;
	int rc;

	if (unlikely(A_LOAD(&m->k_magic) != KEEL__LOCK_MAGIC))
		bad_lock(m, &m->k_magic, site);
	k = LK_OF(m, LK_MUTEX);
	if (!(t = keel__self()))
		return -ENOMEM;
	if ((rc = keel__check(t)) < 0)
		return rc;
	keel__lock_check_blocking("keel_mutex_lock_until()");
	if (mutex_checks(m, &k, site, 0)) {
		mutex_relock(m, &k, site);
		return 0;
	}
	if (!__atomic_compare_exchange_n(&m->k_state, &z, 1, 0,
					 __ATOMIC_ACQUIRE, __ATOMIC_RELAXED) &&
	    (rc = mutex_wait_until(m, t, deadline, "mutex_lock")) < 0)
		return rc;
	A_STORE(&m->k_owner, (void *)&keel__locks);
	held_push(&keel__locks, m, &k, site, LM_EXCL);
	return 0;
}

void keel_mutex_lock2_at(keel_mutex_t *a, keel_mutex_t *b, const char *site)
{
	keel_mutex_t *first = a, *second = b;
	struct lk ka, kb;

	if (a == b) {
		keel_mutex_lock_at(a, site);
		return;
	}
	if (unlikely(A_LOAD(&a->k_magic) != KEEL__LOCK_MAGIC))
		bad_lock(a, &a->k_magic, site);
	if (unlikely(A_LOAD(&b->k_magic) != KEEL__LOCK_MAGIC))
		bad_lock(b, &b->k_magic, site);
	ka = LK_OF(a, LK_MUTEX);
	kb = LK_OF(b, LK_MUTEX);
	if (a->k_level != b->k_level && checking())
		report_taking(R_SAME_LEVEL, NULL, &kb, b, site,
			      "keel_mutex_lock2() of two levels",
			      "keel_mutex_lock2() takes two locks of one level");
	/* Address order: any two threads take the pair the same way. */
	if ((uintptr_t)b < (uintptr_t)a) {
		first = b;
		second = a;
	}
	keel_mutex_lock_at(first, site);
	{
		struct lk ks = first == a ? kb : ka;
		uint32_t z = 0;

		if (mutex_checks(second, &ks, site, 1)) {
			mutex_relock(second, &ks, site);
			return;
		}
		if (!__atomic_compare_exchange_n(&second->k_state, &z, 1, 0,
						 __ATOMIC_ACQUIRE,
						 __ATOMIC_RELAXED))
			mutex_wait(second);
		A_STORE(&second->k_owner, (void *)&keel__locks);
		held_push(&keel__locks, second, &ks, site, LM_EXCL);
	}
}

void keel_mutex_unlock_at(keel_mutex_t *m, const char *site)
{
	struct keel__lockstate *ls = &keel__locks;

	if (unlikely(A_LOAD(&m->k_magic) != KEEL__LOCK_MAGIC))
		bad_lock(m, &m->k_magic, site);
	if (unlikely(A_LOAD(&m->k_owner) != (void *)ls)) {
		if (checking())
			report_lock(R_NOT_HELD, m, m->k_name ? m->k_name : "(unnamed)",
				    site,
				    A_LOAD(&m->k_owner)
					    ? "unlock of a lock another thread holds"
					    : "unlock of a lock that is not held");
		return; /* releasing someone else's lock would break it */
	}
	if (unlikely(held_release(ls, m) < 0))
		report_lock(R_NOT_HELD, m, m->k_name, site,
			    "unlock of a lock missing from the held record");
	if (m->k_depth) {
		m->k_depth--;
		return;
	}
	mutex_release(m);
}

int keel_mutex_destroy(keel_mutex_t *m)
{
	if (!m || A_LOAD(&m->k_magic) != KEEL__LOCK_MAGIC)
		return -EINVAL;
	if (A_LOAD(&m->k_state) != 0 || A_LOAD(&m->k_owner)) {
		report_lock(R_DESTROY_HELD, m, m->k_name, "keel_mutex_destroy()",
			    "destroying a lock that is held");
		return -EBUSY;
	}
	keel__graph_forget(&m->k_node);
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
	struct keel__lockinfo li;

	if (!valid_init(l, level, name, flags))
		return -EINVAL;
	memset(l, 0, sizeof *l);
	l->k_level = (uint16_t)level;
	l->k_flags = (uint16_t)flags;
	l->k_name = name;
	A_STORE_REL(&l->k_magic, KEEL__LOCK_MAGIC);
	li = (struct keel__lockinfo){l, name, &l->k_node, (uint16_t)level,
				     (uint16_t)flags};
	keel__graph_node(&li, 0);
	return 0;
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
	A_STORE_REL(&l->k_magic, 0u);
	return 0;
}

/* Checks for an rwlock; 1 if the caller already holds it (for reading,
 * recursively allowed, or reported). */
static int rw_checks(keel_rwlock_t *l, const struct lk *k, const char *site,
		     int mode)
{
	struct keel__lockstate *ls = &keel__locks;
	int i;

	if (unlikely(!(A_LOAD(&l->k_node) & NODE_TAKEN)))
		mark_taken(l, k);
	if (unlikely(ls->depth) && (i = held_find(ls, l)) >= 0) {
		if (!(mode == LM_SHARED && ls->stack[i].mode == LM_SHARED &&
		      (l->k_flags & KEEL_LOCK_RECURSIVE)) &&
		    checking())
			report_taking(R_RECURSION, &ls->stack[i], k, l, site,
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
		check_acquire(ls, l, k, site, 0);
	return 0;
}

void keel_rwlock_rdlock_at(keel_rwlock_t *l, const char *site)
{
	struct lk k;
	uint32_t s;

	if (unlikely(A_LOAD(&l->k_magic) != KEEL__LOCK_MAGIC))
		bad_lock(l, &l->k_magic, site);
	k = LK_OF(l, LK_RWLOCK);
	if (rw_checks(l, &k, site, LM_SHARED)) {
		/* Held already: one more reader (it would deadlock behind a
		 * waiting writer if we waited, so do not). */
		__atomic_add_fetch(&l->k_state, 1, __ATOMIC_ACQUIRE);
		held_push(&keel__locks, l, &k, site, LM_SHARED);
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
	held_push(&keel__locks, l, &k, site, LM_SHARED);
}

void keel_rwlock_wrlock_at(keel_rwlock_t *l, const char *site)
{
	struct lk k;
	uint32_t s;

	if (unlikely(A_LOAD(&l->k_magic) != KEEL__LOCK_MAGIC))
		bad_lock(l, &l->k_magic, site);
	k = LK_OF(l, LK_RWLOCK);
	if (rw_checks(l, &k, site, LM_EXCL)) {
		/* Waiting would deadlock: go on without the lock word (its
		 * unlock only drops this record). */
		held_push(&keel__locks, l, &k, site, LM_EXCL);
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
	held_push(&keel__locks, l, &k, site, LM_EXCL);
}

void keel_rwlock_unlock_at(keel_rwlock_t *l, const char *site)
{
	struct keel__lockstate *ls = &keel__locks;
	int i;
	uint32_t s;

	if (unlikely(A_LOAD(&l->k_magic) != KEEL__LOCK_MAGIC))
		bad_lock(l, &l->k_magic, site);
	i = held_find(ls, l);
	if (i < 0) {
		if (checking())
			report_lock(R_NOT_HELD, l, l->k_name ? l->k_name : "(unnamed)",
				    site, "unlock of a lock the thread does not hold");
		return;
	}
	if (ls->stack[i].mode == LM_EXCL) {
		held_remove(ls, i);
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
	held_remove(ls, i);
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
	q_wake(&c->k_waiters, &c->k_qlock, 0);
	return 0;
}

int keel_cond_broadcast(keel_cond_t *c)
{
	if (!c || A_LOAD(&c->k_magic) != KEEL__LOCK_MAGIC)
		return -EINVAL;
	q_wake(&c->k_waiters, &c->k_qlock, 1);
	return 0;
}

int keel_cond_wait_until_at(keel_cond_t *c, keel_mutex_t *m,
			    keel_time_t deadline, const char *site)
{
	struct keel__lockstate *ls = &keel__locks;
	struct keel__task *t;
	struct qnode n;
	int i, rc = 0;

	if (!c || A_LOAD(&c->k_magic) != KEEL__LOCK_MAGIC || !m)
		return -EINVAL;
	if (!keel_mutex_held(m) || (i = held_find(ls, m)) < 0) {
		report_lock(R_COND, m, m->k_name ? m->k_name : "(unnamed)", site,
			    "keel_cond_wait() on a mutex the thread does not "
			    "hold");
		return -EPERM;
	}
	if (!(t = keel__self()))
		return -ENOMEM;
	if (checking()) {
		uint32_t d = ls->depth < KEEL_LOCK_STACK ? ls->depth
							 : KEEL_LOCK_STACK;

		/* The mutex must be the lowest-level lock held: whatever is
		 * held below it stays held while this thread sleeps. */
		for (uint32_t j = 0; j < d; j++) {
			struct keel__held *h = &ls->stack[j];

			if ((int)j != i && h->level && m->k_level &&
			    h->level < m->k_level) {
				struct lk km = LK_OF(m, LK_MUTEX);

				report_taking(R_COND, h, &km, m, site,
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
	qlock(&c->k_qlock);
	q_append(&c->k_waiters, &n);
	qunlock(&c->k_qlock);
	/* Release the lock word, keeping its record (and site) in place. */
	ls->stack[i].waiting = 1;
	mutex_release(m);
	while (!A_LOAD_ACQ(&n.woken) && rc == 0)
		rc = keel__wait(t, deadline, 1, "cond_wait");
	qlock(&c->k_qlock);
	if (!A_LOAD(&n.woken))
		q_remove(&c->k_waiters, &n);
	qunlock(&c->k_qlock);
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
	ls->stack[held_find(ls, m)].waiting = 0;
	return rc;
}

/* ---- Assertions and integration ------------------------------------------------------ */

void keel_assert_no_locks_at(const char *site)
{
	struct keel__lockstate *ls = &keel__locks;

	if (ls->depth && checking())
		report_lock(R_ASSERT, ls->stack[0].lock, ls->stack[0].name, site,
			    "assertion failed: locks are held");
}

void keel_assert_may_alloc_at(const char *site)
{
	struct keel__lockstate *ls = &keel__locks;

	if (ls->noalloc && checking()) {
		int d = (int)(ls->depth < KEEL_LOCK_STACK ? ls->depth
							  : KEEL_LOCK_STACK);

		while (d-- > 0)
			if (ls->stack[d].flags & KEEL_LOCK_NOALLOC)
				break;
		report_lock(R_NOALLOC, d >= 0 ? ls->stack[d].lock : NULL,
			    d >= 0 ? ls->stack[d].name : "?", site,
			    "allocation while holding a no-alloc lock");
	}
}

void keel__lock_check_blocking(const char *what)
{
	struct keel__lockstate *ls = &keel__locks;
	int d;

	if (likely(!ls->noblock) || !checking())
		return;
	d = (int)(ls->depth < KEEL_LOCK_STACK ? ls->depth : KEEL_LOCK_STACK);
	while (d-- > 0)
		if (ls->stack[d].flags & KEEL_LOCK_NOBLOCK)
			break;
	if (d >= 0)
		report_lock(R_BLOCKING, ls->stack[d].lock, ls->stack[d].name,
			    ls->stack[d].site, what);
}

void keel__lock_check_serve(void)
{
	struct keel__lockstate *ls = &keel__locks;

	if (likely(!ls->depth) || !checking())
		return;
	report_lock(R_SERVE, ls->stack[0].lock, ls->stack[0].name,
		    ls->stack[0].site,
		    "keel_serve() while holding a lock: messages would run "
		    "inside the critical section");
}

void keel__lock_check_exit(const char *who)
{
	struct keel__lockstate *ls = &keel__locks;

	if (likely(!ls->depth) || !checking())
		return;
	report_lock(R_EXIT, ls->stack[0].lock, ls->stack[0].name,
		    ls->stack[0].site, who);
}
