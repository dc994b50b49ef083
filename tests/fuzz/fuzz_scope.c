/*
 * fuzz_scope.c: scopes built and torn down in random orders, with
 * children that end every way, cleanups and resources that misbehave,
 * fork() while tasks run, and misuse.
 *
 * THE SCHEDULE
 * The driver (the fuzzing thread, an adopted task) keeps a stack of
 * scopes it opened and applies operations to them: open; spawn a child,
 * foreground or background, joinable or detached, into any of them (a
 * child waits until cancelled, returns 0, fails with -EIO, pthread_exit()s,
 * or opens a scope of its own with a cleanup and a grandchild and waits);
 * defer a cleanup (it logs, fails, or leaves a shield or a scope open) or
 * set up a resource (its setup succeeds, fails, closes the scope, or
 * leaves a shield open) on the innermost; join a child; cancel one child
 * (keel_task_cancel); join, cancel or close a scope; keel_scope_run() with
 * a body that may leave a shield or a scope
 * open; fork() while tasks open and close scopes around the driver (the
 * child keeps using keel: a new scope, keel_scope_run(), and a join of a
 * scope whose children only the parent has, which must return), and
 * misuse (stale handles, NULLs, past and odd deadlines, keel_strerror()
 * of every code keel returns and of INT_MIN). Families for FUZZ_NO: fork,
 * fork-inherited (the child's join of the inherited scope), misbehave
 * (every setup, cleanup and body that misbehaves), cleanup-misbehave,
 * setup-close, misuse, run.
 *
 * THE MODEL
 * Each scope keeps its entries in registration order. Children log their
 * end, cleanups and teardowns log when they run. Checks:
 *   scope.teardown-order  close runs every cleanup once, in reverse order
 *                         of registration, each after every child
 *                         registered after it has ended
 *   scope.outlived        no child of a scope runs after its close (or
 *                         keel_scope_run()) returns
 *   scope.close-rc        close returns the first child failure, else the
 *                         first cleanup failure, else -ECANCELED if it was
 *                         cancelled, else 0 (scopes with no misbehaviour)
 *   scope.join-status     keel_join() gives the child's own status
 *   scope.rc              a call returns what the contract says
 *   scope.chain-restored  after a close or keel_scope_run(), whatever its
 *                         cleanups or body left open, the driver is back
 *                         in the scope (or shield) it was in before
 *   scope.shield-slots    ... and can still nest 8 shields
 *   scope.run-leak        keel_scope_run() does not give -EBUSY
 *   scope.misuse          misuse gets its documented error
 *   misuse.strerror       keel_strerror() names every code keel returns
 *   fork.child-hang       the fork child finishes (hangs are found by an
 *                         alarm in the child, which names its stage)
 *   fork.child-failed     the fork child's calls return what they should
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fuzz.h"
#include "internal.h"

#define MAX_SCOPES 4
#define MAX_ENTRIES 12
#define MAX_IDS 256
#define MAX_LOG 1024

/* ---- The event log ------------------------------------------------------ */

static pthread_mutex_t log_mu = PTHREAD_MUTEX_INITIALIZER;
static int logpos[MAX_IDS]; /* position of each id's event, or -1 */
static int nlogged[MAX_IDS];
static int nlog;

static void log_event(int id)
{
	pthread_mutex_lock(&log_mu);
	logpos[id] = nlog++;
	nlogged[id]++;
	pthread_mutex_unlock(&log_mu);
}

static int pos_of(int id)
{
	int p;

	pthread_mutex_lock(&log_mu);
	p = logpos[id];
	pthread_mutex_unlock(&log_mu);
	return p;
}

/* Children still running, of any scope of the input. */
static atomic_int running;

/* ---- The model of the driver's scopes ------------------------------------ */

enum ekind { E_CHILD, E_CLEANUP, E_RESOURCE };
enum child_kind { CH_WAIT, CH_RETURN, CH_FAIL, CH_PEXIT, CH_NESTED, CH_KINDS };
enum cleanup_kind { CL_OK, CL_FAIL, CL_LEAVE_SHIELD, CL_LEAVE_SCOPE, CL_KINDS };
enum setup_kind { SU_OK, SU_FAIL, SU_CLOSE_SCOPE, SU_LEAVE_SHIELD, SU_KINDS };

static const char *child_names[] = {"wait", "return", "fail", "pthread_exit",
				    "nested"};
static const char *cleanup_names[] = {"ok", "fail", "leave-shield",
				      "leave-scope"};
static const char *setup_names[] = {"ok", "fail", "close-scope",
				    "leave-shield"};

struct entry {
	int kind, id, how, background, done;
	keel_task_t task;
	int detached; /* spawned detached: reaped when it ends */
};

struct smodel {
	keel_scope_t *s;
	struct keel__frame *outer; /* the driver's frame before it opened s */
	int policy, cancelled, failing, misbehaved;
	struct entry e[MAX_ENTRIES];
	int n;
};

static struct smodel S[MAX_SCOPES];
static int nscopes;
static int next_id;
static keel_scope_t *stale_scope; /* a closed scope, kept for misuse */

static int new_id(void)
{
	FZ_ASSERT(next_id < MAX_IDS);
	return next_id++;
}

/* Whether scope k or one around it may be cancelled now. */
static int maybe_cancelled(int k)
{
	for (; k >= 0; k--)
		if (S[k].cancelled || S[k].failing)
			return 1;
	return 0;
}

/* ---- Children, cleanups, resources --------------------------------------- */

struct child {
	int id, how;
};

static struct child children[MAX_IDS];

static int nested_cleanup(void *arg)
{
	(void)arg;
	return 0;
}

static int grandchild(void *arg)
{
	(void)arg;
	keel_sleep_until(KEEL_FOREVER);
	return 0;
}

static int child_fn(void *arg)
{
	struct child *c = arg;
	keel_scope_t *mine;

	switch (c->how) {
	case CH_WAIT:
		keel_sleep_until(KEEL_FOREVER);
		break;
	case CH_FAIL:
		log_event(c->id);
		atomic_fetch_sub(&running, 1);
		return -EIO;
	case CH_PEXIT:
		log_event(c->id);
		atomic_fetch_sub(&running, 1);
		pthread_exit(NULL);
	case CH_NESTED:
		if (keel_scope_open(&mine, NULL) == 0) {
			keel_defer(mine, nested_cleanup, NULL);
			keel_spawn(mine, grandchild, NULL, NULL, NULL);
			keel_sleep_until(KEEL_FOREVER);
			keel_scope_close(mine);
		}
		break;
	}
	log_event(c->id);
	atomic_fetch_sub(&running, 1);
	return 0;
}

static keel_time_t soon(void)
{
	return keel_after(KEEL_SEC(2));
}

static int cleanup_fn(void *arg)
{
	int id = (int)(intptr_t)arg, how = children[id].how;
	keel_scope_t *left;

	log_event(id);
	switch (how) {
	case CL_FAIL:
		return -EPIPE;
	case CL_LEAVE_SHIELD:
		keel_shield_begin(soon());
		break;
	case CL_LEAVE_SCOPE:
		keel_scope_open(&left, NULL);
		break;
	}
	return 0;
}

static int teardown_fn(void *res)
{
	log_event((int)(intptr_t)res);
	return 0;
}

static keel_scope_t *setup_scope; /* the scope a setup may close */

static int setup_fn(void *arg, void **res)
{
	int id = (int)(intptr_t)arg;

	*res = arg;
	switch (children[id].how) {
	case SU_FAIL:
		return -ENOENT;
	case SU_CLOSE_SCOPE:
		fz_note("  setup %d closes its scope: %d", id,
			keel_scope_close(setup_scope));
		break;
	case SU_LEAVE_SHIELD:
		keel_shield_begin(soon());
		break;
	}
	return 0;
}

/* ---- Checks shared by close and run --------------------------------------- */

static struct keel__frame *chain_now(void)
{
	struct keel__task *t = keel__self();

	return t ? t->cur : NULL;
}

static void check_chain(struct keel__frame *before, const char *after)
{
	FZ_CHECK(chain_now() == before, "scope.chain-restored",
		 "after %s the driver's innermost frame is not the one it was "
		 "in before (a shield or scope left open leaked)", after);
}

static void check_shield_slots(const char *after)
{
	int ok = 1, n = 0;

	for (; n < KEEL_MAX_SHIELDS; n++)
		if (keel_shield_begin(soon()) != 0) {
			ok = 0;
			break;
		}
	while (n-- > 0)
		keel_shield_end();
	FZ_CHECK(ok, "scope.shield-slots",
		 "after %s the driver cannot nest %d shields any more", after,
		 KEEL_MAX_SHIELDS);
}

/* The teardown log of scope k after its close. */
static void check_teardown(struct smodel *m)
{
	int last = -1; /* the log position of the cleanup that ran before */

	for (int i = m->n; i-- > 0;) {
		struct entry *e = &m->e[i];
		int p;

		if (e->done)
			continue;
		p = pos_of(e->id);
		if (e->kind == E_CHILD) {
			FZ_CHECK(p >= 0, "scope.outlived",
				 "child %d had not ended when its scope's close "
				 "returned", e->id);
			continue;
		}
		FZ_CHECK(nlogged[e->id] == 1, "scope.teardown-order",
			 "cleanup %d ran %d times", e->id, nlogged[e->id]);
		FZ_CHECK(p > last, "scope.teardown-order",
			 "cleanup %d (entry %d) ran before a cleanup registered "
			 "after it", e->id, i);
		last = p;
		for (int j = i + 1; j < m->n; j++)
			if (m->e[j].kind == E_CHILD && !m->e[j].done)
				FZ_CHECK(pos_of(m->e[j].id) < p,
					 "scope.teardown-order",
					 "cleanup %d (entry %d) ran before child "
					 "%d (entry %d, registered after it) ended",
					 e->id, i, m->e[j].id, j);
	}
}

/* The close's result; *loose: -ECANCELED or 0 (a failure elsewhere may
 * or may not have cancelled it yet). */
static int expected_close_rc(struct smodel *m, int k, int *loose)
{
	int fail = 0, cfail = 0, sure = 0;

	*loose = 0;
	for (int i = 0; i < m->n; i++) {
		struct entry *e = &m->e[i];

		/* A joined child's failure still counts. */
		if (e->kind == E_CHILD && e->how == CH_FAIL)
			fail = 1;
		if (e->kind == E_CLEANUP && e->how == CL_FAIL && !e->done)
			cfail = 1;
	}
	if (fail)
		return -EIO;
	if (cfail)
		return -EPIPE;
	for (int j = k; j >= 0; j--)
		sure |= S[j].cancelled;
	*loose = !sure && maybe_cancelled(k);
	return maybe_cancelled(k) ? -ECANCELED : 0;
}

/* ---- Operations on the driver's scopes ------------------------------------- */

static void op_open(struct fz *f)
{
	keel_scope_opts o = {.policy = fz_pick(f, 2) ? KEEL_SUPERVISE
						     : KEEL_FAIL_FAST};
	struct smodel *m;
	int rc;

	if (nscopes == MAX_SCOPES)
		return;
	m = &S[nscopes];
	memset(m, 0, sizeof *m);
	m->policy = o.policy;
	m->outer = chain_now();
	rc = keel_scope_open(&m->s, &o);
	fz_note("open scope %d (%s): %d", nscopes,
		o.policy ? "supervise" : "fail-fast", rc);
	FZ_CHECK(rc == 0 || (rc == -ECANCELED && maybe_cancelled(nscopes - 1)),
		 "scope.rc", "keel_scope_open() returned %d (%s)", rc,
		 keel_strerror(rc));
	if (rc == 0)
		nscopes++;
}

static void op_spawn(struct fz *f)
{
	int k = (int)fz_pick(f, (unsigned)nscopes), rc;
	struct smodel *m = &S[k];
	keel_spawn_opts o = {.background = (int)fz_pick(f, 3) == 0};
	struct entry *e;
	int id, how = (int)fz_pick(f, CH_KINDS);

	o.detached = fz_pick(f, 4) == 0;
	if (m->n == MAX_ENTRIES)
		return;
	id = new_id();
	children[id] = (struct child){id, how};
	e = &m->e[m->n];
	*e = (struct entry){E_CHILD, id, how, o.background, 0, 0, o.detached};
	atomic_fetch_add(&running, 1);
	rc = keel_spawn(m->s, child_fn, &children[id], &o, &e->task);
	fz_note("spawn child %d (%s%s%s) into scope %d: %d", id,
		child_names[how], o.background ? ", background" : "",
		o.detached ? ", detached" : "", k, rc);
	if (rc < 0) {
		atomic_fetch_sub(&running, 1);
		FZ_CHECK(rc == -ECANCELED && maybe_cancelled(k), "scope.rc",
			 "keel_spawn() into scope %d returned %d (%s)", k, rc,
			 keel_strerror(rc));
		return;
	}
	if (how == CH_FAIL && m->policy == KEEL_FAIL_FAST)
		m->failing = 1;
	m->n++;
}

static void op_defer(struct fz *f)
{
	struct smodel *m = &S[nscopes - 1];
	int how = (int)fz_pick(f, CL_KINDS), id, rc;

	if (how >= CL_LEAVE_SHIELD &&
	    (fz_off("misbehave") || fz_off("cleanup-misbehave")))
		how = CL_OK;
	if (m->n == MAX_ENTRIES)
		return;
	id = new_id();
	children[id] = (struct child){id, how};
	rc = keel_defer(m->s, cleanup_fn, (void *)(intptr_t)id);
	fz_note("defer cleanup %d (%s) in scope %d: %d", id, cleanup_names[how],
		nscopes - 1, rc);
	FZ_CHECK(rc == 0, "scope.rc", "keel_defer() returned %d (%s)", rc,
		 keel_strerror(rc));
	m->e[m->n++] = (struct entry){E_CLEANUP, id, how, 0, 0, 0, 0};
	if (how >= CL_LEAVE_SHIELD)
		m->misbehaved = 1;
}

static void op_close(void);

static void op_resource(struct fz *f)
{
	struct smodel *m = &S[nscopes - 1];
	int how = (int)fz_pick(f, SU_KINDS), id, rc;
	void *res = NULL;

	if ((how >= SU_CLOSE_SCOPE && fz_off("misbehave")) ||
	    (how == SU_CLOSE_SCOPE && fz_off("setup-close")))
		how = SU_OK;
	if (m->n == MAX_ENTRIES)
		return;
	id = new_id();
	children[id] = (struct child){id, how};
	setup_scope = m->s;
	rc = keel_resource(m->s, setup_fn, teardown_fn, (void *)(intptr_t)id,
			   &res);
	fz_note("resource %d (%s) in scope %d: %d", id, setup_names[how],
		nscopes - 1, rc);
	if (how >= SU_CLOSE_SCOPE) {
		/* What keel does is open (refuse, report, or go on): no crash
		 * is asked, and the harness then puts things right itself: it
		 * ends a shield the setup left, and closes the scope. */
		m->misbehaved = 1;
		if (rc == 0)
			m->e[m->n++] = (struct entry){E_RESOURCE, id, how, 0, 1, 0, 0};
		if (chain_now() && chain_now()->kind == FRAME_SHIELD)
			keel_shield_end();
		op_close();
		return;
	}
	if (how == SU_FAIL) {
		FZ_CHECK(rc == -ENOENT || (rc == -ECANCELED &&
					   maybe_cancelled(nscopes - 1)),
			 "scope.rc",
			 "keel_resource() with a failing setup returned %d", rc);
		return;
	}
	FZ_CHECK(rc == 0 || (rc == -ECANCELED && maybe_cancelled(nscopes - 1)),
		 "scope.rc", "keel_resource() returned %d (%s)", rc,
		 keel_strerror(rc));
	FZ_CHECK(rc < 0 || res == (void *)(intptr_t)id, "scope.rc",
		 "keel_resource() stored %p, not the resource", res);
	if (rc == 0)
		m->e[m->n++] = (struct entry){E_RESOURCE, id, how, 0, 0, 0, 0};
}

static void op_join_child(struct fz *f)
{
	int k = (int)fz_pick(f, (unsigned)nscopes), st = 12345, rc;
	struct smodel *m = &S[k];
	struct entry *e;

	if (!m->n)
		return;
	e = &m->e[fz_pick(f, (unsigned)m->n)];
	if (e->kind != E_CHILD || e->done)
		return;
	if (e->detached) {
		/* Not joinable: refused while it lives, stale once reaped. */
		rc = keel_join(e->task, &st, 0);
		fz_note("join detached child %d of scope %d: %d", e->id, k, rc);
		FZ_CHECK(rc == -EINVAL || rc == -ESRCH, "scope.misuse",
			 "keel_join() of detached child %d returned %d (%s)",
			 e->id, rc, keel_strerror(rc));
		FZ_CHECK(rc != -ESRCH || pos_of(e->id) >= 0, "scope.outlived",
			 "detached child %d reaped before it ended", e->id);
		return;
	}
	if (e->how == CH_WAIT || e->how == CH_NESTED) {
		rc = keel_join(e->task, &st, 0);
		fz_note("join child %d of scope %d, deadline 0: %d", e->id, k, rc);
		FZ_CHECK(rc == -ETIMEDOUT || rc == -ECANCELED || rc == 0,
			 "scope.rc", "keel_join(deadline 0) returned %d (%s)",
			 rc, keel_strerror(rc));
	} else {
		rc = keel_join(e->task, &st, KEEL_FOREVER);
		fz_note("join child %d of scope %d: %d, status %d", e->id, k,
			rc, st);
		FZ_CHECK(rc == 0 || (rc == -ECANCELED &&
				     maybe_cancelled(nscopes - 1)),
			 "scope.rc", "keel_join() of child %d returned %d (%s)",
			 e->id, rc, keel_strerror(rc));
	}
	if (rc == 0) {
		int want = e->how == CH_FAIL ? -EIO : 0;

		FZ_CHECK(st == want, "scope.join-status",
			 "child %d (%s) joined with status %d, not %d", e->id,
			 child_names[e->how], st, want);
		FZ_CHECK(pos_of(e->id) >= 0, "scope.outlived",
			 "child %d joined before it ended", e->id);
		e->done = 1;
		rc = keel_join(e->task, NULL, 0);
		FZ_CHECK(rc == -ESRCH, "scope.misuse",
			 "joining child %d twice returned %d, not -ESRCH", e->id,
			 rc);
	}
}

static void op_scope_join(struct fz *f)
{
	struct smodel *m = &S[nscopes - 1];
	int forever = fz_pick(f, 2), rc;

	for (int i = 0; i < m->n; i++)
		if (m->e[i].kind == E_CHILD && !m->e[i].background &&
		    !m->e[i].done &&
		    (m->e[i].how == CH_WAIT || m->e[i].how == CH_NESTED))
			forever = 0;
	rc = keel_scope_join(m->s, forever ? KEEL_FOREVER : 0);
	fz_note("scope_join scope %d, %s: %d", nscopes - 1,
		forever ? "forever" : "deadline 0", rc);
	FZ_CHECK(rc == 0 || rc == -ECANCELED || (!forever && rc == -ETIMEDOUT),
		 "scope.rc", "keel_scope_join() returned %d (%s)", rc,
		 keel_strerror(rc));
	FZ_CHECK(rc != -ECANCELED || maybe_cancelled(nscopes - 1), "scope.rc",
		 "keel_scope_join() of a scope nobody cancelled: -ECANCELED");
}

static void op_cancel(struct fz *f)
{
	int k = (int)fz_pick(f, (unsigned)nscopes), rc;

	rc = keel_scope_cancel(S[k].s);
	fz_note("cancel scope %d: %d", k, rc);
	FZ_CHECK(rc == 0, "scope.rc", "keel_scope_cancel() returned %d", rc);
	S[k].cancelled = 1;
}

/* keel_task_cancel() of one child: only it (and what it nests) hears it.
 * A joined child's handle is stale; a detached one's may be. */
static void op_task_cancel(struct fz *f)
{
	int k = (int)fz_pick(f, (unsigned)nscopes), rc;
	struct smodel *m = &S[k];
	struct entry *e;

	if (!m->n)
		return;
	e = &m->e[fz_pick(f, (unsigned)m->n)];
	if (e->kind != E_CHILD)
		return;
	rc = keel_task_cancel(e->task);
	fz_note("task_cancel child %d of scope %d: %d", e->id, k, rc);
	if (e->done)
		FZ_CHECK(rc == -ESRCH, "scope.rc",
			 "keel_task_cancel() of joined child %d returned %d "
			 "(%s)", e->id, rc, keel_strerror(rc));
	else if (e->detached)
		FZ_CHECK(rc == 0 || (rc == -ESRCH && pos_of(e->id) >= 0),
			 "scope.rc",
			 "keel_task_cancel() of detached child %d returned %d "
			 "(%s)", e->id, rc, keel_strerror(rc));
	else
		FZ_CHECK(rc == 0, "scope.rc",
			 "keel_task_cancel() of child %d returned %d (%s)",
			 e->id, rc, keel_strerror(rc));
}

static void op_close(void)
{
	struct smodel *m = &S[nscopes - 1];
	struct keel__frame *before = m->outer;
	int loose, want = expected_close_rc(m, nscopes - 1, &loose), rc;

	rc = keel_scope_close(m->s);
	fz_note("close scope %d: %d", nscopes - 1, rc);
	nscopes--;
	stale_scope = m->s;
	if (m->misbehaved) {
		/* A setup may have closed it already: -EINVAL then. */
		check_chain(before, "a close whose cleanups misbehaved");
		check_shield_slots("a close whose cleanups misbehaved");
		return;
	}
	check_teardown(m);
	FZ_CHECK(rc == want || (loose && (rc == 0 || rc == -ECANCELED)),
		 "scope.close-rc", "close of scope %d returned %d (%s), not %d "
		 "(%s)", nscopes, rc, keel_strerror(rc), want,
		 keel_strerror(want));
	check_chain(before, "a close");
}

/* ---- keel_scope_run --------------------------------------------------------- */

struct run_arg {
	int leave; /* 0 nothing, 1 a shield, 2 a scope */
	int ids[2];
	int spawned[2];
};

static int run_body(keel_scope_t *s, void *p)
{
	struct run_arg *a = p;
	keel_spawn_opts bg = {.background = 1};
	keel_scope_t *inner;

	atomic_fetch_add(&running, 2);
	a->spawned[0] = keel_spawn(s, child_fn, &children[a->ids[0]], NULL,
				   NULL) == 0;
	a->spawned[1] = keel_spawn(s, child_fn, &children[a->ids[1]], &bg,
				   NULL) == 0;
	atomic_fetch_sub(&running, 2 - a->spawned[0] - a->spawned[1]);
	if (a->leave == 1)
		keel_shield_begin(soon());
	else if (a->leave == 2)
		keel_scope_open(&inner, NULL);
	return 0;
}

static void op_run(struct fz *f)
{
	struct run_arg a = {.leave = (int)fz_pick(f, 3)};
	struct keel__frame *before = chain_now();
	int rc;

	if (fz_off("misbehave"))
		a.leave = 0;
	a.ids[0] = new_id();
	children[a.ids[0]] = (struct child){a.ids[0], CH_RETURN};
	a.ids[1] = new_id();
	children[a.ids[1]] = (struct child){a.ids[1], CH_WAIT};
	rc = keel_scope_run(run_body, &a, NULL);
	fz_note("scope_run (body leaves %s open): %d",
		a.leave == 1 ? "a shield" : a.leave == 2 ? "a scope" : "nothing",
		rc);
	FZ_CHECK(rc != -EBUSY, "scope.run-leak",
		 "keel_scope_run() whose body left %s open returned -EBUSY",
		 a.leave == 1 ? "a shield" : "a scope");
	check_chain(before, "keel_scope_run()");
	for (int i = 0; i < 2; i++)
		FZ_CHECK(!a.spawned[i] || pos_of(a.ids[i]) >= 0, "scope.outlived",
			 "child %d of keel_scope_run() still runs after it "
			 "returned", a.ids[i]);
	if (a.leave)
		check_shield_slots("keel_scope_run()");
}

/* ---- fork -------------------------------------------------------------------- */

static int churn_body(keel_scope_t *s, void *p)
{
	(void)p;
	keel_spawn(s, grandchild, NULL, NULL, NULL);
	return 0;
}

/* Opens and closes scopes until cancelled: keel's scope lock is busy. */
static int churner(void *p)
{
	(void)p;
	while (keel_checkpoint() == 0) {
		keel_scope_t *s;

		if (keel_scope_open(&s, NULL) < 0)
			break;
		keel_spawn(s, grandchild, NULL, NULL, NULL);
		keel_scope_close(s);
		keel_scope_run(churn_body, NULL, NULL);
	}
	return 0;
}

static int quick(void *p)
{
	(void)p;
	return 0;
}

static int fork_run_body(keel_scope_t *s, void *p)
{
	(void)p;
	keel_spawn(s, quick, NULL, NULL, NULL);
	return 0;
}

static void child_expect(int ok, const char *what, int rc)
{
	if (!ok) {
		fprintf(stderr, "fork child: %s returned %d (%s)\n", what, rc,
			keel_strerror(rc));
		_exit(3);
	}
}

static int fork_run_body_quiet(keel_scope_t *s, void *p)
{
	(void)s;
	(void)p;
	return 0;
}

static void fork_child(void *p)
{
	keel_scope_t *inherited = p, *s;
	int rc;

	/* The driver may have been cancelled by the time of the fork (a
	 * fail-fast scope it is in had a child fail): then every scope call
	 * here rightly says -ECANCELED. A shield lets the child go on. */
	if (keel_checkpoint() == -ECANCELED)
		keel_shield_begin(keel_after(KEEL_SEC(30)));
	fz_child_stage("keel_scope_open");
	rc = keel_scope_open(&s, NULL);
	child_expect(rc == 0, "keel_scope_open", rc);
	if (!FZ_SANITIZED) { /* spawning allocates: see fuzz.h */
		fz_child_stage("keel_spawn");
		rc = keel_spawn(s, quick, NULL, NULL, NULL);
		child_expect(rc == 0, "keel_spawn", rc);
	}
	fz_child_stage("keel_scope_join of a new scope");
	rc = keel_scope_join(s, KEEL_FOREVER);
	child_expect(rc == 0, "keel_scope_join of a new scope", rc);
	fz_child_stage("keel_scope_close of a new scope");
	rc = keel_scope_close(s);
	child_expect(rc == 0, "keel_scope_close of a new scope", rc);
	fz_child_stage("keel_scope_run");
	rc = keel_scope_run(FZ_SANITIZED ? fork_run_body_quiet : fork_run_body,
			    NULL, NULL);
	child_expect(rc == 0, "keel_scope_run", rc);
	if (fz_off("fork-inherited"))
		return;
	fz_child_stage("keel_scope_join of a scope whose tasks stayed in the "
		       "parent");
	rc = keel_scope_join(inherited, KEEL_FOREVER);
	child_expect(rc == 0, "keel_scope_join of an inherited scope", rc);
	if (FZ_SANITIZED)
		return; /* closing it frees its entries */
	fz_child_stage("keel_scope_close of a scope whose tasks stayed in the "
		       "parent");
	keel_scope_close(inherited);
}

static void op_fork(struct fz *f)
{
	keel_scope_t *churn;
	int n = 1 + (int)fz_pick(f, 2), forks = 1 + (int)fz_pick(f, 3);

	if (keel_scope_open(&churn, NULL) < 0)
		return; /* the driver is cancelled */
	for (int i = 0; i < n; i++)
		if (keel_spawn(churn, churner, NULL, NULL, NULL) < 0)
			n = i;
	for (int i = 0; i < forks; i++) {
		int st;

		fz_note("fork %d of %d with %d task(s) churning scopes", i + 1,
			forks, n);
		st = fz_fork(fork_child, churn, 5);
		FZ_CHECK(st == 0, "fork.child-failed",
			 "the fork child ended with status %d (see above)", st);
	}
	keel_scope_close(churn);
}

/* ---- Misuse -------------------------------------------------------------------- */

static int noop(void *p)
{
	(void)p;
	return 0;
}

static void misuse_rc(int got, int want, const char *what)
{
	FZ_CHECK(got == want, "scope.misuse", "%s returned %d (%s), not %d (%s)",
		 what, got, keel_strerror(got), want, keel_strerror(want));
}

static void op_misuse(struct fz *f)
{
	static const int codes[] = {ECANCELED, ETIMEDOUT, ESRCH, ESHUTDOWN,
				    ENOMEM, EINVAL, EPERM, EDEADLK, ESTALE,
				    EBUSY, EPROTO, EIO, EALREADY, EOVERFLOW,
				    ENOTSUP};
	unsigned which = fz_pick(f, 10);
	keel_scope_t *s = stale_scope;
	char buf[8];
	int rc;

	fz_note("misuse %u", which);
	switch (which) {
	case 0:
		FZ_CHECK(keel_strerror(INT_MIN) != NULL, "scope.misuse",
			 "keel_strerror(INT_MIN) is NULL");
		FZ_CHECK(keel_strerror(INT_MAX) != NULL, "scope.misuse",
			 "keel_strerror(INT_MAX) is NULL");
		break;
	case 1:
		for (size_t i = 0; i < sizeof codes / sizeof codes[0]; i++)
			FZ_CHECK(strcmp(keel_strerror(-codes[i]),
					"unknown error") != 0,
				 "misuse.strerror",
				 "keel_strerror(%d) does not name a code keel "
				 "returns", -codes[i]);
		break;
	case 2:
		if (s)
			misuse_rc(keel_spawn(s, noop, NULL, NULL, NULL),
				  -ECANCELED, "keel_spawn() into a closed scope");
		misuse_rc(keel_spawn(NULL, noop, NULL, NULL, NULL), -EINVAL,
			  "keel_spawn(NULL scope)");
		if (nscopes)
			misuse_rc(keel_spawn(S[0].s, NULL, NULL, NULL, NULL),
				  -EINVAL, "keel_spawn(NULL fn)");
		break;
	case 3:
		if (s) {
			misuse_rc(keel_scope_close(s), -EINVAL,
				  "keel_scope_close(stale)");
			misuse_rc(keel_scope_cancel(s), -EINVAL,
				  "keel_scope_cancel(stale)");
			misuse_rc(keel_scope_join(s, 0), -EINVAL,
				  "keel_scope_join(stale)");
		}
		misuse_rc(keel_scope_open(NULL, NULL), -EINVAL,
			  "keel_scope_open(NULL)");
		break;
	case 4:
		if (s)
			misuse_rc(keel_defer(s, cleanup_fn, NULL), -ECANCELED,
				  "keel_defer(stale)");
		if (nscopes)
			misuse_rc(keel_defer(S[0].s, NULL, NULL), -EINVAL,
				  "keel_defer(NULL fn)");
		break;
	case 5:
		misuse_rc(keel_join(KEEL_TASK_NONE, NULL, 0), -ESRCH,
			  "keel_join(KEEL_TASK_NONE)");
		misuse_rc(keel_join((keel_task_t)-1, NULL, 0), -ESRCH,
			  "keel_join(garbage)");
		misuse_rc(keel_join(keel_self(), NULL, 0), -ESRCH,
			  "keel_join(self)");
		break;
	case 6:
		misuse_rc(keel_shield_begin(KEEL_FOREVER), -EINVAL,
			  "keel_shield_begin(KEEL_FOREVER)");
		if (chain_now() && chain_now()->kind != FRAME_SHIELD)
			misuse_rc(keel_shield_end(), -EPERM,
				  "keel_shield_end() without a shield");
		break;
	case 7:
		if (nscopes >= 2)
			misuse_rc(keel_scope_close(S[0].s), -EBUSY,
				  "keel_scope_close() of an outer scope");
		break;
	case 8:
		/* Past deadlines do not block; odd ones are not errors. */
		rc = keel_sleep_until(INT64_MIN);
		FZ_CHECK(rc == 0 || (rc == -ECANCELED && nscopes &&
				     maybe_cancelled(nscopes - 1)),
			 "scope.misuse", "keel_sleep_until(INT64_MIN) returned %d",
			 rc);
		FZ_CHECK(keel_after(KEEL_FOREVER) == KEEL_FOREVER, "scope.misuse",
			 "keel_after(KEEL_FOREVER) is not KEEL_FOREVER");
		FZ_CHECK(keel_after(INT64_MIN) < keel_now(), "scope.misuse",
			 "keel_after(INT64_MIN) is not in the past");
		misuse_rc(keel_fd_wait(-1, 0, 0), -EINVAL, "keel_fd_wait(-1)");
		break;
	default:
		misuse_rc(keel_task_name(keel_self(), NULL, 0), -EINVAL,
			  "keel_task_name(NULL buf)");
		misuse_rc(keel_task_name(KEEL_TASK_NONE, buf, sizeof buf),
			  -ESRCH, "keel_task_name(KEEL_TASK_NONE)");
		misuse_rc(keel_set_name(NULL), -EINVAL, "keel_set_name(NULL)");
		misuse_rc(keel_dump(NULL), -EINVAL, "keel_dump(NULL)");
		break;
	}
}

/* ---- An input -------------------------------------------------------------------- */

static int run_input(const uint8_t *data, size_t size)
{
	struct fz f = {data, size, 0};
	struct keel__frame *base;
	int ops = 0;

	FZ_ASSERT(keel_self() != KEEL_TASK_NONE);
	base = chain_now();
	memset(logpos, -1, sizeof logpos);
	memset(nlogged, 0, sizeof nlogged);
	nlog = 0;
	next_id = 0;
	nscopes = 0;
	atomic_store(&running, 0);
	fz_watch_arm(60, "an input of fuzz_scope");
	while (fz_more(&f) && ops++ < 60 && next_id < MAX_IDS - 4) {
		unsigned op = fz_pick(&f, 16);

		if (!nscopes && op != 12 && op != 13)
			op = 0;
		switch (op) {
		case 0: op_open(&f); break;
		case 1: case 2: case 3: op_spawn(&f); break;
		case 4: case 5: op_defer(&f); break;
		case 6: op_resource(&f); break;
		case 7: op_join_child(&f); break;
		case 8: op_scope_join(&f); break;
		case 9:
			if (fz_pick(&f, 2))
				op_task_cancel(&f);
			else
				op_cancel(&f);
			break;
		case 10: case 11: op_close(); break;
		case 12:
			if (!fz_off("run"))
				op_run(&f);
			break;
		case 13:
			if (!fz_off("misuse"))
				op_misuse(&f);
			break;
		default:
			if (!fz_off("fork"))
				op_fork(&f);
			break;
		}
	}
	while (nscopes)
		op_close();
	check_chain(base, "the input");
	FZ_CHECK(atomic_load(&running) == 0, "scope.outlived",
		 "%d children still run after every scope closed",
		 atomic_load(&running));
	fz_watch_disarm();
	return 0;
}

FUZZ_HARNESS(fuzz_scope, run_input)
