/*
 * fuzz_once.c: keel_once() with owners that die, fail, hang, are cancelled
 * or call the once again, and new threads that come after them.
 *
 * THE SCHEDULE
 * Each input drives two onces (fresh, zeroed) and up to MAX_CALLERS
 * callers. A caller is a plain pthread (adopted by keel on its first call)
 * or a keel task spawned into the input's scope; it calls keel_once() on
 * one of the onces with a behaviour its init follows if it becomes the
 * owner: publish, fail (-EIO), return 0 without publishing, pthread_exit()
 * (die), sleep until cancelled (the driver cancels a scope the caller
 * opened for this), hang until released (the onces' deadline is short, so
 * waiters take over from it), or call keel_once() on the same once again
 * and then publish. The driver starts callers one at a time and waits
 * until each has returned, died or entered init; other operations join
 * the finished ones (pthread_join, keel_join), release the hung owners,
 * and cancel the cancellable ones. Joining a dead owner and then starting
 * a new thread is what makes a new thread reuse a dead one's stack and TLS.
 *
 * THE MODEL (what is checked, with the name each check reports as)
 *   once.edeadlk-not-owner  -EDEADLK only from an init calling its own once
 *   once.recursion          ... and such a call always gets -EDEADLK
 *   once.two-publications   at most one keel_claim_publish() succeeds
 *   once.value              a caller that gets 0 gets the published value
 *   once.error-leak         init's error (-EIO, -EPROTO) goes to the caller
 *                           that ran it, and no other; a caller gets
 *                           -ECANCELED only if it was cancelled
 *   once.prev-owner-died    the claim after an owner that died sees it
 *   watchdog.hang           every caller returns or settles in time
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz.h"

#define MAX_CALLERS 12
#define NONCES 2

enum behaviour { B_PUBLISH, B_FAIL, B_NOPUB, B_DIE, B_CANCEL, B_HANG,
		 B_RECURSE, B_COUNT };
static const char *bnames[] = {"publish", "fail", "no-publish", "die",
			       "cancel", "hang", "recurse"};

enum state { S_IDLE, S_STARTED, S_IN_INIT, S_RETURNED, S_DIED };

struct once_model {
	keel_once_t *o;
	int claims;     /* inits entered */
	int pubs;       /* publishes that succeeded */
	void *value;    /* the one published */
	int last_died;  /* the latest claim ended by its owner's death */
};

struct caller {
	int id, once, behav, is_task, joined;
	pthread_t th;
	keel_task_t task;
	keel_scope_t *scope; /* B_CANCEL: the scope the driver cancels */
	int state, rc, ran_init, inner_rc, cancelled;
	void *value;
};

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static struct once_model onces[NONCES];
static struct caller callers[MAX_CALLERS];
static int released; /* hung owners may go on */
static keel_once_opts opts;

static void set_state(struct caller *c, int st)
{
	pthread_mutex_lock(&mu);
	c->state = st;
	pthread_cond_broadcast(&cv);
	pthread_mutex_unlock(&mu);
}

static int try_publish(struct caller *c, keel_claim_t *claim)
{
	struct once_model *m = &onces[c->once];
	int rc = keel_claim_publish(claim, c);

	if (rc == 0) {
		pthread_mutex_lock(&mu);
		m->pubs++;
		m->value = c;
		pthread_mutex_unlock(&mu);
		FZ_CHECK(m->pubs == 1, "once.two-publications",
			 "once %d: caller %d published a second value", c->once,
			 c->id);
	}
	fz_note("caller %d: publish -> %d", c->id, rc);
	return rc;
}

static int init_fn(keel_claim_t *claim, void *arg)
{
	struct caller *c = arg;
	struct once_model *m = &onces[c->once];
	int died;
	void *v;

	pthread_mutex_lock(&mu);
	m->claims++;
	died = m->last_died;
	m->last_died = 0;
	c->ran_init = 1;
	c->state = S_IN_INIT;
	pthread_cond_broadcast(&cv);
	pthread_mutex_unlock(&mu);
	fz_note("caller %d: init (%s), claim %llu, prev died %d", c->id,
		bnames[c->behav], (unsigned long long)keel_claim_generation(claim),
		keel_claim_prev_owner_died(claim));
	FZ_CHECK(!died || keel_claim_prev_owner_died(claim),
		 "once.prev-owner-died",
		 "caller %d took over from an owner that died, and "
		 "keel_claim_prev_owner_died() says it did not", c->id);
	switch (c->behav) {
	case B_PUBLISH:
		return try_publish(c, claim);
	case B_FAIL:
		return -EIO;
	case B_NOPUB:
		return 0;
	case B_DIE:
		pthread_mutex_lock(&mu);
		m->last_died = 1;
		c->state = S_DIED;
		pthread_cond_broadcast(&cv);
		pthread_mutex_unlock(&mu);
		pthread_exit(NULL);
	case B_CANCEL:
		return keel_sleep_until(KEEL_FOREVER);
	case B_HANG:
		pthread_mutex_lock(&mu);
		while (!released)
			pthread_cond_wait(&cv, &mu);
		pthread_mutex_unlock(&mu);
		return try_publish(c, claim);
	case B_RECURSE:
		c->inner_rc = keel_once(m->o, init_fn, c, &opts, &v);
		FZ_CHECK(c->inner_rc == -EDEADLK, "once.recursion",
			 "init of caller %d calling its own once got %d (%s), "
			 "not -EDEADLK", c->id, c->inner_rc,
			 keel_strerror(c->inner_rc));
		return try_publish(c, claim);
	}
	return -EINVAL;
}

static void call(struct caller *c)
{
	void *v = NULL;
	int rc;

	if (c->behav == B_CANCEL) {
		keel_scope_t *s = NULL;

		FZ_ASSERT(keel_scope_open(&s, NULL) == 0);
		pthread_mutex_lock(&mu);
		c->scope = s;
		pthread_mutex_unlock(&mu);
	}
	rc = keel_once(onces[c->once].o, init_fn, c, &opts, &v);
	fz_note("caller %d: keel_once -> %d (%s)", c->id, rc, keel_strerror(rc));
	pthread_mutex_lock(&mu);
	c->rc = rc;
	c->value = v;
	pthread_mutex_unlock(&mu);
	if (c->scope) {
		keel_scope_t *s = c->scope;

		pthread_mutex_lock(&mu);
		c->scope = NULL;
		pthread_mutex_unlock(&mu);
		keel_scope_close(s);
	}
	set_state(c, S_RETURNED);
}

static void *caller_thread(void *p)
{
	call(p);
	return NULL;
}

static int caller_task(void *p)
{
	call(p);
	return 0;
}

/* Wait until a caller has returned, died or entered init. */
static void settle(struct caller *c)
{
	pthread_mutex_lock(&mu);
	while (c->state == S_STARTED)
		pthread_cond_wait(&cv, &mu);
	pthread_mutex_unlock(&mu);
}

static void join(struct caller *c)
{
	int st;

	if (c->joined || c->state == S_IDLE)
		return;
	if (c->is_task)
		FZ_ASSERT(keel_join(c->task, &st, KEEL_FOREVER) == 0);
	else
		FZ_ASSERT(pthread_join(c->th, NULL) == 0);
	c->joined = 1;
	fz_note("caller %d joined", c->id);
}

static int state_of(struct caller *c)
{
	int st;

	pthread_mutex_lock(&mu);
	st = c->state;
	pthread_mutex_unlock(&mu);
	return st;
}

static void release_all(void)
{
	pthread_mutex_lock(&mu);
	released = 1;
	pthread_cond_broadcast(&cv);
	pthread_mutex_unlock(&mu);
}

static void cancel_all(void)
{
	pthread_mutex_lock(&mu);
	for (int i = 0; i < MAX_CALLERS; i++)
		if (callers[i].scope) {
			callers[i].cancelled = 1;
			keel_scope_cancel(callers[i].scope);
		}
	pthread_mutex_unlock(&mu);
}

static void check_caller(struct caller *c)
{
	struct once_model *m = &onces[c->once];

	if (c->state != S_RETURNED)
		return;
	FZ_CHECK(c->rc != -EDEADLK, "once.edeadlk-not-owner",
		 "caller %d (%s thread, not running init) got -EDEADLK",
		 c->id, c->is_task ? "a task's" : "a new");
	if (c->rc == 0)
		FZ_CHECK(m->pubs == 1 && c->value == m->value, "once.value",
			 "caller %d got %p; published: %d value(s), %p", c->id,
			 c->value, m->pubs, m->value);
	if (c->rc == -EIO || c->rc == -EPROTO)
		FZ_CHECK(c->ran_init &&
				 (c->behav == B_FAIL || c->behav == B_NOPUB),
			 "once.error-leak",
			 "caller %d (%s, ran init: %d) got %s", c->id,
			 bnames[c->behav], c->ran_init, keel_strerror(c->rc));
	if (c->rc == -ECANCELED)
		FZ_CHECK(c->behav == B_CANCEL, "once.error-leak",
			 "caller %d was not cancelled and got -ECANCELED", c->id);
	FZ_CHECK(c->rc == 0 || c->rc == -EIO || c->rc == -EPROTO ||
			 c->rc == -ECANCELED || c->rc == -EDEADLK,
		 "once.error-leak", "caller %d got %d (%s)", c->id, c->rc,
		 keel_strerror(c->rc));
}

static int run_input(const uint8_t *data, size_t size)
{
	struct fz f = {data, size, 0};
	keel_scope_t *scope;
	int n = 0;

	memset(callers, 0, sizeof callers);
	released = 0;
	opts = (keel_once_opts){.deadline = KEEL_MS(40 + fz_pick(&f, 4) * 20),
				.max_wait = KEEL_SEC(60)};
	for (int i = 0; i < NONCES; i++) {
		onces[i] = (struct once_model){0};
		onces[i].o = calloc(1, sizeof(keel_once_t));
		FZ_ASSERT(onces[i].o);
	}
	fz_watch_arm(60, "an input of fuzz_once");
	FZ_ASSERT(keel_scope_open(&scope, NULL) == 0);
	while (fz_more(&f) && n < MAX_CALLERS) {
		unsigned op = fz_pick(&f, 8);

		if (op < 5) { /* start a caller */
			struct caller *c = &callers[n];

			c->id = n++;
			c->once = (int)fz_pick(&f, NONCES);
			c->behav = (int)fz_pick(&f, B_COUNT);
			c->is_task = fz_pick(&f, 3) == 0;
			c->state = S_STARTED;
			fz_note("start caller %d: once %d, %s, %s", c->id,
				c->once, bnames[c->behav],
				c->is_task ? "task" : "thread");
			if (c->is_task)
				FZ_ASSERT(keel_spawn(scope, caller_task, c, NULL,
						     &c->task) == 0);
			else
				FZ_ASSERT(pthread_create(&c->th, NULL,
							 caller_thread, c) == 0);
			settle(c);
		} else if (op == 5) { /* join what has finished */
			fz_note("join the finished callers");
			for (int i = 0; i < n; i++)
				if (state_of(&callers[i]) >= S_RETURNED)
					join(&callers[i]);
		} else if (op == 6) {
			fz_note("release the hung owners");
			release_all();
		} else {
			fz_note("cancel the cancellable callers");
			cancel_all();
		}
	}
	/* Wind down: everything must return or have died. */
	release_all();
	cancel_all();
	for (int i = 0; i < n; i++) {
		struct caller *c = &callers[i];

		pthread_mutex_lock(&mu);
		while (c->state < S_RETURNED) {
			pthread_mutex_unlock(&mu);
			cancel_all(); /* it may have opened its scope late */
			pthread_mutex_lock(&mu);
			if (c->state < S_RETURNED)
				pthread_cond_wait(&cv, &mu);
		}
		pthread_mutex_unlock(&mu);
		join(c);
	}
	for (int i = 0; i < n; i++)
		check_caller(&callers[i]);
	keel_scope_close(scope);
	fz_watch_disarm();
	for (int i = 0; i < NONCES; i++)
		free(onces[i].o);
	return 0;
}

FUZZ_HARNESS(fuzz_once, run_input)
