/*
 * keel/once.h: one-time initialisation that survives its owner dying, being
 * cancelled or hanging, and where a stale owner cannot publish.
 *
 * The first caller of keel_once() claims the once and runs init; the
 * others wait. Init publishes its value with keel_claim_publish(); from
 * then on keel_once_value() is one acquire load. If the owner's thread
 * ends (any way, including an exit that runs no cleanup), a waiter notices
 * within KEEL_ONCE_POLL and claims it again; if the owner is alive but
 * holds the claim past its deadline, a waiter presumes it hung and claims
 * it again. Each claim has a generation: a stale owner's publish fails
 * with -ESTALE, so exactly one value is ever published. Init that fails
 * frees the claim for the next caller; only its own caller sees the error.
 *
 * keel_once_shared_t is the same across processes, in MAP_SHARED memory,
 * publishing a 63-bit handle or offset rather than a pointer.
 */
#ifndef KEEL_ONCE_H
#define KEEL_ONCE_H

#include <pthread.h>
#include <stdint.h>

#include "common.h"
#include "lock.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Init runs shielded from its caller's cancellation, to the end (or to
 * the claim's deadline). */
#define KEEL_ONCE_ANCHOR 0x01

/* How often a waiter looks at the owner: the bound on noticing its death. */
#define KEEL_ONCE_POLL KEEL_MS(10)

/* Defaults for keel_once_opts. */
#define KEEL_ONCE_DEADLINE KEEL_SEC(15)
#define KEEL_ONCE_MAX_WAIT_EXTRA KEEL_SEC(15)

/* Lifelines per once: how many owners (hung ones included) at a time can
 * be watched for death. */
#define KEEL__ONCE_LIFELINES 4

/**
 * typedef keel_once_t - a reclaimable once.
 *
 * One 64-bit word (the state and the claim's generation, or the published
 * pointer itself), the current owner's record, and the lifelines its owners hold.
 * Initialise with KEEL_ONCE_INIT (or zero it). It must outlive every call
 * on it, stale owners' included.
 */
/* The word, then the owner's record (written after its claim, read
 * against k_gen): the same in both kinds of once. They are 64-bit
 * atomics, so they are 8-aligned on every target: i386 aligns a uint64_t
 * to 4 only, where a load could straddle a cache line and tear (64-bit
 * targets, and wasm32, align it to 8 already: no change there). */
#if defined(__GNUC__)
#define KEEL__ALIGN8 __attribute__((aligned(8)))
#else
#define KEEL__ALIGN8
#endif
#define KEEL__ONCE_RECORD_FIELDS                                           \
	uint64_t k_word KEEL__ALIGN8;                                      \
	uint64_t k_gen;                                                    \
	int64_t k_started;                                                 \
	uint64_t k_thread;                                                 \
	int32_t k_pid;                                                     \
	int32_t k_life;

typedef struct keel_once {
	KEEL__ONCE_RECORD_FIELDS
	/* Waiters, and the lifelines (set up on first use). */
	void *k_waitq;
	uint32_t k_qlock;
	uint32_t k_lstate;
	uint32_t k_watch; /* 1 while a waiter looks at the owner's lifeline */
	uint32_t k_reserved;
	pthread_mutex_t k_lifeline[KEEL__ONCE_LIFELINES];
} keel_once_t;

#define KEEL_ONCE_INIT { 0 }

/**
 * typedef keel_once_shared_t - a reclaimable once in memory shared by
 * processes.
 *
 * Set up with keel_once_shared_init() by one process before any uses it.
 */
typedef struct keel_once_shared {
	KEEL__ONCE_RECORD_FIELDS
	uint32_t k_magic;
	uint32_t k_reserved;
	pthread_mutex_t k_lifeline[KEEL__ONCE_LIFELINES];
} keel_once_shared_t;

#if defined(__STDC_VERSION__) && __STDC_VERSION__ >= 201112L
_Static_assert(_Alignof(keel_once_t) >= 8 && _Alignof(keel_once_shared_t) >= 8,
	       "a once's 64-bit atomics are 8-aligned");
#endif

/* The claim an init runs under; valid until init returns. */
typedef struct keel_claim keel_claim_t;

/* Init: build the value, publish it with keel_claim_publish() (or
 * keel_claim_publish_handle()), return 0; or return a negative error. */
typedef int (*keel_init_fn)(keel_claim_t *claim, void *arg);

/**
 * struct keel_once_opts - how long to trust an owner and to wait; zero
 * means the default.
 * @deadline: a duration: an owner holding the claim longer is presumed
 *            hung, and a waiter claims the once again. Default 15 s. Set
 *            it above the slowest legitimate init: a premature reclaim
 *            runs two inits at once (only one publishes).
 * @max_wait: a duration: a waiter that has waited this long returns
 *            -ETIMEDOUT. Default deadline + 15 s; KEEL_FOREVER: no limit.
 *            Less than @deadline is -EINVAL: a waiter must be able to wait
 *            out a hung owner.
 * @level:    the once's rank as a lock (1 to KEEL_LEVEL_MAX), or 0: none.
 *            A ranked once is checked like taking a lock of that level,
 *            and init runs as if holding it.
 * @flags:    KEEL_ONCE_ANCHOR.
 * @name:     for reports; default "keel_once".
 */
typedef struct keel_once_opts {
	keel_time_t deadline;
	keel_time_t max_wait;
	unsigned level;
	unsigned flags;
	const char *name;
} keel_once_opts;

/**
 * keel_once_at() - run init once, or get the value it published.
 * @o:     the once.
 * @init:  run by the caller that claims the once, with its claim.
 * @arg:   passed to @init.
 * @opts:  may be NULL for the defaults.
 * @value: where the published value is stored; may be NULL.
 * @site:  the call site, for reports (keel_once() passes it).
 *
 * Done already: returns the value at once. Free: claims it and runs
 * @init. Claimed: waits, watching the owner: if its thread has ended, or
 * it has held the claim past @opts->deadline, claims it again (the next
 * init sees keel_claim_prev_owner_died()). An init that fails frees the
 * claim; an init whose claim went stale makes its caller wait for the
 * value the current claim publishes. Waiting is a cancellation point.
 *
 * Context: a task (adopted if needed); blocks while another caller's init
 * runs, up to @opts->max_wait.
 * Return: 0 and the value; @init's error, to its own caller only (an init
 * returning 0 without publishing gives -EPROTO); -EDEADLK if the calling
 * thread's own init is running on @o, or on the main JavaScript thread of
 * a WebAssembly program (which must not wait) while another's runs;
 * -ETIMEDOUT after max_wait;
 * -ECANCELED if the caller was cancelled while waiting; -EINVAL if @o or
 * @init is NULL or @opts is invalid (negative, max_wait < deadline, level
 * above KEEL_LEVEL_MAX, unknown flags), whether or not the once is done;
 * -EOVERFLOW if the generations are used up; -ENOMEM.
 */
KEEL_API int keel_once_at(keel_once_t *o, keel_init_fn init, void *arg,
			  const keel_once_opts *opts, void **value,
			  const char *site);

#define keel_once(o, init, arg, opts, value)                               \
	keel_once_at((o), (init), (arg), (opts), (value), KEEL_SITE)

/**
 * keel_once_value() - the published value, if the once is done.
 * @o: the once.
 *
 * One acquire load and a sign test, inlined: with the caller's own NULL
 * test, the same code as a hand-written load of a published pointer. A
 * value read here is fully built: what init wrote before publishing is
 * visible.
 *
 * Context: any thread; never blocks.
 * Return: the value, or NULL if not done yet.
 */
static inline void *keel_once_value(const keel_once_t *o)
{
	int64_t w = (int64_t)__atomic_load_n(&o->k_word, __ATOMIC_ACQUIRE);

	return w > 0 ? (void *)(uintptr_t)w : (void *)0;
}

/**
 * keel_claim_publish() - publish init's value, if the claim is current.
 * @claim: init's claim.
 * @value: the value: any pointer but NULL whose top bit is clear on a
 *         64-bit target (every ordinary pointer; not one tagged in its
 *         top byte); any pointer but NULL on a 32-bit target.
 *
 * One compare-and-swap: it succeeds only while the claim is the current
 * one. On -ESTALE another caller holds the once now: init must tear down
 * what it built (its caller will get the winner's value).
 *
 * Context: the init the claim was given to.
 * Return: 0; -ESTALE if the claim is no longer current; -EALREADY if this
 * claim published already; -EINVAL if @claim is NULL or is a shared once's
 * claim, or @value is NULL or (64-bit targets) has its top bit set.
 */
KEEL_API int keel_claim_publish(keel_claim_t *claim, void *value);

/**
 * keel_claim_publish_handle() - publish a shared once's value.
 * @claim:  init's claim, from keel_once_shared().
 * @handle: the value: an offset or handle below 2^63 - 1, never a
 *          pointer (another process's pointer means nothing here).
 *
 * Context: the init the claim was given to.
 * Return: 0; -ESTALE if the claim is no longer current; -EALREADY if this
 * claim published already; -EINVAL if @claim is NULL or not a shared
 * once's claim, or @handle is 2^63 - 1 or above.
 */
KEEL_API int keel_claim_publish_handle(keel_claim_t *claim, uint64_t handle);

/**
 * keel_claim_is_current() - whether a claim is still the once's owner.
 * @claim: init's claim.
 *
 * Context: the init the claim was given to; never blocks.
 * Return: 1 if it is, 0 if another caller has claimed the once since.
 */
KEEL_API int keel_claim_is_current(const keel_claim_t *claim);

/**
 * keel_claim_generation() - the claim's generation: a fencing token.
 * @claim: init's claim.
 *
 * Every claim of a once gets a larger generation than the ones before it.
 * Pass it to outside systems that must refuse a stale owner's writes.
 *
 * Context: the init the claim was given to; never blocks.
 * Return: the generation, 1 or more.
 */
KEEL_API uint64_t keel_claim_generation(const keel_claim_t *claim);

/**
 * keel_claim_prev_owner_died() - whether this claim took over from an
 * owner that did not finish.
 * @claim: init's claim.
 *
 * True when the previous owner's thread or process ended, it was presumed
 * hung, or it was cancelled: it may have left partial state to clean up.
 * False on a first claim and after an init that failed with an error.
 *
 * Context: the init the claim was given to; never blocks.
 * Return: 1 or 0.
 */
KEEL_API int keel_claim_prev_owner_died(const keel_claim_t *claim);

/**
 * keel_once_shared_init() - set up a shared once in MAP_SHARED memory.
 * @o: the once, in memory every process using it maps.
 *
 * Call it once, in one process, before any process uses @o. The memory
 * must stay mapped while any process may still use it (a stale owner
 * included).
 *
 * Context: any thread; never blocks.
 * Return: 0; -EINVAL if @o is NULL; an error from setting up its
 * process-shared robust mutexes (-ENOTSUP where they are missing).
 */
KEEL_API int keel_once_shared_init(keel_once_shared_t *o);

/**
 * keel_once_shared_at() - keel_once() across processes.
 * @o:     a shared once set up by keel_once_shared_init().
 * @init:  as for keel_once(); it publishes with keel_claim_publish_handle().
 * @arg:   passed to @init.
 * @opts:  as for keel_once().
 * @value: where the published handle is stored; may be NULL.
 * @site:  the call site (keel_once_shared() passes it).
 *
 * An owner's death (its thread's or its whole process's) is noticed within
 * KEEL_ONCE_POLL; a stopped process counts as hung. Waiting is a
 * cancellation point, noticed within KEEL_ONCE_POLL.
 *
 * Context: a task (adopted if needed); blocks while another caller's init
 * runs, up to @opts->max_wait.
 * Return: as keel_once_at(); -EINVAL also if @o was not set up.
 */
KEEL_API int keel_once_shared_at(keel_once_shared_t *o, keel_init_fn init,
				 void *arg, const keel_once_opts *opts,
				 uint64_t *value, const char *site);

#define keel_once_shared(o, init, arg, opts, value)                        \
	keel_once_shared_at((o), (init), (arg), (opts), (value), KEEL_SITE)

/**
 * keel_once_shared_value() - a shared once's handle, if it is done.
 * @o:     the shared once.
 * @value: where the handle is stored.
 *
 * Context: any thread; never blocks.
 * Return: 1 and the handle if done, 0 if not.
 */
static inline int keel_once_shared_value(const keel_once_shared_t *o,
					 uint64_t *value)
{
	uint64_t w = __atomic_load_n(&o->k_word, __ATOMIC_ACQUIRE);

	if ((int64_t)w <= 0)
		return 0;
	*value = w - 1;
	return 1;
}

#ifdef __cplusplus
}
#endif

#endif /* KEEL_ONCE_H */
