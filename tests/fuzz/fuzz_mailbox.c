/*
 * fuzz_mailbox.c: messages, calls and replies between tasks that close
 * their mailboxes and end every way, while new tasks take their slots.
 *
 * THE SCHEDULE
 * Up to NW workers, each a keel task spawned into the input's scope or a
 * plain pthread that keel adopts; each serves its mailbox in a loop. The
 * driver (the fuzzing thread) runs one operation at a time. It commands
 * a worker with keel_call() (so each command is also a call the model
 * checks): post k messages to a worker, call it, keel_call_then() it,
 * keel_call_ctx() it, keel_call_then_ctx() it (the ctx finished at once
 * or left for the driver), close the mailbox, or end: return from the
 * body, pthread_exit() from the body or from inside the command, or return
 * holding a keel lock, an open scope and a shield. A closed worker gets
 * its end through a plain condition variable instead. The driver also
 * posts from its own thread, finishes pending ctxs (twice, sometimes),
 * joins ended workers (keel_join, pthread_join), starts new ones into the
 * freed slots, and checks the live ones. A worker may bound its mailbox
 * (keel_mailbox_limit, 0 to 4) and post with keel_post_until (deadline
 * 0, 100 us or forever). Every other post is a keel_msg_t of the
 * message's token (keel_post_msg, keel_post_msg_until), finished by its
 * refusal or its outcome. Families for FUZZ_NO: ctx, exit, bound.
 *
 * THE MODEL
 * Each worker is OPEN, CLOSED (its mailbox), ENDING (told to end; not
 * yet joined) or GONE (joined). A send to OPEN is accepted; to CLOSED
 * refused with -ESHUTDOWN; to GONE refused with -ESRCH; to ENDING either.
 * A bounded worker's queue depth is not modelled (it serves meanwhile):
 * a non-blocking send to it may also get -EAGAIN, a blocking one
 * -ETIMEDOUT (finite deadline) or -EDEADLK (to itself); an unbounded one
 * never gives those.
 * Every message carries a token that counts its outcomes and where they
 * ran. Checks:
 *   mailbox.one-outcome   an accepted message gets exactly one of work or
 *                         cancel, a refused one neither; a then-call
 *                         exactly one of done or cancel, done only after
 *                         its work ran once
 *   mailbox.wrong-thread  work and cancel run on the target's thread,
 *                         done and cancel of a then-call on the caller's
 *   mailbox.live-esrch    a live worker's handle never gives -ESRCH, and
 *                         a call to it runs on it (keel_self() is it)
 *   mailbox.rc            sends, calls and ctx finishes return what the
 *                         worker's state calls for
 *   watchdog.hang         every command, end and join finishes
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz.h"
#include "internal.h"

#define NW 4
#define MAX_TOK 1024
#define MAX_CTX 64

enum wstate { W_NONE, W_OPEN, W_CLOSED, W_ENDING, W_GONE };
static const char *wnames[] = {"none", "open", "closed", "ending", "gone"};
enum route { R_RETURN, R_PEXIT_BODY, R_PEXIT_MSG, R_HOLDING, R_ROUTES };
static const char *rnames[] = {"return", "pthread_exit from the body",
			       "pthread_exit inside a message",
			       "return holding a lock, a scope and a shield"};

struct worker {
	int idx, state, is_task, route;
	int limit; /* its mailbox's bound, 0 if none */
	int gen; /* incarnations of this slot */
	keel_task_t task;
	pthread_t th;      /* the thread it runs on (set by itself) */
	pthread_t created; /* an adopted worker's pthread, to join */
	/* Under mu: the worker is up; its end, for a closed worker. */
	int up, leave, leave_plain;
};

struct token {
	/* Every other post is a keel_msg_t of the token's (keel_post_msg,
	 * keel_post_msg_until): registered before its send, finished by
	 * its refusal or by its outcome, which scribbles over it. */
	keel_msg_t msg;
	int own;
	int kind, target, caller, accepted, target_gen, later;
	pthread_t target_th, caller_th;
	atomic_int work, cancel, done;
};

struct pending_ctx {
	keel_ctx_t *ctx;
	int target, target_gen, finished;
	atomic_int ready; /* written by the target's thread */
};

static struct worker W[NW];
static struct token toks[MAX_TOK];
static int ntok;
static struct pending_ctx ctxs[MAX_CTX];
static atomic_int nctx;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
/* Locks that tasks end holding (the "end while holding" route): each is
 * used again only once the task that ended holding it is gone for good
 * (its handle stale: reaped), so that no init ever writes over a lock an
 * ending task is still reporting. */
#define NHOLD 256
static keel_mutex_t hold_lock[NHOLD];
static keel_task_t hold_owner[NHOLD];
static unsigned hold_next;
static pthread_mutex_t hold_mu = PTHREAD_MUTEX_INITIALIZER;
static keel_scope_t *input_scope;

/* ---- Tokens ------------------------------------------------------------- */

static struct token *new_token(int kind, int target, int caller)
{
	struct token *t;

	FZ_ASSERT(ntok < MAX_TOK);
	t = &toks[ntok++];
	t->kind = kind;
	t->target = target;
	t->caller = caller;
	t->accepted = 0;
	t->target_th = W[target].th;
	t->target_gen = W[target].gen;
	t->caller_th = caller >= 0 ? W[caller].th : pthread_self();
	atomic_init(&t->work, 0);
	atomic_init(&t->cancel, 0);
	atomic_init(&t->done, 0);
	t->own = 0;
	return t;
}

static void tok_work(void *p);
static void tok_cancel(void *p);
static keel_time_t until_deadline(int count);

/* Post t to worker `target`, as keel_post() or, every other token, as a
 * keel_msg_t (_until with until >= 0). */
static int post_token(struct token *t, keel_task_t target, int until)
{
	int rc;

	t->own = (int)(t - toks) % 2;
	if (t->own)
		FZ_CHECK(keel_msg_init(&t->msg) == 0, "mailbox.rc",
			 "keel_msg_init failed");
	if (until >= 0)
		rc = t->own ? keel_post_msg_until(target, &t->msg, tok_work,
						  tok_cancel, t,
						  until_deadline(until))
			    : keel_post_until(target, tok_work, tok_cancel, t,
					      until_deadline(until));
	else
		rc = t->own ? keel_post_msg(target, &t->msg, tok_work,
					    tok_cancel, t)
			    : keel_post(target, tok_work, tok_cancel, t);
	if (rc != 0 && t->own)
		FZ_CHECK(keel_msg_fini(&t->msg) == 0, "mailbox.rc",
			 "keel_msg_fini of a refused keel_msg_t failed");
	return rc;
}

/* A keel_msg_t's outcome began: it is the sender's again. */
static void own_again(struct token *t)
{
	if (!t->own)
		return;
	FZ_CHECK(keel_msg_fini(&t->msg) == 0, "mailbox.rc",
		 "keel_msg_fini in a keel_msg_t's outcome failed");
	memset(&t->msg, 0x5a, sizeof t->msg);
}

static void on_target(struct token *t, const char *what)
{
	FZ_CHECK(pthread_equal(pthread_self(), t->target_th),
		 "mailbox.wrong-thread",
		 "token %d: %s for worker %d ran on another thread",
		 (int)(t - toks), what, t->target);
}

static void on_caller(struct token *t, const char *what)
{
	FZ_CHECK(pthread_equal(pthread_self(), t->caller_th),
		 "mailbox.wrong-thread",
		 "token %d: %s of worker %d's then-call ran on another thread",
		 (int)(t - toks), what, t->caller);
}

static void tok_work(void *p)
{
	struct token *t = p;

	on_target(t, "work");
	own_again(t);
	atomic_fetch_add(&t->work, 1);
}

static void tok_cancel(void *p)
{
	struct token *t = p;

	on_target(t, "cancel");
	own_again(t);
	atomic_fetch_add(&t->cancel, 1);
}

static void then_done(void *p)
{
	struct token *t = p;

	on_caller(t, "done");
	atomic_fetch_add(&t->done, 1);
}

static void then_cancel(void *p)
{
	struct token *t = p;

	on_caller(t, "cancel");
	atomic_fetch_add(&t->cancel, 1);
}

static void ctx_work_now(keel_ctx_t *ctx, void *p)
{
	tok_work(p);
	FZ_CHECK(keel_ctx_finish(ctx) == 0, "mailbox.rc",
		 "keel_ctx_finish() inside the work failed");
}

static void ctx_work_later(keel_ctx_t *ctx, void *p)
{
	struct token *t = p;
	int i = atomic_fetch_add(&nctx, 1);

	FZ_ASSERT(i < MAX_CTX);
	ctxs[i].ctx = ctx;
	ctxs[i].target = t->target;
	ctxs[i].target_gen = t->target_gen;
	ctxs[i].finished = 0;
	atomic_store(&ctxs[i].ready, 1);
	/* Counted last: settle_ctxs() takes a run work as a ready ctx. */
	tok_work(p);
}

/* The return codes a send to worker y may get, by its state. */
static int send_ok(int y, int rc)
{
	if (rc == -EAGAIN && W[y].limit &&
	    (W[y].state == W_OPEN || W[y].state == W_ENDING))
		return 1;
	switch (W[y].state) {
	case W_OPEN: return rc == 0;
	case W_CLOSED: return rc == -ESHUTDOWN;
	case W_ENDING: return rc == 0 || rc == -ESHUTDOWN || rc == -ESRCH;
	default: return rc == -ESRCH || rc == -ESHUTDOWN;
	}
}

/* ---- Commands run on a worker --------------------------------------------- */

enum { C_POST, C_CALL, C_THEN, C_CALL_CTX, C_THEN_CTX, C_CLOSE, C_EXIT,
       C_WHOAMI, C_LIMIT, C_POST_UNTIL, C_KINDS };
static const char *cnames[] = {"post",  "call",   "call_then",
			       "call_ctx", "call_then_ctx", "close",
			       "exit",  "whoami", "mailbox_limit",
			       "post_until"};

/* The deadlines of a C_POST_UNTIL, by its count. */
static keel_time_t until_deadline(int count)
{
	return count == 0 ? 0 : count == 1 ? keel_after(KEEL_USEC(100))
					   : KEEL_FOREVER;
}

/* What a keel_post_until() from worker x to worker y may return. */
static int until_ok(int x, int y, int count, int rc)
{
	/* An ending worker's bounded mailbox is open, and may be full, until
	 * its close: a short wait may time out there as at an open one. */
	if (rc == -ETIMEDOUT && W[y].limit && W[y].state == W_ENDING)
		return count < 2;
	if (!W[y].limit || W[y].state != W_OPEN)
		return rc != -EAGAIN && send_ok(y, rc);
	if (rc == -ETIMEDOUT)
		return count < 2;
	if (rc == -EDEADLK)
		return x == y && count > 0;
	return rc == 0;
}

struct cmd {
	int kind, self, target, count, route;
	keel_task_t seen_self;
};

static void command(void *p)
{
	struct cmd *c = p;
	struct worker *w = &W[c->self];
	struct token *t;
	int rc = 0;

	switch (c->kind) {
	case C_POST:
		for (int i = 0; i < c->count; i++) {
			t = new_token(C_POST, c->target, c->self);
			rc = post_token(t, W[c->target].task, -1);
			t->accepted = rc == 0;
			FZ_CHECK(send_ok(c->target, rc), "mailbox.rc",
				 "worker %d: post to %s worker %d: %d (%s)",
				 c->self, wnames[W[c->target].state], c->target,
				 rc, keel_strerror(rc));
		}
		break;
	case C_CALL:
	case C_CALL_CTX:
		t = new_token(c->kind, c->target, c->self);
		rc = c->kind == C_CALL
			     ? keel_call(W[c->target].task, tok_work, t,
					 KEEL_FOREVER)
			     : keel_call_ctx(W[c->target].task, ctx_work_now, t,
					     KEEL_FOREVER);
		t->accepted = rc == 0;
		FZ_CHECK(c->target == c->self ? rc == -EDEADLK
					      : send_ok(c->target, rc),
			 "mailbox.rc", "worker %d: %s to %s worker %d: %d (%s)",
			 c->self, cnames[c->kind], wnames[W[c->target].state],
			 c->target, rc, keel_strerror(rc));
		FZ_CHECK(atomic_load(&t->work) == (rc == 0), "mailbox.one-outcome",
			 "worker %d: %s returned %d, and its work ran %d times",
			 c->self, cnames[c->kind], rc, atomic_load(&t->work));
		break;
	case C_THEN:
	case C_THEN_CTX:
		t = new_token(c->kind, c->target, c->self);
		rc = c->kind == C_THEN
			     ? keel_call_then(W[c->target].task, tok_work,
					      then_done, then_cancel, t)
			     : keel_call_then_ctx(W[c->target].task,
						  c->count ? ctx_work_later
							   : ctx_work_now,
						  then_done, then_cancel, t);
		t->accepted = rc == 0;
		t->later = c->kind == C_THEN_CTX && c->count;
		FZ_CHECK(send_ok(c->target, rc), "mailbox.rc",
			 "worker %d: %s to %s worker %d: %d (%s)", c->self,
			 cnames[c->kind], wnames[W[c->target].state], c->target,
			 rc, keel_strerror(rc));
		break;
	case C_POST_UNTIL:
		/* To itself, one more than its bound: it is not serving now,
		 * so the last finds no room (-ETIMEDOUT or -EDEADLK). */
		for (int i = 0; i < (c->target == c->self ? w->limit + 1 : 1);
		     i++) {
			t = new_token(C_POST, c->target, c->self);
			rc = post_token(t, W[c->target].task, c->count);
			t->accepted = rc == 0;
			FZ_CHECK(until_ok(c->self, c->target, c->count, rc),
				 "mailbox.rc",
				 "worker %d: post_until (%d) to %s worker %d "
				 "(limit %d): %d (%s)", c->self, c->count,
				 wnames[W[c->target].state], c->target,
				 W[c->target].limit, rc, keel_strerror(rc));
		}
		break;
	case C_LIMIT:
		rc = keel_mailbox_limit((size_t)c->count);
		FZ_CHECK(rc == 0, "mailbox.rc", "worker %d: limit %d: %d",
			 c->self, c->count, rc);
		break;
	case C_CLOSE:
		rc = keel_mailbox_close();
		FZ_CHECK(rc == 0, "mailbox.rc", "worker %d: close: %d", c->self,
			 rc);
		break;
	case C_EXIT:
		if (c->route == R_PEXIT_MSG)
			pthread_exit(NULL);
		pthread_mutex_lock(&mu);
		w->route = c->route;
		w->leave = 1;
		pthread_mutex_unlock(&mu);
		break;
	case C_WHOAMI:
		c->seen_self = keel_self();
		FZ_CHECK(pthread_equal(pthread_self(), w->th),
			 "mailbox.live-esrch",
			 "a call to worker %d ran on another thread", c->self);
		break;
	}
}

/* ---- Workers ----------------------------------------------------------------- */

static void leave(struct worker *w)
{
	keel_scope_t *s;

	switch (w->route) {
	case R_PEXIT_BODY:
		pthread_exit(NULL);
	case R_HOLDING: {
		char name[8];
		unsigned k;

		pthread_mutex_lock(&hold_mu);
		k = hold_next++ % NHOLD;
		if (hold_owner[k] != KEEL_TASK_NONE &&
		    keel_task_name(hold_owner[k], name, sizeof name) != -ESRCH)
			k = NHOLD; /* its last user is still ending */
		else
			hold_owner[k] = keel_self();
		pthread_mutex_unlock(&hold_mu);
		if (k < NHOLD) {
			keel_mutex_init(&hold_lock[k], 1, "held at the end", 0);
			keel_mutex_lock(&hold_lock[k]);
		}
		keel_scope_open(&s, NULL);
		keel_shield_begin(keel_after(KEEL_SEC(1)));
		break;
	}
	}
}

static void worker_loop(struct worker *w)
{
	int rc, go = 0;

	pthread_mutex_lock(&mu);
	w->task = keel_self();
	w->th = pthread_self();
	w->up = 1;
	pthread_cond_broadcast(&cv);
	pthread_mutex_unlock(&mu);
	while (!go) {
		rc = keel_serve(KEEL_FOREVER);
		pthread_mutex_lock(&mu);
		go = w->leave;
		pthread_mutex_unlock(&mu);
		if (rc < 0 && !go) {
			FZ_CHECK(rc == -ESHUTDOWN, "mailbox.rc",
				 "worker %d: keel_serve: %d (%s)", w->idx, rc,
				 keel_strerror(rc));
			/* Closed: the end comes the plain way. */
			pthread_mutex_lock(&mu);
			while (!w->leave_plain)
				pthread_cond_wait(&cv, &mu);
			pthread_mutex_unlock(&mu);
			go = 1;
		}
	}
	leave(w);
}

static int worker_task(void *p)
{
	worker_loop(p);
	return 0;
}

static void *worker_thread(void *p)
{
	worker_loop(p);
	return NULL;
}

/* ---- Driver operations ---------------------------------------------------------- */

static int run_cmd(int x, struct cmd *c)
{
	c->self = x;
	return keel_call(W[x].task, command, c, KEEL_FOREVER);
}

/* Until every ctx left for the driver has reached it (its work ran) or
 * will not (its call was cancelled): the targets and callers are idle in
 * keel_serve(), so this comes at once. A caller owed a reply waits for
 * the finish in its close, so its ctxs must all be finished before. */
static void settle_ctxs(void)
{
	for (int i = 0; i < ntok; i++) {
		struct token *t = &toks[i];

		if (t->accepted && t->later)
			while (!atomic_load(&t->work) && !atomic_load(&t->cancel))
				sched_yield();
	}
}

static void finish_ctxs(int all, struct fz *f)
{
	int n;

	if (all)
		settle_ctxs();
	n = atomic_load(&nctx);

	for (int i = 0; i < n; i++) {
		struct pending_ctx *p = &ctxs[i];
		int st, rc;

		/* Its fields are the work's until it is ready. */
		if (!atomic_load(&p->ready) || (!all && fz_pick(f, 2)))
			continue;
		st = W[p->target].state;
		if (W[p->target].gen != p->target_gen)
			st = W_GONE; /* its target ended; the slot is reused */
		rc = keel_ctx_finish(p->ctx);
		fz_note("finish ctx %d (target %d, %s%s): %d", i, p->target,
			wnames[st], p->finished ? ", finished" : "", rc);
		if (p->finished || st == W_GONE)
			FZ_CHECK(rc == -ESTALE, "mailbox.rc",
				 "keel_ctx_finish() of a ctx %s: %d, not -ESTALE",
				 p->finished ? "finished already"
					     : "whose target ended",
				 rc);
		else if (st == W_OPEN || st == W_CLOSED)
			FZ_CHECK(rc == 0, "mailbox.rc",
				 "keel_ctx_finish() of a ctx in flight on a live "
				 "target: %d", rc);
		else
			FZ_CHECK(rc == 0 || rc == -ESTALE, "mailbox.rc",
				 "keel_ctx_finish(): %d", rc);
		p->finished = 1;
	}
}

static void op_spawn(struct worker *w, int as_task)
{
	pthread_mutex_lock(&mu);
	w->up = w->leave = w->leave_plain = 0;
	pthread_mutex_unlock(&mu);
	w->is_task = as_task;
	w->limit = 0;
	w->gen++;
	if (as_task) {
		keel_task_t t; /* taken, so that it stays joinable */

		FZ_ASSERT(keel_spawn(input_scope, worker_task, w, NULL, &t) ==
			  0);
	} else
		FZ_ASSERT(pthread_create(&w->created, NULL, worker_thread, w) == 0);
	pthread_mutex_lock(&mu);
	while (!w->up)
		pthread_cond_wait(&cv, &mu);
	pthread_mutex_unlock(&mu);
	w->state = W_OPEN;
	fz_note("worker %d: up as %s %#llx", w->idx,
		as_task ? "a task" : "an adopted thread",
		(unsigned long long)w->task);
}

static void op_end(struct worker *w, int route)
{
	struct cmd c = {.kind = C_EXIT, .route = route};
	int rc;

	/* A caller owed a ctx reply waits in its close for the finish. */
	finish_ctxs(1, NULL);
	fz_note("worker %d (%s): end by %s", w->idx, wnames[w->state],
		rnames[route]);
	if (w->state == W_OPEN) {
		rc = run_cmd(w->idx, &c);
		FZ_CHECK(rc == (route == R_PEXIT_MSG ? -ESHUTDOWN : 0),
			 "mailbox.rc",
			 "the call ending worker %d by %s returned %d (%s)",
			 w->idx, rnames[route], rc, keel_strerror(rc));
	} else {
		if (route == R_PEXIT_MSG)
			route = R_PEXIT_BODY;
		pthread_mutex_lock(&mu);
		w->route = route;
		w->leave_plain = 1;
		pthread_cond_broadcast(&cv);
		pthread_mutex_unlock(&mu);
	}
	w->state = W_ENDING;
}

static void op_join(struct worker *w)
{
	int st;

	if (w->is_task)
		FZ_CHECK(keel_join(w->task, &st, KEEL_FOREVER) == 0,
			 "mailbox.rc", "keel_join() of worker %d failed", w->idx);
	else
		FZ_ASSERT(pthread_join(w->created, NULL) == 0);
	w->state = W_GONE;
	fz_note("worker %d joined", w->idx);
}

static void op_check(void)
{
	char name[64];

	for (int i = 0; i < NW; i++) {
		struct worker *w = &W[i];
		struct cmd c = {.kind = C_WHOAMI};
		int rc;

		if (w->state != W_OPEN && w->state != W_CLOSED)
			continue;
		rc = keel_task_name(w->task, name, sizeof name);
		FZ_CHECK(rc >= 0, "mailbox.live-esrch",
			 "keel_task_name() of live worker %d (%#llx): %d (%s)",
			 i, (unsigned long long)w->task, rc, keel_strerror(rc));
		if (w->state != W_OPEN)
			continue;
		rc = run_cmd(i, &c);
		FZ_CHECK(rc == 0, "mailbox.live-esrch",
			 "a call to live worker %d (%#llx): %d (%s)", i,
			 (unsigned long long)w->task, rc, keel_strerror(rc));
		FZ_CHECK(c.seen_self == w->task, "mailbox.live-esrch",
			 "a call to worker %d (%#llx) ran as task %#llx", i,
			 (unsigned long long)w->task,
			 (unsigned long long)c.seen_self);
	}
}

static void check_tokens(void)
{
	for (int i = 0; i < ntok; i++) {
		struct token *t = &toks[i];
		int work = atomic_load(&t->work), cancel = atomic_load(&t->cancel),
		    done = atomic_load(&t->done);

		if (t->kind == C_THEN || t->kind == C_THEN_CTX) {
			FZ_CHECK(t->accepted ? done + cancel == 1
					     : done + cancel + work == 0,
				 "mailbox.one-outcome",
				 "%s %d (worker %d to %d, %s): work %d, done %d, "
				 "cancel %d", cnames[t->kind], i, t->caller,
				 t->target, t->accepted ? "accepted" : "refused",
				 work, done, cancel);
			FZ_CHECK(work <= 1 && (!done || work == 1),
				 "mailbox.one-outcome",
				 "%s %d: work ran %d times, done %d",
				 cnames[t->kind], i, work, done);
		} else if (t->kind == C_POST) {
			FZ_CHECK(work + cancel == (t->accepted ? 1 : 0),
				 "mailbox.one-outcome",
				 "post %d (worker %d to %d, %s): work %d, cancel "
				 "%d", i, t->caller, t->target,
				 t->accepted ? "accepted" : "refused", work,
				 cancel);
		}
	}
}

static int run_input(const uint8_t *data, size_t size)
{
	struct fz f = {data, size, 0};
	int ops = 0;

	FZ_ASSERT(keel_self() != KEEL_TASK_NONE);
	memset(W, 0, sizeof W);
	for (int i = 0; i < NW; i++)
		W[i].idx = i;
	ntok = 0;
	atomic_store(&nctx, 0);
	for (int i = 0; i < MAX_CTX; i++)
		atomic_store(&ctxs[i].ready, 0);
	fz_watch_arm(60, "an input of fuzz_mailbox");
	FZ_ASSERT(keel_scope_open(&input_scope, NULL) == 0);
	while (fz_more(&f) && ops++ < 80 && ntok < MAX_TOK - 64 &&
	       atomic_load(&nctx) < MAX_CTX - 4) {
		struct worker *w = &W[fz_pick(&f, NW)];
		int y = (int)fz_pick(&f, NW), op = (int)fz_pick(&f, 12);
		struct cmd c = {.target = y};
		int rc;

		if (w->state == W_NONE || w->state == W_GONE) {
			if (w->state == W_NONE || op < 8)
				op_spawn(w, fz_pick(&f, 3) != 0);
			else
				op_check();
			continue;
		}
		if (W[y].state == W_NONE)
			c.target = y = w->idx;
		if (op < 6 && w->state == W_OPEN) {
			c.kind = op;
			if ((c.kind == C_CALL_CTX || c.kind == C_THEN_CTX) &&
			    fz_off("ctx"))
				c.kind = C_CALL;
			c.count = c.kind == C_POST ? 1 + (int)fz_pick(&f, 4)
						   : (int)fz_pick(&f, 2);
			fz_note("worker %d (%s): %s to worker %d (%s)", w->idx,
				wnames[w->state], cnames[c.kind], y,
				wnames[W[y].state]);
			if (c.kind == C_CLOSE)
				finish_ctxs(1, NULL);
			rc = run_cmd(w->idx, &c);
			FZ_CHECK(rc == 0, rc == -ESRCH ? "mailbox.live-esrch"
						       : "mailbox.rc",
				 "the command call to open worker %d (%#llx): "
				 "%d (%s)", w->idx, (unsigned long long)w->task,
				 rc, keel_strerror(rc));
			if (c.kind == C_CLOSE)
				w->state = W_CLOSED;
		} else if (op == 6) {
			struct token *t = new_token(C_POST, y, -1);
			rc = post_token(t, W[y].task, -1);

			fz_note("driver: post to worker %d (%s): %d", y,
				wnames[W[y].state], rc);
			t->accepted = rc == 0;
			FZ_CHECK(send_ok(y, rc), "mailbox.rc",
				 "driver: post to %s worker %d: %d (%s)",
				 wnames[W[y].state], y, rc, keel_strerror(rc));
		} else if (op == 7 && !fz_off("exit") &&
			   (w->state == W_OPEN || w->state == W_CLOSED)) {
			op_end(w, (int)fz_pick(&f, R_ROUTES));
		} else if (op == 8 && w->state == W_ENDING) {
			finish_ctxs(1, NULL);
			op_join(w);
		} else if (op == 9) {
			finish_ctxs(0, &f);
		} else if (op >= 10 && w->state == W_OPEN && !fz_off("bound")) {
			c.kind = op == 10 ? C_LIMIT : C_POST_UNTIL;
			c.count = (int)fz_pick(&f, op == 10 ? 5 : 3);
			fz_note("worker %d: %s %d to worker %d (%s, limit %d)",
				w->idx, cnames[c.kind], c.count, y,
				wnames[W[y].state], W[y].limit);
			rc = run_cmd(w->idx, &c);
			FZ_CHECK(rc == 0, "mailbox.rc",
				 "the command call to open worker %d: %d (%s)",
				 w->idx, rc, keel_strerror(rc));
			if (c.kind == C_LIMIT)
				w->limit = c.count;
		} else {
			op_check();
		}
	}
	/* Wind down: end every worker, join them all, then count. */
	finish_ctxs(1, NULL);
	for (int i = 0; i < NW; i++)
		if (W[i].state == W_OPEN || W[i].state == W_CLOSED)
			op_end(&W[i], R_RETURN);
	finish_ctxs(1, NULL);
	for (int i = 0; i < NW; i++)
		if (W[i].state == W_ENDING)
			op_join(&W[i]);
	keel_scope_close(input_scope);
	check_tokens();
	/* Every keel_msg_t was finished by its refusal or its outcome. */
	FZ_CHECK(atomic_load(&keel__foreign_live) == 0, "mailbox.one-outcome",
		 "%llu keel_msg_t's still registered after every outcome",
		 (unsigned long long)atomic_load(&keel__foreign_live));
	fz_watch_disarm();
	return 0;
}

FUZZ_HARNESS(fuzz_mailbox, run_input)
