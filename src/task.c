/*
 * task.c: the task registry, handles, adoption of foreign threads, and the
 * one way keel blocks a thread (park/unpark).
 *
 * DESIGN
 * Slots live in a table of chunks that only grows: a slot's memory is never
 * freed, so a pointer to a slot stays valid for the life of the process and
 * anything may wake or inspect any slot at any time. A handle is
 * (generation << 24 | index). The generation of a slot's current
 * incarnation lives in the top 40 bits of its mailbox word (mailbox.c), so
 * one atomic read-modify-write both checks a handle and registers a sender,
 * and in the top 40 bits of its cancel word, so cancelling by handle is one
 * compare-and-swap that a stale handle cannot win.
 *
 * Slot lifecycle:
 *   FREE --keel__task_alloc--> LIVE (generation + 1, mailbox open)
 *   LIVE --keel__task_end, on the task's own thread--> ENDED
 *        (mailbox CLOSED|ENDED, calls resolved, `ended` futex word set)
 *   ENDED --keel__task_release--> FREE
 * An adopted thread's task is released as soon as it ends (nobody joins a
 * foreign thread); a task keel started is released by whoever joins it.
 * The mailbox word keeps the old generation while the slot is FREE, with
 * CLOSED|ENDED set, so stale senders are refused until reuse and after.
 *
 * Threads keel did not start are adopted on first use; a pthread key's
 * destructor ends their task at thread exit. C11 thread-locals stay valid
 * while pthread key destructors run, so the cancel handlers that the exit
 * drain runs may use keel freely.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"

KEEL_TLS struct keel__tls keel__tls;

#define TASK_CHUNK_SHIFT 6
#define TASK_CHUNK ((uint32_t)1 << TASK_CHUNK_SHIFT)
#define TASK_MAX_CHUNKS ((uint32_t)1 << (22 - TASK_CHUNK_SHIFT))

static _Atomic(struct keel__task *) task_chunks[TASK_MAX_CHUNKS];
static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
static uint32_t task_count;            /* slots ever created */
static uint32_t tasks_live;            /* slots in use */
static uint32_t tasks_peak;            /* ... at most, since reset */
static struct keel__task *free_slots;   /* LIFO, under registry_lock */
static uint32_t adopted_seq;           /* for default names */

static pthread_once_t key_once = PTHREAD_ONCE_INIT;
static pthread_key_t exit_key;

/* ---- Slots -------------------------------------------------------------- */

struct keel__task *keel__task_slot(keel_task_t id)
{
	uint32_t idx = (uint32_t)(id & TASK_IDX_MASK);
	struct keel__task *chunk;

	if (idx >> TASK_CHUNK_SHIFT >= TASK_MAX_CHUNKS)
		return NULL;
	/* Pairs with the release in new_chunk(). */
	chunk = load_acquire(&task_chunks[idx >> TASK_CHUNK_SHIFT]);
	return chunk ? &chunk[idx & (TASK_CHUNK - 1)] : NULL;
}

/* Under registry_lock. */
static struct keel__task *new_chunk(uint32_t first)
{
	struct keel__task *c;
	size_t bytes = sizeof(struct keel__task) * TASK_CHUNK;

	c = aligned_alloc(KEEL_CACHELINE, bytes);
	if (!c)
		return NULL;
	memset(c, 0, bytes);
	for (uint32_t i = 0; i < TASK_CHUNK; i++) {
		struct keel__task *t = &c[i];

		t->idx = first + i;
		/* Generation 0 is never handed out, so no handle matches a
		 * slot that was never used. */
		atomic_init(&t->mword, MB_CLOSED | MB_ENDED);
		atomic_init(&t->tailw, TW_CLOSED | MSG_IDX_STUB);
		atomic_init(&t->link_wait, LINK_WAIT_NONE);
		t->stub.idx = MSG_IDX_STUB;
		atomic_init(&t->notify_wfd, -1);
		t->notify_rfd = -1;
		t->wake_rfd = t->wake_wfd = -1;
		pthread_mutex_init(&t->ctx_lock, NULL);
		pthread_mutex_init(&t->chain_lock, NULL);
		pthread_mutex_init(&t->cb_lock, NULL);
		pthread_cond_init(&t->cb_cv, NULL);
		for (int k = 0; k < KEEL_MAX_ON_CANCEL; k++)
			t->cbs[k].task = t;
		t->cur = &t->base;
	}
	store_release(&task_chunks[first >> TASK_CHUNK_SHIFT], c);
	return c;
}

struct keel__task *keel__task_alloc(void)
{
	struct keel__task *t;
	uint64_t w, gen;

	pthread_mutex_lock(&registry_lock);
	t = free_slots;
	if (t) {
		free_slots = t->free_next;
	} else {
		uint32_t idx = task_count;
		struct keel__task *c;

		if (idx >> TASK_CHUNK_SHIFT >= TASK_MAX_CHUNKS) {
			pthread_mutex_unlock(&registry_lock);
			return NULL;
		}
		c = load_relaxed(&task_chunks[idx >> TASK_CHUNK_SHIFT]);
		if (!c && !(c = new_chunk(idx))) {
			pthread_mutex_unlock(&registry_lock);
			return NULL;
		}
		t = &c[idx & (TASK_CHUNK - 1)];
		task_count++;
	}
	w = load_relaxed(&t->mword);
	gen = (w >> MB_GEN_SHIFT) + 1;
	if (gen > TASK_GEN_MAX)
		gen = 1;
	t->id = gen << MB_GEN_SHIFT | t->idx;
	t->in_use = 1;
	if (++tasks_live > tasks_peak)
		tasks_peak = tasks_live;
	t->joined = 0;
	t->adopted = 0;
	t->status = 0;
	snprintf(t->name, sizeof t->name, "task-%u", t->idx);
	pthread_mutex_unlock(&registry_lock);
	/* Set up under the chain lock, which a stale canceller also takes:
	 * it sees the old incarnation or this one, never a mix. */
	pthread_mutex_lock(&t->chain_lock);
	store_release(&t->live, t->id);
	keel__cancel_reset(t);
	pthread_mutex_unlock(&t->chain_lock);

	t->running = NULL;
	t->outstanding = NULL;
	t->inflight = NULL;
	t->spin_ns = SPIN_INIT_NS;
	t->run_len = 0;
	t->stream_pauses = 0;
	t->serving = 0;
	t->closed = 0;
	t->fd_mode = 0;
	t->loop_mode = 0;
	t->loop_owed = 0;
	store_relaxed(&t->loop_thread, 0);
	t->in_exit_hook = 0;
	store_relaxed(&t->park, PARK_EMPTY);
	store_relaxed(&t->ended, TASK_RUNNING);
	keel__mbox_reset(t);

	/* Open the mailbox under the new generation. A sender holding a
	 * stale handle may have a transient count in the word (it adds 1,
	 * sees the wrong generation and takes it back), so wait for the
	 * count to drain; the release pairs with the acquire of every
	 * sender's fetch_add, publishing the reset queue above. */
	for (;;) {
		w = load_relaxed(&t->mword);
		if ((w & MB_COUNT_MASK) != 0) {
			keel__cpu_relax();
			continue;
		}
		if (cas_weak_release(&t->mword, &w, gen << MB_GEN_SHIFT))
			break;
	}
	return t;
}

void keel__task_release(struct keel__task *t)
{
	pthread_mutex_lock(&registry_lock);
	KEEL_ASSERT(t->in_use);
	t->in_use = 0;
	tasks_live--;
	store_release(&t->live, 0);
	t->free_next = free_slots;
	free_slots = t;
	pthread_mutex_unlock(&registry_lock);
}

void keel__task_end(struct keel__task *t, int status)
{
	struct keel__msg *m;

	if (load_relaxed(&t->mword) & MB_ENDED) {
		/* Ended already, unless its thread is ending from inside
		 * its scope's on_exit hook: then it has yet to tell its
		 * scope the rest (the owner waits for that). */
		if (t->in_exit_hook) {
			t->in_exit_hook = 0;
			keel__scope_child_told(t, t->status);
		}
		return;
	}
	/* First: its keel_on_cancel() registrations belong to the body that
	 * returned (their args may have lived on its stack). */
	keel__on_cancel_end(t);
	keel__lock_check_exit("a task ended holding a lock");
	/* A call whose work is still marked running when the task ends never
	 * returned: the thread exited inside it. (A close from inside a
	 * work does not come here: that work goes on and completes.) */
	if ((m = t->running) != NULL) {
		t->running = NULL;
		keel__proxy_abort_running(t, m);
	}
	/* Work in flight is cancelled first: replies this task owes itself
	 * must be settled before its close waits for them. Then the mailbox,
	 * before anything else of the task; then what it left open. The
	 * steps are named for the report of a child slow to end. */
	store_relaxed(&t->ending_in, "closing its mailbox");
	keel__proxy_end(t);
	keel__mbox_shutdown(t);
	keel__mbox_close_fd(t);
	keel__scope_task_end(t);
	t->status = status;
	fetch_or_acq_rel(&t->mword, MB_ENDED);
	if (t->home) {
		keel__scope_child_ended(t, status);
		return;
	}
	/* Pairs with the acquire in keel__task_join(). */
	store_release(&t->ended, TASK_LEFT);
	keel__futex_wake(&t->ended, INT32_MAX);
}

void keel__task_discard(struct keel__task *t)
{
	t->closed = 1;
	keel__mbox_seal(t);
	fetch_or_acq_rel(&t->mword, MB_CLOSED | MB_ENDED);
	store_release(&t->ended, TASK_LEFT);
	keel__task_release(t);
}

int keel__task_is(struct keel__task *t, keel_task_t id)
{
	return id != KEEL_TASK_NONE && load_acquire(&t->live) == id;
}

void keel__task_copy_name(struct keel__task *t, char *buf)
{
	pthread_mutex_lock(&registry_lock);
	memcpy(buf, t->name, sizeof t->name);
	pthread_mutex_unlock(&registry_lock);
}

void keel__task_set_name(struct keel__task *t, const char *name)
{
	pthread_mutex_lock(&registry_lock);
	snprintf(t->name, sizeof t->name, "%s", name);
	pthread_mutex_unlock(&registry_lock);
}

int keel_stats_get(keel_stats *out)
{
	if (!out)
		return -EINVAL;
	memset(out, 0, sizeof *out);
	pthread_mutex_lock(&registry_lock);
	out->tasks_live = tasks_live;
	out->task_slots = task_count;
	out->tasks_peak = tasks_peak;
	pthread_mutex_unlock(&registry_lock);
	keel__scope_stats(&out->scopes_live, &out->scope_slots);
	return 0;
}

void keel_stats_reset_peak(void)
{
	pthread_mutex_lock(&registry_lock);
	tasks_peak = tasks_live;
	pthread_mutex_unlock(&registry_lock);
}

/* ---- Adoption and thread exit -------------------------------------------- */

void (*keel__thread_exit_hook)(void);

static void on_thread_exit(void *value)
{
	struct keel__task *t = keel__tls.self;

	(void)value;
	keel__tls.registered = 0;
	keel__tls.exited = 1;
	keel__once_thread_exit();
	if (t) {
		/* Read before the task ends: once it has, a task keel started
		 * may be joined and its slot given to another thread at any
		 * moment, so nothing of the slot may be read after. */
		int adopted = t->adopted;

		keel__task_end(t, 0);
		keel__tls.self = NULL;
		if (keel__thread_exit_hook)
			keel__thread_exit_hook();
		if (adopted)
			keel__task_release(t);
		/* A task keel started is released by its joiner. */
	}
	keel__msg_flush();
}

void keel__task_retire_self(void)
{
	struct keel__task *t = keel__tls.self;

	if (!t || !t->adopted || t->cur != &t->base || t->running)
		return;
	keel__task_end(t, 0);
	keel__tls.self = NULL;
	keel__task_release(t);
}

static void make_key(void)
{
	if (pthread_key_create(&exit_key, on_thread_exit) != 0)
		keel__panic(__FILE__, __LINE__, "pthread_key_create failed");
}

void keel__tls_register(void)
{
	if (keel__tls.registered)
		return;
	pthread_once(&key_once, make_key);
	/* Any non-NULL value makes the destructor run at thread exit. */
	pthread_setspecific(exit_key, &keel__tls);
	keel__tls.registered = 1;
}

struct keel__task *keel__self_slow(void)
{
	struct keel__task *t = keel__task_alloc();

	if (!t)
		return NULL;
	pthread_mutex_lock(&registry_lock);
	t->adopted = 1;
	if (keel__thread_is_initial())
		snprintf(t->name, sizeof t->name, "main");
	else
		snprintf(t->name, sizeof t->name, "thread-%u", ++adopted_seq);
	pthread_mutex_unlock(&registry_lock);
	keel__tls.self = t;
	keel__tls_register();
	return t;
}

keel_task_t keel_self(void)
{
	struct keel__task *t = keel__self();

	return t ? t->id : KEEL_TASK_NONE;
}

/* ---- Names ---------------------------------------------------------------- */

int keel_task_name(keel_task_t id, char *buf, size_t size)
{
	struct keel__task *t = keel__task_slot(id);
	int len;

	if (!buf || size == 0)
		return -EINVAL;
	if (!t || id == KEEL_TASK_NONE)
		return -ESRCH;
	pthread_mutex_lock(&registry_lock);
	if (!t->in_use || t->id != id) {
		pthread_mutex_unlock(&registry_lock);
		return -ESRCH;
	}
	len = (int)strlen(t->name);
	snprintf(buf, size, "%s", t->name);
	pthread_mutex_unlock(&registry_lock);
	return len;
}

int keel_set_name(const char *name)
{
	struct keel__task *t;

	if (!name)
		return -EINVAL;
	if (!(t = keel__self()))
		return -ENOMEM;
	pthread_mutex_lock(&registry_lock);
	snprintf(t->name, sizeof t->name, "%s", name);
	pthread_mutex_unlock(&registry_lock);
	keel__thread_set_os_name(name);
	return 0;
}

/* ---- Parking ---------------------------------------------------------------
 * The park word is a one-shot wake-up token (a "parker"):
 *
 *   EMPTY   no token, the owner is not asleep
 *   TOKEN   a wake-up is pending; the owner's next park returns at once
 *   PARKED  the owner sleeps in futex_wait on the word (or is about to)
 *
 *   owner:   TOKEN -> EMPTY           consume the token and return
 *            EMPTY -> PARKED          then futex_wait while PARKED
 *            PARKED -> EMPTY          on waking (consuming a token if one
 *                                     replaced PARKED) or on timeout
 *   anyone:  any -> TOKEN (exchange); futex_wake only if it was PARKED
 *
 * Only the owner ever parks on its word, so a waker never syscalls unless
 * the owner really sleeps, and a wake-up can never be lost: a token set
 * before the owner parks makes the park return at once. The exchange is a
 * release and the owner's transitions acquire, so whatever the waker wrote
 * before unparking is visible to the owner when park returns. A stale
 * token (left by a waker whose news the owner already saw) causes one
 * spurious return, which callers' loops absorb.
 */
int keel__park(struct keel__task *self, keel_time_t deadline)
{
	uint32_t s = PARK_TOKEN;
	int rc = 0;

	if (cas_acq_rel(&self->park, &s, PARK_EMPTY))
		return 0;
	KEEL_ASSERT(s == PARK_EMPTY);
	if (!cas_acq_rel(&self->park, &s, PARK_PARKED)) {
		/* A token arrived in between. */
		xchg_acq_rel(&self->park, PARK_EMPTY);
		return 0;
	}
	for (;;) {
		rc = keel__futex_wait(&self->park, PARK_PARKED, deadline);
		if (load_acquire(&self->park) != PARK_PARKED)
			break; /* a token replaced PARKED */
		if (rc == -ETIMEDOUT) {
			s = PARK_PARKED;
			if (cas_acq_rel(&self->park, &s, PARK_EMPTY))
				return -ETIMEDOUT;
			break; /* a token arrived as we timed out */
		}
	}
	xchg_acq_rel(&self->park, PARK_EMPTY);
	return 0;
}

_Atomic uint64_t keel__wake_syscalls;

void keel__unpark(struct keel__task *t)
{
	if (xchg_acq_rel(&t->park, PARK_TOKEN) == PARK_PARKED) {
		fetch_add_relaxed(&keel__wake_syscalls, 1);
		keel__futex_wake(&t->park, 1);
	}
}

/* ---- Tasks on the thread cache ---------------------------------------------- */

struct spawn_job {
	struct keel__task *t;
	int (*fn)(void *);
	void *arg;
};

static void run_spawned(void *p)
{
	struct spawn_job job = *(struct spawn_job *)p;
	char name[KEEL_TASK_NAME_MAX + 1];
	int status;

	free(p);
	keel__tls.self = job.t;
	keel__tls_register();
	keel__task_copy_name(job.t, name);
	keel__thread_set_os_name(name);
	status = job.fn(job.arg);
	keel__task_end(job.t, status);
	keel__tls.self = NULL;
}

int keel__task_spawn(keel_task_t *out, int (*fn)(void *), void *arg,
		     const char *name, size_t stack_size)
{
	struct spawn_job *job = malloc(sizeof *job);
	struct keel__task *t;
	int rc;

	if (!job)
		return -ENOMEM;
	if (!(t = keel__task_alloc())) {
		free(job);
		return -ENOMEM;
	}
	if (name)
		keel__task_set_name(t, name);
	job->t = t;
	job->fn = fn;
	job->arg = arg;
	if (out)
		*out = t->id;
	rc = keel__thread_start(run_spawned, job, stack_size);
	if (rc < 0) {
		free(job);
		keel__task_discard(t);
	}
	return rc;
}

int keel__task_join(keel_task_t id, int *status)
{
	struct keel__task *t = keel__task_slot(id);

	if (!t || id == KEEL_TASK_NONE)
		return -ESRCH;
	pthread_mutex_lock(&registry_lock);
	if (!t->in_use || t->id != id || t->adopted || t->joined) {
		pthread_mutex_unlock(&registry_lock);
		return -ESRCH;
	}
	t->joined = 1;
	pthread_mutex_unlock(&registry_lock);
	/* Pairs with the release in keel__task_end(). */
	for (uint32_t e; (e = load_acquire(&t->ended)) != TASK_LEFT;)
		keel__futex_wait(&t->ended, e, KEEL_FOREVER);
	if (status)
		*status = t->status;
	keel__task_release(t);
	return 0;
}

/* ---- fork() ----------------------------------------------------------------
 * The child has only the forking thread. Every other task's thread is gone,
 * so the child marks those tasks LEFT, with status -ECANCELED if they had
 * not ended (sends to them give -ESRCH; joins, scope joins and closes
 * return: their scopes no longer count them), and forgets cached threads.
 *
 * keel's locks are all taken before fork, in an order no other thread can
 * hold against it (the rules are in cancel.c), and released in both
 * processes, so none is held in the child by a thread that no longer
 * exists and none guards a half-made change: the scope table's lock, every
 * scope's lock, the lock graph's, the thread cache's, the message pool's,
 * the registry's, then every task's chain lock (nothing is taken under a
 * chain lock, so its holders never wait for the ones taken before), and
 * last the platform layer's own (the portable futex buckets). Each
 * task's ctx and on_cancel locks are made anew in the child instead; a
 * registration running on a vanished thread counts as done.
 *
 * Records queued to the vanished tasks are left unrun: their threads can
 * no longer run either outcome. A message another thread was sending to
 * the forking thread's task at the instant of fork may be lost in the
 * child.
 */
static void fork_prepare(void)
{
	keel__scope_fork(0);
	keel__lockgraph_fork(0);
	keel__thread_cache_fork(0);
	keel__msg_fork(0);
	pthread_mutex_lock(&registry_lock);
	for (uint32_t i = 0; i < task_count; i++)
		pthread_mutex_lock(&keel__task_slot(i)->chain_lock);
	keel__platform_fork(0);
}

static void fork_parent(void)
{
	keel__platform_fork(1);
	for (uint32_t i = task_count; i-- > 0;)
		pthread_mutex_unlock(&keel__task_slot(i)->chain_lock);
	pthread_mutex_unlock(&registry_lock);
	keel__msg_fork(1);
	keel__thread_cache_fork(1);
	keel__lockgraph_fork(1);
	keel__scope_fork(1);
}

static void fork_child(void)
{
	struct keel__task *self = keel__tls.self;

	keel__platform_fork(2);
	for (uint32_t i = 0; i < task_count; i++) {
		struct keel__task *t = keel__task_slot(i);

		pthread_mutex_init(&t->chain_lock, NULL);
		pthread_mutex_init(&t->ctx_lock, NULL);
		keel__on_cancel_fork_child(t);
		/* Senders caught mid-send by the fork do not exist here: their
		 * counts must not make a close wait forever. */
		fetch_and_acq_rel(&t->mword, ~MB_COUNT_MASK);
		if (t == self && t->in_use)
			keel__mbox_fork_child(t);
		if (!t->in_use || t == self)
			continue;
		/* Vanished: the status of a task cut off (not an error). */
		if (load_relaxed(&t->ended) == TASK_RUNNING)
			t->status = -ECANCELED;
		t->closed = 1;
		keel__mbox_seal(t);
		fetch_or_acq_rel(&t->mword, MB_CLOSED | MB_ENDED);
		store_release(&t->ended, TASK_LEFT);
	}
	pthread_mutex_unlock(&registry_lock);
	keel__msg_fork(2);
	keel__thread_cache_fork(2);
	keel__lockgraph_fork(2);
	keel__scope_fork(2);
}

__attribute__((constructor)) static void register_fork_handlers(void)
{
	pthread_atfork(fork_prepare, fork_parent, fork_child);
}

/* ---- Time ---------------------------------------------------------------- */

keel_time_t keel_now(void)
{
	return keel__clock_now();
}

keel_time_t keel_after(keel_time_t d)
{
	keel_time_t now = keel__clock_now();

	if (d > 0 && now > KEEL_FOREVER - d)
		return KEEL_FOREVER;
	return now + d;
}

/* ---- Yield injection ------------------------------------------------------- */
#ifdef KEEL_DEBUG_YIELD
static _Atomic int yield_ppm = -1;

void keel__yield_point(void)
{
	int ppm = load_relaxed(&yield_ppm);
	uint32_t x;

	if (ppm < 0) {
		const char *e = getenv("KEEL_YIELD");

		ppm = e ? atoi(e) : 0;
		store_relaxed(&yield_ppm, ppm);
	}
	if (ppm == 0)
		return;
	x = keel__tls.rng;
	if (x == 0)
		x = (uint32_t)(uintptr_t)&keel__tls | 1;
	x ^= x << 13;
	x ^= x >> 17;
	x ^= x << 5;
	keel__tls.rng = x;
	if (x % 1000000u < (uint32_t)ppm)
		sched_yield();
}
#endif
