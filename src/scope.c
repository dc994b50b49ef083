/*
 * scope.c: scopes: structured concurrency with exact reverse-order
 * teardown, and the task-tree dump (keel_main() is in main.c).
 *
 * DESIGN
 * A scope is a cancellation frame (cancel.c) plus one stack of entries in
 * creation order: child tasks, cleanups, resources. Its owner, the task
 * that opened it, is its body: the scope is on the owner's chain until
 * the owner closes it. Closing unwinds the stack from the top, one entry
 * at a time: a child is cancelled (cause CLOSE) and joined (waiting, not
 * cancellably, until it has ended, its own scopes and cleanups included);
 * a cleanup or teardown runs on the owner under a fresh shield of
 * cleanup_deadline. So a cleanup registered at position i runs only after
 * every task registered after i has fully exited, and what was registered
 * before i is still alive while it runs: teardown is the exact reverse of
 * creation. (A scope cancelled as a whole, by keel_scope_cancel(), its
 * deadline, a failure or a signal, cancels all its children at once;
 * close still joins them in reverse order.)
 *
 * Scopes live in a never-freed table, like task slots, and a keel_scope_t
 * pointer is an (index, generation) handle: a scope that was closed (and
 * its slot perhaps reused) is recognised, never dereferenced.
 *
 * A handle value is issued once. The slot keeps its generation in 56
 * bits; the handle has room for the index (20 bits, the table's size) and
 * the rest of a pointer: 44 bits of generation on 64-bit targets, 12 on
 * 32-bit ones. A slot whose generation has no room left in a handle is
 * retired: never given out again, its memory kept (it is one scope struct
 * per 2^44, or 2^12, openings of that slot). So a stale handle can never
 * match a later scope, on any width; what a 32-bit target gives up
 * instead is the number of scopes a process can ever open, about 2^32
 * (then keel_scope_open() says -ENOMEM), since no 32-bit value can tell
 * more uses apart.
 *
 * LOCKS (the rules are in cancel.c). Each scope has its own lock, over its
 * entries and its state changes; the handle's generation is checked under
 * it. The table's lock is taken only to take a slot or give one back (and
 * by keel_dump() and fork()). No lock is shared by the tasks of different
 * scopes, and a child ends without taking any lock of its scope's: what it
 * tells the scope goes through atomics (the foreground count, the first
 * error) and its `ended` word.
 *
 * A child's life:
 *   keel_spawn (under the scope's lock): slot allocated, chain rooted in
 *   the scope, entry pushed, foreground count up -> runs fn on a cached
 *   thread -> keel__task_end on that thread: mailbox closed and drained,
 *   open scopes closed, then keel__scope_child_ended: on_exit hook,
 *   `ended` = ENDED (status final), foreground count down, failure
 *   recorded (fail-fast cancels the scope), then one of two ways:
 *   - joinable (its handle was taken, and it was not spawned detached):
 *     `ended` = LEFT, owner unparked -> the owner joins it (keel_join or
 *     close): waits for LEFT, takes its status, marks the entry done and
 *     releases the slot;
 *   - not joinable: its status has been delivered (to on_exit, and into
 *     the scope's result), so it reaps itself: under the scope's lock,
 *     if the scope is still OPEN, it marks its entry done and counts
 *     itself in `reaping`; then `ended` = LEFT, it releases its own slot,
 *     and its last touch of the scope is to take itself out of
 *     `reaping` (the close waits for 0 before it frees the scope, so a
 *     closed scope has given back every slot); then it unparks the owner.
 *     If the scope is CLOSING, the close may be joining it: it leaves as
 *     a joinable child does and the close reaps it.
 * A child's status is read only after ENDED, and ENDED comes before its
 * failure cancels anything, so a finished child's status is never lost to
 * a cancellation that comes later. Nothing of the scope is touched after
 * LEFT (or after a self-reap lets go of the scope's lock); a joinable
 * child is reaped only by the owner, a detached one only by itself, and
 * only while the owner cannot have begun to close: so the scope outlives
 * every child's last touch, and no slot is released twice.
 *
 * Memory follows what is live. Reaped entries are marked done; once at
 * least half the stack (and 32 entries or more) is done, the stack is
 * compacted in order, each moved child's `entry` index updated (under its
 * chain lock too, which keel_join reads it under), and the array shrunk
 * when it is mostly empty. `layout` counts compactions, so that a spread
 * walking the entries in batches starts over when indices moved. Never
 * while CLOSING (the close walks the stack by index) nor while a
 * resource's setup runs (it holds a reserved index).
 *
 * Fields: set at open and read-only until the close: name, cleanup_ns,
 * policy, on_exit, owner (frame.owner), frame.parent, frame.deadline.
 * Under the scope's lock: entries and their done marks, setting_up, state
 * changes. Atomic: nfg, first_error, nerrors, frame.cancelled, gen_state.
 * Owner only: first_cleanup_error.
 */
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"

enum scope_state { SC_FREE, SC_OPEN, SC_CLOSING };
enum entry_kind { E_NONE, E_CHILD, E_CLEANUP, E_RESOURCE, E_RESERVED };

struct entry {
	uint8_t kind;
	uint8_t done;
	struct keel__task *task;
	keel_cleanup_fn fn;
	void *arg;
};

struct keel__scope {
	struct keel__frame frame; /* first: a FRAME_SCOPE frame is its scope */
	_Atomic uint64_t gen_state; /* generation << 8 | enum scope_state */
	pthread_mutex_t lock;
	uint32_t idx;
	char name[KEEL_TASK_NAME_MAX + 1];
	keel_time_t cleanup_ns;
	keel_policy_t policy;
	keel_exit_fn on_exit;
	void *on_exit_arg;
	keel_time_t opened_at;
	struct entry *entries;
	uint32_t nentries, cap;
	uint32_t ndone;  /* entries marked done or E_NONE, not yet dropped */
	uint32_t layout; /* compactions so far */
	_Atomic uint32_t nfg;        /* foreground children not yet ended */
	_Atomic uint32_t reaping;    /* self-reaped, slot not yet given back */
	_Atomic int first_error;
	_Atomic uint32_t nerrors;
	int first_cleanup_error;
	uint32_t setting_up; /* keel_resource() setups running */
	struct keel__scope *free_next;
};

#define SC_CHUNK_SHIFT 6
#define SC_CHUNK ((uint32_t)1 << SC_CHUNK_SHIFT)
#define SC_MAX_CHUNKS ((uint32_t)1 << (20 - SC_CHUNK_SHIFT))
#define SC_IDX_BITS 20
#define SC_GEN_BITS (sizeof(uintptr_t) * 8 - SC_IDX_BITS)
/* The last generation a handle can carry; a slot past it is retired. */
#define SC_GEN_LAST ((((uint64_t)1) << SC_GEN_BITS) - 1)
_Static_assert(SC_MAX_CHUNKS * SC_CHUNK <= (1u << SC_IDX_BITS),
	       "every slot index fits in a handle");
#define DEFAULT_CLEANUP_NS KEEL_SEC(5)

/* The table: chunks and the count are published with release stores, so
 * that a handle is decoded without the lock; the free list is under it. */
static pthread_mutex_t table_lock = PTHREAD_MUTEX_INITIALIZER;
static _Atomic(struct keel__scope *) sc_chunks[SC_MAX_CHUNKS];
static _Atomic uint32_t sc_count;
static struct keel__scope *sc_free;

/* ---- Handles ---------------------------------------------------------------- */

static uint32_t scope_state(struct keel__scope *sc)
{
	return (uint32_t)(load_acquire(&sc->gen_state) & 0xff);
}

uint64_t keel__scope_gen(struct keel__frame *f)
{
	return load_acquire(&((struct keel__scope *)f)->gen_state) >> 8;
}

static keel_scope_t *encode(struct keel__scope *sc)
{
	uint64_t gen = load_relaxed(&sc->gen_state) >> 8;

	/* gen <= SC_GEN_LAST: a slot past it is never opened. */
	return (keel_scope_t *)(uintptr_t)(gen << SC_IDX_BITS | sc->idx);
}

static struct keel__scope *slot_at(uint32_t idx)
{
	struct keel__scope *c;

	if (idx >= load_acquire(&sc_count))
		return NULL;
	c = load_acquire(&sc_chunks[idx >> SC_CHUNK_SHIFT]);
	return &c[idx & (SC_CHUNK - 1)];
}

/* The slot a handle names, or NULL if it never named one (-EINVAL). The
 * caller locks the slot and checks it with scope_is(). */
static struct keel__scope *scope_slot(keel_scope_t *h)
{
	return h ? slot_at((uint32_t)((uintptr_t)h &
				      ((1u << SC_IDX_BITS) - 1)))
		 : NULL;
}

/* Under sc's lock: does the handle name this open or closing use of it? */
static int scope_is(struct keel__scope *sc, keel_scope_t *h)
{
	uint64_t w = load_relaxed(&sc->gen_state);

	return (w >> 8) == (uint64_t)((uintptr_t)h >> SC_IDX_BITS) &&
	       (w & 0xff) != SC_FREE;
}

/* Lock the scope a handle names. NULL, with *rc set, if it names none:
 * -EINVAL if it never did, `stale_rc` if that scope has closed. */
static struct keel__scope *scope_lock(keel_scope_t *h, int stale_rc, int *rc)
{
	struct keel__scope *sc = scope_slot(h);

	if (!sc) {
		*rc = -EINVAL;
		return NULL;
	}
	pthread_mutex_lock(&sc->lock);
	if (!scope_is(sc, h)) {
		pthread_mutex_unlock(&sc->lock);
		*rc = stale_rc;
		return NULL;
	}
	*rc = 0;
	return sc;
}

static struct keel__scope *scope_alloc(void)
{
	struct keel__scope *sc;
	uint32_t n;

	pthread_mutex_lock(&table_lock);
	if ((sc = sc_free) != NULL) {
		sc_free = sc->free_next;
		pthread_mutex_unlock(&table_lock);
		return sc;
	}
	n = load_relaxed(&sc_count);
	if (n >> SC_CHUNK_SHIFT >= SC_MAX_CHUNKS) {
		pthread_mutex_unlock(&table_lock);
		return NULL;
	}
	if (!load_relaxed(&sc_chunks[n >> SC_CHUNK_SHIFT])) {
		struct keel__scope *c = calloc(SC_CHUNK, sizeof *c);

		if (!c) {
			pthread_mutex_unlock(&table_lock);
			return NULL;
		}
		for (uint32_t i = 0; i < SC_CHUNK; i++) {
			c[i].idx = n + i;
			pthread_mutex_init(&c[i].lock, NULL);
			/* Generation 1: a handle is never NULL. */
			atomic_init(&c[i].gen_state, (uint64_t)1 << 8 | SC_FREE);
		}
		store_release(&sc_chunks[n >> SC_CHUNK_SHIFT], c);
	}
	sc = &load_relaxed(&sc_chunks[n >> SC_CHUNK_SHIFT])[n & (SC_CHUNK - 1)];
	store_release(&sc_count, n + 1);
	pthread_mutex_unlock(&table_lock);
	return sc;
}

/* Under sc's lock. */
static void scope_set_state(struct keel__scope *sc, enum scope_state st)
{
	uint64_t w = load_relaxed(&sc->gen_state);

	store_release(&sc->gen_state, (w & ~(uint64_t)0xff) | st);
}

/* The owner is done with it: a new generation (every handle to it is
 * stale from here), then back to the table. */
static void scope_free(struct keel__scope *sc)
{
	uint64_t gen;
	struct entry *entries;

	pthread_mutex_lock(&sc->lock);
	gen = (load_relaxed(&sc->gen_state) >> 8) + 1;
	/* Past SC_GEN_LAST no handle could name it: stale handles would
	 * wrap onto its next use. Its generation still moves on, so every
	 * handle to it reads as stale. */
	store_release(&sc->gen_state, gen << 8 | SC_FREE);
	entries = sc->entries;
	sc->entries = NULL;
	sc->nentries = sc->cap = sc->ndone = 0;
	pthread_mutex_unlock(&sc->lock);
	free(entries);
	if (gen > SC_GEN_LAST)
		return; /* retired */
	pthread_mutex_lock(&table_lock);
	sc->free_next = sc_free;
	sc_free = sc;
	pthread_mutex_unlock(&table_lock);
}

/* Is the scope's frame, or one it sits in (up to the nearest shield),
 * cancelled? Under sc's lock with sc open, or on the owner's thread: the
 * frames below sc on its owner's chain cannot pop while sc is open. */
static uint32_t scope_cancelled(struct keel__scope *sc)
{
	return keel__chain_cancelled(&sc->frame);
}

/* Under sc's lock. */
static int push_entry(struct keel__scope *sc, struct entry e)
{
	if (sc->nentries == sc->cap) {
		uint32_t cap = sc->cap ? sc->cap * 2 : 8;
		struct entry *n = realloc(sc->entries, cap * sizeof *n);

		if (!n)
			return -ENOMEM;
		sc->entries = n;
		sc->cap = cap;
	}
	sc->entries[sc->nentries] = e;
	return (int)sc->nentries++;
}

/* Under sc's lock: drop the entries marked done (or never used), keeping
 * the order of the rest, once they are at least half the stack; then
 * give back memory if the array is mostly empty. Only while OPEN and no
 * setup holds a reserved index (see the DESIGN comment). */
static void compact(struct keel__scope *sc)
{
	uint32_t k = 0;

	if (sc->ndone < 32 || sc->ndone * 2 < sc->nentries ||
	    scope_state(sc) != SC_OPEN || sc->setting_up)
		return;
	for (uint32_t i = 0; i < sc->nentries; i++) {
		struct entry *e = &sc->entries[i];

		if (e->done || e->kind == E_NONE)
			continue;
		if (e->kind == E_CHILD && i != k) {
			pthread_mutex_lock(&e->task->chain_lock);
			e->task->entry = k;
			pthread_mutex_unlock(&e->task->chain_lock);
		}
		sc->entries[k++] = *e;
	}
	sc->nentries = k;
	sc->ndone = 0;
	sc->layout++;
	if (sc->cap > 64 && k < sc->cap / 4) {
		uint32_t cap = k * 2 > 8 ? k * 2 : 8;
		struct entry *n = realloc(sc->entries, cap * sizeof *n);

		if (n) { /* else it keeps the larger array: no harm */
			sc->entries = n;
			sc->cap = cap;
		}
	}
}

/* Under sc's lock: entry i is finished with. */
static void drop_entry(struct keel__scope *sc, uint32_t i)
{
	sc->entries[i].done = 1;
	sc->ndone++;
	compact(sc);
}

/* A failure, as opposed to success or an exit caused by cancellation. */
static int genuine(int status)
{
	return status < 0 && status != -ECANCELED;
}

/* No keel lock held; sc is alive (the caller is its owner or an unreaped
 * child). A failure while the scope closes is recorded but cancels nothing
 * more: the close is already taking everything down, in order. */
static void record_failure(struct keel__scope *sc, int status)
{
	int none = 0;

	atomic_compare_exchange_strong_explicit(&sc->first_error, &none,
						status, memory_order_acq_rel,
						memory_order_relaxed);
	fetch_add_relaxed(&sc->nerrors, 1);
	if (sc->policy == KEEL_FAIL_FAST && scope_state(sc) == SC_OPEN)
		keel__frame_cancel(&sc->frame, KEEL_CANCEL_SIBLING);
}

/* ---- Opening ----------------------------------------------------------------- */

int keel_scope_open(keel_scope_t **out, const keel_scope_opts *opts)
{
	static const keel_scope_opts defaults;
	struct keel__task *t;
	struct keel__scope *sc;

	if (!out)
		return -EINVAL;
	if (!opts)
		opts = &defaults;
	if (opts->cleanup_deadline < 0 ||
	    (opts->policy != KEEL_FAIL_FAST && opts->policy != KEEL_SUPERVISE))
		return -EINVAL;
	if (!(t = keel__self()))
		return -ENOMEM;
	if (keel__check(t) < 0)
		return -ECANCELED;
	if (!(sc = scope_alloc()))
		return -ENOMEM;
	pthread_mutex_lock(&sc->lock);
	snprintf(sc->name, sizeof sc->name, "%s",
		 opts->name ? opts->name : "scope");
	sc->cleanup_ns = opts->cleanup_deadline ? opts->cleanup_deadline
						: DEFAULT_CLEANUP_NS;
	sc->policy = opts->policy;
	sc->on_exit = opts->on_exit;
	sc->on_exit_arg = opts->on_exit_arg;
	sc->opened_at = keel__clock_now();
	store_relaxed(&sc->nfg, 0);
	store_relaxed(&sc->first_error, 0);
	store_relaxed(&sc->nerrors, 0);
	sc->first_cleanup_error = 0;
	sc->setting_up = 0;
	store_relaxed(&sc->frame.cancelled, 0);
	sc->frame.kind = FRAME_SCOPE;
	sc->frame.internal = 0;
	/* 0 is "none" (zeroed options); any other time, negative ones
	 * included, is a deadline, perhaps one that has passed already. */
	sc->frame.deadline = opts->deadline != 0 ? opts->deadline : KEEL_FOREVER;
	sc->frame.parent = t->cur;
	sc->frame.owner = t;
	scope_set_state(sc, SC_OPEN);
	*out = encode(sc);
	pthread_mutex_unlock(&sc->lock);
	/* Onto the chain under the chain lock: a spread that walks the
	 * chain either sees the scope, or comes after this and so finds any
	 * cancellation already marked by the time a child is spawned. */
	pthread_mutex_lock(&t->chain_lock);
	t->cur = &sc->frame;
	pthread_mutex_unlock(&t->chain_lock);
	keel__chain_changed(t);
	return 0;
}

/* ---- Children ------------------------------------------------------------------ */

void keel__spread_scope(struct keel__frame *f, uint64_t gen)
{
	struct keel__scope *sc = (struct keel__scope *)f;
	struct keel__task *batch[SPREAD_BATCH];
	uint32_t from = 0, layout = 0;

	for (int first = 1;; first = 0) {
		unsigned n = 0;
		int more;

		pthread_mutex_lock(&sc->lock);
		if ((load_relaxed(&sc->gen_state) >> 8) != gen ||
		    scope_state(sc) == SC_FREE) {
			/* Closed since: every child it had has ended. */
			pthread_mutex_unlock(&sc->lock);
			return;
		}
		/* Compacted since the last batch: indices moved, so start
		 * over (waking a child twice is harmless; missing one is
		 * not). Compactions need reaps, which are finite. */
		if (first || sc->layout != layout) {
			layout = sc->layout;
			from = 0;
		}
		for (; from < sc->nentries && n < SPREAD_BATCH; from++) {
			struct entry *e = &sc->entries[from];

			if (e->kind == E_CHILD && !e->done &&
			    load_relaxed(&e->task->ended) == TASK_RUNNING)
				batch[n++] = e->task;
		}
		more = from < sc->nentries;
		pthread_mutex_unlock(&sc->lock);
		KEEL_YIELD();
		for (unsigned i = 0; i < n; i++)
			keel__spread_task(batch[i], &batch[i]->base);
		if (!more)
			return;
	}
}

static void run_child(void *p)
{
	struct keel__task *t = p;
	char name[KEEL_TASK_NAME_MAX + 1];
	int status;

	keel__tls.self = t;
	keel__tls_register();
	keel__task_copy_name(t, name);
	keel__thread_set_os_name(name);
	status = t->spawn_fn(t->spawn_arg);
	keel__task_end(t, status);
	keel__tls.self = NULL;
}

int keel_spawn(keel_scope_t *s, keel_fn fn, void *arg,
	       const keel_spawn_opts *opts, keel_task_t *out)
{
	static const keel_spawn_opts defaults;
	struct keel__scope *sc;
	struct keel__task *c;
	keel_task_t old = KEEL_TASK_NONE;
	int idx, rc;

	if (!fn)
		return -EINVAL;
	if (!opts)
		opts = &defaults;
	if (!(sc = scope_lock(s, -ECANCELED, &rc)))
		return rc;
	/* Under the lock, so that a spread of a cancellation either finds
	 * the child among the entries or has marked its frame before this
	 * look. */
	if (scope_state(sc) != SC_OPEN || scope_cancelled(sc)) {
		pthread_mutex_unlock(&sc->lock);
		return -ECANCELED;
	}
	if (!(c = keel__task_alloc())) {
		pthread_mutex_unlock(&sc->lock);
		return -ENOMEM;
	}
	idx = push_entry(sc, (struct entry){.kind = E_CHILD, .task = c});
	if (idx < 0) {
		pthread_mutex_unlock(&sc->lock);
		keel__task_discard(c);
		return -ENOMEM;
	}
	if (opts->name)
		keel__task_set_name(c, opts->name);
	pthread_mutex_lock(&c->chain_lock);
	c->home = sc;
	c->entry = (uint32_t)idx;
	c->background = opts->background ? 1 : 0;
	c->joinable = out && !opts->detached;
	c->base.parent = &sc->frame;
	keel__chain_changed(c);
	c->spawn_fn = fn;
	c->spawn_arg = arg;
	pthread_mutex_unlock(&c->chain_lock);
	if (!c->background)
		fetch_add_relaxed(&sc->nfg, 1);
	/* The handle is written before the thread starts, so that a child
	 * that reads it where the caller keeps it (a struct passed as its
	 * argument) finds it there; if the thread cannot start, the caller's
	 * variable gets its old value back: a failed call has no effect. */
	if (out) {
		old = *out;
		*out = c->id;
	}
	/* Started under the lock, so that a close (which needs the lock)
	 * cannot see the entry before its thread exists. */
	rc = keel__thread_start(run_child, c, opts->stack_size);
	if (rc < 0) {
		if (out)
			*out = old;
		sc->entries[idx].kind = E_NONE;
		sc->ndone++;
		if (!c->background)
			fetch_sub_release(&sc->nfg, 1);
		pthread_mutex_unlock(&sc->lock);
		keel__task_discard(c);
		return rc;
	}
	pthread_mutex_unlock(&sc->lock);
	return 0;
}

void keel__scope_child_ended(struct keel__task *t, int status)
{
	struct keel__scope *sc = t->home;

	/* Before ENDED: until then the owner cannot close the scope, so the
	 * hook's argument is alive. A hook that ends the thread comes back
	 * through keel__task_end(), which finishes with the rest. */
	if (sc->on_exit) {
		store_relaxed(&t->ending_in, "its scope's on_exit hook");
		t->in_exit_hook = 1;
		sc->on_exit(t->id, status, sc->on_exit_arg);
		t->in_exit_hook = 0;
	}
	keel__scope_child_told(t, status);
}

void keel__scope_child_told(struct keel__task *t, int status)
{
	struct keel__scope *sc = t->home;
	struct keel__task *owner = sc->frame.owner;
	int self_reap = 0;

	store_relaxed(&t->ending_in, "telling its scope");
	/* The thread goes back to the cache: it no longer carries the task's
	 * name by the time anyone can see the task ended. */
	keel__thread_set_os_name("keel-idle");
	/* ENDED before its failure cancels anything: an owner that wakes on
	 * that cancellation while joining this very child finds it ended and
	 * gets its status. Pairs with the acquire loads in keel_join() and
	 * join_child(). */
	store_release(&t->ended, TASK_ENDED);
	KEEL_YIELD();
	if (!t->background)
		fetch_sub_release(&sc->nfg, 1);
	if (genuine(status))
		record_failure(sc, status);
	KEEL_YIELD();
	/* Not joinable: its status is delivered, so it reaps itself while
	 * the scope is OPEN. CLOSING never goes back to OPEN, so a close
	 * seen without the lock is seen for good; under the lock, the state
	 * is final for this decision, as the close sets it under the lock
	 * and walks the entries only after. */
	if (!t->joinable && scope_state(sc) == SC_OPEN) {
		pthread_mutex_lock(&sc->lock);
		self_reap = scope_state(sc) == SC_OPEN;
		if (self_reap) {
			drop_entry(sc, t->entry);
			fetch_add_relaxed(&sc->reaping, 1);
		}
		pthread_mutex_unlock(&sc->lock);
	}
	store_release(&t->ended, TASK_LEFT);
	if (self_reap) {
		/* The last touch of the slot: it may be reused at once. Then
		 * the last touch of the scope: the close waits for `reaping`
		 * to fall to 0, so that when it returns every slot of its
		 * children has been given back. */
		keel__task_release(t);
		fetch_sub_release(&sc->reaping, 1);
	}
	/* From here the owner may reap the task (if it is joinable) and
	 * close the scope. The owner's slot outlives it (never freed): a
	 * late wake of a reused one is spurious, which every wait absorbs. */
	keel__unpark(owner);
}

/* ---- Cleanups and resources ------------------------------------------------------ */

/* The scope a handle names, locked, if the caller may add to it. */
static struct keel__scope *owned_open(keel_scope_t *s, struct keel__task *t,
				      int *rc)
{
	struct keel__scope *sc = scope_lock(s, -ECANCELED, rc);

	if (!sc)
		return NULL;
	if (sc->frame.owner != t)
		*rc = -EPERM;
	else if (scope_state(sc) != SC_OPEN)
		*rc = -ECANCELED;
	else
		return sc;
	pthread_mutex_unlock(&sc->lock);
	return NULL;
}

int keel_defer(keel_scope_t *s, keel_cleanup_fn fn, void *arg)
{
	struct keel__task *t = keel__self();
	struct keel__scope *sc;
	int rc;

	if (!fn)
		return -EINVAL;
	if (!t)
		return -ENOMEM;
	if (!(sc = owned_open(s, t, &rc)))
		return rc;
	rc = push_entry(sc, (struct entry){.kind = E_CLEANUP, .fn = fn,
					    .arg = arg});
	pthread_mutex_unlock(&sc->lock);
	return rc < 0 ? rc : 0;
}

int keel_resource(keel_scope_t *s, keel_setup_fn setup,
		  keel_cleanup_fn teardown, void *arg, void **out)
{
	struct keel__task *t = keel__self();
	struct keel__scope *sc;
	void *res = NULL;
	int rc, slot;

	if (!setup || !teardown)
		return -EINVAL;
	if (!t)
		return -ENOMEM;
	if (keel__check(t) < 0)
		return -ECANCELED;
	/* Reserve the entry first: once setup has succeeded, arming its
	 * teardown can neither fail nor be interrupted. */
	if (!(sc = owned_open(s, t, &rc)))
		return rc;
	slot = push_entry(sc, (struct entry){.kind = E_RESERVED});
	if (slot >= 0)
		sc->setting_up++; /* the scope cannot close under the setup */
	pthread_mutex_unlock(&sc->lock);
	if (slot < 0)
		return slot;
	KEEL_YIELD();
	rc = setup(arg, &res);
	/* Nothing between a successful setup and this store can cancel or
	 * fail: it is not a cancellation point and allocates nothing. The
	 * lock is for the entries array, which other tasks' spawns may
	 * have moved. */
	pthread_mutex_lock(&sc->lock);
	sc->setting_up--;
	if (rc == 0)
		sc->entries[slot] = (struct entry){.kind = E_RESOURCE,
						   .fn = teardown, .arg = res};
	else
		sc->entries[slot].kind = E_NONE, sc->ndone++;
	pthread_mutex_unlock(&sc->lock);
	if (rc == 0 && out)
		*out = res;
	return rc;
}

/* ---- Joining ------------------------------------------------------------------------ */

static int has_ended(void *p)
{
	/* Pairs with the release in keel__scope_child_ended(). */
	return load_acquire(&((struct keel__task *)p)->ended) != TASK_RUNNING;
}

static int has_left(void *p)
{
	return load_acquire(&((struct keel__task *)p)->ended) == TASK_LEFT;
}

static int no_foreground(void *p)
{
	return load_acquire(&((struct keel__scope *)p)->nfg) == 0;
}

static int none_reaping(void *p)
{
	/* Pairs with the release in keel__scope_child_told(). */
	return load_acquire(&((struct keel__scope *)p)->reaping) == 0;
}

int keel_scope_join(keel_scope_t *s, keel_time_t deadline)
{
	struct keel__task *t = keel__self();
	struct keel__scope *sc;
	int rc;

	if (!t)
		return -ENOMEM;
	if (!(sc = scope_lock(s, -EINVAL, &rc)))
		return rc;
	rc = sc->frame.owner != t ? -EPERM : 0;
	pthread_mutex_unlock(&sc->lock);
	if (rc < 0)
		return rc;
	/* Ours, so it stays open while we wait. */
	keel__lock_check_blocking("keel_scope_join()");
	return keel__wait_for(t, no_foreground, sc, deadline, 1, "scope_join");
}

/* The owner reaps a joinable child that has LEFT: marks its entry done
 * and releases its slot. Its index is read under the lock: a compaction
 * may have moved it since the caller looked. */
static void reap(struct keel__scope *sc, struct keel__task *c)
{
	pthread_mutex_lock(&sc->lock);
	drop_entry(sc, c->entry);
	pthread_mutex_unlock(&sc->lock);
	keel__task_release(c);
}

int keel_join(keel_task_t id, int *status, keel_time_t deadline)
{
	struct keel__task *t = keel__self(), *c = keel__task_slot(id);
	struct keel__scope *sc;
	int rc = 0;

	if (!t)
		return -ENOMEM;
	if (!c || id == KEEL_TASK_NONE)
		return -ESRCH;
	keel__lock_check_blocking("keel_join()");
	pthread_mutex_lock(&c->chain_lock);
	sc = keel__task_is(c, id) ? c->home : NULL;
	pthread_mutex_unlock(&c->chain_lock);
	if (!sc)
		return -ESRCH;
	/* Scope slots are never freed, so its lock may be taken even if the
	 * child has gone and the scope closed since: the checks under it
	 * tell. A joinable child is reaped only by its scope's owner; if
	 * that is us, nobody else can while we wait. */
	pthread_mutex_lock(&sc->lock);
	if (!keel__task_is(c, id) || c->home != sc || scope_state(sc) == SC_FREE ||
	    c->entry >= sc->nentries || sc->entries[c->entry].task != c ||
	    sc->entries[c->entry].done)
		rc = -ESRCH;
	else if (sc->frame.owner != t)
		rc = -EPERM;
	else if (!c->joinable)
		rc = -EINVAL;
	pthread_mutex_unlock(&sc->lock);
	if (rc < 0)
		return rc;
	if ((rc = keel__wait_for(t, has_ended, c, deadline, 1, "join")) < 0)
		return rc;
	/* Ended: its status is final. It is about to leave its scope; wait
	 * for that, not cancellably (it is a matter of instructions). */
	keel__wait_for(t, has_left, c, KEEL_FOREVER, 0, "join");
	if (status)
		*status = c->status;
	reap(sc, c);
	return 0;
}

/* ---- Cancelling and closing ---------------------------------------------------------- */

static int scope_cancel_cause(keel_scope_t *s, uint32_t cause)
{
	struct keel__scope *sc;
	struct keel__task *owner;
	uint32_t none = 0;
	uint64_t gen;
	int rc, won;

	if (!(sc = scope_lock(s, -EINVAL, &rc)))
		return rc;
	/* Marked under the lock, where the handle was checked: a handle to a
	 * closed scope cannot mark the slot's next use. If the scope closes
	 * once we let go, the spread finds it gone (off its owner's chain, a
	 * new generation) and wakes nothing it should not. */
	won = atomic_compare_exchange_strong_explicit(
		&sc->frame.cancelled, &none, cause, memory_order_acq_rel,
		memory_order_acquire);
	gen = load_relaxed(&sc->gen_state) >> 8;
	owner = sc->frame.owner;
	pthread_mutex_unlock(&sc->lock);
	if (won)
		keel__spread_frame(&sc->frame, owner, gen);
	return 0;
}

int keel_scope_cancel(keel_scope_t *s)
{
	return scope_cancel_cause(s, KEEL_CANCEL_EXPLICIT);
}

int keel_task_cancel(keel_task_t id)
{
	return keel__task_cancel(id, KEEL_CANCEL_EXPLICIT);
}

void keel__scope_stats(size_t *live, size_t *slots)
{
	uint32_t n;

	pthread_mutex_lock(&table_lock);
	n = load_relaxed(&sc_count);
	*slots = n;
	*live = n;
	for (struct keel__scope *sc = sc_free; sc; sc = sc->free_next)
		(*live)--;
	pthread_mutex_unlock(&table_lock);
}

/* The close's report of a child that has not ended cleanup_ns after its
 * turn came: still running its body (and where), or past it and still
 * ending (and in which step). */
static void report_slow_child(struct keel__scope *sc, struct keel__task *c)
{
	char name[KEEL_TASK_NAME_MAX + 1];
	const char *ending = load_relaxed(&c->ending_in);
	const char *blocked = load_relaxed(&c->blocked_in);
	long long ms = (long long)(sc->cleanup_ns / 1000000);

	keel__task_copy_name(c, name);
	if (ending)
		keel__report("scope '%s': child '%s' returned from its body "
			     "but has not ended %lld ms after it was cancelled "
			     "(in: %s%s%s); waiting",
			     sc->name, name, ms, ending,
			     blocked ? ", blocked in " : "",
			     blocked ? blocked : "");
	else
		keel__report("scope '%s': child '%s' still running %lld ms "
			     "after it was cancelled (%s%s); waiting",
			     sc->name, name, ms,
			     blocked ? "blocked in " : "running",
			     blocked ? blocked : "");
}

static void join_child(struct keel__scope *sc, struct keel__task *t,
		       uint32_t entry)
{
	struct keel__task *c = sc->entries[entry].task;
	keel_time_t report_at = keel_after(sc->cleanup_ns);

	/* Its turn: cancel it (and what runs inside it), and only it. A
	 * child of a scope cancelled as a whole keeps that cause. Not reaped
	 * yet, so its base frame is alive. */
	if (!has_ended(c) && !scope_cancelled(sc))
		keel__frame_cancel(&c->base, KEEL_CANCEL_CLOSE);
	/* Not cancellable: close must not return while the child runs. */
	while (keel__wait_for(t, has_left, c, report_at, 0, "close: join") <
	       0) {
		if (report_at != KEEL_FOREVER) {
			report_slow_child(sc, c);
			report_at = KEEL_FOREVER;
		}
	}
	reap(sc, c);
}

static int close_scope(struct keel__scope *sc, struct keel__task *t);

/*
 * Misuse repaired: end or close, innermost first, every shield and scope
 * that t left open above `stop` on its chain (a cleanup, a body or a whole
 * task that returned without ending what it began), each with a report
 * "<who> <verb> ... open". Closing a scope this way runs its teardown in
 * order, as keel_scope_close() would.
 */
static void unwind_to(struct keel__task *t, struct keel__frame *stop,
		      const char *who, const char *verb)
{
	while (t->cur != stop) {
		struct keel__frame *f = t->cur;
		struct keel__scope *sc = (struct keel__scope *)f;

		KEEL_ASSERT(f != &t->base);
		if (f->kind == FRAME_SHIELD) {
			/* keel's own, around a cleanup the thread ended in:
			 * the scope's report below says it. */
			if (!f->internal)
				keel__report("%s %s a shield open; ending it",
					     who, verb);
			keel__shield_pop(t);
			continue;
		}
		if (scope_state(sc) == SC_CLOSING)
			keel__report("%s %s scope '%s' half closed (in one of "
				     "its cleanups); finishing the close",
				     who, verb, sc->name);
		else
			keel__report("%s %s scope '%s' open; closing it", who,
				     verb, sc->name);
		pthread_mutex_lock(&sc->lock);
		scope_set_state(sc, SC_CLOSING);
		pthread_mutex_unlock(&sc->lock);
		close_scope(sc, t);
	}
}

static void run_cleanup(struct keel__scope *sc, struct keel__task *t,
			struct entry *e, uint32_t pos)
{
	int shielded =
		keel__shield_push(t, keel_after(sc->cleanup_ns), 1) == 0;
	struct keel__frame *mine = t->cur;
	char who[KEEL_TASK_NAME_MAX + 40];
	int rc;

	if (!shielded)
		keel__report("scope '%s': cleanup #%u runs unshielded: too "
			     "many nested shields",
			     sc->name, pos);
	/* Taken before it runs: a cleanup that ends its thread is not run
	 * again by the close that the task's end finishes. */
	pthread_mutex_lock(&sc->lock);
	e->done = 1;
	pthread_mutex_unlock(&sc->lock);
	rc = e->fn(e->arg);
	if (t->cur != mine) {
		snprintf(who, sizeof who, "scope '%s': cleanup #%u", sc->name,
			 pos);
		unwind_to(t, mine, who, "left");
	}
	if (shielded && keel__shield_pop(t)) {
		keel__report("scope '%s': cleanup #%u was cut off at its "
			     "deadline (%lld ms)",
			     sc->name, pos, (long long)(sc->cleanup_ns / 1000000));
		rc = -ETIMEDOUT; /* teardown was incomplete */
	}
	if (genuine(rc) && !sc->first_cleanup_error)
		sc->first_cleanup_error = rc;
}

/* The owner closes sc, which it has marked CLOSING (so nothing is pushed
 * any more and the entries array stays where it is). */
static int close_scope(struct keel__scope *sc, struct keel__task *t)
{
	uint32_t own, outer;
	int rc, first;

	/* What had cancelled the scope before the close decides its
	 * result. */
	own = load_acquire(&sc->frame.cancelled);
	if (!own && sc->frame.deadline != KEEL_FOREVER &&
	    keel__clock_now() >= sc->frame.deadline) {
		keel__frame_cancel(&sc->frame, KEEL_CANCEL_DEADLINE);
		own = KEEL_CANCEL_DEADLINE;
	}
	outer = keel__chain_cancelled(sc->frame.parent);

	/* Unwind from the top, one entry at a time: each child is cancelled
	 * only when its turn comes, so what was created earlier keeps running
	 * while what came later is torn down (unless the scope was cancelled
	 * as a whole before). */
	for (uint32_t i = sc->nentries; i-- > 0;) {
		struct entry *e = &sc->entries[i];

		if (e->done)
			continue;
		if (e->kind == E_CHILD)
			join_child(sc, t, i);
		else if (e->kind == E_CLEANUP || e->kind == E_RESOURCE)
			run_cleanup(sc, t, e, i);
	}

	/* Children that reaped themselves may still be giving back their
	 * slots: a matter of instructions, not cancellable. */
	keel__wait_for(t, none_reaping, sc, KEEL_FOREVER, 0, "close: reap");
	/* Every child has LEFT: their errors are all in. */
	first = load_acquire(&sc->first_error);
	rc = first			    ? first
	     : sc->first_cleanup_error	    ? sc->first_cleanup_error
	     : own == KEEL_CANCEL_DEADLINE ? -ETIMEDOUT
	     : (own || outer)		    ? -ECANCELED
					    : 0;
	pthread_mutex_lock(&t->chain_lock);
	t->cur = sc->frame.parent;
	pthread_mutex_unlock(&t->chain_lock);
	keel__chain_changed(t);
	scope_free(sc);
	return rc;
}

/* Under sc->lock: every child of the scope has left (and given back its
 * slot), so closing it waits for nobody (its cleanups aside). */
static int close_would_not_wait(struct keel__scope *sc)
{
	for (uint32_t i = 0; i < sc->nentries; i++) {
		struct entry *e = &sc->entries[i];

		if (e->kind == E_CHILD && !e->done && !has_left(e->task))
			return 0;
	}
	return none_reaping(sc);
}

int keel_scope_close(keel_scope_t *s)
{
	struct keel__task *t = keel__self();
	struct keel__scope *sc;
	int rc;

	if (!t)
		return -EPERM;
	keel__lock_check_blocking("keel_scope_close()");
	if (!(sc = scope_lock(s, -EINVAL, &rc)))
		return rc;
	if (sc->frame.owner != t)
		rc = -EPERM;
	else if (scope_state(sc) != SC_OPEN || t->cur != &sc->frame ||
		 sc->setting_up)
		rc = -EBUSY;
	if (rc == -EBUSY && sc->setting_up)
		keel__report("keel_scope_close: scope '%s' closed from inside "
			     "the setup of one of its resources; refused "
			     "(-EBUSY)",
			     sc->name);
	if (rc == 0 && !keel__thread_may_block() && !close_would_not_wait(sc))
		rc = -EDEADLK; /* the main JavaScript thread: stays open */
	if (rc == 0)
		scope_set_state(sc, SC_CLOSING);
	pthread_mutex_unlock(&sc->lock);
	return rc < 0 ? rc : close_scope(sc, t);
}

void keel__scope_task_end(struct keel__task *t)
{
	char name[KEEL_TASK_NAME_MAX + 1], who[KEEL_TASK_NAME_MAX + 16];

	/* A scope or shield left open: report it, then close it, so that
	 * nothing the task started outlives it. */
	if (t->cur != &t->base) {
		store_relaxed(&t->ending_in, "closing what it left open");
		keel__task_copy_name(t, name);
		snprintf(who, sizeof who, "task '%s'", name);
		unwind_to(t, &t->base, who, "ended with");
	}
	pthread_mutex_lock(&t->chain_lock);
	if (t->wake_rfd >= 0) {
		keel__notify_close(t->wake_rfd, t->wake_wfd);
		t->wake_rfd = t->wake_wfd = -1;
	}
	pthread_mutex_unlock(&t->chain_lock);
}

/* ---- fork() ---------------------------------------------------------------------------- */

void keel__scope_fork(int phase)
{
	uint32_t n = load_relaxed(&sc_count);

	if (phase == 0) {
		/* The table's lock first: nobody else holds two scope locks
		 * without it, so taking them all in index order cannot meet
		 * another thread holding one and waiting for a second. */
		pthread_mutex_lock(&table_lock);
		n = load_relaxed(&sc_count);
		for (uint32_t i = 0; i < n; i++)
			pthread_mutex_lock(&slot_at(i)->lock);
		return;
	}
	if (phase == 1) {
		for (uint32_t i = n; i-- > 0;)
			pthread_mutex_unlock(&slot_at(i)->lock);
		pthread_mutex_unlock(&table_lock);
		return;
	}
	/* The child: only the forking thread's task can still end. Every
	 * other task has been marked LEFT (task.c), so a scope's foreground
	 * count is that of its children that are still running: at most
	 * the forking task itself. */
	for (uint32_t i = 0; i < n; i++) {
		struct keel__scope *sc = slot_at(i);
		uint32_t fg = 0;

		pthread_mutex_init(&sc->lock, NULL);
		if (scope_state(sc) == SC_FREE)
			continue;
		for (uint32_t k = 0; k < sc->nentries; k++) {
			struct entry *e = &sc->entries[k];

			if (e->kind == E_CHILD && !e->done &&
			    !e->task->background &&
			    load_relaxed(&e->task->ended) == TASK_RUNNING)
				fg++;
		}
		store_release(&sc->nfg, fg);
		/* Those that were giving back their slots are gone. */
		store_relaxed(&sc->reaping, 0);
	}
	pthread_mutex_init(&table_lock, NULL);
}

/* ---- keel_scope_run and keel_main ------------------------------------------------------- */

int keel_scope_run(keel_body_fn body, void *arg, const keel_scope_opts *opts)
{
	struct keel__task *t;
	struct keel__scope *sc;
	keel_scope_t *s;
	int rc, st;

	if (!body)
		return -EINVAL;
	/* It waits for the children: not on the main JavaScript thread. */
	if (!keel__thread_may_block())
		return -EDEADLK;
	if ((rc = keel_scope_open(&s, opts)) < 0)
		return rc;
	t = keel__self();
	st = body(s, arg);
	if (!(sc = scope_lock(s, -EINVAL, &rc)))
		return rc; /* the body closed its own scope */
	pthread_mutex_unlock(&sc->lock);
	/* Ours: it stays open until we close it. */
	if (genuine(st))
		record_failure(sc, st);
	if (t->cur != &sc->frame) {
		char who[KEEL_TASK_NAME_MAX + 32];

		snprintf(who, sizeof who, "scope '%s': the body", sc->name);
		unwind_to(t, &sc->frame, who, "left");
	}
	/* The foreground children may finish, until the scope's deadline or
	 * a cancellation; then close cancels whatever still runs. */
	keel_scope_join(s, KEEL_FOREVER);
	return keel_scope_close(s);
}

/* keel_main()'s signal watcher (main.c) cancels the root scope with its
 * own cause. */
int keel__scope_cancel_signal(keel_scope_t *s)
{
	return scope_cancel_cause(s, KEEL_CANCEL_SIGNAL);
}

/* ---- Dumping the tree ---------------------------------------------------------------- */
/*
 * Under the table's lock (so that scope locks may nest, and no slot is
 * taken or given back meanwhile), each scope under its lock and each task's
 * chain under its chain lock, taken in the order of the rules in cancel.c.
 */

static const char *cause_name(uint32_t c)
{
	switch (c) {
	case KEEL_CANCEL_EXPLICIT: return "cancelled";
	case KEEL_CANCEL_DEADLINE: return "deadline passed";
	case KEEL_CANCEL_SIBLING: return "cancelled: a child failed";
	case KEEL_CANCEL_SIGNAL: return "cancelled by a signal";
	case KEEL_CANCEL_CLOSE: return "closing";
	default: return "open";
	}
}

/* The scope opened by owner directly inside the frame `outer` of its chain,
 * if any (none if `outer` has left the chain). */
static struct keel__scope *inner_scope(struct keel__task *owner,
				       struct keel__frame *outer)
{
	struct keel__scope *found = NULL;

	pthread_mutex_lock(&owner->chain_lock);
	for (struct keel__frame *g = owner->cur; g != outer; g = g->parent) {
		if (g == &owner->base) {
			found = NULL;
			break;
		}
		if (g->kind == FRAME_SCOPE)
			found = (struct keel__scope *)g;
	}
	pthread_mutex_unlock(&owner->chain_lock);
	return found;
}

static void dump_scope(FILE *f, struct keel__scope *sc, int d, keel_time_t now,
		       int dot);

static void dump_task(FILE *f, struct keel__task *c, int d, keel_time_t now,
		      int dot, struct keel__scope *parent)
{
	char name[KEEL_TASK_NAME_MAX + 1];
	struct keel__scope *inner;
	const char *state;
	keel_time_t started;
	uint32_t cancelled;
	char buf[64];

	keel__task_copy_name(c, name);
	pthread_mutex_lock(&c->chain_lock);
	cancelled = keel__cancelled(c);
	started = c->started_at;
	pthread_mutex_unlock(&c->chain_lock);
	if (load_acquire(&c->ended) != TASK_RUNNING) {
		snprintf(buf, sizeof buf, "ended, status %d", c->status);
		state = buf;
	} else {
		const char *b = load_relaxed(&c->blocked_in);
		const char *e = load_relaxed(&c->ending_in);

		state = e	  ? e
		      : cancelled ? (b ? "cancelled, still waiting"
				       : "cancelled")
		      : b	  ? b
				  : "running";
	}
	if (dot) {
		fprintf(f, "  t%u [shape=ellipse label=\"%s\\n%s\"];\n", c->idx,
			name, state);
		fprintf(f, "  s%u -> t%u;\n", parent->idx, c->idx);
	} else {
		fprintf(f, "%*stask '%s' #%u%s: %s, age %lld ms\n", 2 * d, "",
			name, c->idx, c->background ? " (background)" : "",
			state, (long long)((now - started) / 1000000));
	}
	if (load_acquire(&c->ended) == TASK_RUNNING &&
	    (inner = inner_scope(c, &c->base)) != NULL) {
		if (dot)
			fprintf(f, "  t%u -> s%u;\n", c->idx, inner->idx);
		dump_scope(f, inner, d + 1, now, dot);
	}
}

static void dump_scope(FILE *f, struct keel__scope *sc, int d, keel_time_t now,
		       int dot)
{
	char owner[KEEL_TASK_NAME_MAX + 1], dl[48] = "";
	struct keel__scope *inner;
	uint32_t c;

	pthread_mutex_lock(&sc->lock);
	if (scope_state(sc) == SC_FREE) {
		pthread_mutex_unlock(&sc->lock);
		return; /* closed meanwhile */
	}
	c = load_relaxed(&sc->frame.cancelled);
	keel__task_copy_name(sc->frame.owner, owner);
	if (sc->frame.deadline != KEEL_FOREVER)
		snprintf(dl, sizeof dl, ", deadline in %lld ms",
			 (long long)((sc->frame.deadline - now) / 1000000));
	if (dot)
		fprintf(f,
			"  s%u [shape=box label=\"scope %s\\n%s\\nowner %s\"];\n",
			sc->idx, sc->name, cause_name(c), owner);
	else
		fprintf(f, "%*sscope '%s' #%u: %s%s, age %lld ms, owner '%s'\n",
			2 * d, "", sc->name, sc->idx, cause_name(c), dl,
			(long long)((now - sc->opened_at) / 1000000), owner);
	if ((inner = inner_scope(sc->frame.owner, &sc->frame)) != NULL) {
		if (dot)
			fprintf(f, "  s%u -> s%u [style=dashed];\n", sc->idx,
				inner->idx);
		dump_scope(f, inner, d + 1, now, dot);
	}
	for (uint32_t i = 0; i < sc->nentries; i++) {
		struct entry *e = &sc->entries[i];

		if (e->done || e->kind == E_NONE)
			continue;
		if (e->kind == E_CHILD)
			dump_task(f, e->task, d + 1, now, dot, sc);
		else if (!dot)
			fprintf(f, "%*s%s #%u\n", 2 * (d + 1), "",
				e->kind == E_RESOURCE	? "resource"
				: e->kind == E_CLEANUP ? "cleanup"
						       : "resource (setting up)",
				i);
	}
	pthread_mutex_unlock(&sc->lock);
}

/* A scope at the top of a tree: still on its owner's chain, with no scope
 * below it there, and an owner that no scope spawned. */
static int is_root(struct keel__scope *sc)
{
	struct keel__task *owner = sc->frame.owner;
	int on = 0, root;

	pthread_mutex_lock(&owner->chain_lock);
	root = owner->home == NULL;
	for (struct keel__frame *g = owner->cur; g && g != &owner->base;
	     g = g->parent) {
		if (g == &sc->frame)
			on = 1;
		else if (on && g->kind == FRAME_SCOPE)
			root = 0;
	}
	pthread_mutex_unlock(&owner->chain_lock);
	return on && root;
}

static int dump(FILE *f, int dot)
{
	keel_time_t now = keel__clock_now();
	uint32_t n;

	if (!f)
		return -EINVAL;
	pthread_mutex_lock(&table_lock);
	n = load_relaxed(&sc_count);
	if (dot)
		fprintf(f, "digraph keel {\n  rankdir=LR;\n");
	/* Newest first, as the tree has always been listed. */
	for (uint32_t i = n; i-- > 0;) {
		struct keel__scope *sc = slot_at(i);
		int root;

		pthread_mutex_lock(&sc->lock);
		root = scope_state(sc) != SC_FREE && is_root(sc);
		pthread_mutex_unlock(&sc->lock);
		if (root)
			dump_scope(f, sc, 0, now, dot);
	}
	if (dot)
		fprintf(f, "}\n");
	pthread_mutex_unlock(&table_lock);
	fflush(f);
	return 0;
}

int keel_dump(FILE *f)
{
	return dump(f, 0);
}

int keel_dump_dot(FILE *f)
{
	return dump(f, 1);
}
