/*
 * keel/lock.h: ranked locks.
 *
 * Every lock has a level. While a thread holds locks, it may take only a
 * lock of a strictly lower level than every ranked lock it holds (the
 * Julia runtime's rule). A taking that breaks the rule is reported before
 * the thread blocks on the lock, the first time it happens, so an
 * inversion is found on the run where it would have deadlocked, and on
 * every run before. The check is on in every build.
 *
 * Locks of level KEEL_LEVEL_LEARNED (0) declare no level: the order they
 * are taken in is learned at run time into a graph, and the first taking
 * that would close a cycle is reported, with the shortest cycle and the
 * site of each edge.
 *
 * Reports name the locks, their levels, where each was taken, the thread
 * and everything it holds. Then the policy applies: KEEL_LOCKCHECK=abort
 * (the default), report, or off, in the environment, or
 * keel_lockcheck_set(). Reports of the same pair of locks are made once.
 *
 * See docs/locks.md.
 */
#ifndef KEEL_LOCK_H
#define KEEL_LOCK_H

#include <stdio.h>

#include "common.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- Clang thread-safety attributes --------------------------------------
 * With clang -Wthread-safety, code that uses keel's locks is checked at
 * compile time: KEEL_GUARDED_BY(m) on data, KEEL_REQUIRES(m) on functions
 * that must be called with m held. */
#if defined(__clang__) && defined(__has_attribute)
#if __has_attribute(capability)
#define KEEL__TSA(x) __attribute__((x))
#endif
#endif
#ifndef KEEL__TSA
#define KEEL__TSA(x)
#endif
#define KEEL_CAPABILITY(x) KEEL__TSA(capability(x))
#define KEEL_GUARDED_BY(x) KEEL__TSA(guarded_by(x))
#define KEEL_PT_GUARDED_BY(x) KEEL__TSA(pt_guarded_by(x))
#define KEEL_REQUIRES(...) KEEL__TSA(requires_capability(__VA_ARGS__))
#define KEEL_REQUIRES_SHARED(...) KEEL__TSA(requires_shared_capability(__VA_ARGS__))
#define KEEL_ACQUIRE(...) KEEL__TSA(acquire_capability(__VA_ARGS__))
#define KEEL_ACQUIRE_SHARED(...) KEEL__TSA(acquire_shared_capability(__VA_ARGS__))
#define KEEL_RELEASE(...) KEEL__TSA(release_capability(__VA_ARGS__))
#define KEEL_RELEASE_SHARED(...) KEEL__TSA(release_shared_capability(__VA_ARGS__))
/* Releases a capability held either way (an rwlock's one unlock). */
#define KEEL_RELEASE_GENERIC(...) KEEL__TSA(release_generic_capability(__VA_ARGS__))
#define KEEL_TRY_ACQUIRE(...) KEEL__TSA(try_acquire_capability(__VA_ARGS__))
#define KEEL_TRY_ACQUIRE_SHARED(...) KEEL__TSA(try_acquire_shared_capability(__VA_ARGS__))
#define KEEL_EXCLUDES(...) KEEL__TSA(locks_excluded(__VA_ARGS__))
#define KEEL_ASSERT_CAPABILITY(x) KEEL__TSA(assert_capability(x))
#define KEEL_NO_THREAD_SAFETY_ANALYSIS KEEL__TSA(no_thread_safety_analysis)

/* ---- Levels and flags ---- */

#define KEEL_LEVEL_LEARNED 0   /* no declared level: order learned */
#define KEEL_LEVEL_LEAF 1      /* the lowest level; see KEEL_LOCK_LEAF */
#define KEEL_LEVEL_MAX 65535

#define KEEL_LOCK_LEAF 0x01      /* nothing may be taken while it is held */
#define KEEL_LOCK_ROOT 0x02      /* taken only with nothing held */
#define KEEL_LOCK_NOBLOCK 0x04   /* no keel blocking call while held */
#define KEEL_LOCK_NOALLOC 0x08   /* the holder must not allocate */
#define KEEL_LOCK_RECURSIVE 0x10 /* its holder may take it again */

/* The call site a lock was taken at, as one string constant. */
#define KEEL__STR2(x) #x
#define KEEL__STR(x) KEEL__STR2(x)
#define KEEL_SITE __FILE__ ":" KEEL__STR(__LINE__)

#define KEEL__LOCK_MAGIC 0x6b6c636bu /* "klck": initialised */

/* keel's own bits in k_flags, above the KEEL_LOCK_* flags. */
#define KEEL__LOCK_READY 0x8000   /* initialised (set by the initialisers) */
#define KEEL__LOCK_GRAPHED 0x4000 /* known to the lock graph as taken */
#define KEEL__LOCK_QUEUED 0x2000  /* a cancellable waiter may be queued */
#define KEEL__LOCK_TOKEN 0x1000   /* keel's stand-in for a ranked once */

/* The words every lock and unlock touches are the first 16 bytes; a
 * nested lock also reads the next 16 (its graph node and the parents it is
 * known to have been taken under). On the 64-bit targets whose malloc
 * aligns to 16, the type is aligned so that the first 16 always share one
 * cache line (and the first 32 do three times in four). */
#if (defined(__x86_64__) || defined(__aarch64__)) && defined(__GNUC__)
#define KEEL__LOCK_ALIGN __attribute__((aligned(16)))
#else
#define KEEL__LOCK_ALIGN
#endif

/* Mutexes and reader-writer locks share one layout, so the checker reads
 * either through the same fields. */
#define KEEL__LOCK_FIELDS                                                  \
	uint32_t k_state;                                                  \
	uint16_t k_level;                                                  \
	uint16_t k_flags;                                                  \
	void *k_owner;                                                     \
	uint32_t k_node;                                                   \
	uint32_t k_epoch;                                                  \
	uint64_t k_parents;                                                \
	const char *k_name;                                                \
	void *k_waitq;                                                     \
	uint32_t k_depth;                                                  \
	uint32_t k_qlock;                                                  \
	uint32_t k_magic;                                                  \
	uint32_t k_cwait;

#define KEEL__LOCK_INITIALIZER(level, name, flags)                         \
	{ 0, (level), (uint16_t)((flags) | KEEL__LOCK_READY), 0, 0, 0, 0,    \
	  (name), 0, 0, 0, KEEL__LOCK_MAGIC, 0 }

/**
 * typedef keel_mutex_t - a ranked mutual-exclusion lock.
 *
 * Caller-allocated; the fields are keel's. Initialise with KEEL_MUTEX_INIT
 * or keel_mutex_init(); a zeroed or destroyed one is reported when used.
 */
typedef struct KEEL_CAPABILITY("mutex") KEEL__LOCK_ALIGN keel_mutex {
	KEEL__LOCK_FIELDS
} keel_mutex_t;

#define KEEL_MUTEX_INIT_FLAGS(level, name, flags)                          \
	KEEL__LOCK_INITIALIZER(level, name, flags)
#define KEEL_MUTEX_INIT(level, name) KEEL_MUTEX_INIT_FLAGS(level, name, 0)

/**
 * typedef keel_rwlock_t - a ranked reader-writer lock (writers preferred).
 *
 * Initialise with KEEL_RWLOCK_INIT or keel_rwlock_init().
 */
typedef struct KEEL_CAPABILITY("rwlock") KEEL__LOCK_ALIGN keel_rwlock {
	KEEL__LOCK_FIELDS
} keel_rwlock_t;

#define KEEL_RWLOCK_INIT_FLAGS(level, name, flags)                         \
	KEEL__LOCK_INITIALIZER(level, name, flags)
#define KEEL_RWLOCK_INIT(level, name) KEEL_RWLOCK_INIT_FLAGS(level, name, 0)

/**
 * typedef keel_cond_t - a condition variable for keel mutexes.
 *
 * Initialise with KEEL_COND_INIT or keel_cond_init().
 */
typedef struct keel_cond {
	void *k_waiters;
	uint32_t k_qlock;
	uint32_t k_magic;
	uint64_t k_reserved[2];
} keel_cond_t;

#define KEEL_COND_INIT { 0, 0, KEEL__LOCK_MAGIC, { 0, 0 } }

/* The sizes are part of the ABI where pointers are 8 bytes; with 4-byte
 * pointers (wasm32, i386) the same fields take less, never more. */
#if defined(__STDC_VERSION__) && __STDC_VERSION__ >= 201112L
#if UINTPTR_MAX > 0xFFFFFFFFu
_Static_assert(sizeof(keel_mutex_t) == 64, "keel_mutex_t is 64 bytes");
_Static_assert(sizeof(keel_rwlock_t) == 64, "keel_rwlock_t is 64 bytes");
#else
_Static_assert(sizeof(keel_mutex_t) <= 64, "keel_mutex_t fits 64 bytes");
_Static_assert(sizeof(keel_rwlock_t) <= 64, "keel_rwlock_t fits 64 bytes");
#endif
_Static_assert(sizeof(keel_cond_t) <= 32, "keel_cond_t fits 32 bytes");
#endif

/* ---- Mutexes ---- */

/**
 * keel_mutex_init() - initialise a mutex.
 * @m:     the mutex.
 * @level: its level, 1 to KEEL_LEVEL_MAX, or KEEL_LEVEL_LEARNED (0).
 * @name:  for reports and the lock graph; kept by pointer.
 * @flags: KEEL_LOCK_* flags.
 *
 * Context: any thread; never blocks.
 * Return: 0; -EINVAL if @m or @name is NULL, @level is out of range, or
 * @flags has unknown bits or both LEAF and ROOT.
 */
KEEL_API int keel_mutex_init(keel_mutex_t *m, unsigned level, const char *name,
			     unsigned flags);

/**
 * keel_mutex_destroy() - destroy a mutex.
 * @m: the mutex; not held.
 *
 * Its edges in the lock graph are dropped, so a lock initialised later at
 * the same address starts fresh. A holder waiting in keel_cond_wait()
 * still holds it (it takes it back before returning).
 *
 * Context: any thread; never blocks.
 * Return: 0; -EBUSY if it is held, also while its holder waits in
 * keel_cond_wait() (reported too; nothing is destroyed); -EINVAL if it is
 * not an initialised mutex.
 */
KEEL_API int keel_mutex_destroy(keel_mutex_t *m);

/**
 * keel_mutex_lock_at() - take a mutex; use the keel_mutex_lock() macro.
 * @m:    the mutex.
 * @site: where it is taken (KEEL_SITE), for reports.
 *
 * The level check runs before blocking: taking a lock out of order, a
 * leaf's successor, a root with locks held, or a non-recursive lock again
 * is reported first; then, under the report policy, the lock is taken as
 * asked (the abort policy ends the process instead).
 *
 * Context: any thread; blocks until the lock is free; not a cancellation
 * point (see keel_mutex_lock_until()).
 */
KEEL_API void keel_mutex_lock_at(keel_mutex_t *m, const char *site)
	KEEL_ACQUIRE(m);
#define keel_mutex_lock(m) keel_mutex_lock_at((m), KEEL_SITE)

/**
 * keel_mutex_lock_until_at() - take a mutex, cancellably; use the
 * keel_mutex_lock_until() macro.
 * @m:        the mutex.
 * @deadline: absolute time to give up.
 * @site:     where it is taken (KEEL_SITE).
 *
 * Context: a task (adopted if needed); blocks; a cancellation point.
 * Return: 0 with the lock held; -ETIMEDOUT or -ECANCELED without it;
 * -ENOMEM if the thread could not be adopted.
 */
KEEL_API int keel_mutex_lock_until_at(keel_mutex_t *m, keel_time_t deadline,
				      const char *site)
	KEEL_TRY_ACQUIRE(0, m);
#define keel_mutex_lock_until(m, d) keel_mutex_lock_until_at((m), (d), KEEL_SITE)

/**
 * keel_mutex_trylock_at() - take a mutex if it is free; use the
 * keel_mutex_trylock() macro.
 * @m:    the mutex.
 * @site: where it is taken (KEEL_SITE).
 *
 * A trylock cannot deadlock, so it may go out of order: it is not checked
 * and adds no edge to the lock graph. Once taken, the lock counts in the
 * held stack like any other.
 *
 * Context: any thread; never blocks.
 * Return: 0 with the lock held; -EBUSY if it is held (by anyone).
 */
KEEL_API int keel_mutex_trylock_at(keel_mutex_t *m, const char *site)
	KEEL_TRY_ACQUIRE(0, m);
#define keel_mutex_trylock(m) keel_mutex_trylock_at((m), KEEL_SITE)

/**
 * keel_mutex_lock2_at() - take two mutexes of one level; use the
 * keel_mutex_lock2() macro.
 * @a:    a mutex.
 * @b:    another mutex of the same level.
 * @site: where they are taken (KEEL_SITE).
 *
 * The only way to hold two locks of one level: they are taken in address
 * order, so two threads doing this with the same pair cannot deadlock.
 * Release each with keel_mutex_unlock(), in any order.
 *
 * Context: any thread; blocks; not a cancellation point.
 */
KEEL_API void keel_mutex_lock2_at(keel_mutex_t *a, keel_mutex_t *b,
				  const char *site) KEEL_ACQUIRE(a, b);
#define keel_mutex_lock2(a, b) keel_mutex_lock2_at((a), (b), KEEL_SITE)

/**
 * keel_mutex_unlock_at() - release a mutex; use the keel_mutex_unlock()
 * macro.
 * @m:    the mutex, held by the calling thread.
 * @site: where it is released (KEEL_SITE).
 *
 * Unlock order is free. Releasing a lock the thread does not hold is
 * reported and does nothing.
 *
 * Context: the thread that holds it; never blocks.
 */
KEEL_API void keel_mutex_unlock_at(keel_mutex_t *m, const char *site)
	KEEL_RELEASE(m);
#define keel_mutex_unlock(m) keel_mutex_unlock_at((m), KEEL_SITE)

/**
 * keel_mutex_held() - does the calling thread hold the mutex?
 * @m: the mutex.
 *
 * Checks the owner, not just that someone holds it.
 *
 * Context: any thread; never blocks.
 * Return: 1 if the calling thread holds it, else 0.
 */
KEEL_API int keel_mutex_held(const keel_mutex_t *m);

/**
 * keel_mutex_assert_held_at() - report unless the calling thread holds it;
 * use the keel_mutex_assert_held() macro.
 * @m:    the mutex.
 * @site: where the assertion is (KEEL_SITE).
 *
 * Context: any thread; never blocks.
 */
KEEL_API void keel_mutex_assert_held_at(const keel_mutex_t *m,
					const char *site)
	KEEL_ASSERT_CAPABILITY(m);
#define keel_mutex_assert_held(m) keel_mutex_assert_held_at((m), KEEL_SITE)

/* ---- Reader-writer locks ---- */

/**
 * keel_rwlock_init() - initialise a reader-writer lock.
 * @l:     the lock.
 * @level: as for keel_mutex_init().
 * @name:  for reports.
 * @flags: KEEL_LOCK_* flags (KEEL_LOCK_RECURSIVE allows a reader to take
 *         it again for reading).
 *
 * Context: any thread; never blocks.
 * Return: 0; -EINVAL as for keel_mutex_init().
 */
KEEL_API int keel_rwlock_init(keel_rwlock_t *l, unsigned level,
			      const char *name, unsigned flags);

/**
 * keel_rwlock_destroy() - destroy a reader-writer lock.
 * @l: the lock; not held.
 *
 * Context: any thread; never blocks.
 * Return: 0; -EBUSY if it is held (reported); -EINVAL if not initialised.
 */
KEEL_API int keel_rwlock_destroy(keel_rwlock_t *l);

/**
 * keel_rwlock_rdlock_at() - take for reading; use keel_rwlock_rdlock().
 * @l:    the lock.
 * @site: where (KEEL_SITE).
 *
 * Checked like a mutex. Taking it again for reading while holding it is
 * reported unless it is KEEL_LOCK_RECURSIVE: with a writer waiting, that
 * deadlocks.
 *
 * Context: any thread; blocks; not a cancellation point.
 */
KEEL_API void keel_rwlock_rdlock_at(keel_rwlock_t *l, const char *site)
	KEEL_ACQUIRE_SHARED(l);
#define keel_rwlock_rdlock(l) keel_rwlock_rdlock_at((l), KEEL_SITE)

/**
 * keel_rwlock_wrlock_at() - take for writing; use keel_rwlock_wrlock().
 * @l:    the lock.
 * @site: where (KEEL_SITE).
 *
 * Context: any thread; blocks; not a cancellation point.
 */
KEEL_API void keel_rwlock_wrlock_at(keel_rwlock_t *l, const char *site)
	KEEL_ACQUIRE(l);
#define keel_rwlock_wrlock(l) keel_rwlock_wrlock_at((l), KEEL_SITE)

/**
 * keel_rwlock_unlock_at() - release, whichever way it was taken; use
 * keel_rwlock_unlock().
 * @l:    the lock, held by the calling thread.
 * @site: where (KEEL_SITE).
 *
 * Context: the thread that holds it; never blocks.
 */
KEEL_API void keel_rwlock_unlock_at(keel_rwlock_t *l, const char *site)
	KEEL_RELEASE_GENERIC(l);
#define keel_rwlock_unlock(l) keel_rwlock_unlock_at((l), KEEL_SITE)

/* ---- Condition variables ---- */

/**
 * keel_cond_init() - initialise a condition variable.
 * @c: the condition variable.
 *
 * Context: any thread; never blocks.
 * Return: 0; -EINVAL if @c is NULL.
 */
KEEL_API int keel_cond_init(keel_cond_t *c);

/**
 * keel_cond_destroy() - destroy a condition variable.
 * @c: the condition variable; nobody may wait on it.
 *
 * Context: any thread; never blocks.
 * Return: 0; -EBUSY if a task waits on it; -EINVAL if not initialised.
 */
KEEL_API int keel_cond_destroy(keel_cond_t *c);

/**
 * keel_cond_wait_until_at() - release a mutex, wait, take it back; use
 * keel_cond_wait_until() (or keel_cond_wait() for no deadline).
 * @c:        the condition variable.
 * @m:        a mutex the caller holds: the lowest-level one it holds.
 * @deadline: absolute time to stop waiting.
 * @site:     where (KEEL_SITE).
 *
 * Waiting while holding a lock of a lower level than @m (which stays held
 * while this thread sleeps) is reported, as is waiting while holding a
 * no-block lock. The held-lock record keeps @m, with its original site,
 * while it waits; @m is held again when this returns, whatever it returns.
 * Wake-ups may be spurious: wait in a loop on the condition.
 *
 * Context: a task (adopted if needed) holding @m; blocks; a cancellation
 * point.
 * Return: 0 when woken; -ETIMEDOUT; -ECANCELED; -EPERM if @m is not held
 * by the caller (reported; nothing waits).
 */
KEEL_API int keel_cond_wait_until_at(keel_cond_t *c, keel_mutex_t *m,
				     keel_time_t deadline, const char *site)
	KEEL_REQUIRES(m);
#define keel_cond_wait_until(c, m, d) \
	keel_cond_wait_until_at((c), (m), (d), KEEL_SITE)
#define keel_cond_wait(c, m) \
	keel_cond_wait_until_at((c), (m), KEEL_FOREVER, KEEL_SITE)

/**
 * keel_cond_signal() - wake one waiter.
 * @c: the condition variable.
 *
 * Context: any thread; never blocks.
 * Return: 0; -EINVAL if @c is not initialised.
 */
KEEL_API int keel_cond_signal(keel_cond_t *c);

/**
 * keel_cond_broadcast() - wake every waiter.
 * @c: the condition variable.
 *
 * Context: any thread; never blocks.
 * Return: 0; -EINVAL if @c is not initialised.
 */
KEEL_API int keel_cond_broadcast(keel_cond_t *c);

/* ---- Assertions and policy ---- */

/**
 * keel_assert_no_locks_at() - report if the calling thread holds any keel
 * lock; use keel_assert_no_locks().
 * @site: where (KEEL_SITE).
 *
 * Context: any thread; never blocks.
 */
KEEL_API void keel_assert_no_locks_at(const char *site);
#define keel_assert_no_locks() keel_assert_no_locks_at(KEEL_SITE)

/**
 * keel_assert_may_alloc_at() - report if the calling thread holds a
 * KEEL_LOCK_NOALLOC lock; use keel_assert_may_alloc(). For allocators and
 * allocation wrappers to call.
 * @site: where (KEEL_SITE).
 *
 * Context: any thread; never blocks.
 */
KEEL_API void keel_assert_may_alloc_at(const char *site);
#define keel_assert_may_alloc() keel_assert_may_alloc_at(KEEL_SITE)

/* What happens after a lock report. */
typedef enum keel_lockcheck {
	KEEL_LOCKCHECK_ABORT = 0,  /* report, then abort (the default) */
	KEEL_LOCKCHECK_REPORT = 1, /* report and go on */
	KEEL_LOCKCHECK_OFF = 2,    /* do not check */
} keel_lockcheck_t;

/**
 * keel_lockcheck_set() - choose the policy for lock reports.
 * @policy: a keel_lockcheck_t.
 *
 * Overrides KEEL_LOCKCHECK=abort|report|off from the environment.
 *
 * Context: any thread; never blocks.
 * Return: the previous policy; -EINVAL for an unknown one.
 */
KEEL_API int keel_lockcheck_set(int policy);

/**
 * keel_lockcheck_reports() - how many lock reports were made so far.
 *
 * Context: any thread; never blocks.
 * Return: the count (deduplicated reports count once).
 */
KEEL_API unsigned long keel_lockcheck_reports(void);

#define KEEL_FORMAT_DOT 1
#define KEEL_FORMAT_JSON 2

/**
 * keel_lockgraph_write() - write the locks and the order observed so far.
 * @f:      where to write.
 * @format: KEEL_FORMAT_DOT or KEEL_FORMAT_JSON.
 *
 * The declared levels with the order observed laid over them: every lock
 * keel has seen (name, level, flags, how often taken), every observed
 * "taken while holding" edge with the site where it was first seen, edges
 * that broke the rules marked as violations, locks never taken marked so.
 * DOT ranks locks by level; violations are red and untaken locks grey.
 *
 * Context: any thread; takes keel's graph lock briefly.
 * Return: 0; -EINVAL for a NULL @f or an unknown format.
 */
KEEL_API int keel_lockgraph_write(FILE *f, int format);

#ifdef __cplusplus
}
#endif

#endif /* KEEL_LOCK_H */
