/*
 * stress_once.c: many threads racing on a once, and processes sharing one
 * while their owners are killed and stopped.
 *
 * Threads: KEEL_THREADS (1000) threads race on a fresh once each round,
 * KEEL_ITERS rounds (20; 400 under KEEL_STRESS=long). Rounds are plain,
 * slow (init yields so the others queue up) or failing (the first init
 * fails and another caller must take over). Waiters' polling is switched
 * off, so a lost wake-up hangs the round, which the watchdog reports.
 *
 * Processes: KEEL_PROCS (6) processes share a keel_once_shared_t in
 * MAP_SHARED memory; the parent SIGKILLs or SIGSTOPs (and later
 * SIGCONTs) whichever process is running init, at random, and by plan:
 * each run kills one owner and stops another while they are in init.
 * Eventually exactly one handle is published, every process not killed
 * gets it, and none waits forever. KEEL_ROUNDS rounds (4, at least 2; 40
 * under KEEL_STRESS=long).
 *
 * Watch: an owner blocks in its init while KEEL_WAITERS (40) waiters come,
 * three in four of them cancelled after a few ms, so the watch on the owner
 * passes from hand to hand; then the owner's thread ends and a waiter
 * still there must notice within a poll or two. KEEL_WATCH_ROUNDS rounds
 * (5; 50 under KEEL_STRESS=long).
 * KEEL_SEED fixes the randomness.
 */
#include <errno.h>
#include <semaphore.h>
#include <signal.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"
#include "internal.h"

/* ---- Threads ---- */

enum { PLAIN, SLOW, FAILING };

static struct {
	keel_once_t *o;
	int kind;
	_Atomic int inits, failures, answered, wrong;
	pthread_mutex_t mu;
	pthread_cond_t cv;
	int done;
} round_;
static int token;
static harness_barrier start;
static long nthreads, rounds;

static int race_init(keel_claim_t *c, void *arg)
{
	int n = atomic_fetch_add(&round_.inits, 1);

	(void)arg;
	if (round_.kind == FAILING && n == 0)
		return -EIO;
	if (round_.kind == SLOW)
		for (int i = 0; i < 50; i++)
			sched_yield();
	return keel_claim_publish(c, &token);
}

static void *racer(void *arg)
{
	(void)arg;
	for (long r = 0; r < rounds; r++) {
		void *v = NULL;
		int rc;

		barrier_wait(&start);
		rc = keel_once(round_.o, race_init, NULL, NULL, &v);
		if (rc == -EIO)
			atomic_fetch_add(&round_.failures, 1);
		else if (rc != 0 || v != &token)
			atomic_fetch_add(&round_.wrong, 1);
		pthread_mutex_lock(&round_.mu);
		if (atomic_fetch_add(&round_.answered, 1) + 1 == nthreads)
			round_.done = 1;
		pthread_cond_signal(&round_.cv);
		pthread_mutex_unlock(&round_.mu);
		barrier_wait(&start); /* the round is checked */
	}
	return NULL;
}

TEST(stress_thousand_threads_one_init)
{
	uint64_t seed = harness_seed(), rng = seed;
	pthread_t *th;
	pthread_attr_t a;

	nthreads = harness_param("KEEL_THREADS", 1000, 1000);
	rounds = harness_param("KEEL_ITERS", 20, 400);
	/* No poll: only wake-ups end a wait, so a lost one hangs. */
	store_relaxed(&keel__once_poll, KEEL_SEC(3600));
	th = calloc((size_t)nthreads, sizeof *th);
	barrier_init(&start, (unsigned)nthreads + 1);
	pthread_mutex_init(&round_.mu, NULL);
	pthread_cond_init(&round_.cv, NULL);
	pthread_attr_init(&a);
	pthread_attr_setstacksize(&a, 256 * 1024);
	for (long i = 0; i < nthreads; i++)
		CHECK_OK(pthread_create(&th[i], &a, racer, NULL));
	pthread_attr_destroy(&a);
	for (long r = 0; r < rounds; r++) {
		keel_once_t *o = calloc(1, sizeof *o);
		struct timespec until;

		round_.o = o;
		round_.kind = (int)(rng_next(&rng) % 3);
		atomic_store(&round_.inits, 0);
		atomic_store(&round_.failures, 0);
		atomic_store(&round_.answered, 0);
		round_.done = 0;
		barrier_wait(&start);
		clock_gettime(CLOCK_REALTIME, &until);
		until.tv_sec += 60;
		pthread_mutex_lock(&round_.mu);
		while (!round_.done)
			if (pthread_cond_timedwait(&round_.cv, &round_.mu, &until) ==
			    ETIMEDOUT) {
				harness_fail(__FILE__, __LINE__,
					     "round %ld (kind %d, seed %#llx): %d of "
					     "%ld callers answered: a lost wake-up",
					     r, round_.kind, (unsigned long long)seed,
					     atomic_load(&round_.answered), nthreads);
			}
		pthread_mutex_unlock(&round_.mu);
		CHECK_EQ(atomic_load(&round_.wrong), 0);
		CHECK_EQ(atomic_load(&round_.inits),
			 round_.kind == FAILING ? 2 : 1);
		CHECK_EQ(atomic_load(&round_.failures),
			 round_.kind == FAILING ? 1 : 0);
		CHECK(keel_once_value(o) == &token);
		barrier_wait(&start);
		free(o); /* every caller has returned */
	}
	for (long i = 0; i < nthreads; i++)
		harness_join(th[i]);
	free(th);
	printf("%ld rounds of %ld threads: one init each (seed %#llx)\n",
	       rounds, nthreads, (unsigned long long)seed);
}

/* ---- The watch, handed on ---- */

/* One waiter at a time looks at a running owner's lifeline. Here the
 * waiters that hold the watch keep leaving (their max_wait is short) while
 * the owner runs, so the watch passes from hand to hand; then the owner's
 * thread ends in its init, and one of the waiters still there must notice
 * within a poll or two, not at the owner's 60 s deadline. */
static struct {
	keel_once_t *o;
	harness_event owning, die;
	_Atomic int64_t died_at, reclaimed_at;
	_Atomic int reclaims;
} hand;

static int hand_owner_init(keel_claim_t *c, void *arg)
{
	(void)c;
	(void)arg;
	event_set(&hand.owning);
	event_wait(&hand.die);
	atomic_store(&hand.died_at, keel_now());
	pthread_exit(NULL);
}

static int hand_reclaim_init(keel_claim_t *c, void *arg)
{
	(void)arg;
	atomic_store(&hand.reclaimed_at, keel_now());
	atomic_fetch_add(&hand.reclaims, 1);
	return keel_claim_publish(c, &token);
}

static void *hand_owner(void *arg)
{
	static const keel_once_opts patient = {.deadline = KEEL_SEC(60)};
	void *v;

	(void)arg;
	keel_once(hand.o, hand_owner_init, NULL, &patient, &v);
	return NULL; /* not reached: the init ends the thread */
}

struct hand_waiter {
	pthread_t th;
	keel_time_t leave_after; /* 0: stays */
	int rc;
	void *v;
};

/* A leaver waits inside a scope of its own whose deadline cancels it. */
static void *hand_wait(void *arg)
{
	static const keel_once_opts patient = {.deadline = KEEL_SEC(60)};
	struct hand_waiter *w = arg;
	keel_scope_t *s = NULL;

	if (w->leave_after) {
		keel_scope_opts o = {.deadline = keel_after(w->leave_after)};

		CHECK_OK(keel_scope_open(&s, &o));
	}
	w->rc = keel_once(hand.o, hand_reclaim_init, NULL, &patient, &w->v);
	if (s)
		keel_scope_close(s);
	return NULL;
}

TEST(stress_the_watch_passes_through_leaving_waiters)
{
	uint64_t seed = harness_seed(), rng = seed;
	long nwaiters = harness_param("KEEL_WAITERS", 40, 100);
	long nrounds = harness_param("KEEL_WATCH_ROUNDS", 5, 50);
	struct hand_waiter *w = calloc((size_t)nwaiters, sizeof *w);

	for (long r = 0; r < nrounds; r++) {
		pthread_t owner;
		int64_t latency;

		hand.o = calloc(1, sizeof *hand.o);
		event_init(&hand.owning);
		event_init(&hand.die);
		atomic_store(&hand.reclaims, 0);
		owner = harness_thread(hand_owner, NULL);
		event_wait(&hand.owning);
		/* Three in four leave after 1-40 ms (their scope's deadline
		 * cancels their wait); the rest, and the last, stay. */
		for (long i = 0; i < nwaiters; i++) {
			w[i].rc = 1;
			w[i].leave_after =
				i + 1 < nwaiters && rng_next(&rng) % 4
					? KEEL_MS(1 + (long)(rng_next(&rng) % 40))
					: 0;
			w[i].th = harness_thread(hand_wait, &w[i]);
		}
		for (long i = 0; i < nwaiters; i++)
			if (w[i].leave_after) {
				harness_join(w[i].th);
				CHECK(w[i].rc == -ECANCELED || w[i].rc == -ETIMEDOUT);
			}
		event_set(&hand.die);
		harness_join(owner);
		for (long i = 0; i < nwaiters; i++)
			if (!w[i].leave_after) {
				harness_join(w[i].th);
				CHECK_OK(w[i].rc);
				CHECK(w[i].v == &token);
			}
		latency = atomic_load(&hand.reclaimed_at) -
			  atomic_load(&hand.died_at);
		if (atomic_load(&hand.reclaims) != 1 ||
		    latency >= 2 * KEEL_ONCE_POLL + KEEL_MS(500))
			harness_fail(__FILE__, __LINE__,
				     "round %ld (seed %#llx): %d reclaims, the "
				     "last %.1f ms after the owner died",
				     r, (unsigned long long)seed,
				     atomic_load(&hand.reclaims),
				     (double)latency / 1e6);
		free(hand.o);
	}
	free(w);
	printf("%ld rounds of %ld waiters leaving and staying (seed %#llx)\n",
	       nrounds, nwaiters, (unsigned long long)seed);
}

/* ---- Processes ----
 * Besides the random chaos, every round has a plan, and the plans of a
 * run make sure it does what it is for: the first owner of round 0 is
 * killed in init and the first owner of round 1 is stopped in init (the
 * other rounds' plans come from the seed). A planned owner (the one that
 * runs claim 1) says so through a process-shared semaphore and then waits
 * for the parent, so it is in init when the signal lands, not by luck. */

#define MAX_PROCS 32

enum { PLAN_NONE, PLAN_KILL, PLAN_STOP };

struct shm {
	keel_once_shared_t once;
	_Atomic int in_init[MAX_PROCS]; /* running init right now */
	_Atomic int inits;
	int rc[MAX_PROCS];
	uint64_t got[MAX_PROCS];
	uint64_t seed;
	int plan;                /* for claim 1's owner */
	_Atomic int planned;     /* the index of claim 1's owner */
	sem_t entered, released; /* process-shared */
};

static struct shm *shm;
static int me_index;

static void nap(uint64_t *rng, long max_us)
{
	struct timespec ts = {0, (long)(rng_next(rng) % (uint64_t)max_us) * 1000};

	nanosleep(&ts, NULL);
}

static int proc_init(keel_claim_t *c, void *arg)
{
	uint64_t *rng = arg;
	int rc;

	atomic_fetch_add(&shm->inits, 1);
	atomic_store(&shm->in_init[me_index], 1);
	if (shm->plan != PLAN_NONE && keel_claim_generation(c) == 1) {
		struct timespec until;

		/* Hold still in init until the parent has done its part (a
		 * minute at most: never outlive a parent that failed). */
		clock_gettime(CLOCK_REALTIME, &until);
		until.tv_sec += 60;
		atomic_store(&shm->planned, me_index);
		sem_post(&shm->entered);
		while (sem_timedwait(&shm->released, &until) != 0 && errno == EINTR)
			;
	}
	nap(rng, 20000); /* the work (simulated), while the chaos goes on */
	rc = keel_claim_publish_handle(c, (uint64_t)getpid());
	atomic_store(&shm->in_init[me_index], 0);
	return rc;
}

static void child(int i)
{
	const keel_once_opts o = {.deadline = KEEL_MS(40),
				  .max_wait = KEEL_SEC(30)};
	uint64_t rng = shm->seed ^ (uint64_t)(i + 1) * 0x9E3779B97F4A7C15ull;
	uint64_t h = 0;

	me_index = i;
	shm->rc[i] = keel_once_shared(&shm->once, proc_init, &rng, &o, &h);
	shm->got[i] = h;
	_exit(0);
}

/* Wait (60 s at most) for the planned owner to be in init; its index. */
static int planned_owner(long r, uint64_t seed)
{
	struct timespec until;

	clock_gettime(CLOCK_REALTIME, &until);
	until.tv_sec += 60;
	while (sem_timedwait(&shm->entered, &until) != 0)
		if (errno != EINTR)
			harness_fail(__FILE__, __LINE__,
				     "round %ld (seed %#llx): no owner entered init",
				     r, (unsigned long long)seed);
	return atomic_load(&shm->planned);
}

TEST(stress_processes_kill_and_stop_owners)
{
	HARNESS_NEED(FORK);
	uint64_t seed = harness_seed(), rng = seed;
	long nprocs = harness_param("KEEL_PROCS", 6, 6);
	long nrounds = harness_param("KEEL_ROUNDS", 4, 40);
	long kills = 0, stops = 0;

	if (nprocs > MAX_PROCS)
		nprocs = MAX_PROCS;
	if (nprocs < 2)
		nprocs = 2; /* a killed owner needs a survivor to take over */
	if (nrounds < 2)
		nrounds = 2; /* one planned kill, one planned stop */
	for (long r = 0; r < nrounds; r++) {
		pid_t pid[MAX_PROCS];
		int killed[MAX_PROCS] = {0}, stopped[MAX_PROCS] = {0};
		int alive = (int)nprocs, nkilled = 0;
		uint64_t h;

		shm = mmap(NULL, sizeof *shm, PROT_READ | PROT_WRITE,
			   MAP_SHARED | MAP_ANONYMOUS, -1, 0);
		CHECK(shm != MAP_FAILED);
		CHECK_OK(keel_once_shared_init(&shm->once));
		CHECK_OK(sem_init(&shm->entered, 1, 0));
		CHECK_OK(sem_init(&shm->released, 1, 0));
		shm->seed = rng_next(&rng);
		shm->plan = r == 0 ? PLAN_KILL
			  : r == 1 ? PLAN_STOP
				   : (int)(rng_next(&rng) % 3);
		for (int i = 0; i < nprocs; i++) {
			pid[i] = fork();
			CHECK(pid[i] >= 0);
			if (pid[i] == 0)
				child(i);
		}
		if (shm->plan != PLAN_NONE) {
			int i = planned_owner(r, seed);

			if (shm->plan == PLAN_KILL) {
				kill(pid[i], SIGKILL);
				killed[i] = 1;
				nkilled++;
				kills++;
			} else {
				/* Stopped first, then free to go on when it is
				 * continued: hung meanwhile, and stale after. */
				kill(pid[i], SIGSTOP);
				stopped[i] = 1;
				stops++;
				sem_post(&shm->released);
			}
		}
		while (alive > 0) {
			int i = (int)(rng_next(&rng) % (uint64_t)nprocs);
			int status;
			pid_t p;

			/* Reap whoever has finished. */
			while ((p = waitpid(-1, &status, WNOHANG)) > 0)
				alive--;
			/* Once it is done, let everyone finish. */
			if (keel_once_shared_value(&shm->once, &h))
				for (int j = 0; j < nprocs; j++)
					if (stopped[j]) {
						kill(pid[j], SIGCONT);
						stopped[j] = 0;
					}
			nap(&rng, 5000);
			if (stopped[i] && rng_next(&rng) % 4 == 0) {
				kill(pid[i], SIGCONT);
				stopped[i] = 0;
			}
			if (killed[i] || stopped[i] || !atomic_load(&shm->in_init[i]))
				continue;
			if (rng_next(&rng) % 2 == 0 && nkilled + 1 < nprocs) {
				kill(pid[i], SIGKILL);
				killed[i] = 1;
				nkilled++;
				kills++;
			} else {
				kill(pid[i], SIGSTOP);
				stopped[i] = 1;
				stops++;
			}
		}
		CHECK(keel_once_shared_value(&shm->once, &h));
		for (int i = 0; i < nprocs; i++) {
			if (killed[i])
				continue;
			if (shm->rc[i] != 0 || shm->got[i] != h)
				harness_fail(__FILE__, __LINE__,
					     "round %ld (seed %#llx): process %d got "
					     "rc %d, handle %llu; published %llu",
					     r, (unsigned long long)seed, i, shm->rc[i],
					     (unsigned long long)shm->got[i],
					     (unsigned long long)h);
		}
		{
			int owner = 0;

			for (int i = 0; i < nprocs; i++)
				owner += (uint64_t)pid[i] == h;
			CHECK_EQ(owner, 1); /* one of them built it */
		}
		sem_destroy(&shm->entered);
		sem_destroy(&shm->released);
		munmap(shm, sizeof *shm);
	}
	printf("%ld rounds of %ld processes, %ld owners killed, %ld stopped: "
	       "one handle each (seed %#llx)\n",
	       nrounds, nprocs, kills, stops, (unsigned long long)seed);
	fflush(stdout);
	/* The chaos happened: owners were killed and stopped in init. */
	CHECK_INT(kills, >=, 1);
	CHECK_INT(stops, >=, 1);
}
