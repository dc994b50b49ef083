/*
 * internal.h: definitions shared by keel's source files. Never installed.
 *
 * The runtime every part shares: a registry of task slots with
 * generation-checked handles (task.c), message records (msg.c), per-task
 * mailboxes (mailbox.c) and proxying (proxy.c), a thread cache that runs
 * tasks (thread_cache.c), and one way to block a thread: park/unpark on a
 * per-task futex word that cancellation also wakes (task.c).
 */
#ifndef KEEL_INTERNAL_H
#define KEEL_INTERNAL_H

#include <pthread.h>
#include <stdint.h>

#include "atomic.h"
#include "keel.h"
#include "platform.h"

/* keel's own thread-local state. Initial-exec: reached with one
 * thread-pointer-relative load, not a call to __tls_get_addr. */
#define KEEL_TLS __thread __attribute__((tls_model("initial-exec")))

#define KEEL_CACHELINE 64
#define KEEL_ALIGNED(n) __attribute__((aligned(n)))
#define likely(x) __builtin_expect(!!(x), 1)
#define unlikely(x) __builtin_expect(!!(x), 0)

/* ---- Reporting ---------------------------------------------------------
 * Programming errors that cannot be returned go through keel__panic(): it
 * writes what happened and where to stderr without allocating, then aborts.
 * It is compiled in with NDEBUG too. */
__attribute__((noreturn, format(printf, 3, 4))) void
keel__panic(const char *file, int line, const char *fmt, ...);

/* A report of misuse or trouble that keel handles and goes on from:
 * "keel: <message>" on stderr, one write, no allocation. */
__attribute__((format(printf, 1, 2))) void keel__report(const char *fmt, ...);

#define KEEL_ASSERT(c)                                                      \
	do {                                                                \
		if (unlikely(!(c)))                                         \
			keel__panic(__FILE__, __LINE__,                     \
				    "internal invariant broken: %s", #c);   \
	} while (0)

/* ---- Yield injection ---------------------------------------------------
 * With -DKEEL_DEBUG_YIELD=ON, KEEL_YIELD() marks the internal points where
 * another thread's interleaving matters; when the environment sets
 * KEEL_YIELD=<per-million>, each point yields the CPU with that
 * probability, widening race windows for the stress tests. */
#ifdef KEEL_DEBUG_YIELD
void keel__yield_point(void);
#define KEEL_YIELD() keel__yield_point()
#else
#define KEEL_YIELD() ((void)0)
#endif

/* ---- Message records ---------------------------------------------------
 * Every message is a record from one type-stable table (msg.c): records are
 * never freed, only recycled, and each carries its index, so a ctx handle
 * can be an (index, generation) pair. Hot fields first: a post touches the
 * first cache line only. */

enum keel__msg_kind {
	MSG_POST,
	MSG_CALL,
	MSG_CALL_CTX,
	MSG_THEN,
	MSG_THEN_CTX,
	/* A keel_msg_t, the sender's memory: line 0 only (mailbox.c,
	 * CALLER-OWNED MESSAGES). */
	MSG_FOREIGN,
	/* A keel_msg_t after keel_msg_fini(). */
	MSG_FOREIGN_DEAD,
};

/* The low 8 bits of a record's state word; see proxy.c for the machine. */
enum keel__msg_state {
	ST_FREE,
	ST_QUEUED,
	ST_RUNNING,
	ST_INFLIGHT,
	ST_RESOLVING,
	ST_DONE,
	ST_SHUT,
	ST_ABANDONED,
	ST_REPLY_DONE,
	ST_REPLY_CANCEL,
	ST_ORPHANED,
};

#define MSG_STATE_BITS 8
#define MSG_STATE_MASK ((uint64_t)0xff)

/* A keel_ctx_t is (ctx generation << MSG_IDX_BITS | record index) as a
 * pointer-sized value, and a record's ctx generation never goes past
 * MSG_CTX_GEN_LAST (proxy.c, CTX HANDLES). The table holds at most
 * 2^MSG_IDX_BITS records: fewer on 32-bit targets, to leave the handle
 * 10 bits of generation there (40 on 64-bit ones). */
#if UINTPTR_MAX == 0xffffffffu
#define MSG_IDX_BITS 22
#else
#define MSG_IDX_BITS 24
#endif
#define MSG_CTX_GEN_LAST                                                   \
	((((uint64_t)1) << (sizeof(uintptr_t) * 8 - MSG_IDX_BITS)) - 1)

struct keel__task;

union keel__fn {
	keel_work_fn work;
	keel_ctx_work_fn ctx_work;
};

/* A record is two cache lines in two tables. Line 0, `struct keel__msg`,
 * is everything a post touches, on both sides; line 1, `struct
 * keel__msg_call`, is what only calls use. A chunk of the table holds
 * MSG_CHUNK line 0s side by side and then their MSG_CHUNK line 1s, so a
 * stream of posts moves through memory a line per message, not two, and
 * never faults in the call half's pages (msg.c). keel__msg_call() finds
 * a table record's line 1 at a fixed distance from its line 0.
 *
 * Line 0 is an anonymous union with its own line so that the fields keep
 * their names. The type asks only for its fields' alignment (the table's
 * records are line-aligned by its layout): a keel_msg_t, which is a line 0
 * in a sender's own 8-aligned memory, is reached through it too
 * (mailbox.c, CALLER-OWNED MESSAGES); a keel_msg_t and a mailbox's stub
 * have no line 1. */
struct keel__msg {
	union {
	struct {
	_Atomic(struct keel__msg *) next; /* queue link; free-list link */
	union keel__fn fn;
	/* While free, a batch's first record links the next batch of the
	 * pool in batch_next and keeps the batch's length in batch_n
	 * (msg.c). */
	union {
		void *arg;
		struct keel__msg *batch_next;
	};
	keel_work_fn cancel;
	/* generation << 8 | enum keel__msg_state; the generation changes each
	 * time the record is freed. */
	_Atomic uint64_t state;
	union {
		keel_work_fn done;
		uintptr_t batch_n;
	};
	uint32_t idx;
	uint8_t kind;
	/* It took one of a bounded mailbox's places (mailbox.c); 0 while
	 * free, so a send to an unbounded mailbox need not write it. */
	uint8_t counted;
	/* MSG_FOREIGN only: sent on the counted path, so the owner counts
	 * its outcome in the registration (mailbox.c, CALLER-OWNED
	 * MESSAGES). */
	uint8_t noted;
	/* MSG_FOREIGN only: keel__foreign_key() of its address and index,
	 * which a send checks without reading the registrations. */
	uint64_t key;
	};
	char line0_[KEEL_CACHELINE];
	};
};
_Static_assert(sizeof(struct keel__msg) == KEEL_CACHELINE,
	       "a record's line 0 is one cache line");

/* Line 1 of a record: calls only. */
struct keel__msg_call {
	struct keel__task *caller; /* who waits or gets the reply */
	keel_task_t caller_id;
	/* _ctx kinds: the task whose in-flight list holds the record. Read
	 * without a lock by keel_ctx_finish() on possibly stale handles. */
	_Atomic(struct keel__task *) target;
	/* The caller's owner-only list of then-kind records awaiting a
	 * reply. */
	struct keel__msg *oprev, *onext;
	/* The target's in-flight ctx list, under target->ctx_lock. */
	struct keel__msg *iprev, *inext;
	/* How many times the record went in flight as a _ctx call: the
	 * generation its keel_ctx_t carries (proxy.c, CTX HANDLES). Raised
	 * only, under the target's ctx_lock; read by keel_ctx_finish() on
	 * possibly stale handles. */
	_Atomic uint64_t ctx_gen;
};
_Static_assert(sizeof(struct keel__msg_call) <= KEEL_CACHELINE,
	       "a record's line 1 is one cache line");

struct keel__msg *keel__msg_refill(void);
/* A record freed while this thread's cache is full: kept with the others
 * of its home batch until the batch can go back whole (msg.c). */
void keel__msg_free_home(struct keel__msg *m);
/* Give every free record this thread keeps back to the pool. */
void keel__msg_flush(void);
/* The record at index idx, or NULL if idx was never handed out. */
struct keel__msg *keel__msg_at_checked(uint32_t idx);
/* The table is chunks of 1 << MSG_CHUNK_SHIFT records (msg.c). */
#define MSG_CHUNK_SHIFT 10

/* The line 1 of m, a record of the table (never a keel_msg_t or a stub):
 * MSG_CHUNK line-0 slots further on, in its chunk. */
static inline struct keel__msg_call *keel__msg_call(struct keel__msg *m)
{
	return (struct keel__msg_call *)(void *)((uintptr_t)m +
						 ((uintptr_t)1
						  << MSG_CHUNK_SHIFT) *
							 sizeof *m);
}
/* The index no record has: a mailbox's stub (mailbox.c). */
#define MSG_IDX_STUB ((uint32_t)0xffffff)
/* Indices from here up to the stub's name registered keel_msg_t's (msg.c,
 * CALLER-OWNED MESSAGES), never a table record. */
#define MSG_IDX_FOREIGN ((uint32_t)0xc00000)
#define MSG_FOREIGN_MAX (MSG_IDX_STUB - MSG_IDX_FOREIGN)
extern _Atomic(struct keel__msg *) keel__msg_chunks[];

/* A registered keel_msg_t (msg.c): the message, NULL while the index is
 * free; and a count of its outcomes on the counted path, which a sender
 * reads after linking instead of the message's own memory (it only ever
 * grows, whichever message holds the index). */
struct keel__foreign {
	_Atomic(struct keel__msg *) msg;
	_Atomic uint64_t served;
	uint32_t next_free; /* while free: the next free index, under a lock */
};
extern _Atomic(struct keel__foreign *) keel__foreign_chunks[];

/* The registration of foreign index idx, which was handed out. */
static inline struct keel__foreign *keel__foreign_at(uint32_t idx)
{
	uint32_t i = idx - MSG_IDX_FOREIGN;
	struct keel__foreign *chunk =
		load_acquire(&keel__foreign_chunks[i >> MSG_CHUNK_SHIFT]);

	return &chunk[i & ((1u << MSG_CHUNK_SHIFT) - 1)];
}

/* What a registered keel_msg_t at m with index idx holds in its key: a
 * copy elsewhere, or memory that was never registered, does not (but for
 * a 2^-64 chance of garbage). */
static inline uint64_t keel__foreign_key(const struct keel__msg *m,
					 uint32_t idx)
{
	return ((uint64_t)(uintptr_t)m ^ 0x6b65656c6d736721ull) *
		       0x9e3779b97f4a7c15ull ^
	       idx;
}

/* Tests: keel_msg_t's registered now. */
extern _Atomic uint64_t keel__foreign_live;

/* The record at index idx, which was handed out (a queued record's, say):
 * no bounds check. Pairs with the release that published its chunk. */
static inline struct keel__msg *keel__msg_at(uint32_t idx)
{
	struct keel__msg *chunk;

	if (unlikely(idx >= MSG_IDX_FOREIGN))
		return load_acquire(&keel__foreign_at(idx)->msg);
	chunk = load_acquire(&keel__msg_chunks[idx >> MSG_CHUNK_SHIFT]);
	return chunk ? &chunk[idx & ((1u << MSG_CHUNK_SHIFT) - 1)] : NULL;
}
/* Tests: chunks whose memory was given back; how long free records must
 * stay unused before they may be (msg.c, GIVING MEMORY BACK). */
extern _Atomic uint64_t keel__msg_chunks_released;
extern _Atomic keel_time_t keel__msg_decay_ns;
/* Tests: how soon a refill must follow the last for a thread to take
 * more (msg.c, HOW MUCH A THREAD TAKES). */
extern _Atomic keel_time_t keel__msg_stream_ns;

/* ---- Thread-local state ------------------------------------------------ */
#define MSG_HOMES 4 /* home batches a thread gathers records of at once */

/* Free records of one home (the MSG_HOME records of a chunk), gathered
 * by the thread that freed them; see msg.c. */
struct keel__msg_home {
	struct keel__msg *head; /* linked by next, NULL-terminated */
	uint32_t home;          /* idx / MSG_HOME */
	uint32_t n;             /* 0: empty */
};

struct keel__tls {
	struct keel__task *self; /* the task running on this thread */
	struct keel__msg *cache; /* free message records, linked by next */
	uint32_t ncache;
	uint8_t registered; /* the thread-exit key holds a value */
	uint8_t exited;     /* the thread-exit hook has run once */
	uint32_t rng;       /* yield injection */
	uint32_t home_next; /* the slot to empty next when all are taken */
	struct keel__msg_home homes[MSG_HOMES];
	/* Records the next refill takes (0: MSG_CACHE_BATCH), and when the
	 * last one was (msg.c, HOW MUCH A THREAD TAKES). */
	uint32_t want;
	keel_time_t refill_at;
};

extern KEEL_TLS struct keel__tls keel__tls;

/* Tests: called by the thread-exit hook after the thread's task has ended
 * (and perhaps been joined and its slot reused), before the hook returns. */
extern void (*keel__thread_exit_hook)(void);

/* Register the thread-exit hook for this thread (idempotent until the hook
 * has run; after that, registers again so that late keel use is cleaned up
 * by another round of destructors). */
void keel__tls_register(void);

/* The most records a thread's cache takes back before freed records go
 * to their homes, and what a refill takes at first (msg.c). */
#define MSG_CACHE_BATCH 64
/* A home: the records of one chunk (msg.c). */
#define MSG_HOME ((uint32_t)1 << MSG_CHUNK_SHIFT)

static inline struct keel__msg *keel__msg_alloc(void)
{
	struct keel__msg *m = keel__tls.cache;

	if (likely(m != NULL)) {
		struct keel__msg *after = load_relaxed(&m->next);

		keel__tls.cache = after;
		keel__tls.ncache--;
		/* Records often come back from another thread's cache: start
		 * fetching the next one for writing now. */
		if (after) {
			__builtin_prefetch(after, 1);
			/* The cache is mostly runs of neighbouring records
			 * (msg.c), in either direction: fetch the one after
			 * `after` in its run too, which gives a miss two
			 * allocations of time to land. A guess: a prefetch
			 * of a wrong address costs nothing and cannot fault. */
			__builtin_prefetch((const void *)((uintptr_t)after +
							  ((uintptr_t)after -
							   (uintptr_t)m)),
					   1);
		}
		return m;
	}
	return keel__msg_refill();
}

static inline void keel__msg_free(struct keel__msg *m)
{
	uint64_t gen = load_relaxed(&m->state) >> MSG_STATE_BITS;

	/* A new generation for every use: a sender tells by it whether the
	 * record it linked has been run and freed since (mailbox.c). */
	gen++;
	store_relaxed(&m->state, gen << MSG_STATE_BITS | ST_FREE);
	if (unlikely(keel__tls.ncache >= MSG_CACHE_BATCH)) {
		keel__msg_free_home(m);
		return;
	}
	store_relaxed(&m->next, keel__tls.cache);
	keel__tls.cache = m;
	keel__tls.ncache++;
}

/* ---- Tasks -------------------------------------------------------------
 * Mailbox word layout, see mailbox.c. */
#define MB_COUNT_MASK (((uint64_t)1 << 20) - 1)
#define MB_BOUNDED ((uint64_t)1 << 20)
#define MB_SLEEPING ((uint64_t)1 << 21)
#define MB_CLOSED ((uint64_t)1 << 22)
#define MB_ENDED ((uint64_t)1 << 23)
#define MB_GEN_SHIFT 24
/* Tail word layout, see mailbox.c: a record index (MSG_IDX_STUB for the
 * stub), three flags, and the low bits of the incarnation's generation. */
#define TW_IDX_MASK ((uint64_t)0xffffff)
#define TW_SLEEPING ((uint64_t)1 << 24)
#define TW_CLOSED ((uint64_t)1 << 25)
#define TW_SLOW ((uint64_t)1 << 26)
#define TW_GEN_SHIFT 27
#define TW_GEN_MASK (~(uint64_t)0 << TW_GEN_SHIFT)
#define LINK_WAIT_NONE ((uint32_t)0xffffffff)
#define TASK_IDX_BITS 24
#define TASK_IDX_MASK (((uint64_t)1 << TASK_IDX_BITS) - 1)
#define TASK_GEN_MAX (((uint64_t)1 << (64 - TASK_IDX_BITS)) - 1)

/* ---- Cancellation frames (cancel.c) -------------------------------------
 * A task's cancellation state is a chain of frames, innermost first: the
 * shields it began and the scopes it opened, then its base frame, then the
 * scope it was spawned into and that scope's own chain. A task is
 * cancelled when a frame on its chain is, looking no further than the
 * nearest shield. Frames outlive every chain that passes through them: a
 * scope cannot close while a child runs in it. */
enum keel__frame_kind {
	FRAME_BASE,
	FRAME_SCOPE,
	FRAME_SHIELD,
};

struct keel__frame {
	_Atomic uint32_t cancelled; /* keel_cause_t, 0 if not */
	uint8_t kind;
	uint8_t internal;            /* a shield keel began (a cleanup's) */
	keel_time_t deadline;        /* KEEL_FOREVER if none */
	struct keel__frame *parent;  /* the enclosing frame; NULL at a root */
	struct keel__task *owner;    /* the task whose chain holds it */
};

#define KEEL_MAX_SHIELDS 8
#define KEEL_MAX_ON_CANCEL 8

/* A keel_on_cancel() registration; see cancel.c. */
struct keel__on_cancel {
	keel_work_fn fn;
	void *arg;
	struct keel__task *task; /* whose registration it is */
	uint32_t gen;
	uint8_t state;
	pthread_t runner;
};

struct keel__scope;

/* The `ended` word of a task:
 *   TASK_RUNNING -> TASK_ENDED  its status is final (keel_join may take it)
 *   TASK_ENDED   -> TASK_LEFT   it has told its scope (scope.c) and touches
 *                               neither the scope nor its slot again: the
 *                               slot may be released.
 * A task without a scope goes from RUNNING to LEFT in one step. */
#define TASK_RUNNING 0u
#define TASK_ENDED 1u
#define TASK_LEFT 2u

/* Park word states; see task.c. */
#define PARK_EMPTY 0u
#define PARK_TOKEN 1u
#define PARK_PARKED 2u

struct keel__task {
	/* Line 0, written by every sender: the mailbox word and the tail of
	 * the queue, together so that a send moves one line. */
	_Atomic uint64_t mword;
	_Atomic uint64_t tailw; /* the tail word (mailbox.c) */
	/* Backpressure (mailbox.c): the count of messages holding a place,
	 * with ROOM_WAITERS; and the limit, 0 if unbounded. Touched by
	 * senders only while MB_BOUNDED is set. */
	_Atomic uint64_t mb_queued;
	_Atomic uint32_t mb_limit;
	/* The record the owner waits to see linked (mailbox.c, WAITING FOR
	 * A LINK), by index; LINK_WAIT_NONE if none. */
	_Atomic uint32_t link_wait;
	char pad0[KEEL_CACHELINE - 32];

	/* Line 1, owner only: the head of the queue. */
	struct keel__msg *head;
	char pad1[KEEL_CACHELINE - sizeof(void *)];

	/* The queue's stub record (Vyukov's algorithm); its own line. */
	struct keel__msg stub KEEL_ALIGNED(KEEL_CACHELINE);

	/* Wake-up line: read by wakers, written rarely. */
	_Atomic uint32_t park;
	_Atomic int notify_wfd; /* -1 until keel_mailbox_fd() */
	_Atomic uint32_t ended; /* futex word: TASK_RUNNING, _ENDED, _LEFT */
	char pad2[KEEL_CACHELINE - 12];

	/* Owner only. */
	keel_task_t id;
	struct keel__msg *running;     /* call/then record whose work runs */
	struct keel__msg *outstanding; /* then-kind records owed a reply */
	int64_t spin_ns;               /* adaptive spin budget */
	int notify_rfd;
	uint32_t fd_owed; /* signals of the fd since its last drain (mailbox.c) */
	uint8_t serving;
	uint8_t closed;
	uint8_t fd_mode;
	uint8_t fd_armed; /* the owner set SLEEPING for the fd or the loop */
	uint8_t in_exit_hook; /* its scope's on_exit hook runs on it */
	uint8_t loop_mode; /* served from its JavaScript event loop */
	uint32_t loop_owed; /* loop serves scheduled, not run yet (mailbox.c) */
	/* The stream the owner serves (mailbox.c, spin_pauses): records run
	 * since its last spin, and the pauses between looks in a stream (0:
	 * none). */
	uint32_t run_len;
	uint32_t stream_pauses;
	/* The thread whose event loop serves the mailbox, 0 if none: written
	 * by the owner, read by the sender that clears SLEEPING. */
	_Atomic uintptr_t loop_thread;
	uint8_t slow; /* senders take the counted path (mailbox.c) */

	/* Senders waiting for room in this mailbox (keel__qnode list, under
	 * room_ql); not reset with an incarnation: each waiter takes itself
	 * off before it returns. */
	uint32_t room_ql;
	void *room_q;

	/* Exit status: written by the owner before `ended` is released. */
	int status;

	/* In-flight ctx records of this task as target. */
	pthread_mutex_t ctx_lock;
	struct keel__msg *inflight;

	/* Scopes and cancellation. The chain (`cur`, the frames this task
	 * pushed, `home`, the wake fds) is written under chain_lock, by the
	 * owner or, before the task runs, by whoever sets it up; others read
	 * it under chain_lock; the owner reads its own without it. Nothing
	 * else is taken while chain_lock is held (see cancel.c). */
	pthread_mutex_t chain_lock;
	struct keel__frame base;
	struct keel__frame *cur;
	keel_time_t eff_deadline;        /* min deadline along the chain */
	struct keel__frame *eff_frame;   /* the frame it comes from */
	struct keel__scope *home;        /* spawned into; NULL if adopted */
	uint32_t entry;                  /* its entry in home's stack */
	uint8_t background;
	uint8_t joinable; /* kept for keel_join(), else reaped when it ends */
	uint8_t nshields;
	struct keel__frame shields[KEEL_MAX_SHIELDS];
	_Atomic(const char *) blocked_in; /* for keel_dump(); NULL: running */
	/* Once the body has returned: the step of its ending it is in, for
	 * the close's report of a child slow to end; NULL before. */
	_Atomic(const char *) ending_in;
	keel_fn spawn_fn;                /* keel_spawn()'s body and arg */
	void *spawn_arg;
	keel_time_t started_at;
	int wake_rfd, wake_wfd;          /* keel_fd_wait(); -1 until used */

	/* keel_on_cancel() registrations, under cb_lock. cb_epoch moves
	 * with each incarnation, so that a canceller that saw an old one
	 * cancelled runs none of a new one's callbacks. */
	pthread_mutex_t cb_lock;
	pthread_cond_t cb_cv;
	_Atomic uint32_t cb_epoch;
	struct keel__on_cancel cbs[KEEL_MAX_ON_CANCEL];

	/* The handle while the slot is in use, 0 while it is free: a
	 * lock-free check of a handle. Written under the registry lock. */
	_Atomic uint64_t live;
	/* Registry fields, under the registry lock. */
	uint32_t idx;
	uint8_t adopted; /* a foreign thread: released when its thread exits */
	uint8_t in_use;
	uint8_t joined;
	char name[KEEL_TASK_NAME_MAX + 1];
	struct keel__task *free_next;
} KEEL_ALIGNED(KEEL_CACHELINE);

/* The slot a handle's index names, or NULL if there is none; the caller
 * checks the generation. */
struct keel__task *keel__task_slot(keel_task_t id);

/* The calling thread's task, adopting the thread if needed; NULL if it
 * could not be adopted. */
struct keel__task *keel__self_slow(void);

static inline struct keel__task *keel__self(void)
{
	struct keel__task *t = keel__tls.self;

	return likely(t != NULL) ? t : keel__self_slow();
}

/* Allocate a task slot with a new generation and an open mailbox, not yet
 * bound to any thread. NULL when memory or the table ran out. */
struct keel__task *keel__task_alloc(void);
/* End the task on its own thread: close and drain its mailbox, resolve its
 * calls, mark it ENDED and wake joiners. Idempotent. */
void keel__task_end(struct keel__task *t, int status);
/* Return an ended task's slot for reuse. */
void keel__task_release(struct keel__task *t);

/* Park the calling task's thread until unparked or the deadline passes.
 * Returns 0 (possibly spuriously) or -ETIMEDOUT. Callers re-check their
 * condition in a loop. */
int keel__park(struct keel__task *self, keel_time_t deadline);
/* Wake t's thread if it is parked, or make its next park return at once.
 * Safe on any slot at any time: slots are never freed. */
void keel__unpark(struct keel__task *t);

/* Wake-up system calls made by keel__unpark(), for tests of guarantee 6. */
extern _Atomic uint64_t keel__wake_syscalls;

/* ---- Cancellation (cancel.c) ----------------------------------------- */

/* The cause of the first cancelled frame from f outwards, looking no
 * further than the nearest shield; 0 if none. */
static inline uint32_t keel__chain_cancelled(struct keel__frame *f)
{
	for (; f; f = f->parent) {
		uint32_t c = load_acquire(&f->cancelled);

		if (c)
			return c;
		if (f->kind == FRAME_SHIELD)
			break;
	}
	return 0;
}

/* The cause the task is cancelled with, or 0. Lock-free on the owner's
 * thread; others call it under the task's chain lock. */
static inline uint32_t keel__cancelled(struct keel__task *t)
{
	return keel__chain_cancelled(t->cur);
}

/* Cancel the frame whose deadline is the task's effective one (it has
 * passed). */
void keel__expire(struct keel__task *t);

/* A cancellation point's check: -ECANCELED if cancelled or if the
 * effective deadline has passed (which cancels its frame), else 0. */
static inline int keel__check(struct keel__task *t)
{
	if (keel__cancelled(t))
		return -ECANCELED;
	if (unlikely(t->eff_deadline != KEEL_FOREVER) &&
	    keel__clock_now() >= t->eff_deadline) {
		keel__expire(t);
		return -ECANCELED;
	}
	return 0;
}

/* Park until woken or the deadline. With `cancellable`, the effective
 * deadline of the task's scopes applies too, and cancellation ends the
 * wait: returns -ECANCELED. Otherwise 0 (perhaps spurious: callers loop)
 * or -ETIMEDOUT at the caller's own deadline. `what` names the wait for
 * keel_dump(). A cancellable wait on a thread that must not block
 * (keel__thread_may_block()) that would sleep returns -EDEADLK instead;
 * non-cancellable waits are short matters of instructions and are kept. */
int keel__wait(struct keel__task *t, keel_time_t deadline, int cancellable,
	       const char *what);

/* Wait until cond(arg) holds: spin briefly, then keel__wait() in a loop.
 * 0 once it holds; else keel__wait()'s -ETIMEDOUT, -ECANCELED or -EDEADLK. */
int keel__wait_for(struct keel__task *t, int (*cond)(void *), void *arg,
		   keel_time_t deadline, int cancellable, const char *what);

/* Recompute t's effective deadline from its chain (after a push or pop). */
void keel__chain_changed(struct keel__task *t);

/* Cancel the task named by id (its base frame), exactly: a stale handle
 * cancels nothing. 0, or -ESRCH. */
int keel__task_cancel(keel_task_t id, uint32_t cause);

/* Cancel frame f with cause (sticky: the first cause stays) and wake every
 * task whose chain passes through it, running their keel_on_cancel()
 * callbacks. The caller holds no keel lock and knows f is alive (on its
 * own chain, or a scope or task it keeps from closing or being released).
 * Returns 1 if this call cancelled it. */
int keel__frame_cancel(struct keel__frame *f, uint32_t cause);

/* Scopes or children the spread copies per lock hold: small, because the
 * spread recurses on the cancelling thread's stack. */
#define SPREAD_BATCH 8

/* Wake every task whose chain passes through f, a frame of owner's just
 * marked cancelled (gen: the scope's incarnation, if f is a scope's).
 * Caller holds no keel lock. Goes on to the end even if a callback it runs
 * ends the thread. */
void keel__spread_frame(struct keel__frame *f, struct keel__task *owner,
			uint64_t gen);
/* Wake the task in slot t, and everything nested in the part of its chain
 * above `stop` (exclusive), if `stop` is still on its chain (cancel.c).
 * Caller holds no keel lock. Safe on a slot since reused: the wakes are
 * then spurious. */
void keel__spread_task(struct keel__task *t, struct keel__frame *stop);
/* Wake every live child of the scope whose frame is f, and what runs
 * inside them, if the scope is still the incarnation `gen` (scope.c). */
void keel__spread_scope(struct keel__frame *f, uint64_t gen);
/* The incarnation of the scope whose frame is f (scope.c). */
uint64_t keel__scope_gen(struct keel__frame *f);

/* Shields (cancel.c): push one with a deadline (-ENOMEM when too deep);
 * pop the innermost, returning the cause it was cancelled with, or 0. An
 * internal shield (keel's own, around a cleanup) cannot be ended by
 * keel_shield_end(). */
int keel__shield_push(struct keel__task *t, keel_time_t deadline,
		      int internal);
uint32_t keel__shield_pop(struct keel__task *t);

/* Registry helpers (task.c). keel__task_is: does the slot hold the task
 * named id (lock-free)? */
int keel__task_is(struct keel__task *t, keel_task_t id);
void keel__task_copy_name(struct keel__task *t, char *buf);
void keel__task_set_name(struct keel__task *t, const char *name);
/* Throw away a task that never ran: close it and release its slot. */
void keel__task_discard(struct keel__task *t);

/* Reset the scope fields of a fresh incarnation (task.c's alloc), under
 * its chain lock. */
void keel__cancel_reset(struct keel__task *t);
/* The task is ending: drop its armed keel_on_cancel() registrations and
 * wait for running ones, so that none runs after it has ended. */
void keel__on_cancel_end(struct keel__task *t);
/* fork() child: t's on_cancel lock made anew; a callback that was running
 * (on a thread that did not come along) counts as done. */
void keel__on_cancel_fork_child(struct keel__task *t);
/* A task is ending: close what it left open (reported), close its wake
 * fd. Called on its own thread by keel__task_end(). */
void keel__scope_task_end(struct keel__task *t);
/* Cancel a scope with cause KEEL_CANCEL_SIGNAL (keel_main's watcher). */
int keel__scope_cancel_signal(keel_scope_t *s);
/* keel_main() returns: end the calling thread's adopted task as a thread
 * exit would (mailbox drained, its fds closed); the thread is adopted
 * afresh by its next keel call. Does nothing for a task keel started or
 * one with a scope, shield or message still open. */
void keel__task_retire_self(void);
/* A spawned task has ended with status: tell its scope (its on_exit
 * hook, then the rest). */
/* keel_stats_get()'s scope counters (scope.c). */
void keel__scope_stats(size_t *live, size_t *slots);
void keel__scope_child_ended(struct keel__task *t, int status);
/* The rest, for a thread that ended inside the on_exit hook. */
void keel__scope_child_told(struct keel__task *t, int status);
/* fork(): 0 prepare (takes the scope table's lock and every scope's), 1
 * parent, 2 child (after the tasks whose threads did not come along are
 * marked LEFT: recounts the scopes' foreground children). */
void keel__scope_fork(int phase);

/* Spin budget bounds for waits, in nanoseconds. */
#define SPIN_MIN_NS 500
#define SPIN_INIT_NS 4000
#define SPIN_MAX_NS 16000

/* Adapt a spin budget: grow after a spin that found what it waited for,
 * shrink after one that gave up and parked. */
static inline void keel__spin_adapt(int64_t *budget, int success)
{
	if (success)
		*budget = *budget * 2 > SPIN_MAX_NS ? SPIN_MAX_NS : *budget * 2;
	else
		*budget = *budget / 2 < SPIN_MIN_NS ? SPIN_MIN_NS : *budget / 2;
}

/* ---- Mailbox and proxying ------------------------------------------------ */
/* Send a request m (a post, a call) to the task named id: 0, -ESRCH,
 * -ESHUTDOWN, or -EAGAIN if its mailbox is bounded and full. On success
 * the record belongs to the target. */
int keel__mbox_send(keel_task_t id, struct keel__msg *m);
/* The same, waiting for room until the deadline: a cancellation point
 * while it waits (-ECANCELED, -ETIMEDOUT; -EDEADLK if id is the caller,
 * -ENOMEM if the thread could not be adopted). */
int keel__mbox_send_wait(keel_task_t id, struct keel__msg *m,
			 keel_time_t deadline);
/* Send a reply the caller is owed: never refused for want of room. */
int keel__mbox_reply(keel_task_t id, struct keel__msg *m);
/* Tests: sends that waited for room and were then accepted. */
extern _Atomic uint64_t keel__room_waits_ok;
/* Tests: how often each race of the tail word (mailbox.c) went the rare
 * way; counted on the rare paths only. */
enum keel__mbox_race {
	RACE_SEND_SAW_SEAL,    /* a fast send passed the word, met CLOSED */
	RACE_CLOSE_WAITED,     /* a close waited for an accepted send's link */
	RACE_SEND_WOKE,        /* a send took the owner's arming, woke it */
	RACE_SLEEP_LINKING,    /* the owner would sleep; a send was linking */
	RACE_POP_STUB_LOST,    /* a send took the tail from the popped last */
	RACE_ARM_LOST,         /* a send took the tail from the arming CAS */
	RACE_LINK_WOKE,        /* a send's link was waited for: it woke */
	KEEL_MBOX_RACES
};
extern _Atomic uint64_t keel__mbox_races[KEEL_MBOX_RACES];
/* Close (if not yet) and drain the owner's mailbox; resolve its calls. */
void keel__mbox_shutdown(struct keel__task *t);
/* t is cancelled: make its event-loop fd readable, if it has one and no
 * wake is outstanding. Any thread; under t's chain_lock off t's thread. */
void keel__mbox_wake_cancelled(struct keel__task *t);
/* Close the owner's event-loop fd, if any; after keel__mbox_shutdown(). */
void keel__mbox_close_fd(struct keel__task *t);
/* Initialise a fresh incarnation's queue. */
void keel__mbox_reset(struct keel__task *t);
/* Refuse every send from now on, without draining (a task that never ran,
 * or one a fork left behind). */
void keel__mbox_seal(struct keel__task *t);
/* fork() child, the task that forked: a send caught between its CAS and
 * its link does not exist here; end the queue at its last linked record. */
void keel__mbox_fork_child(struct keel__task *t);

/* proxy.c: run, cancel and close-time handling of call-kind records. */
void keel__proxy_run(struct keel__task *t, struct keel__msg *m);
void keel__proxy_cancel(struct keel__task *t, struct keel__msg *m);
void keel__proxy_abort_running(struct keel__task *t, struct keel__msg *m);
void keel__proxy_close(struct keel__task *t);
void keel__proxy_end(struct keel__task *t);

/* ---- Ranked locks (lock.c, lockcheck.c, lockgraph.c) --------------------
 * Each thread's held-lock record: a fixed stack that never allocates, with
 * the running minimum of the ranked levels held, so that the order check
 * is O(1). Initial-exec TLS, like keel__tls. */
#define KEEL_LOCK_STACK 32
#define LEVEL_NONE 0x10000u /* "no ranked lock held": above every level */

enum keel__lock_mode { LM_EXCL, LM_SHARED };

/* One lock in a thread's record. The lock's name, level and flags are
 * read from the lock itself (keel_mutex_t and keel_rwlock_t share their
 * layout), so taking a lock writes only this much. */
struct keel__held {
	void *lock;
	const char *site;
	uint32_t min;  /* running minimum of ranked levels, this included */
	uint16_t node; /* the lock's graph node id (0: none) */
	uint8_t mode;  /* LM_EXCL or LM_SHARED */
	uint8_t bits;  /* HELD_* */
};

#define HELD_WAITING 1 /* in keel_cond_wait: released while it sleeps */
#define HELD_LEAF 2    /* a KEEL_LOCK_LEAF lock */
#define HELD_RELOCK 4  /* taken again by its holder (k_depth counts it) */
#define HELD_COUNTED 8 /* a NOBLOCK or NOALLOC lock (counted in the state) */

/* Past the record's capacity, locks go unrecorded (see lock.c, THE HELD
 * RECORD): counted in `unrec`, and, for read holds, in a small hashed
 * count by lock address, which says "maybe one of mine" exactly enough
 * that no unrecorded read hold is ever refused. */
#define UNREC_READ_BUCKETS 32

struct keel__lockstate {
	uint32_t depth; /* entries in stack[], at most KEEL_LOCK_STACK */
	uint32_t unrec; /* locks held besides those, taken while it was full */
	uint32_t noblock, noalloc;
	struct keel__held stack[KEEL_LOCK_STACK];
	/* Unrecorded read holds by bucket of the lock's address; a bucket
	 * that reaches 255 stays there until unrec is back to 0. */
	uint8_t unrec_read[UNREC_READ_BUCKETS];
	uint8_t overflow_warned;
	/* Graph edges this thread knows are recorded, as node ids
	 * (from << 32 | to), so taking a nested pair again skips the graph;
	 * cleared when keel__graph_epoch moves (an id now means another
	 * lock). */
	uint32_t edges_epoch;
	uint64_t edges_known[64];
};

extern KEEL_TLS struct keel__lockstate keel__locks;

/* Each thread's state for a contended mutex's spin (lock.c, mutex_wait()):
 * the mutex it released last (compared, never read through), the running
 * average of the pauses its won spins took, and how many spins it won
 * (took the lock) and lost (went on to sleep). Apart from keel__locks,
 * which the pthread interposer shares: making that record larger moved
 * the interposer's per-lock cost by 4 to 8%. */
struct keel__spinstate {
	const void *released;
	uint32_t avg;
	uint32_t won, lost;
};

extern KEEL_TLS struct keel__spinstate keel__spin;

/* Queues of cancellable waiters (waitq.c): a node per waiter, on its stack,
 * guarded by a spin bit; a waiter sleeps on its task's parker. */
struct keel__qnode {
	struct keel__qnode *next;
	struct keel__task *t;
	uint32_t woken;
};
void keel__qlock(uint32_t *q);
void keel__qunlock(uint32_t *q);
void keel__q_append(void **head, struct keel__qnode *n);
void keel__q_remove(void **head, struct keel__qnode *n);
/* Wake the first queued waiter (or all); under nothing. */
void keel__q_wake(void **head, uint32_t *ql, int all);

/* A ranked resource that is not a lock (a once's claim), checked by the
 * level rule as if it were one: token is a keel_mutex_t never locked, set
 * up by keel__rank_token(); `resource` (the once) is what reports about it
 * are deduplicated by. check: before waiting for it; enter/leave: while
 * holding it (locks taken meanwhile must rank below it). */
void keel__rank_token(keel_mutex_t *token, unsigned level, const char *name,
		      const void *resource);
void keel__rank_check(keel_mutex_t *token, const char *site);
void keel__rank_enter(keel_mutex_t *token, const char *site);
void keel__rank_leave(keel_mutex_t *token);

/* once.c: how often a waiter looks at the owner (KEEL_ONCE_POLL). */
extern _Atomic keel_time_t keel__once_poll;
/* once.c: the calling thread is ending (keel's thread-exit hook): release
 * the lifelines it still holds, so that waiters see its claims' owner
 * dead. */
void keel__once_thread_exit(void);

/* Report a blocking keel call made while a no-block lock is held. */
void keel__lock_check_blocking(const char *what);
/* Report serving a mailbox while holding a ranked lock. */
void keel__lock_check_serve(void);
/* Report a task or thread that ends holding keel locks. */
void keel__lock_check_exit(const char *who);
/* fork(): 0 prepare, 1 parent, 2 child. */
void keel__lockgraph_fork(int phase);
/* Tests: called after each lock report is written, before the policy. */
extern void (*keel__lock_report_hook)(void);
/* Tests: forget which reports were made, so that each may be made again
 * (a model that starts afresh with keel's memory of them). */
void keel__lock_reports_forget(void);

/* The lock graph (lockgraph.c). Nodes are locks, edges "taken while
 * holding". Node ids are 1-based (0: none yet). */
struct keel__lockinfo {
	void *lock;
	const char *name;
	uint32_t *node; /* the lock's k_node field */
	uint16_t level;
	uint16_t flags;
};
/* The lock's node, assigning one on first use; 0 if the table is full.
 * `taken`: mark it as taken (not just initialised). */
uint32_t keel__graph_node(const struct keel__lockinfo *li, int taken);
/* A lock is destroyed: forget it and its edges. */
void keel__graph_forget(uint32_t *node);
/* Moves each time a forgotten node's id is given to another lock. */
extern _Atomic uint32_t keel__graph_epoch;
/* Node id with its generation (which moves when the node's lock is
 * destroyed, before the id can go to another lock): no other lock, ever,
 * has this value; 0 for an id that names no node. */
uint64_t keel__graph_identity(uint32_t id);
/* Called for each edge of a cycle found, under the graph's lock (it
 * must not take it): the new edge first, then the path back. */
typedef void (*keel__graph_each_fn)(void *ctx, uint32_t from, uint32_t to,
				    const char *site, const char *from_site);
/* Record "to taken at site while holding from (taken at from_site)". With
 * `learned` (either end is a learned lock), if the edge would close a
 * cycle, passes the shortest such cycle's edges to each(ctx, ...) and
 * returns the number of edges on the path back (>= 1); else 0. The sites
 * are opaque to the graph. */
int keel__graph_edge_each(uint32_t from, uint32_t to, const char *site,
			  const char *from_site, int learned, int violation,
			  keel__graph_each_fn each, void *ctx);
/* The same, for keel's locks, whose sites are "file:line" strings: the
 * cycle is written into buf as the lines of keel's report; 1 if found. */
int keel__graph_edge(uint32_t from, uint32_t to, const char *site,
		     const char *from_site, int learned, int violation,
		     char *buf, size_t size);
/* A node's name and lock (NULL for none), for the callers' reports. */
const char *keel__graph_name(uint32_t id);
const void *keel__graph_lock(uint32_t id);
/* The site recorded with the current edge from -> to; NULL: none. */
const char *keel__graph_site(uint32_t from, uint32_t to);
/* Live locks and current edges, counted. */
void keel__graph_count(uint32_t *nlocks, uint32_t *nedges);
/* Where the edge table is: the one large table, hashed, so that a few
 * thousand edges touch every page of it (the interposer asks for huge
 * pages there). */
void keel__graph_table(void **start, size_t *bytes);

/* ---- Thread cache ------------------------------------------------------ */
/* Run fn(arg) on a cached thread with the given stack size (0: default),
 * creating a thread if none is idle. 0 or -ENOMEM. */
int keel__thread_start(void (*fn)(void *), void *arg, size_t stack_size);

struct keel__thread_cache_stats {
	uint64_t created; /* threads created so far */
	uint64_t started; /* jobs started so far */
	uint32_t idle;    /* threads idle now */
	uint32_t exited;  /* threads that have left the cache */
};
void keel__thread_cache_stats(struct keel__thread_cache_stats *st);
/* How long an idle cached thread waits for a job before it exits. */
void keel__thread_cache_set_idle_timeout(keel_time_t ns);
/* Wait until the count of exited threads differs from `seen`. */
void keel__thread_cache_wait_exit(uint32_t seen);
/* fork() phases: 0 prepare, 1 parent, 2 child. */
void keel__thread_cache_fork(int phase);
void keel__msg_fork(int phase);

/* Start a task on a cached thread: allocates its slot (so the handle is
 * valid at once), then runs fn(arg) there; the task ends when fn returns,
 * with fn's return value as its status. */
int keel__task_spawn(keel_task_t *out, int (*fn)(void *), void *arg,
		     const char *name, size_t stack_size);
/* Wait until the task has ended, then take its status and release its
 * slot. -ESRCH for a stale or adopted handle. */
int keel__task_join(keel_task_t id, int *status);

#endif /* KEEL_INTERNAL_H */
