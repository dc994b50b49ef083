/*
 * fuzz_lock.c: ranked locks under random orders of lock, trylock, unlock,
 * destroy and re-init on several threads, with condition waits and
 * nesting past the held record's capacity.
 *
 * THE SCHEDULE
 * A pool of mutexes and reader-writer locks at fixed (static) addresses,
 * so that every input re-initialises locks where earlier ones lived, and
 * THREADS worker threads. The driver sends one operation at a time to one
 * worker and waits for it, except a condition wait without a deadline,
 * which goes on until a signal or broadcast. Operations: lock (a lock
 * another worker holds is tried instead, so that nothing blocks on the
 * pool), trylock, unlock (any held entry, in any order), unlock of a lock
 * the worker does not hold, destroy (held or not), re-init with a random
 * level (0, learned, or 1 to 5) and flags, condition waits (a deadline
 * already past, or none), signal, broadcast, destroying a mutex whose
 * holder waits on a condition, and "deep": take 30 to 40 learned locks of
 * the worker's own in one order, release them in taking order, in reverse
 * or shuffled, destroy them. Reports are made under the report policy.
 * Families for FUZZ_NO: deep, wait, misuse, reinit.
 *
 * THE MODEL
 * Each lock incarnation (an init) is a new identity, whatever its address.
 * The model keeps each worker's held record (order of taking, gaps closed
 * on release), the graph of "taken while holding" edges between
 * identities (an edge from the top of the record at each lock or rdlock
 * or wrlock; none for trylock; a destroyed identity loses its edges), and
 * which reports were made. For each operation it computes the reports the
 * contract calls for, and compares them with keel_lockcheck_reports():
 *   a lock of level l while the lowest ranked level held is m <= l:
 *       "lock order violation" (l < m is fine; learned locks take no part),
 *       or "two locks of one level" (l == m), against the first held lock
 *       of level m;
 *   a new edge with a learned end that closes a cycle in the graph:
 *       "lock order cycle", against the lock on top;
 *   a wait on a mutex while holding a lock of a lower level: one report;
 *   unlocking a lock the worker does not hold; destroying a held lock
 *       (-EBUSY): one report each;
 * each deduplicated per (kind, identity, identity): a new pair of locks
 * at recycled addresses is a new pair. Past 32 held locks one warning is
 * allowed (and nothing else). Checks:
 *   lock.false-report    keel reported more than the model calls for
 *   lock.missed-report   keel reported less
 *   lock.rc              a return code differs from the contract's
 *                        (-EBUSY to destroy a held mutex, a mutex whose
 *                        holder waits on a condition included; -EINVAL
 *                        for bad arguments; -EBUSY from a held trylock)
 *   lock.record          keel_mutex_held() disagrees with the model
 *   watchdog.hang        an operation did not finish
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz.h"
#include "internal.h"

#define THREADS 3
#define NMUTEX 5
#define NRW 2
#define NLOCKS (NMUTEX + NRW)
#define NCONDS 2
#define MAX_HELD 24 /* pool entries a worker holds, relocks included */
#define DEEP_MIN 30
#define DEEP_MAX 40

/* ---- The locks ------------------------------------------------------------ */

static keel_mutex_t mutexes[NMUTEX];
static keel_rwlock_t rwlocks[NRW];
static keel_cond_t conds[NCONDS];
static keel_mutex_t deep[THREADS][DEEP_MAX];
static const char *names[NLOCKS] = {"m0", "m1", "m2", "m3", "m4", "rw0",
				    "rw1"};

struct lockm {
	int live;       /* initialised */
	unsigned id;    /* identity of this incarnation */
	unsigned level; /* 0: learned */
	unsigned flags;
	int writer;     /* worker holding it exclusively, or -1 */
	int readers;    /* rwlock: shared holders */
	int waiting;    /* mutex: its holder waits on a condition */
};

static struct lockm L[NLOCKS];
static unsigned next_id = 1;

static int is_rw(int i)
{
	return i >= NMUTEX;
}

static void *addr(int i)
{
	return is_rw(i) ? (void *)&rwlocks[i - NMUTEX] : (void *)&mutexes[i];
}

/* ---- The model's record, graph and reports -------------------------------- */

struct held {
	int lock; /* pool index */
	unsigned id;
	int shared;
};

struct worker {
	int idx;
	pthread_t th;
	struct held h[MAX_HELD];
	int n;
	int waiting; /* in a condition wait without deadline, on cond */
	int cond;
	unsigned long queued; /* when it began waiting: a signal wakes the
			       * earliest */
	/* The command channel (under mu). */
	int cmd, arg, arg2, busy;
	int rc;
};

static struct worker W[THREADS];
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;

#define MAX_EDGES 512
static struct {
	unsigned from, to;
} edges[MAX_EDGES];
static int nedges;

enum { K_ORDER = 1, K_SAME, K_CYCLE, K_COND, K_NOT_HELD, K_DESTROY_HELD };

#define MAX_SEEN 1024
static struct {
	int kind;
	unsigned a, b;
} seen[MAX_SEEN];
static int nseen;

/* The reports the model expects for the operation in progress. */
static int want_lo, want_hi;
static char why[512];

static void expect_report(int kind, unsigned a, unsigned b, const char *what)
{
	size_t n = strlen(why);

	for (int i = 0; i < nseen; i++)
		if (seen[i].kind == kind && seen[i].a == a && seen[i].b == b)
			return; /* made before: deduplicated */
	FZ_ASSERT(nseen < MAX_SEEN);
	seen[nseen].kind = kind;
	seen[nseen].a = a;
	seen[nseen].b = b;
	nseen++;
	want_lo++;
	want_hi++;
	snprintf(why + n, sizeof why - n, "%s%s (#%u, #%u)", n ? "; " : "",
		 what, a, b);
}

static int edge_has(unsigned from, unsigned to)
{
	for (int i = 0; i < nedges; i++)
		if (edges[i].from == from && edges[i].to == to)
			return 1;
	return 0;
}

static int reaches(unsigned from, unsigned to, int depth)
{
	if (from == to)
		return 1;
	if (depth > NLOCKS + 2)
		return 0;
	for (int i = 0; i < nedges; i++)
		if (edges[i].from == from && reaches(edges[i].to, to, depth + 1))
			return 1;
	return 0;
}

/* An identity is gone: its edges and its reports cannot come back. */
static void forget(unsigned id)
{
	for (int i = 0; i < nedges;)
		if (edges[i].from == id || edges[i].to == id)
			edges[i] = edges[--nedges];
		else
			i++;
	for (int i = 0; i < nseen;)
		if (seen[i].a == id || seen[i].b == id)
			seen[i] = seen[--nseen];
		else
			i++;
}

/* What taking pool lock i with the order check calls for. */
static void model_check_acquire(struct worker *w, int i)
{
	struct lockm *l = &L[i];
	unsigned minlv = UINT_MAX;
	struct held *top, *lowest = NULL;

	if (w->n == 0)
		return;
	for (int j = 0; j < w->n; j++) {
		unsigned lv = L[w->h[j].lock].level;

		if (lv && lv < minlv)
			minlv = lv;
	}
	for (int j = 0; j < w->n && !lowest; j++)
		if (L[w->h[j].lock].level == minlv)
			lowest = &w->h[j];
	top = &w->h[w->n - 1];
	if (l->level && l->level >= minlv)
		expect_report(l->level == minlv ? K_SAME : K_ORDER, lowest->id,
			      l->id,
			      l->level == minlv ? "two locks of one level"
						: "order violation");
	if (top->id == l->id || edge_has(top->id, l->id))
		return;
	if ((!l->level || !L[top->lock].level) && reaches(l->id, top->id, 0))
		expect_report(K_CYCLE, top->id, l->id, "cycle");
	FZ_ASSERT(nedges < MAX_EDGES);
	edges[nedges].from = top->id;
	edges[nedges].to = l->id;
	nedges++;
}

static void held_push(struct worker *w, int i, int shared)
{
	FZ_ASSERT(w->n < MAX_HELD);
	w->h[w->n].lock = i;
	w->h[w->n].id = L[i].id;
	w->h[w->n].shared = shared;
	w->n++;
}

/* The topmost entry of lock i, as keel's record finds it. */
static int held_top_of(struct worker *w, int i)
{
	for (int j = w->n; j-- > 0;)
		if (w->h[j].lock == i)
			return j;
	return -1;
}

static void held_remove(struct worker *w, int j)
{
	memmove(&w->h[j], &w->h[j + 1], (size_t)(w->n - j - 1) * sizeof w->h[0]);
	w->n--;
}

static int holds(struct worker *w, int i)
{
	return held_top_of(w, i) >= 0;
}

/* ---- The workers ------------------------------------------------------------ */

enum { C_NONE, C_LOCK, C_TRYLOCK, C_RDLOCK, C_WRLOCK, C_UNLOCK, C_DESTROY,
       C_INIT, C_WAIT0, C_WAIT, C_SIGNAL, C_BROADCAST, C_DEEP, C_MISUSE,
       C_HELD, C_EXIT };

static const char *cnames[] = {"none", "lock", "trylock", "rdlock", "wrlock",
			       "unlock", "destroy", "init", "wait(0)", "wait",
			       "signal", "broadcast", "deep", "misuse", "held",
			       "exit"};

/* A deep run's parameters: count, release order and its shuffle. */
static int deep_n, deep_order;
static uint8_t deep_perm[DEEP_MAX];

static void do_unlock(int i)
{
	if (is_rw(i))
		keel_rwlock_unlock(addr(i));
	else
		keel_mutex_unlock((keel_mutex_t *)addr(i));
}

static int do_deep(struct worker *w)
{
	keel_mutex_t *d = deep[w->idx];
	int rc = 0;

	for (int k = 0; k < deep_n; k++)
		FZ_ASSERT(keel_mutex_init(&d[k], KEEL_LEVEL_LEARNED, "deep", 0) == 0);
	for (int k = 0; k < deep_n; k++)
		keel_mutex_lock(&d[k]);
	for (int k = 0; k < deep_n; k++) {
		int j = deep_order == 0   ? k
			: deep_order == 1 ? deep_n - 1 - k
					  : deep_perm[k];

		keel_mutex_unlock(&d[j]);
	}
	for (int k = 0; k < deep_n; k++) {
		int r = keel_mutex_destroy(&d[k]);

		if (r < 0 && rc == 0)
			rc = r;
	}
	return rc;
}

static int do_misuse(int which)
{
	keel_mutex_t m;
	keel_cond_t c;

	memset(&m, 0, sizeof m);
	memset(&c, 0, sizeof c);
	switch (which) {
	case 0: return keel_mutex_init(NULL, 1, "x", 0);
	case 1: return keel_mutex_init(&m, KEEL_LEVEL_MAX + 1, "x", 0);
	case 2: return keel_mutex_init(&m, 1, "x", 0x80);
	case 3: return keel_mutex_init(&m, 1, "x", KEEL_LOCK_LEAF | KEEL_LOCK_ROOT);
	case 4: return keel_mutex_init(&m, 1, NULL, 0);
	case 5: return keel_mutex_destroy(NULL);
	case 6: return keel_mutex_destroy(&m);
	case 7: return keel_cond_destroy(&c);
	case 8: return keel_cond_signal(NULL);
	case 9: return keel_rwlock_destroy(NULL);
	default: return keel_cond_init(NULL);
	}
}

static int execute(struct worker *w, int cmd, int a, int b)
{
	switch (cmd) {
	case C_LOCK:
		keel_mutex_lock((keel_mutex_t *)addr(a));
		return 0;
	case C_TRYLOCK:
		return keel_mutex_trylock((keel_mutex_t *)addr(a));
	case C_RDLOCK:
		keel_rwlock_rdlock(addr(a));
		return 0;
	case C_WRLOCK:
		keel_rwlock_wrlock(addr(a));
		return 0;
	case C_UNLOCK:
		do_unlock(a);
		return 0;
	case C_DESTROY:
		return is_rw(a) ? keel_rwlock_destroy(addr(a))
				: keel_mutex_destroy(addr(a));
	case C_WAIT0:
		return keel_cond_wait_until(&conds[b], (keel_mutex_t *)addr(a), 0);
	case C_WAIT:
		return keel_cond_wait(&conds[b], (keel_mutex_t *)addr(a));
	case C_SIGNAL:
		return keel_cond_signal(&conds[b]);
	case C_BROADCAST:
		return keel_cond_broadcast(&conds[b]);
	case C_DEEP:
		return do_deep(w);
	case C_MISUSE:
		return do_misuse(a);
	case C_HELD:
		return keel_mutex_held((keel_mutex_t *)addr(a));
	}
	return 0;
}

static void *worker_main(void *p)
{
	struct worker *w = p;

	pthread_mutex_lock(&mu);
	for (;;) {
		int cmd, a, b, rc;

		while (w->cmd == C_NONE)
			pthread_cond_wait(&cv, &mu);
		cmd = w->cmd;
		a = w->arg;
		b = w->arg2;
		if (cmd == C_EXIT)
			break;
		pthread_mutex_unlock(&mu);
		rc = execute(w, cmd, a, b);
		pthread_mutex_lock(&mu);
		w->rc = rc;
		w->cmd = C_NONE;
		w->busy = 0;
		pthread_cond_broadcast(&cv);
	}
	pthread_mutex_unlock(&mu);
	return NULL;
}

static void send(struct worker *w, int cmd, int a, int b)
{
	pthread_mutex_lock(&mu);
	w->cmd = cmd;
	w->arg = a;
	w->arg2 = b;
	w->busy = 1;
	pthread_cond_broadcast(&cv);
	pthread_mutex_unlock(&mu);
}

static int finish(struct worker *w)
{
	int rc;

	pthread_mutex_lock(&mu);
	while (w->busy)
		pthread_cond_wait(&cv, &mu);
	rc = w->rc;
	pthread_mutex_unlock(&mu);
	return rc;
}

/* ---- One operation, checked --------------------------------------------------- */

static unsigned long reports_before;
static char opdesc[128];

static void begin(struct worker *w, int cmd, int a)
{
	want_lo = want_hi = 0;
	why[0] = 0;
	reports_before = keel_lockcheck_reports();
	snprintf(opdesc, sizeof opdesc, "worker %d: %s %s", w->idx, cnames[cmd],
		 cmd == C_DEEP	     ? "locks"
		 : cmd == C_MISUSE   ? "call"
		 : a >= 0 && a < NLOCKS ? names[a]
					: "");
	fz_note("%s", opdesc);
}

static void end_check(void)
{
	unsigned long got = keel_lockcheck_reports() - reports_before;

	FZ_CHECK(got <= (unsigned long)want_hi, "lock.false-report",
		 "%s: keel made %lu report(s); the model calls for %d..%d%s%s",
		 opdesc, got, want_lo, want_hi, why[0] ? ": " : "", why);
	FZ_CHECK(got >= (unsigned long)want_lo, "lock.missed-report",
		 "%s: keel made %lu report(s); the model calls for %d..%d: %s",
		 opdesc, got, want_lo, want_hi, why);
}

static void check_rc(int got, int want)
{
	FZ_CHECK(got == want, "lock.rc", "%s returned %d (%s), expected %d (%s)",
		 opdesc, got, keel_strerror(got), want, keel_strerror(want));
}

static int run(struct worker *w, int cmd, int a, int b)
{
	send(w, cmd, a, b);
	return finish(w);
}

static void op_init(struct worker *w, int i, unsigned level, unsigned flags)
{
	struct lockm *l = &L[i];
	int rc;

	begin(w, C_INIT, i);
	l->id = next_id++;
	l->level = level;
	l->flags = flags;
	l->live = 1;
	l->writer = -1;
	l->readers = 0;
	l->waiting = 0;
	rc = is_rw(i) ? keel_rwlock_init(addr(i), level, names[i], flags)
		      : keel_mutex_init(addr(i), level, names[i], flags);
	check_rc(rc, 0);
	end_check();
}

static void op_destroy(struct worker *w, int i)
{
	struct lockm *l = &L[i];
	int held = l->writer >= 0 || l->readers || l->waiting, rc;

	begin(w, C_DESTROY, i);
	if (!l->live) {
		rc = run(w, C_DESTROY, i, 0);
		check_rc(rc, -EINVAL);
	} else if (held) {
		/* A mutex whose holder waits in a condition wait is held
		 * too: refused and reported the same way. */
		expect_report(K_DESTROY_HELD, l->id, l->id,
			      "destroying a held lock");
		rc = run(w, C_DESTROY, i, 0);
		FZ_CHECK(rc == -EBUSY, l->waiting ? "lock.destroy-cond-waiter"
						  : "lock.rc",
			 "%s: destroying a %s returned %d (%s), not -EBUSY",
			 opdesc,
			 l->waiting ? "mutex whose holder waits on a condition"
				    : "held lock",
			 rc, keel_strerror(rc));
		if (rc == 0) { /* keel destroyed it: follow it */
			end_check();
			return;
		}
	} else {
		rc = run(w, C_DESTROY, i, 0);
		check_rc(rc, 0);
		l->live = 0;
		forget(l->id);
	}
	end_check();
}

/* Take pool lock i on worker w in the way the model allows now. */
static void op_take(struct worker *w, int i, int how)
{
	struct lockm *l = &L[i];
	int mine = holds(w, i), rc;

	if (!l->live || l->waiting || w->n >= MAX_HELD - 1)
		return;
	if (is_rw(i)) {
		/* Never block: rdlock only without a writer, wrlock only on a
		 * free lock; never again by a holder. */
		if (mine || l->writer >= 0 || (how && l->readers))
			return;
		begin(w, how ? C_WRLOCK : C_RDLOCK, i);
		model_check_acquire(w, i);
		run(w, how ? C_WRLOCK : C_RDLOCK, i, 0);
		if (how)
			l->writer = w->idx;
		else
			l->readers++;
		held_push(w, i, !how);
		end_check();
		return;
	}
	if (l->writer >= 0 && !mine) {
		begin(w, C_TRYLOCK, i);
		check_rc(run(w, C_TRYLOCK, i, 0), -EBUSY);
		end_check();
		return;
	}
	if (mine) {
		/* A holder taking it again: recursive locks only (a
		 * non-recursive one's trylock is -EBUSY). */
		if (!(l->flags & KEEL_LOCK_RECURSIVE)) {
			begin(w, C_TRYLOCK, i);
			check_rc(run(w, C_TRYLOCK, i, 0), -EBUSY);
			end_check();
			return;
		}
		begin(w, how ? C_TRYLOCK : C_LOCK, i);
		rc = run(w, how ? C_TRYLOCK : C_LOCK, i, 0);
		check_rc(rc, 0);
		held_push(w, i, 0);
		end_check();
		return;
	}
	begin(w, how ? C_TRYLOCK : C_LOCK, i);
	if (!how)
		model_check_acquire(w, i);
	rc = run(w, how ? C_TRYLOCK : C_LOCK, i, 0);
	check_rc(rc, 0);
	l->writer = w->idx;
	held_push(w, i, 0);
	end_check();
}

static void op_unlock(struct worker *w, int j)
{
	int i = w->h[j].lock;
	struct lockm *l = &L[i];

	begin(w, C_UNLOCK, i);
	j = held_top_of(w, i);
	held_remove(w, j);
	run(w, C_UNLOCK, i, 0);
	if (!holds(w, i)) {
		if (l->writer == w->idx)
			l->writer = -1;
		else if (l->readers)
			l->readers--;
	}
	end_check();
	if (!is_rw(i))
		FZ_CHECK(run(w, C_HELD, i, 0) == holds(w, i), "lock.record",
			 "%s: keel_mutex_held() says %d after the unlock",
			 opdesc, !holds(w, i));
}

static void op_unlock_not_held(struct worker *w, int i)
{
	struct lockm *l = &L[i];

	if (!l->live || holds(w, i) || l->waiting || (is_rw(i) && l->readers))
		return;
	begin(w, C_UNLOCK, i);
	expect_report(K_NOT_HELD, l->id, l->id, "unlock of a lock not held");
	run(w, C_UNLOCK, i, 0);
	end_check();
}

/* Worker w waits on a condition with mutex i, which it holds once. */
/* Orders the waits: op_wait() returns once its worker is queued. */
static unsigned long wait_clock;

static void op_wait(struct worker *w, int i, int c, int forever)
{
	struct lockm *l = &L[i];
	int j = held_top_of(w, i);
	unsigned lv = l->level;
	keel_mutex_t *m = addr(i);

	if (is_rw(i) || j < 0 || (l->flags & KEEL_LOCK_RECURSIVE) || l->waiting)
		return;
	begin(w, forever ? C_WAIT : C_WAIT0, i);
	for (int k = 0; k < w->n; k++) {
		unsigned hl = L[w->h[k].lock].level;

		if (k != j && hl && lv && hl < lv) {
			expect_report(K_COND, w->h[k].id, l->id,
				      "a wait while holding a lower level");
			break;
		}
	}
	if (!forever) {
		check_rc(run(w, C_WAIT0, i, c), -ETIMEDOUT);
		end_check();
		return;
	}
	send(w, C_WAIT, i, c);
	/* Until the worker sleeps in the wait: queued, the word released. */
	while (!__atomic_load_n(&conds[c].k_waiters, __ATOMIC_ACQUIRE) ||
	       __atomic_load_n(&m->k_state, __ATOMIC_ACQUIRE) != 0)
		sched_yield();
	w->waiting = 1;
	w->cond = c;
	w->queued = ++wait_clock;
	l->waiting = 1;
	end_check();
}

static void woke(struct worker *w)
{
	int i = -1;

	for (int j = 0; j < w->n; j++)
		if (L[w->h[j].lock].waiting && L[w->h[j].lock].writer == w->idx)
			i = w->h[j].lock;
	check_rc(finish(w), 0);
	w->waiting = 0;
	if (i >= 0)
		L[i].waiting = 0;
}

/* Signalled from the driver's thread: any thread may. */
static void op_signal(struct worker *w, int c, int all)
{
	begin(w, all ? C_BROADCAST : C_SIGNAL, -1);
	check_rc(all ? keel_cond_broadcast(&conds[c]) : keel_cond_signal(&conds[c]),
		 0);
	/* FIFO: a signal wakes the waiter queued first, whichever worker
	 * it is. */
	for (;;) {
		struct worker *first = NULL;

		for (int k = 0; k < THREADS; k++) {
			struct worker *v = &W[k];

			if (v->waiting && v->cond == c &&
			    (!first || v->queued < first->queued))
				first = v;
		}
		if (!first)
			break;
		woke(first);
		if (!all)
			break;
	}
	end_check();
}

static void op_deep(struct worker *w, struct fz *f)
{
	begin(w, C_DEEP, -1);
	deep_n = DEEP_MIN + (int)fz_pick(f, DEEP_MAX - DEEP_MIN + 1);
	deep_order = (int)fz_pick(f, 3);
	for (int k = 0; k < deep_n; k++)
		deep_perm[k] = (uint8_t)k;
	for (int k = deep_n - 1; k > 0; k--) {
		int r = (int)fz_pick(f, (unsigned)k + 1);
		uint8_t t = deep_perm[k];

		deep_perm[k] = deep_perm[r];
		deep_perm[r] = t;
	}
	fz_note("  %d locks on top of %d, released %s", deep_n, w->n,
		deep_order == 0 ? "in taking order"
		: deep_order == 1 ? "in reverse" : "shuffled");
	if (w->n + deep_n > 32)
		want_hi++; /* the one warning past the record's capacity */
	check_rc(run(w, C_DEEP, 0, 0), 0);
	end_check();
	for (int j = 0; j < w->n; j++)
		if (!is_rw(w->h[j].lock))
			FZ_CHECK(run(w, C_HELD, w->h[j].lock, 0) == 1,
				 "lock.record", "%s: %s no longer held after",
				 opdesc, names[w->h[j].lock]);
}

static void op_misuse(struct worker *w, unsigned which)
{
	begin(w, C_MISUSE, -1);
	check_rc(run(w, C_MISUSE, (int)which, 0), -EINVAL);
	end_check();
}

/* ---- An input ----------------------------------------------------------------- */

static void random_init(struct worker *w, struct fz *f, int i)
{
	unsigned level = fz_pick(f, 6);
	unsigned flags = fz_pick(f, 4) == 0 && !is_rw(i) ? KEEL_LOCK_RECURSIVE : 0;

	op_init(w, i, level, flags);
}

static int run_input(const uint8_t *data, size_t size)
{
	struct fz f = {data, size, 0};
	int ops = 0;

	fz_watch_arm(60, "an input of fuzz_lock");
	/* The model of what was reported starts afresh with each input; so
	 * does keel's memory of it, which is of a fixed size (an input run
	 * after thousands of others would otherwise meet a crowded table and
	 * an old report made again). */
	keel__lock_reports_forget();
	for (int k = 0; k < THREADS; k++) {
		memset(&W[k], 0, sizeof W[k]);
		W[k].idx = k;
		FZ_ASSERT(pthread_create(&W[k].th, NULL, worker_main, &W[k]) == 0);
	}
	for (int c = 0; c < NCONDS; c++)
		FZ_ASSERT(keel_cond_init(&conds[c]) == 0);
	for (int i = 0; i < NLOCKS; i++)
		random_init(&W[0], &f, i);
	while (fz_more(&f) && ops++ < 200) {
		struct worker *w = &W[fz_pick(&f, THREADS)];
		unsigned op = fz_pick(&f, 20);
		int i = (int)fz_pick(&f, NLOCKS);

		if (w->waiting) {
			op_signal(w, w->cond, (int)fz_pick(&f, 2));
			continue;
		}
		if (op < 7) {
			op_take(w, i, (int)fz_pick(&f, 3) == 0);
		} else if (op < 11) {
			if (w->n)
				op_unlock(w, (int)fz_pick(&f, (unsigned)w->n));
		} else if (op == 11) {
			op_unlock_not_held(w, i);
		} else if (op == 12) {
			op_destroy(w, i);
		} else if (op == 13 && !fz_off("reinit")) {
			struct lockm *l = &L[i];

			if (l->writer < 0 && !l->readers && !l->waiting) {
				if (l->live)
					op_destroy(w, i);
				random_init(w, &f, i);
			}
		} else if ((op == 14 || op == 15) && !fz_off("wait")) {
			op_wait(w, i, (int)fz_pick(&f, NCONDS), op == 15);
		} else if (op == 16) {
			op_signal(w, (int)fz_pick(&f, NCONDS), (int)fz_pick(&f, 2));
		} else if (op == 17 && !fz_off("deep")) {
			op_deep(w, &f);
		} else if (op == 18 && !fz_off("misuse")) {
			op_misuse(w, fz_pick(&f, 11));
		} else if (op == 19) {
			/* A mutex whose holder waits: destroy must refuse. */
			for (int k = 0; k < NMUTEX; k++)
				if (L[k].waiting) {
					op_destroy(w, k);
					break;
				}
		}
	}
	/* Wind down: wake the waiters, release everything, destroy. */
	for (int c = 0; c < NCONDS; c++)
		op_signal(&W[0], c, 1);
	for (int k = 0; k < THREADS; k++)
		while (W[k].n)
			op_unlock(&W[k], W[k].n - 1);
	for (int i = 0; i < NLOCKS; i++)
		if (L[i].live)
			op_destroy(&W[0], i);
	for (int k = 0; k < THREADS; k++) {
		send(&W[k], C_EXIT, 0, 0);
		pthread_join(W[k].th, NULL);
	}
	for (int c = 0; c < NCONDS; c++)
		FZ_CHECK(keel_cond_destroy(&conds[c]) == 0, "lock.rc",
			 "keel_cond_destroy with nobody waiting failed");
	fz_watch_disarm();
	return 0;
}

FUZZ_HARNESS(fuzz_lock, run_input)
