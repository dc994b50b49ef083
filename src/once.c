/*
 * once.c: reclaimable once, in one process and across processes.
 *
 * STATE MACHINE (k_word)
 *   FREE(g, d)  no owner. g is the last claim's generation (0: none yet);
 *               d is set when that claim ended without finishing (its
 *               owner died, was presumed hung, or was cancelled).
 *   BUSY(g)     claim g's owner is running init.
 *   DONE(v)     v is published; final.
 *   The word read as a signed number: 0 is FREE(0) (so a zeroed once is
 *   ready); positive is DONE, the word being the pointer itself (in one
 *   process) or the handle + 1 (shared); negative is FREE or BUSY:
 *   1 << 63 | g << 3 | d << 2 | tag (0 FREE, 1 BUSY), g below 2^60. So the
 *   fast path, keel_once_value(), is a load and a sign test, which a
 *   caller's own NULL test absorbs: the same code as a hand-written
 *   acquire load of a published pointer. (Published pointers must read as
 *   positive: NULL, and 64-bit pointers with the top bit set, as top-byte
 *   tagging on AArch64 can give, are refused; a 32-bit pointer, widened
 *   with zeros, is positive whatever its top bit.)
 *
 *   claim:    FREE(g, d) -> BUSY(g + 1)  CAS; the caller owns claim g + 1
 *                                         (prev_owner_died = d)
 *   reclaim:  BUSY(g)    -> BUSY(g + 1)  CAS, by a waiter that found owner g
 *                                         dead or past its deadline
 *                                         (prev_owner_died = 1)
 *   publish:  BUSY(g)    -> DONE(v)      CAS, by owner g
 *   fail:     BUSY(g)    -> FREE(g, c)   CAS, by owner g whose init failed
 *                                         (c: it was cancelled)
 * Every transition out of BUSY(g) is a CAS from exactly BUSY(g), so a stale
 * owner (one whose g is no longer the word's) can neither publish nor free
 * a newer claim: its publish gets -ESTALE and its caller waits for the
 * current claim's value.
 *
 * THE OWNER'S RECORD
 * After its claim CAS the owner writes who it is (k_gen, k_started,
 * k_thread, k_pid, k_life) seqlock-style: k_gen = 0, the fields (release
 * stores), then k_gen = g with release; a reader loads k_gen (acquire),
 * the fields (acquire), and k_gen again. A reader takes the record as g's
 * only if k_gen reads g before and after the fields; otherwise (not
 * written yet, or being rewritten) it knows nothing about the owner and
 * times it from when it first saw BUSY(g). k_thread is the owner's task
 * handle, for whoever inspects the once; no decision rests on it.
 *
 * RECURSION
 * A caller finding BUSY(g) is itself claim g's owner only if its own init
 * for g is running further up its stack, and only the thread itself knows
 * that exactly: each thread keeps the claims it runs init for as a chain
 * of frames on its own stack (`running`, thread-local). No identity read
 * from the record could do this: a thread created after a dead owner was
 * joined gets the dead thread's stack and thread-local storage (glibc
 * caches stacks; Emscripten reuses malloc'd TLS), so an address would name
 * both, while the new thread's `running` starts empty whatever its address.
 *
 * LIFELINES
 * An owner's death is noticed through robust mutexes, which the kernel
 * marks "owner died" however a thread ends (a raw exit that runs no
 * cleanup included). Each once has a few; an owner locks one before its
 * claim CAS and unlocks it after its publish or fail CAS (or after a claim
 * CAS that failed). So:
 *   while the word is BUSY(g) and the record is g's, owner g holds
 *   lifeline k_life, or it has died.
 * A waiter probes with trylock: EBUSY means alive; success (0, or
 * EOWNERDEAD made consistent) means the owner does not hold it, so if the
 * word and record still say g, owner g is dead, and the waiter reclaims
 * with that lifeline as its own. (A lifeline found dead by a claimer
 * taking a fresh one is made consistent and used: if it was a current
 * owner's, that owner's probers now find it free, which reads as dead too.)
 * A hung owner keeps its lifeline; its reclaimer takes another. With all
 * taken, an owner goes without one and only its deadline covers it. In a
 * forked child, an owner recorded with another pid is a parent's thread:
 * dead here.
 * Not every system's robust mutexes report a dead owner (Emscripten's
 * never do), so a thread also keeps the lifelines it holds in a
 * thread-local list (`held`), and keel's thread-exit hook unlocks them as
 * the thread ends (pthread_exit, cancellation, return from a thread that
 * ended inside init): its probers then find them free, which reads as
 * dead, as above. The hook also wakes the once's waiters, which look
 * again at once instead of at their next poll. Only a raw exit that runs
 * no hook is left to the robust mutexes, and it exists only where they
 * work. A thread holding more than HELD_MAX at once goes without the
 * extra ones (its deadline covers it).
 *
 * WAITING
 * In one process a waiter queues a node on the once and sleeps on its
 * task's parker until min(now + KEEL_ONCE_POLL, the owner's deadline, its
 * own max_wait): publish and fail wake every node; cancellation wakes the
 * parker. Across processes a waiter sleeps on the word (a shared futex)
 * for at most KEEL_ONCE_POLL at a time and checks its cancellation at each
 * wake-up.
 */
#include <sched.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"

#define STATE_BIT (UINT64_C(1) << 63)
#define TAG_FREE 0u
#define TAG_BUSY 1u
#define TAG_DONE 2u /* not stored: any positive word */
#define TAG(w)                                                             \
	((int64_t)(w) > 0 ? TAG_DONE : (unsigned)((w) & 3))
#define GEN(w) (((w) & ~STATE_BIT) >> 3)
#define DIED(w) ((unsigned)((w) >> 2 & 1))
#define WORD(g, d, tag)                                                    \
	(STATE_BIT | (uint64_t)(g) << 3 | (uint64_t)(d) << 2 | (tag))
#define GEN_MAX ((UINT64_C(1) << 60) - 1)

#define ONCE_SHARED_MAGIC 0x6b6f6e63u /* "konc" */

#define LS_NONE 0  /* lifelines not set up */
#define LS_BUSY 1  /* being set up */
#define LS_READY 2
#define LS_FAILED 3 /* could not be: go without */

/* How often a waiter looks at the owner (tests lengthen it so that a lost
 * wake-up shows as a hang). */
_Atomic keel_time_t keel__once_poll = KEEL_ONCE_POLL;

/* The claims this thread is running init for, innermost first (see
 * RECURSION above). */
struct running {
	const uint64_t *word;
	uint64_t gen;
	const struct running *up;
};

static KEEL_TLS const struct running *running;

/* 1 if this thread is running init for claim gen of the once at word. */
static int running_on(const uint64_t *word, uint64_t gen)
{
	for (const struct running *r = running; r; r = r->up)
		if (r->word == word && r->gen == gen)
			return 1;
	return 0;
}

/* ---- A once, whichever kind ------------------------------------------------ */

/* The once's 64-bit atomics, 8-aligned on every target (once.h): said in
 * their type, so that i386 compilers need not assume 4. */
typedef uint64_t u64_atom KEEL__ALIGN8;
typedef int64_t i64_atom KEEL__ALIGN8;

struct ov {
	u64_atom *word;
	u64_atom *gen;
	i64_atom *started;
	u64_atom *thread;
	int32_t *pid;
	int32_t *life;
	pthread_mutex_t *lifeline;
	uint32_t *lstate; /* NULL: set up by keel_once_shared_init() */
	void **waitq;     /* NULL: shared (no parkers across processes) */
	uint32_t *qlock;
	uint32_t *watch;  /* NULL: shared (every waiter looks) */
	int shared;
};

/* The lifelines this thread holds (see LIFELINES above), each with its
 * index in its once's array and whether the once is shared: enough to
 * find the once, whose waiters the exit hook wakes. (Small: keel's TLS
 * must fit the C library's reserve for dlopen().) */
#define HELD_MAX 8
static KEEL_TLS struct {
	pthread_mutex_t *m[HELD_MAX];
	uint8_t idx[HELD_MAX];
	uint8_t shared[HELD_MAX];
	unsigned n;
} held;

struct keel_claim {
	struct ov *ov;
	uint64_t gen;
	int prev_died;
	int published;
	uint64_t value;
};

struct record {
	int64_t started;
	int32_t pid;
	int32_t life;
};

static uint64_t word_load(const struct ov *v)
{
	return __atomic_load_n(v->word, __ATOMIC_ACQUIRE);
}

static int word_cas(const struct ov *v, uint64_t old, uint64_t new)
{
	return __atomic_compare_exchange_n(v->word, &old, new, 0,
					   __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}

/* The word's low 32 bits, which change at every transition: the futex. */
static _Atomic uint32_t *word_futex(const struct ov *v)
{
	char *p = (char *)v->word;

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
	p += 4;
#endif
	return (_Atomic uint32_t *)(void *)p;
}

static void record_write(const struct ov *v, uint64_t gen, int life,
			 keel_time_t started, keel_task_t owner)
{
	/* Release stores for the fields, acquire loads in the reader: a
	 * reader that sees any of them sees the k_gen = 0 before them. */
	__atomic_store_n(v->gen, 0, __ATOMIC_RELAXED);
	__atomic_store_n(v->started, started, __ATOMIC_RELEASE);
	__atomic_store_n(v->thread, (uint64_t)owner, __ATOMIC_RELEASE);
	__atomic_store_n(v->pid, (int32_t)getpid(), __ATOMIC_RELEASE);
	__atomic_store_n(v->life, life, __ATOMIC_RELEASE);
	__atomic_store_n(v->gen, gen, __ATOMIC_RELEASE);
}

/* 1 if the record is claim gen's, read into r. */
static int record_read(const struct ov *v, uint64_t gen, struct record *r)
{
	uint64_t g1 = __atomic_load_n(v->gen, __ATOMIC_ACQUIRE), g2;

	r->started = __atomic_load_n(v->started, __ATOMIC_ACQUIRE);
	r->pid = __atomic_load_n(v->pid, __ATOMIC_ACQUIRE);
	r->life = __atomic_load_n(v->life, __ATOMIC_ACQUIRE);
	g2 = __atomic_load_n(v->gen, __ATOMIC_RELAXED);
	return g1 == gen && g2 == gen && r->life >= -1 &&
	       r->life < KEEL__ONCE_LIFELINES;
}

static void wake_all(const struct ov *v)
{
	if (v->shared)
		keel__futex_wake_shared(word_futex(v));
	else
		keel__q_wake(v->waitq, v->qlock, 1);
}

/* ---- Lifelines ------------------------------------------------------------- */

static int lifelines_setup(pthread_mutex_t *l, int pshared)
{
	pthread_mutexattr_t a;
	int rc, i = 0;

	if ((rc = pthread_mutexattr_init(&a)) != 0)
		return -rc;
	if ((rc = pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST)) == 0 &&
	    (!pshared ||
	     (rc = pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED)) == 0))
		for (; i < KEEL__ONCE_LIFELINES; i++)
			if ((rc = pthread_mutex_init(&l[i], &a)) != 0)
				break;
	pthread_mutexattr_destroy(&a);
	if (rc != 0)
		while (i-- > 0)
			pthread_mutex_destroy(&l[i]);
	return -rc;
}

/* 1 if the once's lifelines can be used (set up on first use). */
static int lifelines_ready(const struct ov *v)
{
	uint32_t s, z = LS_NONE;

	if (!v->lstate)
		return 1;
	s = __atomic_load_n(v->lstate, __ATOMIC_ACQUIRE);
	if (s == LS_READY)
		return 1;
	if (s == LS_NONE &&
	    __atomic_compare_exchange_n(v->lstate, &z, LS_BUSY, 0,
					__ATOMIC_ACQUIRE, __ATOMIC_RELAXED)) {
		s = lifelines_setup(v->lifeline, 0) == 0 ? LS_READY : LS_FAILED;
		__atomic_store_n(v->lstate, s, __ATOMIC_RELEASE);
		return s == LS_READY;
	}
	/* Another thread is setting them up: a few instructions. */
	while ((s = __atomic_load_n(v->lstate, __ATOMIC_ACQUIRE)) == LS_BUSY)
		sched_yield();
	return s == LS_READY;
}

/* Lock lifeline i without waiting: 1 if now held by the caller. */
static int lifeline_try(const struct ov *v, int i)
{
	pthread_mutex_t *m = &v->lifeline[i];
	int rc = pthread_mutex_trylock(m);

	if (rc == EOWNERDEAD) {
		/* Its holder died holding it: it is ours, and usable again. */
		pthread_mutex_consistent(m);
		rc = 0;
	}
	if (rc != 0)
		return 0;
	if (held.n == HELD_MAX) {
		pthread_mutex_unlock(m);
		return 0;
	}
	/* The exit hook must run for this thread to let go of it. */
	keel__tls_register();
	held.idx[held.n] = (uint8_t)i;
	held.shared[held.n] = (uint8_t)v->shared;
	held.m[held.n++] = m;
	return 1;
}

/* A lifeline for a new owner, not `avoid`: its index, or -1. */
static int lifeline_take(const struct ov *v, int avoid)
{
	if (!lifelines_ready(v))
		return -1;
	for (int i = 0; i < KEEL__ONCE_LIFELINES; i++)
		if (i != avoid && lifeline_try(v, i))
			return i;
	return -1;
}

static void lifeline_drop(const struct ov *v, int i)
{
	pthread_mutex_t *m;

	if (i < 0)
		return;
	m = &v->lifeline[i];
	for (unsigned j = held.n; j-- > 0;) {
		if (held.m[j] == m) {
			held.n--;
			held.m[j] = held.m[held.n];
			held.idx[j] = held.idx[held.n];
			held.shared[j] = held.shared[held.n];
			break;
		}
	}
	pthread_mutex_unlock(m);
}

/* Wake the waiters of the once whose lifeline `idx` is m. */
static void held_wake(pthread_mutex_t *m, unsigned idx, int shared)
{
	char *first = (char *)(m - idx);
	struct ov v = {0};

	if (shared) {
		keel_once_shared_t *o = (keel_once_shared_t *)(void *)(
			first - offsetof(keel_once_shared_t, k_lifeline));

		v.word = &o->k_word;
		v.shared = 1;
	} else {
		keel_once_t *o = (keel_once_t *)(void *)(
			first - offsetof(keel_once_t, k_lifeline));

		v.waitq = &o->k_waitq;
		v.qlock = &o->k_qlock;
	}
	wake_all(&v);
}

void keel__once_thread_exit(void)
{
	/* The thread's stack is gone: so are the frames `running` names. */
	running = NULL;
	/* The once outlives its owner's claim: its waiters are woken to
	 * find the lifeline free now, not at their next poll. */
	while (held.n > 0) {
		held.n--;
		pthread_mutex_unlock(held.m[held.n]);
		held_wake(held.m[held.n], held.idx[held.n],
			  held.shared[held.n]);
	}
}

/* ---- Claims ---------------------------------------------------------------- */

static int publish(keel_claim_t *c, uint64_t done)
{
	struct ov *v = c->ov;

	if (c->published)
		return -EALREADY;
	if (!word_cas(v, WORD(c->gen, 0, TAG_BUSY), done))
		return -ESTALE;
	c->published = 1;
	c->value = done;
	wake_all(v);
	return 0;
}

int keel_claim_publish(keel_claim_t *c, void *value)
{
	/* A done word is the pointer itself, so it must read as positive
	 * as a 64-bit number: a 64-bit pointer needs its top bit clear; a
	 * 32-bit one, widened with zeros, always reads positive unless NULL
	 * (so no 32-bit pointer is refused for its top bit). */
	if (!c || c->ov->shared || !value ||
	    (int64_t)(uint64_t)(uintptr_t)value <= 0)
		return -EINVAL;
	return publish(c, (uint64_t)(uintptr_t)value);
}

int keel_claim_publish_handle(keel_claim_t *c, uint64_t handle)
{
	if (!c || !c->ov->shared || handle >= (UINT64_C(1) << 63) - 1)
		return -EINVAL;
	return publish(c, handle + 1);
}

int keel_claim_is_current(const keel_claim_t *c)
{
	return c && !c->published &&
	       word_load(c->ov) == WORD(c->gen, 0, TAG_BUSY);
}

uint64_t keel_claim_generation(const keel_claim_t *c)
{
	return c ? c->gen : 0;
}

int keel_claim_prev_owner_died(const keel_claim_t *c)
{
	return c ? c->prev_died : 0;
}

/* ---- keel_once ------------------------------------------------------------- */

struct call {
	keel_init_fn init;
	void *arg;
	keel_time_t deadline, max_wait;
	unsigned level, flags;
	const char *name, *site;
	struct keel__task *t;
	keel_mutex_t rank; /* the once as a ranked resource */
	int watching;      /* this caller holds the once's watch */
};

/* Whether a call's arguments are valid (NULL opts: the defaults). Checked
 * before the once's word, so that a call refused while the once is not
 * done is refused once it is too; a few compares, on a path that is not
 * the inlined keel_once_value(). A zero max_wait becomes deadline + 15 s
 * (or forever), never below deadline. */
static int args_valid(keel_init_fn init, const keel_once_opts *o)
{
	keel_time_t deadline;

	if (!init)
		return 0;
	if (!o)
		return 1;
	if (o->deadline < 0 || o->max_wait < 0 || o->level > KEEL_LEVEL_MAX ||
	    (o->flags & ~KEEL_ONCE_ANCHOR))
		return 0;
	deadline = o->deadline ? o->deadline : KEEL_ONCE_DEADLINE;
	return !o->max_wait || o->max_wait >= deadline;
}

/* Apply valid opts (args_valid() said so). */
static void opts_read(struct call *k, const keel_once_opts *o)
{
	k->deadline = KEEL_ONCE_DEADLINE;
	k->max_wait = 0;
	k->level = 0;
	k->flags = 0;
	k->name = "keel_once";
	if (o) {
		if (o->deadline)
			k->deadline = o->deadline;
		k->max_wait = o->max_wait;
		k->level = o->level;
		k->flags = o->flags;
		if (o->name)
			k->name = o->name;
	}
	if (!k->max_wait)
		k->max_wait = k->deadline > KEEL_FOREVER - KEEL_ONCE_MAX_WAIT_EXTRA
				      ? KEEL_FOREVER
				      : k->deadline + KEEL_ONCE_MAX_WAIT_EXTRA;
}

/* Run init as owner of claim gen, holding lifeline life. 0: published
 * (*out set); 1: the claim went stale, look again; < 0: init's error. */
static int own(struct ov *v, struct call *k, uint64_t gen, int prev_died,
	       int life, uint64_t *out)
{
	keel_claim_t c = {v, gen, prev_died, 0, 0};
	keel_time_t started = keel_now();
	struct running self = {v->word, gen, running};
	int rc, shielded = 0, cancelled;

	record_write(v, gen, life, started, k->t->id);
	if (k->level)
		keel__rank_enter(&k->rank, k->site);
	if ((k->flags & KEEL_ONCE_ANCHOR) &&
	    keel_shield_begin(started > KEEL_FOREVER - k->deadline
				      ? KEEL_FOREVER
				      : started + k->deadline) == 0)
		shielded = 1;
	running = &self;
	rc = k->init(&c, k->arg);
	running = self.up;
	if (shielded)
		keel_shield_end();
	if (k->level)
		keel__rank_leave(&k->rank);
	if (c.published) {
		lifeline_drop(v, life);
		*out = c.value;
		return 0;
	}
	cancelled = rc == -ECANCELED || keel__check(k->t) < 0;
	if (rc >= 0)
		rc = -EPROTO; /* returned without publishing */
	/* Free the claim, if it is still ours. */
	if (word_cas(v, WORD(gen, 0, TAG_BUSY), WORD(gen, cancelled, TAG_FREE))) {
		lifeline_drop(v, life);
		wake_all(v);
		return rc;
	}
	lifeline_drop(v, life);
	return 1; /* stale: the current claim's value is the caller's */
}

/* ---- The watch -----------------------------------------------------------
 * While an init runs, its owner may die, and nothing wakes the waiters for
 * that: someone must look at its lifeline every KEEL_ONCE_POLL. In a once
 * of this process one waiter at a time does, the one holding the watch
 * (k_watch = 1); the others sleep until the claim changes, their own
 * max_wait or the owner's deadline (a thousand waiters polling each burnt
 * both CPUs of a two-CPU machine through a one-second init).
 *
 *   take:     a waiter about to sleep CASes k_watch 0 -> 1; if it wins, it
 *             sleeps at most a poll interval.
 *   release:  the holder, when it stops waiting for any reason (done,
 *             failed, timed out, cancelled, or about to claim), exchanges
 *             k_watch to 0 and wakes one queued waiter, which takes it.
 *             Any other waiter that stops waiting and finds the watch free
 *             wakes one too: the one woken to take it may have left.
 *   re-look:  a waiter that lost the take queues its node, then looks at
 *             k_watch again with an RMW and sleeps only if it is still 1.
 *             The release is an RMW of the same word: if it comes after
 *             the re-look, it acquires the node's queueing and its wake-up
 *             finds a node (this one or another, which takes the watch);
 *             if before, the re-look reads 0 and the waiter goes round to
 *             take the watch itself.
 * Shared onces have no queue to hand the watch through: every waiter there
 * looks, as before.
 */
static int watch_take(struct ov *v, struct call *k)
{
	uint32_t z = 0;

	if (!v->watch || k->watching)
		return 1;
	k->watching = __atomic_compare_exchange_n(v->watch, &z, 1, 0,
						  __ATOMIC_ACQ_REL,
						  __ATOMIC_RELAXED);
	return k->watching;
}

static void watch_release(struct ov *v, struct call *k)
{
	if (!v->watch)
		return;
	if (k->watching) {
		k->watching = 0;
		__atomic_exchange_n(v->watch, 0, __ATOMIC_ACQ_REL);
	} else if (__atomic_fetch_or(v->watch, 0, __ATOMIC_ACQ_REL) != 0) {
		return; /* someone holds it */
	}
	keel__q_wake(v->waitq, v->qlock, 0);
}

/* Sleep until woken, `until`, or cancelled; -ECANCELED, -EDEADLK (a
 * thread that must not block) or 0. */
static int wait_a_while(struct ov *v, struct call *k, uint64_t w,
			keel_time_t until)
{
	int rc;

	if (v->shared) {
		keel__futex_wait_shared(word_futex(v), (uint32_t)w, until);
		rc = keel__check(k->t);
		return rc == -ECANCELED ? rc : 0;
	}
	{
		struct keel__qnode n = {.t = k->t};

		keel__qlock(v->qlock);
		keel__q_append(v->waitq, &n);
		keel__qunlock(v->qlock);
		/* Queued first: a change after this look wakes the node. The
		 * look is an RMW of the word, not a load: a load could be
		 * answered before the node's link left this CPU's store
		 * buffer, while the publisher's CAS and its look at the queue
		 * (empty) came in between, and nobody would wake us. As an RMW
		 * it is ordered with the publisher's CAS on the one word: if
		 * it comes first, the CAS acquires it and the publisher sees
		 * the node; if later, it reads the new word. */
		rc = 0;
		if (__atomic_fetch_or(v->word, 0, __ATOMIC_ACQ_REL) == w &&
		    (k->watching ||
		     __atomic_fetch_or(v->watch, 0, __ATOMIC_ACQ_REL) != 0))
			while (!__atomic_load_n(&n.woken, __ATOMIC_ACQUIRE) &&
			       rc == 0)
				rc = keel__wait(k->t, until, 1, "once");
		keel__qlock(v->qlock);
		if (!__atomic_load_n(&n.woken, __ATOMIC_RELAXED))
			keel__q_remove(v->waitq, &n);
		keel__qunlock(v->qlock);
		return rc == -ECANCELED || rc == -EDEADLK ? rc : 0;
	}
}

static keel_time_t min_time(keel_time_t a, keel_time_t b)
{
	return a < b ? a : b;
}

static keel_time_t add_time(keel_time_t t, keel_time_t d)
{
	return t > KEEL_FOREVER - d ? KEEL_FOREVER : t + d;
}

/* Claim, wait or return, until done, failed, timed out or cancelled. */
static int once_loop(struct ov *v, struct call *k, keel_time_t give_up,
		     uint64_t *out)
{
	keel_time_t seen_at = 0;
	uint64_t seen_gen = 0;
	int rc;

	for (;;) {
		uint64_t w = word_load(v), g = GEN(w);
		struct record r;
		int valid, dead = 0, hung = 0, life = -1;
		keel_time_t now, reclaim_at, until;

		if (TAG(w) == TAG_DONE) {
			*out = w;
			return 0;
		}
		if (TAG(w) == TAG_FREE) {
			if (g >= GEN_MAX)
				return -EOVERFLOW;
			watch_release(v, k);
			life = lifeline_take(v, -1);
			if (!word_cas(v, w, WORD(g + 1, 0, TAG_BUSY))) {
				lifeline_drop(v, life);
				continue;
			}
			rc = own(v, k, g + 1, (int)DIED(w), life, out);
			if (rc <= 0)
				return rc;
			continue;
		}
		/* BUSY(g): our own init for g, further up this stack? */
		if (running_on(v->word, g))
			return -EDEADLK;
		/* Someone else's: look at its owner. */
		valid = record_read(v, g, &r);
		now = keel_now();
		if (valid && !v->shared && r.pid != (int32_t)getpid()) {
			dead = 1; /* a parent's thread: not in this process */
		} else if (valid && r.life >= 0 && lifelines_ready(v) &&
			   lifeline_try(v, r.life)) {
			struct record again;

			/* Its lifeline is free: dead, if still its claim. */
			if (word_load(v) == w && record_read(v, g, &again) &&
			    again.life == r.life) {
				dead = 1;
				life = r.life;
			} else {
				lifeline_drop(v, r.life);
				continue;
			}
		}
		if (!valid) {
			if (seen_gen != g) {
				seen_gen = g;
				seen_at = now;
			}
			r.started = seen_at;
		}
		reclaim_at = add_time(r.started, k->deadline);
		/* Presumed hung once past its deadline, if that came before
		 * this waiter's own max_wait: a waiter that wakes up late
		 * does what it would have done on time. */
		if (!dead && now >= reclaim_at && reclaim_at <= give_up)
			hung = 1;
		if (dead || hung) {
			if (g >= GEN_MAX) {
				lifeline_drop(v, life);
				return -EOVERFLOW;
			}
			watch_release(v, k);
			if (life < 0)
				life = lifeline_take(v, valid ? r.life : -1);
			if (!word_cas(v, w, WORD(g + 1, 0, TAG_BUSY))) {
				lifeline_drop(v, life);
				continue;
			}
			rc = own(v, k, g + 1, 1, life, out);
			if (rc <= 0)
				return rc;
			continue;
		}
		if (now >= give_up)
			return -ETIMEDOUT;
		/* Only the watcher (and every waiter of a shared once) wakes
		 * to look at the owner's lifeline; the others sleep until the
		 * claim changes, the owner's deadline or their own. */
		until = min_time(reclaim_at, give_up);
		if (watch_take(v, k))
			until = min_time(until,
					 add_time(now, load_relaxed(&keel__once_poll)));
		if ((rc = wait_a_while(v, k, w, until)) < 0)
			return rc;
	}
}

/* The slow path, for a once not done when the caller looked; the
 * arguments are valid. */
static int once_core(struct ov *v, keel_init_fn init, void *arg,
		     const keel_once_opts *opts, uint64_t *out, const char *site)
{
	struct call k = {.init = init, .arg = arg, .site = site};
	int rc;

	opts_read(&k, opts);
	if (!(k.t = keel__self()))
		return -ENOMEM;
	if (k.level) {
		keel__rank_token(&k.rank, k.level, k.name, v->word);
		keel__rank_check(&k.rank, site);
	}
	keel__lock_check_blocking("keel_once()");
	rc = once_loop(v, &k, add_time(keel_now(), k.max_wait), out);
	watch_release(v, &k);
	return rc;
}

static void ov_of(keel_once_t *o, struct ov *v)
{
	*v = (struct ov){&o->k_word, &o->k_gen, &o->k_started, &o->k_thread,
			 &o->k_pid, &o->k_life,
			 o->k_lifeline, &o->k_lstate, &o->k_waitq, &o->k_qlock,
			 &o->k_watch, 0};
}

/* keel_once() on a once not done when it looked: out of line, so that the
 * done path sets up no frame. */
static __attribute__((noinline)) int once_slow(keel_once_t *o,
					       keel_init_fn init, void *arg,
					       const keel_once_opts *opts,
					       void **value, const char *site)
{
	struct ov v;
	uint64_t w;
	int rc;

	ov_of(o, &v);
	if ((rc = once_core(&v, init, arg, opts, &w, site)) < 0)
		return rc;
	if (value)
		*value = (void *)(uintptr_t)w;
	return 0;
}

int keel_once_at(keel_once_t *o, keel_init_fn init, void *arg,
		 const keel_once_opts *opts, void **value, const char *site)
{
	uint64_t w;

	if (!o || !args_valid(init, opts))
		return -EINVAL;
	w = __atomic_load_n(&o->k_word, __ATOMIC_ACQUIRE);
	if (TAG(w) != TAG_DONE)
		return once_slow(o, init, arg, opts, value, site);
	if (value)
		*value = (void *)(uintptr_t)w;
	return 0;
}

/* ---- Across processes ------------------------------------------------------- */

int keel_once_shared_init(keel_once_shared_t *o)
{
	int rc;

	if (!o)
		return -EINVAL;
	memset(o, 0, sizeof *o);
	if ((rc = lifelines_setup(o->k_lifeline, 1)) < 0)
		return rc == -ENOSYS ? -ENOTSUP : rc;
	__atomic_store_n(&o->k_magic, ONCE_SHARED_MAGIC, __ATOMIC_RELEASE);
	return 0;
}

int keel_once_shared_at(keel_once_shared_t *o, keel_init_fn init, void *arg,
			const keel_once_opts *opts, uint64_t *value,
			const char *site)
{
	struct ov v;
	uint64_t w;
	int rc;

	if (!o || __atomic_load_n(&o->k_magic, __ATOMIC_ACQUIRE) !=
			  ONCE_SHARED_MAGIC ||
	    !args_valid(init, opts))
		return -EINVAL;
	w = __atomic_load_n(&o->k_word, __ATOMIC_ACQUIRE);
	if (TAG(w) != TAG_DONE) {
		v = (struct ov){&o->k_word, &o->k_gen, &o->k_started, &o->k_thread,
				&o->k_pid, &o->k_life, o->k_lifeline, NULL,
				NULL, NULL, NULL, 1};
		if ((rc = once_core(&v, init, arg, opts, &w, site)) < 0)
			return rc;
	}
	if (value)
		*value = w - 1;
	return 0;
}
