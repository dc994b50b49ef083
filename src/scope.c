/*
 * scope.c: scopes: structured concurrency with exact reverse-order
 * teardown, keel_main(), and the task-tree dump.
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
 * Everything structural happens under the scope lock (cancel.c): opening,
 * closing, pushing entries, children joining and leaving, and so every
 * cancellation traversal sees a consistent tree. The lock is taken before
 * the registry lock.
 *
 * A child's life:
 *   keel_spawn (under the lock): slot allocated, chain rooted in the scope,
 *   entry pushed, linked on the scope's live children -> runs fn on a
 *   cached thread -> keel__task_end on that thread: mailbox closed and
 *   drained, open scopes closed, then keel__scope_child_ended: on_exit
 *   hook, then under the lock: unlinked, error recorded (fail-fast cancels
 *   the scope), `ended` released, owner unparked -> the owner joins it
 *   (keel_join or close): takes its status, releases its slot.
 * A child's status is read only after `ended`, so a finished child's
 * status is never lost to a cancellation that comes later.
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
	uint32_t idx;
	char name[KEEL_TASK_NAME_MAX + 1];
	keel_time_t cleanup_ns;
	keel_policy_t policy;
	keel_exit_fn on_exit;
	void *on_exit_arg;
	keel_time_t opened_at;
	struct entry *entries;
	uint32_t nentries, cap;
	struct keel__task *children; /* live children, via sib_prev/next */
	_Atomic uint32_t nfg;        /* foreground children not yet ended */
	int first_error;
	int first_cleanup_error;
	uint32_t nerrors;
	uint32_t setting_up; /* keel_resource() setups running (owner only) */
	struct keel__scope *free_next;
	struct keel__scope *all_prev, *all_next; /* open scopes, for dump */
};

#define SC_CHUNK_SHIFT 6
#define SC_CHUNK ((uint32_t)1 << SC_CHUNK_SHIFT)
#define SC_MAX_CHUNKS ((uint32_t)1 << (20 - SC_CHUNK_SHIFT))
#define SC_IDX_BITS 24
#define SC_GEN_BITS (sizeof(uintptr_t) * 8 - SC_IDX_BITS)
#define SC_GEN_MASK ((((uint64_t)1) << SC_GEN_BITS) - 1)
#define DEFAULT_CLEANUP_NS KEEL_SEC(5)

/* All under keel__scope_lock. */
static struct keel__scope *sc_chunks[SC_MAX_CHUNKS];
static uint32_t sc_count;
static struct keel__scope *sc_free;
static struct keel__scope *sc_all;

/* ---- Handles ---------------------------------------------------------------- */

static keel_scope_t *encode(struct keel__scope *sc)
{
	uint64_t gen = load_relaxed(&sc->gen_state) >> 8;

	return (keel_scope_t *)(uintptr_t)((gen & SC_GEN_MASK) << SC_IDX_BITS |
					   sc->idx);
}

/* Under the lock. The open or closing scope a handle names; *stale is set
 * when the handle names a slot that exists but not this use of it. */
static struct keel__scope *scope_get(keel_scope_t *h, int *stale)
{
	uintptr_t v = (uintptr_t)h;
	uint32_t idx = (uint32_t)(v & ((1u << SC_IDX_BITS) - 1));
	struct keel__scope *sc;
	uint64_t w;

	*stale = 0;
	if (!h || idx >= sc_count)
		return NULL;
	sc = &sc_chunks[idx >> SC_CHUNK_SHIFT][idx & (SC_CHUNK - 1)];
	w = load_relaxed(&sc->gen_state);
	if (((w >> 8) & SC_GEN_MASK) != (uint64_t)(v >> SC_IDX_BITS) ||
	    (w & 0xff) == SC_FREE) {
		*stale = 1;
		return NULL;
	}
	return sc;
}

static struct keel__scope *scope_alloc(void)
{
	struct keel__scope *sc = sc_free;

	if (sc) {
		sc_free = sc->free_next;
		return sc;
	}
	if (sc_count >> SC_CHUNK_SHIFT >= SC_MAX_CHUNKS)
		return NULL;
	if (!sc_chunks[sc_count >> SC_CHUNK_SHIFT]) {
		struct keel__scope *c = calloc(SC_CHUNK, sizeof *c);

		if (!c)
			return NULL;
		for (uint32_t i = 0; i < SC_CHUNK; i++) {
			c[i].idx = sc_count + i;
			/* Generation 1: a handle is never NULL. */
			atomic_init(&c[i].gen_state, (uint64_t)1 << 8 | SC_FREE);
		}
		sc_chunks[sc_count >> SC_CHUNK_SHIFT] = c;
	}
	sc = &sc_chunks[sc_count >> SC_CHUNK_SHIFT][sc_count & (SC_CHUNK - 1)];
	sc_count++;
	return sc;
}

static void scope_set_state(struct keel__scope *sc, enum scope_state st)
{
	uint64_t w = load_relaxed(&sc->gen_state);

	store_relaxed(&sc->gen_state, (w & ~(uint64_t)0xff) | st);
}

static void scope_free(struct keel__scope *sc)
{
	uint64_t gen = (load_relaxed(&sc->gen_state) >> 8) + 1;

	if ((gen & SC_GEN_MASK) == 0)
		gen++;
	store_relaxed(&sc->gen_state, gen << 8 | SC_FREE);
	free(sc->entries);
	sc->entries = NULL;
	sc->nentries = sc->cap = 0;
	if (sc->all_prev)
		sc->all_prev->all_next = sc->all_next;
	else
		sc_all = sc->all_next;
	if (sc->all_next)
		sc->all_next->all_prev = sc->all_prev;
	sc->free_next = sc_free;
	sc_free = sc;
}

/* Under the lock: is the scope's frame, or one it sits in (up to the
 * nearest shield), cancelled? */
static uint32_t scope_cancelled(struct keel__scope *sc)
{
	return keel__chain_cancelled(&sc->frame);
}

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

/* A failure, as opposed to success or an exit caused by cancellation. */
static int genuine(int status)
{
	return status < 0 && status != -ECANCELED;
}

/* Under the lock. A failure while the scope closes is recorded but cancels
 * nothing more: the close is already taking everything down, in order. */
static void record_failure(struct keel__scope *sc, int status)
{
	if (!sc->first_error)
		sc->first_error = status;
	sc->nerrors++;
	if (sc->policy == KEEL_FAIL_FAST &&
	    (load_relaxed(&sc->gen_state) & 0xff) == SC_OPEN)
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
	pthread_mutex_lock(&keel__scope_lock);
	if (!(sc = scope_alloc())) {
		pthread_mutex_unlock(&keel__scope_lock);
		return -ENOMEM;
	}
	scope_set_state(sc, SC_OPEN);
	snprintf(sc->name, sizeof sc->name, "%s",
		 opts->name ? opts->name : "scope");
	sc->cleanup_ns = opts->cleanup_deadline ? opts->cleanup_deadline
						: DEFAULT_CLEANUP_NS;
	sc->policy = opts->policy;
	sc->on_exit = opts->on_exit;
	sc->on_exit_arg = opts->on_exit_arg;
	sc->opened_at = keel__clock_now();
	sc->children = NULL;
	store_relaxed(&sc->nfg, 0);
	sc->first_error = sc->first_cleanup_error = 0;
	sc->nerrors = 0;
	sc->setting_up = 0;
	store_relaxed(&sc->frame.cancelled, 0);
	sc->frame.kind = FRAME_SCOPE;
	/* 0 is "none" (zeroed options); any other time, negative ones
	 * included, is a deadline, perhaps one that has passed already. */
	sc->frame.deadline = opts->deadline != 0 ? opts->deadline : KEEL_FOREVER;
	sc->frame.parent = t->cur;
	sc->frame.owner = t;
	t->cur = &sc->frame;
	keel__chain_changed(t);
	sc->all_prev = NULL;
	sc->all_next = sc_all;
	if (sc_all)
		sc_all->all_prev = sc;
	sc_all = sc;
	*out = encode(sc);
	pthread_mutex_unlock(&keel__scope_lock);
	return 0;
}

/* ---- Children ------------------------------------------------------------------ */

void keel__scope_wake_children(struct keel__scope *sc)
{
	for (struct keel__task *c = sc->children; c; c = c->sib_next)
		keel__wake_below(c, &c->base);
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
	int stale, idx, rc;

	if (!fn)
		return -EINVAL;
	if (!opts)
		opts = &defaults;
	pthread_mutex_lock(&keel__scope_lock);
	if (!(sc = scope_get(s, &stale))) {
		pthread_mutex_unlock(&keel__scope_lock);
		return stale ? -ECANCELED : -EINVAL;
	}
	if ((load_relaxed(&sc->gen_state) & 0xff) != SC_OPEN ||
	    scope_cancelled(sc)) {
		pthread_mutex_unlock(&keel__scope_lock);
		return -ECANCELED;
	}
	if (!(c = keel__task_alloc())) {
		pthread_mutex_unlock(&keel__scope_lock);
		return -ENOMEM;
	}
	idx = push_entry(sc, (struct entry){.kind = E_CHILD, .task = c});
	if (idx < 0) {
		pthread_mutex_unlock(&keel__scope_lock);
		keel__task_discard(c);
		return -ENOMEM;
	}
	if (opts->name)
		keel__task_set_name(c, opts->name);
	c->home = sc;
	c->entry = (uint32_t)idx;
	c->background = opts->background ? 1 : 0;
	c->base.parent = &sc->frame;
	keel__chain_changed(c);
	c->spawn_fn = fn;
	c->spawn_arg = arg;
	c->sib_prev = NULL;
	c->sib_next = sc->children;
	if (sc->children)
		sc->children->sib_prev = c;
	sc->children = c;
	if (!c->background)
		store_relaxed(&sc->nfg, load_relaxed(&sc->nfg) + 1);
	if (out)
		*out = c->id;
	/* Started under the lock, so that a close (which needs the lock)
	 * cannot see the entry before its thread exists. */
	rc = keel__thread_start(run_child, c, opts->stack_size);
	if (rc < 0) {
		sc->entries[idx].kind = E_NONE;
		sc->children = c->sib_next;
		if (c->sib_next)
			c->sib_next->sib_prev = NULL;
		if (!c->background)
			store_relaxed(&sc->nfg, load_relaxed(&sc->nfg) - 1);
		pthread_mutex_unlock(&keel__scope_lock);
		keel__task_discard(c);
		return rc;
	}
	pthread_mutex_unlock(&keel__scope_lock);
	return 0;
}

void keel__scope_child_ended(struct keel__task *t, int status)
{
	struct keel__scope *sc = t->home;

	/* Before `ended`: until then the owner cannot close the scope, so
	 * the hook's argument is alive. */
	if (sc->on_exit)
		sc->on_exit(t->id, status, sc->on_exit_arg);
	/* The thread goes back to the cache: it no longer carries the task's
	 * name by the time anyone can see the task ended. */
	keel__thread_set_os_name("keel-idle");
	pthread_mutex_lock(&keel__scope_lock);
	if (t->sib_prev)
		t->sib_prev->sib_next = t->sib_next;
	else
		sc->children = t->sib_next;
	if (t->sib_next)
		t->sib_next->sib_prev = t->sib_prev;
	if (!t->background)
		store_release(&sc->nfg, load_relaxed(&sc->nfg) - 1);
	/* Ended before its failure cancels anything: an owner that wakes on
	 * that cancellation while joining this very child finds it ended and
	 * gets its status. Pairs with the acquire loads in join_child() and
	 * keel_join(). */
	store_release(&t->ended, 1);
	if (genuine(status))
		record_failure(sc, status);
	keel__unpark(sc->frame.owner);
	pthread_mutex_unlock(&keel__scope_lock);
}

void keel__scope_vanished(struct keel__task *t)
{
	struct keel__scope *sc = t->home;

	if (!sc)
		return;
	if (t->sib_prev)
		t->sib_prev->sib_next = t->sib_next;
	else
		sc->children = t->sib_next;
	if (t->sib_next)
		t->sib_next->sib_prev = t->sib_prev;
	t->sib_prev = t->sib_next = NULL;
	if (!t->background)
		store_relaxed(&sc->nfg, load_relaxed(&sc->nfg) - 1);
}

/* ---- Cleanups and resources ------------------------------------------------------ */

/* Under the lock: the scope a handle names if the caller may add to it. */
static int owned_open(keel_scope_t *s, struct keel__task *t,
		      struct keel__scope **out)
{
	int stale;
	struct keel__scope *sc = scope_get(s, &stale);

	if (!sc)
		return stale ? -ECANCELED : -EINVAL;
	if (sc->frame.owner != t)
		return -EPERM;
	if ((load_relaxed(&sc->gen_state) & 0xff) != SC_OPEN)
		return -ECANCELED;
	*out = sc;
	return 0;
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
	pthread_mutex_lock(&keel__scope_lock);
	if ((rc = owned_open(s, t, &sc)) == 0) {
		rc = push_entry(sc, (struct entry){.kind = E_CLEANUP, .fn = fn,
						    .arg = arg});
		rc = rc < 0 ? rc : 0;
	}
	pthread_mutex_unlock(&keel__scope_lock);
	return rc;
}

int keel_resource(keel_scope_t *s, keel_setup_fn setup,
		  keel_cleanup_fn teardown, void *arg, void **out)
{
	struct keel__task *t = keel__self();
	struct keel__scope *sc;
	void *res = NULL;
	int rc, slot = -1;

	if (!setup || !teardown)
		return -EINVAL;
	if (!t)
		return -ENOMEM;
	if (keel__check(t) < 0)
		return -ECANCELED;
	/* Reserve the entry first: once setup has succeeded, arming its
	 * teardown can neither fail nor be interrupted. */
	pthread_mutex_lock(&keel__scope_lock);
	if ((rc = owned_open(s, t, &sc)) == 0)
		rc = slot = push_entry(sc, (struct entry){.kind = E_RESERVED});
	if (rc >= 0)
		sc->setting_up++; /* the scope cannot close under the setup */
	pthread_mutex_unlock(&keel__scope_lock);
	if (rc < 0 || slot < 0)
		return rc < 0 ? rc : -ENOMEM;
	KEEL_YIELD();
	rc = setup(arg, &res);
	/* Nothing between a successful setup and this store can cancel or
	 * fail: it is not a cancellation point and allocates nothing. The
	 * lock is for the entries array, which other tasks' spawns may
	 * have moved. */
	pthread_mutex_lock(&keel__scope_lock);
	sc->setting_up--;
	if (rc == 0)
		sc->entries[slot] = (struct entry){.kind = E_RESOURCE,
						   .fn = teardown, .arg = res};
	else
		sc->entries[slot].kind = E_NONE;
	pthread_mutex_unlock(&keel__scope_lock);
	if (rc == 0 && out)
		*out = res;
	return rc;
}

/* ---- Joining ------------------------------------------------------------------------ */

static int has_ended(void *p)
{
	/* Pairs with the release in keel__scope_child_ended(). */
	return load_acquire(&((struct keel__task *)p)->ended) != 0;
}

static int no_foreground(void *p)
{
	return load_acquire(&((struct keel__scope *)p)->nfg) == 0;
}

int keel_scope_join(keel_scope_t *s, keel_time_t deadline)
{
	struct keel__task *t = keel__self();
	struct keel__scope *sc;
	int stale, rc;

	if (!t)
		return -ENOMEM;
	pthread_mutex_lock(&keel__scope_lock);
	sc = scope_get(s, &stale);
	rc = !sc ? -EINVAL : sc->frame.owner != t ? -EPERM : 0;
	pthread_mutex_unlock(&keel__scope_lock);
	if (rc < 0)
		return rc;
	keel__lock_check_blocking("keel_scope_join()");
	return keel__wait_for(t, no_foreground, sc, deadline, 1, "scope_join");
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
	pthread_mutex_lock(&keel__scope_lock);
	if (!keel__task_is(c, id) || !(sc = c->home) ||
	    sc->entries[c->entry].done)
		rc = -ESRCH;
	else if (sc->frame.owner != t)
		rc = -EPERM;
	pthread_mutex_unlock(&keel__scope_lock);
	if (rc < 0)
		return rc;
	/* Only the owner (this task) joins or closes, so the child and its
	 * entry stay put while we wait. */
	if ((rc = keel__wait_for(t, has_ended, c, deadline, 1, "join")) < 0)
		return rc;
	pthread_mutex_lock(&keel__scope_lock);
	if (status)
		*status = c->status;
	sc->entries[c->entry].done = 1;
	keel__task_release(c);
	pthread_mutex_unlock(&keel__scope_lock);
	return 0;
}

/* ---- Cancelling and closing ---------------------------------------------------------- */

static int scope_cancel_cause(keel_scope_t *s, uint32_t cause)
{
	struct keel__scope *sc;
	int stale;

	pthread_mutex_lock(&keel__scope_lock);
	sc = scope_get(s, &stale);
	if (sc)
		keel__frame_cancel(&sc->frame, cause);
	pthread_mutex_unlock(&keel__scope_lock);
	return sc ? 0 : -EINVAL;
}

int keel_scope_cancel(keel_scope_t *s)
{
	return scope_cancel_cause(s, KEEL_CANCEL_EXPLICIT);
}

static void join_child(struct keel__scope *sc, struct keel__task *t,
		       struct entry *e)
{
	struct keel__task *c = e->task;
	keel_time_t report_at = keel_after(sc->cleanup_ns);
	char name[KEEL_TASK_NAME_MAX + 1];

	/* Its turn: cancel it (and what runs inside it), and only it. A
	 * child of a scope cancelled as a whole keeps that cause. */
	pthread_mutex_lock(&keel__scope_lock);
	if (!load_relaxed(&c->ended) && !scope_cancelled(sc))
		keel__frame_cancel(&c->base, KEEL_CANCEL_CLOSE);
	pthread_mutex_unlock(&keel__scope_lock);
	/* Not cancellable: close must not return while the child runs. */
	while (keel__wait_for(t, has_ended, c, report_at, 0, "close: join") <
	       0) {
		if (report_at != KEEL_FOREVER) {
			keel__task_copy_name(c, name);
			keel__report("scope '%s': child '%s' still running %lld "
				     "ms after it was cancelled; waiting",
				     sc->name, name,
				     (long long)(sc->cleanup_ns / 1000000));
			report_at = KEEL_FOREVER;
		}
	}
	pthread_mutex_lock(&keel__scope_lock);
	e->done = 1;
	keel__task_release(c);
	pthread_mutex_unlock(&keel__scope_lock);
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

		KEEL_ASSERT(f != &t->base);
		if (f->kind == FRAME_SHIELD) {
			keel__report("%s %s a shield open; ending it", who, verb);
			keel__shield_pop(t);
			continue;
		}
		keel__report("%s %s scope '%s' open; closing it", who, verb,
			     ((struct keel__scope *)f)->name);
		pthread_mutex_lock(&keel__scope_lock);
		close_scope((struct keel__scope *)f, t);
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
	e->done = 1;
}

static int close_scope(struct keel__scope *sc, struct keel__task *t)
{
	uint32_t own, outer;
	int rc;

	/* Under the lock (taken by the caller, released here). What had
	 * cancelled the scope before the close decides its result. */
	scope_set_state(sc, SC_CLOSING);
	own = load_relaxed(&sc->frame.cancelled);
	if (!own && sc->frame.deadline != KEEL_FOREVER &&
	    keel__clock_now() >= sc->frame.deadline) {
		keel__frame_cancel(&sc->frame, KEEL_CANCEL_DEADLINE);
		own = KEEL_CANCEL_DEADLINE;
	}
	outer = keel__chain_cancelled(sc->frame.parent);
	pthread_mutex_unlock(&keel__scope_lock);

	/* Unwind from the top, one entry at a time: each child is cancelled
	 * only when its turn comes, so what was created earlier keeps running
	 * while what came later is torn down (unless the scope was cancelled
	 * as a whole before). Nothing can push now (the scope is CLOSING), so
	 * the entries array stays where it is. */
	for (uint32_t i = sc->nentries; i-- > 0;) {
		struct entry *e = &sc->entries[i];

		if (e->done)
			continue;
		if (e->kind == E_CHILD)
			join_child(sc, t, e);
		else if (e->kind == E_CLEANUP || e->kind == E_RESOURCE)
			run_cleanup(sc, t, e, i);
	}

	rc = sc->first_error		    ? sc->first_error
	     : sc->first_cleanup_error	    ? sc->first_cleanup_error
	     : own == KEEL_CANCEL_DEADLINE ? -ETIMEDOUT
	     : (own || outer)		    ? -ECANCELED
					    : 0;
	pthread_mutex_lock(&keel__scope_lock);
	t->cur = sc->frame.parent;
	keel__chain_changed(t);
	scope_free(sc);
	pthread_mutex_unlock(&keel__scope_lock);
	return rc;
}

int keel_scope_close(keel_scope_t *s)
{
	struct keel__task *t = keel__self();
	struct keel__scope *sc;
	int stale;

	if (!t)
		return -EPERM;
	keel__lock_check_blocking("keel_scope_close()");
	pthread_mutex_lock(&keel__scope_lock);
	sc = scope_get(s, &stale);
	if (!sc || sc->frame.owner != t ||
	    (load_relaxed(&sc->gen_state) & 0xff) != SC_OPEN ||
	    t->cur != &sc->frame || sc->setting_up) {
		int rc = !sc ? -EINVAL
			 : sc->frame.owner != t ? -EPERM
						: -EBUSY;

		if (sc && rc == -EBUSY && sc->setting_up)
			keel__report("keel_scope_close: scope '%s' closed from "
				     "inside the setup of one of its resources; "
				     "refused (-EBUSY)",
				     sc->name);
		pthread_mutex_unlock(&keel__scope_lock);
		return rc;
	}
	return close_scope(sc, t); /* releases the lock */
}

void keel__scope_task_end(struct keel__task *t)
{
	char name[KEEL_TASK_NAME_MAX + 1], who[KEEL_TASK_NAME_MAX + 16];

	/* A scope or shield left open: report it, then close it, so that
	 * nothing the task started outlives it. */
	if (t->cur != &t->base) {
		keel__task_copy_name(t, name);
		snprintf(who, sizeof who, "task '%s'", name);
		unwind_to(t, &t->base, who, "ended with");
	}
	pthread_mutex_lock(&keel__scope_lock);
	if (t->wake_rfd >= 0) {
		keel__notify_close(t->wake_rfd, t->wake_wfd);
		t->wake_rfd = t->wake_wfd = -1;
	}
	pthread_mutex_unlock(&keel__scope_lock);
}

/* ---- keel_scope_run and keel_main ------------------------------------------------------- */

int keel_scope_run(keel_body_fn body, void *arg, const keel_scope_opts *opts)
{
	struct keel__task *t;
	struct keel__scope *sc;
	keel_scope_t *s;
	int rc, st, stale;

	if (!body)
		return -EINVAL;
	if ((rc = keel_scope_open(&s, opts)) < 0)
		return rc;
	t = keel__self();
	st = body(s, arg);
	pthread_mutex_lock(&keel__scope_lock);
	sc = scope_get(s, &stale);
	if (sc && genuine(st))
		record_failure(sc, st);
	pthread_mutex_unlock(&keel__scope_lock);
	if (!sc)
		return -EINVAL; /* the body closed its own scope */
	if (t->cur != &sc->frame) {
		char who[KEEL_TASK_NAME_MAX + 32];

		snprintf(who, sizeof who, "scope '%s': the body", sc->name);
		unwind_to(t, &sc->frame, who, "left");
	}
	/* The foreground children may finish, until the scope's deadline or
	 * a cancellation; then close cancels whatever still runs. */
	keel_scope_join(s, KEEL_FOREVER);
	(void)t;
	return keel_scope_close(s);
}

static _Atomic int main_signal;
static _Atomic int main_signals_seen;
static int main_pipe[2] = {-1, -1};
static keel_scope_t *_Atomic main_scope;

static void main_on_signal(int sig)
{
	char c = (char)sig;
	ssize_t n;

	/* The second signal ends the process at once. */
	if (atomic_fetch_add(&main_signals_seen, 1) > 0)
		_exit(128 + sig);
	atomic_store(&main_signal, sig);
	n = write(main_pipe[1], &c, 1);
	(void)n;
}

/* Turns the first signal into a cancellation, outside the handler. */
static void *main_watcher(void *p)
{
	char c;

	(void)p;
	while (read(main_pipe[0], &c, 1) == 1 && c != 0) {
		keel_scope_t *s = atomic_load(&main_scope);

		if (s)
			scope_cancel_cause(s, KEEL_CANCEL_SIGNAL);
	}
	return NULL;
}

struct main_call {
	keel_body_fn body;
	void *arg;
};

static int main_body(keel_scope_t *s, void *p)
{
	struct main_call *mc = p;

	atomic_store(&main_scope, s);
	/* A signal that came before the scope was known. */
	if (atomic_load(&main_signal))
		scope_cancel_cause(s, KEEL_CANCEL_SIGNAL);
	return mc->body(s, mc->arg);
}

int keel_main(keel_body_fn body, void *arg)
{
	struct main_call mc = {body, arg};
	struct sigaction sa, old_int, old_term;
	keel_scope_opts opts = {.name = "main"};
	sigset_t all, old_mask;
	pthread_t watcher;
	int rc, sig;
	char stop = 0;

	if (!body)
		return 1;
	if (pipe(main_pipe) < 0) {
		keel__report("keel_main: pipe: %s", keel_strerror(-errno));
		return 1;
	}
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old_mask);
	rc = pthread_create(&watcher, NULL, main_watcher, NULL);
	pthread_sigmask(SIG_SETMASK, &old_mask, NULL);
	if (rc != 0) {
		keel__report("keel_main: cannot start its signal thread");
		return 1;
	}
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = main_on_signal;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGINT, &sa, &old_int);
	sigaction(SIGTERM, &sa, &old_term);

	rc = keel_scope_run(main_body, &mc, &opts);

	sigaction(SIGINT, &old_int, NULL);
	sigaction(SIGTERM, &old_term, NULL);
	atomic_store(&main_scope, NULL);
	if (write(main_pipe[1], &stop, 1) == 1)
		pthread_join(watcher, NULL);
	close(main_pipe[0]);
	close(main_pipe[1]);
	sig = atomic_load(&main_signal);
	if (sig)
		return 128 + sig;
	if (rc < 0) {
		keel__report("keel_main: %s", keel_strerror(rc));
		return 1;
	}
	return 0;
}

/* ---- Dumping the tree ---------------------------------------------------------------- */

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

/* The scope opened by the same owner directly inside sc, if any. */
static struct keel__scope *inner_scope(struct keel__task *owner,
				       struct keel__frame *outer)
{
	struct keel__scope *found = NULL;

	for (struct keel__frame *g = owner->cur; g && g != outer; g = g->parent)
		if (g->kind == FRAME_SCOPE)
			found = (struct keel__scope *)g;
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
	char buf[64];

	keel__task_copy_name(c, name);
	if (load_acquire(&c->ended)) {
		snprintf(buf, sizeof buf, "ended, status %d", c->status);
		state = buf;
	} else {
		const char *b = load_relaxed(&c->blocked_in);

		state = keel__cancelled(c) ? (b ? "cancelled, still waiting"
						: "cancelled")
		      : b		  ? b
					  : "running";
	}
	if (dot) {
		fprintf(f, "  t%u [shape=ellipse label=\"%s\\n%s\"];\n", c->idx,
			name, state);
		fprintf(f, "  s%u -> t%u;\n", parent->idx, c->idx);
	} else {
		fprintf(f, "%*stask '%s' #%u%s: %s, age %lld ms\n", 2 * d, "",
			name, c->idx, c->background ? " (background)" : "",
			state, (long long)((now - c->started_at) / 1000000));
	}
	if (!load_acquire(&c->ended) &&
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
	uint32_t c = load_relaxed(&sc->frame.cancelled);

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
}

/* A scope at the top of a tree: no scope encloses it. */
static int is_root(struct keel__scope *sc)
{
	for (struct keel__frame *f = sc->frame.parent; f; f = f->parent)
		if (f->kind == FRAME_SCOPE)
			return 0;
	return 1;
}

static int dump(FILE *f, int dot)
{
	keel_time_t now = keel__clock_now();

	if (!f)
		return -EINVAL;
	pthread_mutex_lock(&keel__scope_lock);
	if (dot)
		fprintf(f, "digraph keel {\n  rankdir=LR;\n");
	for (struct keel__scope *sc = sc_all; sc; sc = sc->all_next)
		if (is_root(sc) && inner_scope(sc->frame.owner,
					       sc->frame.parent) == sc)
			dump_scope(f, sc, 0, now, dot);
	if (dot)
		fprintf(f, "}\n");
	pthread_mutex_unlock(&keel__scope_lock);
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
