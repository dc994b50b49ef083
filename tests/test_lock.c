/*
 * test_lock.c: ranked locks: the level rule, learned order, flags,
 * recursion, ownership, condition variables, the graph, reports.
 *
 * Most cases run under the report policy and capture stderr to check what
 * was reported; one runs the default abort policy in a child process.
 */
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "harness.h"
#include "internal.h"

static unsigned long reports_before;

static void report_mode(void)
{
	keel_lockcheck_set(KEEL_LOCKCHECK_REPORT);
	reports_before = keel_lockcheck_reports();
}

static unsigned long new_reports(void)
{
	return keel_lockcheck_reports() - reports_before;
}

static int contains(const char *text, const char *part)
{
	return strstr(text, part) != NULL;
}

#define CHECK_SAID(cap, part)                                              \
	do {                                                               \
		if (!contains((cap)->text, (part)))                        \
			harness_fail(__FILE__, __LINE__,                   \
				     "report lacks \"%s\"; it said:\n%s",  \
				     (part), (cap)->text);                 \
	} while (0)

/* ---- 1. Out of order: reported before blocking ---- */

static keel_mutex_t db = KEEL_MUTEX_INIT(3, "db");
static keel_mutex_t cache = KEEL_MUTEX_INIT(5, "cache");

struct prober {
	pthread_t th;
	harness_event go, done;
	int trylock_rc;
};

static struct prober probe;

static void *probe_main(void *arg)
{
	(void)arg;
	event_wait(&probe.go);
	/* Is the level-5 mutex taken at the moment of the report? */
	probe.trylock_rc = keel_mutex_trylock(&cache);
	if (probe.trylock_rc == 0)
		keel_mutex_unlock(&cache);
	event_set(&probe.done);
	return NULL;
}

static void at_report(void)
{
	event_set(&probe.go);
	event_wait(&probe.done);
}

TEST(out_of_order_reported_before_it_blocks)
{
	harness_capture cap;

	report_mode();
	event_init(&probe.go);
	event_init(&probe.done);
	probe.th = harness_thread(probe_main, NULL);
	keel__lock_report_hook = at_report;
	capture_begin(&cap);
	keel_mutex_lock(&db);
	keel_mutex_lock(&cache); /* level 5 under level 3: wrong way */
	capture_end(&cap);
	keel__lock_report_hook = NULL;
	harness_join(probe.th);
	/* At the report, the level-5 mutex was still free. */
	CHECK_RC(probe.trylock_rc, 0);
	CHECK_EQ(new_reports(), 1);
	CHECK_SAID(&cap, "lock order violation: taking 'cache' (level 5) at");
	CHECK_SAID(&cap, "test_lock.c:");
	CHECK_SAID(&cap, "while holding 'db' (level 3), taken at");
	CHECK_SAID(&cap, "holds 1 lock:");
	keel_mutex_unlock(&cache);
	keel_mutex_unlock(&db);
	/* The same pair again: reported once only. */
	keel_mutex_lock(&db);
	keel_mutex_lock(&cache);
	keel_mutex_unlock(&cache);
	keel_mutex_unlock(&db);
	CHECK_EQ(new_reports(), 1);
}

TEST(abort_policy_ends_the_process_with_the_report)
{
	HARNESS_NEED(FORK);
	int fds[2], status;
	char text[4096] = "";
	ssize_t n;
	pid_t pid;

	CHECK_EQ(pipe(fds), 0);
	pid = fork();
	CHECK(pid >= 0);
	if (pid == 0) {
		dup2(fds[1], 2);
		keel_lockcheck_set(KEEL_LOCKCHECK_ABORT);
		keel_mutex_lock(&db);
		keel_mutex_lock(&cache);
		_exit(0); /* not reached */
	}
	close(fds[1]);
	n = read(fds[0], text, sizeof text - 1);
	text[n > 0 ? n : 0] = '\0';
	close(fds[0]);
	CHECK_EQ(waitpid(pid, &status, 0), pid);
	CHECK(WIFSIGNALED(status));
	CHECK_EQ(WTERMSIG(status), SIGABRT);
	CHECK(contains(text, "taking 'cache' (level 5)"));
}

TEST(in_order_is_silent)
{
	static keel_mutex_t a = KEEL_MUTEX_INIT(10, "a");
	static keel_mutex_t b = KEEL_MUTEX_INIT(7, "b");
	static keel_mutex_t c = KEEL_MUTEX_INIT(2, "c");

	report_mode();
	keel_mutex_lock(&a);
	keel_mutex_lock(&b);
	keel_mutex_lock(&c);
	/* Unlock order is free. */
	keel_mutex_unlock(&b);
	keel_mutex_unlock(&a);
	keel_mutex_unlock(&c);
	keel_mutex_lock(&a);
	keel_mutex_lock(&c);
	keel_mutex_unlock(&c);
	keel_mutex_unlock(&a);
	CHECK_EQ(new_reports(), 0);
	CHECK_EQ(keel__locks.depth, 0);
}

/* Reports are made once per pair of locks, and a pair is the locks, not
 * their addresses: a lock destroyed and initialised again at the same
 * memory, or a new lock in memory freed and handed out again, is another
 * lock, and breaking a rule with it is reported again. */
struct two {
	keel_mutex_t hi, lo;
};

/* One pair's misdeeds, all from the same sites whatever the pair: an
 * order violation, a learned cycle, an unlock of a lock not held. */
static void misdeeds(struct two *p)
{
	keel_mutex_lock(&p->lo);
	keel_mutex_lock(&p->hi); /* level 20 under level 10 */
	keel_mutex_unlock(&p->hi);
	keel_mutex_unlock(&p->lo);
	keel_mutex_unlock(&p->lo); /* not held */
}

static void learned_cycle(struct two *p)
{
	keel_mutex_lock(&p->hi);
	keel_mutex_lock(&p->lo);
	keel_mutex_unlock(&p->lo);
	keel_mutex_unlock(&p->hi);
	keel_mutex_lock(&p->lo);
	keel_mutex_lock(&p->hi); /* closes the cycle */
	keel_mutex_unlock(&p->hi);
	keel_mutex_unlock(&p->lo);
}

static void init_two(struct two *p, int learned)
{
	CHECK_OK(keel_mutex_init(&p->hi, learned ? 0 : 20, "recycled-hi", 0));
	CHECK_OK(keel_mutex_init(&p->lo, learned ? 0 : 10, "recycled-lo", 0));
}

static void destroy_two(struct two *p)
{
	CHECK_OK(keel_mutex_destroy(&p->hi));
	CHECK_OK(keel_mutex_destroy(&p->lo));
}

TEST(a_new_pair_at_recycled_addresses_is_reported)
{
	struct two same, *p, *q;
	unsigned long before;

	report_mode();
	/* The same pair twice: each report once. */
	init_two(&same, 0);
	before = keel_lockcheck_reports();
	misdeeds(&same);
	CHECK_EQ(keel_lockcheck_reports() - before, 2);
	misdeeds(&same);
	CHECK_EQ(keel_lockcheck_reports() - before, 2);
	/* Destroyed and initialised again at the same memory: new locks. */
	destroy_two(&same);
	init_two(&same, 0);
	misdeeds(&same);
	CHECK_EQ(keel_lockcheck_reports() - before, 4);
	destroy_two(&same);
	init_two(&same, 1);
	learned_cycle(&same);
	CHECK_EQ(keel_lockcheck_reports() - before, 5);
	destroy_two(&same);
	init_two(&same, 1);
	learned_cycle(&same);
	CHECK_EQ(keel_lockcheck_reports() - before, 6);
	destroy_two(&same);
	/* Freed (without a destroy, as programs do) and handed out again. */
	p = malloc(sizeof *p);
	init_two(p, 0);
	misdeeds(p);
	CHECK_EQ(keel_lockcheck_reports() - before, 8);
	free(p);
	q = malloc(sizeof *q);
	printf("the allocator %s the freed pair's memory\n",
	       (void *)q == (void *)p ? "handed out" : "did not hand out");
	fflush(stdout);
	init_two(q, 0);
	misdeeds(q);
	CHECK_EQ(keel_lockcheck_reports() - before, 10);
	destroy_two(q);
	free(q);
}

/* ---- 2. Learned order: cycles ---- */

static keel_mutex_t la = KEEL_MUTEX_INIT(KEEL_LEVEL_LEARNED, "learned-a");
static keel_mutex_t lb = KEEL_MUTEX_INIT(KEEL_LEVEL_LEARNED, "learned-b");
static keel_mutex_t lc = KEEL_MUTEX_INIT(KEEL_LEVEL_LEARNED, "learned-c");

static void *a_then_b(void *arg)
{
	(void)arg;
	keel_mutex_lock(&la);
	keel_mutex_lock(&lb);
	keel_mutex_unlock(&lb);
	keel_mutex_unlock(&la);
	return NULL;
}

static void *b_then_a(void *arg)
{
	(void)arg;
	keel_mutex_lock(&lb);
	keel_mutex_lock(&la);
	keel_mutex_unlock(&la);
	keel_mutex_unlock(&lb);
	return NULL;
}

TEST(abba_on_learned_locks_is_reported_not_hung)
{
	harness_capture cap;

	report_mode();
	/* One after the other: nothing deadlocks on this run, but the two
	 * orders together could. */
	harness_join(harness_thread(a_then_b, NULL));
	CHECK_EQ(new_reports(), 0);
	capture_begin(&cap);
	harness_join(harness_thread(b_then_a, NULL));
	capture_end(&cap);
	CHECK_EQ(new_reports(), 1);
	CHECK_SAID(&cap, "lock order cycle: taking 'learned-a'");
	CHECK_SAID(&cap, "'learned-b' -> 'learned-a': taken at");
	CHECK_SAID(&cap, "'learned-a' -> 'learned-b': taken at");
}

static void *b_then_c(void *arg)
{
	(void)arg;
	keel_mutex_lock(&lb);
	keel_mutex_lock(&lc);
	keel_mutex_unlock(&lc);
	keel_mutex_unlock(&lb);
	return NULL;
}

static void *c_then_a(void *arg)
{
	(void)arg;
	keel_mutex_lock(&lc);
	keel_mutex_lock(&la);
	keel_mutex_unlock(&la);
	keel_mutex_unlock(&lc);
	return NULL;
}

TEST(three_lock_cycle_across_three_threads)
{
	harness_capture cap;
	const char *p;
	int edges = 0;

	report_mode();
	harness_join(harness_thread(a_then_b, NULL));
	harness_join(harness_thread(b_then_c, NULL));
	CHECK_EQ(new_reports(), 0);
	capture_begin(&cap);
	harness_join(harness_thread(c_then_a, NULL));
	capture_end(&cap);
	CHECK_EQ(new_reports(), 1);
	for (p = cap.text; (p = strstr(p, "': taken at ")) != NULL; p++)
		edges++;
	CHECK_EQ(edges, 3);
	CHECK_SAID(&cap, "'learned-c' -> 'learned-a'");
	CHECK_SAID(&cap, "'learned-a' -> 'learned-b'");
	CHECK_SAID(&cap, "'learned-b' -> 'learned-c'");
}

/* A learned lock taken before more than 32 others (the graph once kept
 * 32 out-edges a lock and switched itself off past them), then an
 * inversion with one of them: still reported. */
#define FANOUT 100
TEST(learned_lock_before_many_others_still_finds_a_cycle)
{
	static keel_mutex_t big, small[FANOUT];
	harness_capture cap;

	report_mode();
	CHECK_OK(keel_mutex_init(&big, KEEL_LEVEL_LEARNED, "fanout-big", 0));
	for (int i = 0; i < FANOUT; i++)
		CHECK_OK(keel_mutex_init(&small[i], KEEL_LEVEL_LEARNED,
					 "fanout-small", 0));
	for (int i = 0; i < FANOUT; i++) {
		keel_mutex_lock(&big);
		keel_mutex_lock(&small[i]);
		keel_mutex_unlock(&small[i]);
		keel_mutex_unlock(&big);
	}
	CHECK_EQ(new_reports(), 0);
	capture_begin(&cap);
	keel_mutex_lock(&small[FANOUT - 3]);
	keel_mutex_lock(&big); /* closes big -> small[97] -> big */
	keel_mutex_unlock(&big);
	keel_mutex_unlock(&small[FANOUT - 3]);
	capture_end(&cap);
	CHECK_EQ(new_reports(), 1);
	CHECK_SAID(&cap, "'fanout-small' -> 'fanout-big'");
	CHECK_SAID(&cap, "'fanout-big' -> 'fanout-small'");
	CHECK(strstr(cap.text, "graph is full") == NULL);
	for (int i = 0; i < FANOUT; i++)
		CHECK_OK(keel_mutex_destroy(&small[i]));
	CHECK_OK(keel_mutex_destroy(&big));
}

/* The same, with the others destroyed and made again round after round
 * at the same memory: the long-lived lock's list fills with edges to
 * destroyed locks (unlinked as searches pass them, or as their slots are
 * reused) and a reused node id starts with an empty list. No round may
 * report anything (the order is always big, then small), and an
 * inversion after the last round is still found. */
#define CHURN_ROUNDS 200
TEST(learned_lock_before_locks_made_and_destroyed_keeps_its_order)
{
	static keel_mutex_t big, small[FANOUT];
	harness_capture cap;

	report_mode();
	CHECK_OK(keel_mutex_init(&big, KEEL_LEVEL_LEARNED, "churn-big", 0));
	for (int r = 0; r < CHURN_ROUNDS; r++) {
		for (int i = 0; i < FANOUT; i++)
			CHECK_OK(keel_mutex_init(&small[i], KEEL_LEVEL_LEARNED,
						 "churn-small", 0));
		for (int i = 0; i < FANOUT; i++) {
			keel_mutex_lock(&big);
			keel_mutex_lock(&small[i]);
			keel_mutex_unlock(&small[i]);
			keel_mutex_unlock(&big);
			/* small[i] -> small[i + 1] too: searches from a
			 * small lock walk lists holding stale edges. */
			if (i + 1 < FANOUT) {
				keel_mutex_lock(&small[i]);
				keel_mutex_lock(&small[i + 1]);
				keel_mutex_unlock(&small[i + 1]);
				keel_mutex_unlock(&small[i]);
			}
		}
		if (r + 1 < CHURN_ROUNDS)
			for (int i = 0; i < FANOUT; i++)
				CHECK_OK(keel_mutex_destroy(&small[i]));
	}
	CHECK_EQ(new_reports(), 0);
	capture_begin(&cap);
	keel_mutex_lock(&small[FANOUT - 1]);
	keel_mutex_lock(&big); /* big -> small[0] -> ... -> small[99] -> big */
	keel_mutex_unlock(&big);
	keel_mutex_unlock(&small[FANOUT - 1]);
	capture_end(&cap);
	CHECK_EQ(new_reports(), 1);
	CHECK_SAID(&cap, "'churn-small' -> 'churn-big'");
	CHECK_SAID(&cap, "'churn-big' -> 'churn-small'");
	CHECK(strstr(cap.text, "graph is full") == NULL);
	for (int i = 0; i < FANOUT; i++)
		CHECK_OK(keel_mutex_destroy(&small[i]));
	CHECK_OK(keel_mutex_destroy(&big));
}

static keel_mutex_t mixed_ranked = KEEL_MUTEX_INIT(7, "mixed-ranked");
static keel_mutex_t mixed_learned = KEEL_MUTEX_INIT(0, "mixed-learned");

static void *ranked_then_learned(void *arg)
{
	(void)arg;
	keel_mutex_lock(&mixed_ranked);
	keel_mutex_lock(&mixed_learned);
	keel_mutex_unlock(&mixed_learned);
	keel_mutex_unlock(&mixed_ranked);
	return NULL;
}

static void *learned_then_ranked(void *arg)
{
	(void)arg;
	keel_mutex_lock(&mixed_learned);
	keel_mutex_lock(&mixed_ranked);
	keel_mutex_unlock(&mixed_ranked);
	keel_mutex_unlock(&mixed_learned);
	return NULL;
}

TEST(learned_lock_on_both_sides_of_a_ranked_one_is_a_cycle)
{
	harness_capture cap;

	/* The level rule says nothing about a learned lock, so only the
	 * graph can see this ABBA. */
	report_mode();
	harness_join(harness_thread(ranked_then_learned, NULL));
	capture_begin(&cap);
	harness_join(harness_thread(learned_then_ranked, NULL));
	capture_end(&cap);
	CHECK_EQ(new_reports(), 1);
	CHECK_SAID(&cap, "lock order cycle: taking 'mixed-ranked' (level 7)");
	CHECK_SAID(&cap, "'mixed-ranked' -> 'mixed-learned'");
}

/* Locks made and destroyed, one after another, under a long-lived lock:
 * each leaves an edge from it that is stale once the lock is destroyed.
 * Stale edges must not fill the long-lived lock's list of edges (32):
 * the graph went full after 32 such locks, and stopped learning. */
TEST(graph_keeps_learning_under_a_lock_whose_children_come_and_go)
{
	static keel_mutex_t outer = KEEL_MUTEX_INIT(0, "churn-outer");
	static keel_mutex_t other = KEEL_MUTEX_INIT(0, "churn-other");
	harness_capture cap;

	report_mode();
	for (int i = 0; i < 1000; i++) {
		keel_mutex_t inner;

		CHECK_OK(keel_mutex_init(&inner, 0, "churn-inner", 0));
		keel_mutex_lock(&outer);
		keel_mutex_lock(&inner);
		keel_mutex_unlock(&inner);
		keel_mutex_unlock(&outer);
		CHECK_OK(keel_mutex_destroy(&inner));
	}
	keel_mutex_lock(&outer);
	keel_mutex_lock(&other);
	keel_mutex_unlock(&other);
	keel_mutex_unlock(&outer);
	capture_begin(&cap);
	keel_mutex_lock(&other);
	keel_mutex_lock(&outer);
	keel_mutex_unlock(&outer);
	keel_mutex_unlock(&other);
	capture_end(&cap);
	CHECK_EQ(new_reports(), 1);
	CHECK_SAID(&cap, "lock order cycle: taking 'churn-outer'");
}

/* ---- 3. The rules one by one ---- */

TEST(same_level_needs_lock2)
{
	static keel_mutex_t x = KEEL_MUTEX_INIT(4, "acct-x");
	static keel_mutex_t y = KEEL_MUTEX_INIT(4, "acct-y");
	harness_capture cap;

	report_mode();
	keel_mutex_lock2(&x, &y);
	CHECK(keel_mutex_held(&x) && keel_mutex_held(&y));
	keel_mutex_unlock(&x);
	keel_mutex_unlock(&y);
	keel_mutex_lock2(&y, &x); /* either argument order: address order */
	keel_mutex_unlock(&y);
	keel_mutex_unlock(&x);
	CHECK_EQ(new_reports(), 0);
	capture_begin(&cap);
	keel_mutex_lock(&x);
	keel_mutex_lock(&y);
	capture_end(&cap);
	CHECK_EQ(new_reports(), 1);
	CHECK_SAID(&cap, "two locks of one level");
	keel_mutex_unlock(&y);
	keel_mutex_unlock(&x);
}

TEST(leaf_and_root_rules)
{
	static keel_mutex_t leaf = KEEL_MUTEX_INIT_FLAGS(9, "leaf", KEEL_LOCK_LEAF);
	static keel_mutex_t low = KEEL_MUTEX_INIT(2, "low");
	static keel_mutex_t root = KEEL_MUTEX_INIT_FLAGS(20, "root", KEEL_LOCK_ROOT);
	harness_capture cap;

	report_mode();
	keel_mutex_lock(&root); /* nothing held: fine */
	keel_mutex_unlock(&root);
	capture_begin(&cap);
	keel_mutex_lock(&leaf);
	keel_mutex_lock(&low); /* lower level, but under a leaf */
	keel_mutex_unlock(&low);
	keel_mutex_unlock(&leaf);
	keel_mutex_lock(&low);
	keel_mutex_lock(&root); /* a root with something held */
	keel_mutex_unlock(&root);
	keel_mutex_unlock(&low);
	capture_end(&cap);
	CHECK_SAID(&cap, "lock taken under a leaf lock: taking 'low'");
	CHECK_SAID(&cap, "root lock taken with locks held: taking 'root'");
}

TEST(blocking_call_under_a_noblock_lock)
{
	static keel_mutex_t nb = KEEL_MUTEX_INIT_FLAGS(3, "spin-ish",
						       KEEL_LOCK_NOBLOCK);
	harness_capture cap;

	report_mode();
	capture_begin(&cap);
	keel_mutex_lock(&nb);
	CHECK_OK(keel_sleep_until(0)); /* checked even when it does not block */
	keel_mutex_unlock(&nb);
	capture_end(&cap);
	CHECK_EQ(new_reports(), 1);
	CHECK_SAID(&cap, "keel_sleep_until(): 'spin-ish'");
}

TEST(trylock_out_of_order_is_not_reported_and_adds_no_edge)
{
	static keel_mutex_t hi = KEEL_MUTEX_INIT(8, "try-hi");
	static keel_mutex_t lo = KEEL_MUTEX_INIT(1, "try-lo");
	char buf[16384];
	FILE *f;

	report_mode();
	keel_mutex_lock(&lo);
	CHECK_OK(keel_mutex_trylock(&hi)); /* wrong way, but cannot block */
	CHECK(keel_mutex_held(&hi));
	keel_mutex_unlock(&hi);
	keel_mutex_unlock(&lo);
	CHECK_EQ(new_reports(), 0);
	f = fmemopen(buf, sizeof buf, "w");
	CHECK_OK(keel_lockgraph_write(f, KEEL_FORMAT_JSON));
	fclose(f);
	CHECK(contains(buf, "\"try-hi\""));
	CHECK(!contains(buf, "\"edges\": [\n    {"));
	/* Busy: -EBUSY. */
	keel_mutex_lock(&hi);
	CHECK_RC(keel_mutex_trylock(&hi), -EBUSY);
	keel_mutex_unlock(&hi);
}

TEST(recursion_reported_before_self_deadlock)
{
	static keel_mutex_t m = KEEL_MUTEX_INIT(5, "once-only");
	static keel_mutex_t r = KEEL_MUTEX_INIT_FLAGS(5, "recursive",
						      KEEL_LOCK_RECURSIVE);
	harness_capture cap;

	report_mode();
	keel_mutex_lock(&r);
	keel_mutex_lock(&r);
	keel_mutex_unlock(&r);
	CHECK(keel_mutex_held(&r));
	keel_mutex_unlock(&r);
	CHECK(!keel_mutex_held(&r));
	CHECK_EQ(new_reports(), 0);
	capture_begin(&cap);
	keel_mutex_lock(&m);
	keel_mutex_lock(&m); /* would deadlock: reported, then carried on */
	capture_end(&cap);
	CHECK_EQ(new_reports(), 1);
	CHECK_SAID(&cap, "lock taken again by its holder: taking 'once-only'");
	keel_mutex_unlock(&m);
	keel_mutex_unlock(&m);
	CHECK(!keel_mutex_held(&m));
	CHECK_OK(keel_mutex_trylock(&m));
	keel_mutex_unlock(&m);
}

static keel_mutex_t owned = KEEL_MUTEX_INIT(5, "owned");

static void *unlock_foreign(void *arg)
{
	(void)arg;
	keel_mutex_unlock(&owned);
	return NULL;
}

TEST(unlock_not_held_or_held_by_another_thread)
{
	harness_capture cap;

	report_mode();
	capture_begin(&cap);
	keel_mutex_unlock(&owned); /* not held at all */
	keel_mutex_lock(&owned);
	harness_join(harness_thread(unlock_foreign, NULL));
	capture_end(&cap);
	CHECK_EQ(new_reports(), 2);
	CHECK_SAID(&cap, "unlock of a lock that is not held: 'owned'");
	CHECK_SAID(&cap, "unlock of a lock another thread holds: 'owned'");
	/* The foreign unlock did nothing: still ours. */
	CHECK(keel_mutex_held(&owned));
	keel_mutex_unlock(&owned);
}

TEST(destroy_held_is_an_error_and_reinit_leaves_no_stale_edge)
{
	keel_mutex_t m, other;
	harness_capture cap;
	char buf[16384];
	FILE *f;

	report_mode();
	CHECK_OK(keel_mutex_init(&other, 0, "other", 0));
	CHECK_OK(keel_mutex_init(&m, 0, "first-life", 0));
	/* Learn other -> m. */
	keel_mutex_lock(&other);
	keel_mutex_lock(&m);
	capture_begin(&cap);
	CHECK_RC(keel_mutex_destroy(&m), -EBUSY);
	capture_end(&cap);
	CHECK_SAID(&cap, "destroying a lock that is held");
	keel_mutex_unlock(&m);
	keel_mutex_unlock(&other);
	CHECK_OK(keel_mutex_destroy(&m));
	CHECK_RC(keel_mutex_destroy(&m), -EINVAL);
	/* A new lock at the same address: the old order is gone, so the
	 * reverse order is no cycle. */
	CHECK_OK(keel_mutex_init(&m, 0, "second-life", 0));
	keel_mutex_lock(&m);
	keel_mutex_lock(&other);
	keel_mutex_unlock(&other);
	keel_mutex_unlock(&m);
	f = fmemopen(buf, sizeof buf, "w");
	CHECK_OK(keel_lockgraph_write(f, KEEL_FORMAT_JSON));
	fclose(f);
	CHECK(!contains(buf, "first-life"));
	CHECK(contains(buf, "second-life"));
	CHECK_OK(keel_mutex_destroy(&m));
	CHECK_OK(keel_mutex_destroy(&other));
	CHECK_EQ(new_reports(), 1);
}

/* A thread remembers the nested pairs it has taken (by graph node id) so
 * taking them again skips the graph. A destroyed lock's id goes to the
 * next lock initialised: the remembered pair must not stand for the new
 * lock, or its first nesting would never reach the graph and a cycle
 * through it would go unseen. */
TEST(a_reused_node_id_is_not_taken_for_a_known_pair)
{
	keel_mutex_t m, other;
	harness_capture cap;

	report_mode();
	CHECK_OK(keel_mutex_init(&other, 0, "steady", 0));
	CHECK_OK(keel_mutex_init(&m, 0, "old-lock", 0));
	for (int i = 0; i < 3; i++) { /* remembered after the first */
		keel_mutex_lock(&other);
		keel_mutex_lock(&m);
		keel_mutex_unlock(&m);
		keel_mutex_unlock(&other);
	}
	CHECK_OK(keel_mutex_destroy(&m));
	CHECK_OK(keel_mutex_init(&m, 0, "new-lock", 0));
	/* steady -> new-lock is a new edge, then new-lock -> steady closes
	 * a cycle. */
	keel_mutex_lock(&other);
	keel_mutex_lock(&m);
	keel_mutex_unlock(&m);
	keel_mutex_unlock(&other);
	CHECK_EQ(new_reports(), 0);
	capture_begin(&cap);
	keel_mutex_lock(&m);
	keel_mutex_lock(&other);
	capture_end(&cap);
	keel_mutex_unlock(&other);
	keel_mutex_unlock(&m);
	CHECK_EQ(new_reports(), 1);
	CHECK_SAID(&cap, "lock order cycle: taking 'steady'");
	CHECK_SAID(&cap, "'steady' -> 'new-lock'");
	CHECK_OK(keel_mutex_destroy(&m));
	CHECK_OK(keel_mutex_destroy(&other));
}

/* A mutex remembers the parents it was taken under (by graph node id), so
 * a nesting taken again skips the graph. When a parent is destroyed and
 * its id goes to a new lock, the child's memory must not stand for the new
 * parent: the new nesting must reach the graph, or a cycle through it
 * would go unseen. */
TEST(a_reused_parent_id_is_not_taken_for_a_known_parent)
{
	keel_mutex_t parent, child;
	harness_capture cap;

	report_mode();
	CHECK_OK(keel_mutex_init(&child, 0, "child", 0));
	CHECK_OK(keel_mutex_init(&parent, 0, "old-parent", 0));
	for (int i = 0; i < 3; i++) { /* remembered after the first */
		keel_mutex_lock(&parent);
		keel_mutex_lock(&child);
		keel_mutex_unlock(&child);
		keel_mutex_unlock(&parent);
	}
	CHECK_OK(keel_mutex_destroy(&parent));
	CHECK_OK(keel_mutex_init(&parent, 0, "new-parent", 0));
	keel_mutex_lock(&parent);
	keel_mutex_lock(&child);
	keel_mutex_unlock(&child);
	keel_mutex_unlock(&parent);
	CHECK_EQ(new_reports(), 0);
	/* new-parent -> child was recorded, so the reverse closes a cycle. */
	capture_begin(&cap);
	keel_mutex_lock(&child);
	keel_mutex_lock(&parent);
	capture_end(&cap);
	keel_mutex_unlock(&parent);
	keel_mutex_unlock(&child);
	CHECK_EQ(new_reports(), 1);
	CHECK_SAID(&cap, "lock order cycle: taking 'new-parent'");
	CHECK_SAID(&cap, "'new-parent' -> 'child'");
	CHECK_OK(keel_mutex_destroy(&parent));
	CHECK_OK(keel_mutex_destroy(&child));
}

/* A mutex remembers only its last four parents: a fifth is a new edge the
 * graph must see (so the reverse closes a cycle), and the ones it forgot
 * are still allowed. */
TEST(a_fifth_parent_reaches_the_graph)
{
	keel_mutex_t p[5], child;
	static const char *const names[5] = {"parent-1", "parent-2", "parent-3",
					     "parent-4", "parent-5"};
	harness_capture cap;

	report_mode();
	CHECK_OK(keel_mutex_init(&child, 0, "child", 0));
	for (int i = 0; i < 5; i++)
		CHECK_OK(keel_mutex_init(&p[i], 0, names[i], 0));
	for (int round = 0; round < 2; round++)
		for (int i = 0; i < 4; i++) {
			keel_mutex_lock(&p[i]);
			keel_mutex_lock(&child);
			keel_mutex_unlock(&child);
			keel_mutex_unlock(&p[i]);
		}
	keel_mutex_lock(&p[4]);
	keel_mutex_lock(&child);
	keel_mutex_unlock(&child);
	keel_mutex_unlock(&p[4]);
	for (int i = 0; i < 5; i++) { /* parent-1 is forgotten by now */
		keel_mutex_lock(&p[i]);
		keel_mutex_lock(&child);
		keel_mutex_unlock(&child);
		keel_mutex_unlock(&p[i]);
	}
	CHECK_EQ(new_reports(), 0);
	capture_begin(&cap);
	keel_mutex_lock(&child);
	keel_mutex_lock(&p[4]);
	capture_end(&cap);
	keel_mutex_unlock(&p[4]);
	keel_mutex_unlock(&child);
	CHECK_EQ(new_reports(), 1);
	CHECK_SAID(&cap, "'parent-5' -> 'child'");
	CHECK_OK(keel_mutex_destroy(&child));
	for (int i = 0; i < 5; i++)
		CHECK_OK(keel_mutex_destroy(&p[i]));
}

TEST(init_and_use_errors)
{
	keel_mutex_t m;
	harness_capture cap;

	report_mode();
	CHECK_RC(keel_mutex_init(NULL, 1, "x", 0), -EINVAL);
	CHECK_RC(keel_mutex_init(&m, 1, NULL, 0), -EINVAL);
	CHECK_RC(keel_mutex_init(&m, KEEL_LEVEL_MAX + 1, "x", 0), -EINVAL);
	CHECK_RC(keel_mutex_init(&m, 1, "x", 0x100), -EINVAL);
	CHECK_RC(keel_mutex_init(&m, 1, "x", KEEL_LOCK_LEAF | KEEL_LOCK_ROOT),
		 -EINVAL);
	memset(&m, 0, sizeof m);
	capture_begin(&cap);
	keel_mutex_lock(&m); /* never initialised */
	capture_end(&cap);
	CHECK_SAID(&cap, "not initialised, or destroyed");
	keel_mutex_unlock(&m);
}

TEST(stack_overflow_warns_once_and_checking_resumes)
{
	static keel_mutex_t many[40];
	static keel_mutex_t hi = KEEL_MUTEX_INIT(60000, "hi");
	harness_capture cap;
	char name[40][16];

	report_mode();
	for (int i = 0; i < 40; i++) {
		snprintf(name[i], sizeof name[i], "deep-%d", i);
		CHECK_OK(keel_mutex_init(&many[i], (unsigned)(1000 - i), name[i],
					 0));
	}
	capture_begin(&cap);
	for (int i = 0; i < 40; i++)
		keel_mutex_lock(&many[i]);
	for (int i = 39; i >= 0; i--)
		keel_mutex_unlock(&many[i]);
	CHECK_EQ(keel__locks.depth, 0);
	/* Checking works again. */
	keel_mutex_lock(&many[39]);
	keel_mutex_lock(&hi);
	keel_mutex_unlock(&hi);
	keel_mutex_unlock(&many[39]);
	capture_end(&cap);
	CHECK_EQ(new_reports(), 2); /* one overflow, one order */
	CHECK_SAID(&cap, "more than 32 locks held");
	CHECK_SAID(&cap, "taking 'hi'");
}

/* ---- Past the record's capacity ----
 * The record holds KEEL_LOCK_STACK locks; those taken past it go
 * unrecorded. Whatever order the locks are then released in, and however
 * recorded and unrecorded ones mix, nothing may be reported but the one
 * overflow warning, every lock must really be released, the record must
 * end empty (no stale entry standing for a released lock, from which an
 * edge would be recorded), and the graph must survive its locks being
 * destroyed and initialised again. */

#define PAST (KEEL_LOCK_STACK + 4)

enum { DEEP_MUTEX, DEEP_READ, DEEP_WRITE };

static struct {
	keel_mutex_t m[PAST + 2];
	keel_rwlock_t rw[PAST + 2];
	char name[PAST + 2][16];
} deep;

static int deep_kind(int i)
{
	return i % 3;
}

/* Levels fall with the index: taking them in index order breaks no rule. */
static void deep_init(void)
{
	for (int i = 0; i < PAST + 2; i++) {
		snprintf(deep.name[i], sizeof deep.name[i], "deep-%d", i);
		if (deep_kind(i) == DEEP_MUTEX)
			CHECK_OK(keel_mutex_init(&deep.m[i], (unsigned)(1000 - i),
						 deep.name[i], 0));
		else
			CHECK_OK(keel_rwlock_init(&deep.rw[i], (unsigned)(1000 - i),
						  deep.name[i], 0));
	}
}

static void deep_destroy(void)
{
	for (int i = 0; i < PAST + 2; i++)
		if (deep_kind(i) == DEEP_MUTEX)
			CHECK_OK(keel_mutex_destroy(&deep.m[i]));
		else
			CHECK_OK(keel_rwlock_destroy(&deep.rw[i]));
}

static void deep_take(int i)
{
	switch (deep_kind(i)) {
	case DEEP_MUTEX:
		keel_mutex_lock(&deep.m[i]);
		break;
	case DEEP_READ:
		keel_rwlock_rdlock(&deep.rw[i]);
		break;
	default:
		keel_rwlock_wrlock(&deep.rw[i]);
	}
}

static void deep_release(int i)
{
	if (deep_kind(i) == DEEP_MUTEX)
		keel_mutex_unlock(&deep.m[i]);
	else
		keel_rwlock_unlock(&deep.rw[i]);
}

/* Nobody holds lock i (white-box: its lock word). */
static int deep_free(int i)
{
	if (deep_kind(i) == DEEP_MUTEX)
		return !keel_mutex_held(&deep.m[i]) &&
		       __atomic_load_n(&deep.m[i].k_state, __ATOMIC_ACQUIRE) == 0;
	return __atomic_load_n(&deep.rw[i].k_state, __ATOMIC_ACQUIRE) == 0 &&
	       __atomic_load_n(&deep.rw[i].k_owner, __ATOMIC_ACQUIRE) == NULL;
}

static int count_of(const char *text, const char *part)
{
	int n = 0;

	for (const char *p = text; (p = strstr(p, part)) != NULL; p++)
		n++;
	return n;
}

static keel_mutex_t deep_probe = KEEL_MUTEX_INIT(0, "deep-probe");

/* Take `ntake` locks in index order, release `nrel` of them in the order
 * given, then (with `more`) take locks PAST and PAST + 1 and release the
 * rest in reverse index order. Checks that the only report was the
 * overflow warning and that the thread ends holding nothing: the
 * assertion is silent, and taking a learned lock alone records no edge. */
static void deep_round(const char *what, int ntake, const int *order, int nrel,
		       int more)
{
	unsigned long before = keel_lockcheck_reports();
	int held[PAST + 2] = {0};
	harness_capture cap;
	int warned;

	capture_begin(&cap);
	for (int i = 0; i < ntake; i++) {
		deep_take(i);
		held[i] = 1;
	}
	for (int j = 0; j < nrel; j++) {
		deep_release(order[j]);
		held[order[j]] = 0;
	}
	if (more) {
		deep_take(PAST);
		deep_take(PAST + 1);
		held[PAST] = held[PAST + 1] = 1;
	}
	for (int i = PAST + 1; i >= 0; i--)
		if (held[i])
			deep_release(i);
	keel_assert_no_locks();
	keel_mutex_lock(&deep_probe);
	keel_mutex_unlock(&deep_probe);
	capture_end(&cap);
	warned = count_of(cap.text, "more than 32 locks held");
	printf("%s: %lu report(s), %d of them the overflow warning\n", what,
	       keel_lockcheck_reports() - before, warned);
	fflush(stdout);
	CHECK(!contains(cap.text, "missing from the held record"));
	CHECK(!contains(cap.text, "locks are held"));
	CHECK(!contains(cap.text, "not held"));
	CHECK_INT(warned, <=, 1);
	CHECK_EQ(keel_lockcheck_reports() - before, (unsigned long)warned);
	for (int i = 0; i < PAST + 2; i++)
		if (!deep_free(i))
			harness_fail(__FILE__, __LINE__, "%s: %s is still held",
				     what, deep.name[i]);
}

/* No edge into the probe: it was always taken with nothing held. */
static void check_probe_has_no_parent(void)
{
	static char buf[1 << 16];
	char idtext[32];
	const char *p;
	FILE *f;

	f = fmemopen(buf, sizeof buf, "w");
	CHECK_OK(keel_lockgraph_write(f, KEEL_FORMAT_JSON));
	fclose(f);
	p = strstr(buf, "\"name\": \"deep-probe\"");
	CHECK(p != NULL);
	while (p > buf && strncmp(p, "{\"id\": ", 7) != 0)
		p--;
	snprintf(idtext, sizeof idtext, "\"to\": %d,", atoi(p + 7));
	if (contains(buf, idtext))
		harness_fail(__FILE__, __LINE__,
			     "an edge into 'deep-probe' (%s) was recorded from a "
			     "lock not held:\n%s", idtext, buf);
}

TEST(held_record_past_capacity_releases_in_any_order)
{
	int order[PAST];
	uint64_t rng = 0x5eed;

	report_mode();
	deep_init();
	for (int i = 0; i < PAST; i++)
		order[i] = i;
	deep_round("taking order", PAST, order, PAST, 0);
	for (int i = 0; i < PAST; i++)
		order[i] = PAST - 1 - i;
	deep_round("reverse order", PAST, order, PAST, 0);
	/* Unrecorded ones first, then the recorded ones oldest first. */
	for (int i = 0; i < PAST; i++)
		order[i] = i < PAST - KEEL_LOCK_STACK ? KEEL_LOCK_STACK + i
						      : i - (PAST - KEEL_LOCK_STACK);
	deep_round("unrecorded first", PAST, order, PAST, 0);
	for (int i = 0; i < PAST; i++)
		order[i] = i;
	for (int i = PAST - 1; i > 0; i--) {
		int j = (int)(rng_next(&rng) % (uint64_t)(i + 1)), t = order[i];

		order[i] = order[j];
		order[j] = t;
	}
	deep_round("shuffled", PAST, order, PAST, 0);
	/* Recorded ones released from the middle while unrecorded ones are
	 * held, then two more taken into the room that leaves. */
	order[0] = 3;
	order[1] = 17;
	order[2] = 30;
	deep_round("mixed with new ones", PAST, order, 3, 1);
	/* Exactly at capacity, then one past it. */
	deep_round("at capacity", KEEL_LOCK_STACK, order, 0, 0);
	deep_round("one past", KEEL_LOCK_STACK + 1, order, 0, 0);
	check_probe_has_no_parent();
	/* The graph survives: destroyed locks give their nodes back, new ones
	 * take them, and everything works again. */
	deep_destroy();
	deep_init();
	for (int i = 0; i < PAST; i++)
		order[i] = i;
	deep_round("after destroy and init", PAST, order, PAST, 0);
	deep_destroy();
	check_probe_has_no_parent();
}

/* Past capacity, a recursive lock taken again goes unrecorded while its
 * first taking is in the record: releasing the recorded one must leave it
 * held; a cond wait on an unrecorded mutex is not misuse. */
TEST(held_record_past_capacity_relock_and_cond_wait)
{
	static keel_mutex_t rec = KEEL_MUTEX_INIT_FLAGS(2000, "deep-recursive",
							KEEL_LOCK_RECURSIVE);
	static keel_rwlock_t rrw = KEEL_RWLOCK_INIT_FLAGS(1999, "deep-rreader",
							  KEEL_LOCK_RECURSIVE);
	static keel_mutex_t low = KEEL_MUTEX_INIT(1, "deep-low");
	static keel_cond_t cond = KEEL_COND_INIT;
	harness_capture cap;
	unsigned long before;

	report_mode();
	deep_init();
	before = keel_lockcheck_reports();
	capture_begin(&cap);
	keel_mutex_lock(&rec);
	keel_rwlock_rdlock(&rrw);
	for (int i = 0; i < KEEL_LOCK_STACK - 2; i++)
		deep_take(i);
	/* The record is full: these three go unrecorded. */
	keel_mutex_lock(&rec);
	keel_rwlock_rdlock(&rrw);
	keel_mutex_lock(&low);
	CHECK_RC(keel_cond_wait_until(&cond, &low, 0), -ETIMEDOUT);
	CHECK(keel_mutex_held(&low));
	for (int i = KEEL_LOCK_STACK - 3; i >= 0; i--)
		deep_release(i);
	/* The recorded takings are on top now. */
	keel_rwlock_unlock(&rrw);
	CHECK_EQ(__atomic_load_n(&rrw.k_state, __ATOMIC_ACQUIRE), 1);
	keel_mutex_unlock(&rec);
	CHECK(keel_mutex_held(&rec));
	keel_mutex_unlock(&rec);
	CHECK(!keel_mutex_held(&rec));
	keel_rwlock_unlock(&rrw);
	CHECK_EQ(__atomic_load_n(&rrw.k_state, __ATOMIC_ACQUIRE), 0);
	keel_mutex_unlock(&low);
	CHECK(!keel_mutex_held(&low));
	keel_assert_no_locks();
	capture_end(&cap);
	CHECK_EQ(keel_lockcheck_reports() - before,
		 (unsigned long)count_of(cap.text, "more than 32 locks held"));
	CHECK_EQ(keel__locks.depth, 0);
	deep_destroy();
}

/* The graph records an edge only between live locks: one from a destroyed
 * lock's node (a stale id, as a corrupted record would hand it) is
 * refused, and the list of free nodes survives it, so the locks
 * initialised next get sound, distinct nodes. */
TEST(graph_refuses_an_edge_from_a_destroyed_lock)
{
	keel_mutex_t gone, live, fresh[3];
	char cycle[256];
	uint32_t stale, to;

	report_mode();
	CHECK_OK(keel_mutex_init(&gone, 0, "gone", 0));
	CHECK_OK(keel_mutex_init(&live, 0, "live", 0));
	stale = gone.k_node & 0x7fffffffu;
	to = live.k_node & 0x7fffffffu;
	CHECK(stale != 0 && to != 0);
	CHECK_OK(keel_mutex_destroy(&gone));
	CHECK_EQ(keel__graph_edge(stale, to, "here.c:1", "there.c:2", 1, 0, cycle,
				  sizeof cycle),
		 0);
	for (int i = 0; i < 3; i++) {
		uint32_t id;

		CHECK_OK(keel_mutex_init(&fresh[i], 0, "fresh", 0));
		id = fresh[i].k_node & 0x7fffffffu;
		CHECK(id != 0 && id <= 4096 && id != to);
		for (int j = 0; j < i; j++)
			CHECK(id != (fresh[j].k_node & 0x7fffffffu));
	}
	/* The reused node carries no edge from its former life. */
	keel_mutex_lock(&live);
	keel_mutex_lock(&fresh[0]);
	keel_mutex_unlock(&fresh[0]);
	keel_mutex_unlock(&live);
	CHECK_EQ(new_reports(), 0);
	for (int i = 0; i < 3; i++)
		CHECK_OK(keel_mutex_destroy(&fresh[i]));
	CHECK_OK(keel_mutex_destroy(&live));
}

TEST(forked_child_keeps_a_consistent_record)
{
	HARNESS_NEED(FORK);
	static keel_mutex_t held = KEEL_MUTEX_INIT(9, "held-at-fork");
	static keel_mutex_t lower = KEEL_MUTEX_INIT(2, "lower");
	pid_t pid;
	int status;

	report_mode();
	keel_mutex_lock(&held);
	pid = fork();
	CHECK(pid >= 0);
	if (pid == 0) {
		/* The child holds what its thread held, and checks go on. */
		if (!keel_mutex_held(&held) || keel__locks.depth != 1)
			_exit(10);
		keel_mutex_lock(&lower);
		keel_mutex_unlock(&lower);
		keel_mutex_unlock(&held);
		if (keel__locks.depth != 0 || keel_lockcheck_reports() !=
						      reports_before)
			_exit(11);
		_exit(0);
	}
	CHECK_EQ(waitpid(pid, &status, 0), pid);
	CHECK(WIFEXITED(status));
	CHECK_EQ(WEXITSTATUS(status), 0);
	keel_mutex_unlock(&held);
}

/* ---- 4. Condition variables ---- */

static keel_mutex_t cv_mu = KEEL_MUTEX_INIT(4, "cv-mutex");
static keel_mutex_t cv_high = KEEL_MUTEX_INIT(9, "cv-high");
static keel_mutex_t cv_low = KEEL_MUTEX_INIT(1, "cv-low");
static keel_cond_t cv = KEEL_COND_INIT;
static int cv_flag;

static void *cv_signaller(void *arg)
{
	(void)arg;
	keel_mutex_lock(&cv_mu);
	cv_flag = 1;
	keel_cond_signal(&cv);
	keel_mutex_unlock(&cv_mu);
	return NULL;
}

TEST(cond_wait_on_the_lowest_lock_keeps_the_record)
{
	struct keel__held before[2];
	pthread_t th;

	report_mode();
	keel_mutex_lock(&cv_high);
	keel_mutex_lock(&cv_mu);
	memcpy(before, keel__locks.stack, sizeof before);
	cv_flag = 0;
	th = harness_thread(cv_signaller, NULL);
	while (!cv_flag)
		CHECK_OK(keel_cond_wait(&cv, &cv_mu));
	harness_join(th);
	/* Same locks, same sites, nothing waiting, mutex ours again. */
	CHECK_EQ(keel__locks.depth, 2);
	CHECK(memcmp(before, keel__locks.stack, sizeof before) == 0);
	CHECK(keel_mutex_held(&cv_mu));
	keel_mutex_unlock(&cv_mu);
	keel_mutex_unlock(&cv_high);
	CHECK_EQ(new_reports(), 0);
}

TEST(cond_wait_while_holding_a_lower_lock_is_reported)
{
	harness_capture cap;

	report_mode();
	keel_mutex_lock(&cv_mu);
	keel_mutex_lock(&cv_low); /* level 1 below the cv's mutex (4) */
	capture_begin(&cap);
	CHECK_RC(keel_cond_wait_until(&cv, &cv_mu, 0), -ETIMEDOUT);
	capture_end(&cap);
	CHECK_SAID(&cap, "keel_cond_wait() while holding a lower-level lock");
	CHECK_SAID(&cap, "while holding 'cv-low' (level 1)");
	CHECK(keel_mutex_held(&cv_mu));
	keel_mutex_unlock(&cv_low);
	keel_mutex_unlock(&cv_mu);
	CHECK_RC(keel_cond_wait(&cv, &cv_mu), -EPERM); /* not held */
}

static keel_scope_t *cv_scope;

static int cv_waiter(void *arg)
{
	int rc;

	(void)arg;
	keel_mutex_lock(&cv_mu);
	rc = keel_cond_wait(&cv, &cv_mu);
	/* Held again, whatever the outcome. */
	if (!keel_mutex_held(&cv_mu))
		rc = -EPROTO;
	keel_mutex_unlock(&cv_mu);
	return rc == -ECANCELED ? 0 : -EPROTO;
}

TEST(cond_wait_is_a_cancellation_point)
{
	keel_task_t t;

	report_mode();
	CHECK_OK(keel_scope_open(&cv_scope, &(keel_scope_opts){
						    .policy = KEEL_SUPERVISE}));
	CHECK_OK(keel_spawn(cv_scope, cv_waiter, NULL, NULL, &t));
	/* Before or during the wait, the cancellation ends it. */
	CHECK_OK(keel_scope_cancel(cv_scope));
	CHECK_RC(keel_scope_close(cv_scope), -ECANCELED);
	CHECK_EQ(new_reports(), 0);
}

/* A mutex whose holder waits in keel_cond_wait() is still held: the lock
 * word is free while it sleeps, but it takes the mutex back before it
 * returns. Destroying it then must fail with -EBUSY (and be reported),
 * never succeed under the waiter. */
struct cv_holder {
	keel_mutex_t m;
	keel_cond_t c;
	int timed;
	int flag;
	int rc;
	int held_after;
	harness_event locked;
};

static void *cv_holder_main(void *arg)
{
	struct cv_holder *h = arg;
	int rc = 0;

	keel_mutex_lock(&h->m);
	event_set(&h->locked);
	while (!h->flag && rc == 0)
		rc = h->timed ? keel_cond_wait_until(&h->c, &h->m,
						     keel_after(KEEL_SEC(60)))
			      : keel_cond_wait(&h->c, &h->m);
	h->rc = rc;
	h->held_after = keel_mutex_held(&h->m);
	keel_mutex_unlock(&h->m);
	return NULL;
}

static void destroy_under_cond_waiter(int timed)
{
	struct cv_holder *h = calloc(1, sizeof *h);
	harness_capture cap;
	pthread_t th;

	report_mode();
	CHECK_OK(keel_mutex_init(&h->m, 4, "cv-held", 0));
	CHECK_OK(keel_cond_init(&h->c));
	h->timed = timed;
	event_init(&h->locked);
	th = harness_thread(cv_holder_main, h);
	event_wait(&h->locked);
	/* Taking the mutex here means the holder has released its word in
	 * the wait; giving it back leaves the holder waiting for a signal. */
	keel_mutex_lock(&h->m);
	keel_mutex_unlock(&h->m);
	capture_begin(&cap);
	CHECK_RC(keel_mutex_destroy(&h->m), -EBUSY);
	capture_end(&cap);
	CHECK_SAID(&cap, "destroying a lock that is held: 'cv-held'");
	CHECK_EQ(new_reports(), 1);
	/* Nothing was destroyed: the wait ends as usual. */
	keel_mutex_lock(&h->m);
	h->flag = 1;
	CHECK_OK(keel_cond_signal(&h->c));
	keel_mutex_unlock(&h->m);
	harness_join(th);
	CHECK_OK(h->rc);
	CHECK(h->held_after);
	CHECK_OK(keel_mutex_destroy(&h->m));
	CHECK_OK(keel_cond_destroy(&h->c));
	CHECK_EQ(new_reports(), 1);
	free(h);
}

TEST(destroy_while_the_holder_waits_in_cond_wait_is_ebusy)
{
	destroy_under_cond_waiter(0);
}

TEST(destroy_while_the_holder_waits_in_cond_wait_until_is_ebusy)
{
	destroy_under_cond_waiter(1);
}

/* A mutex other threads are blocked trying to take is held by someone:
 * destroying it from a third thread fails, and the blocked ones then get
 * it in turn. */
struct blocked {
	keel_mutex_t m;
	int plain_got, until_rc;
};

static void *blocked_plain(void *arg)
{
	struct blocked *b = arg;

	keel_mutex_lock(&b->m);
	b->plain_got = 1;
	keel_mutex_unlock(&b->m);
	return NULL;
}

static void *blocked_until(void *arg)
{
	struct blocked *b = arg;

	b->until_rc = keel_mutex_lock_until(&b->m, keel_after(KEEL_SEC(60)));
	if (b->until_rc == 0)
		keel_mutex_unlock(&b->m);
	return NULL;
}

static void *destroy_from_elsewhere(void *arg)
{
	return (void *)(intptr_t)keel_mutex_destroy(arg);
}

TEST(destroy_while_others_wait_to_lock_is_ebusy)
{
	struct blocked *b = calloc(1, sizeof *b);
	pthread_t plain, until;
	harness_capture cap;
	void *rc;

	report_mode();
	CHECK_OK(keel_mutex_init(&b->m, 4, "waited-for", 0));
	keel_mutex_lock(&b->m);
	plain = harness_thread(blocked_plain, b);
	until = harness_thread(blocked_until, b);
	/* White-box: both are blocked once the word says "contended" and a
	 * cancellable waiter is queued. */
	while (__atomic_load_n(&b->m.k_state, __ATOMIC_ACQUIRE) != 2 ||
	       !(__atomic_load_n(&b->m.k_flags, __ATOMIC_ACQUIRE) &
		 KEEL__LOCK_QUEUED))
		sched_yield();
	capture_begin(&cap);
	CHECK_OK(pthread_join(harness_thread(destroy_from_elsewhere, &b->m), &rc));
	capture_end(&cap);
	CHECK_EQ((intptr_t)rc, -EBUSY);
	CHECK_SAID(&cap, "destroying a lock that is held: 'waited-for'");
	keel_mutex_unlock(&b->m);
	harness_join(plain);
	harness_join(until);
	CHECK(b->plain_got);
	CHECK_OK(b->until_rc);
	CHECK_OK(keel_mutex_destroy(&b->m));
	CHECK_EQ(new_reports(), 1);
	free(b);
}

/* ---- The contended mutex's spin ---- */

/* A thread that finds a mutex held spins a short while before it sleeps,
 * unless the mutex is the one it released last (two threads taking turns
 * at one lock would hand it over at every release, where a sleeper lets
 * the running holder take it again and again). White-box: the waiter's
 * own counts (keel__spin.won and keel__spin.lost) say whether it spun,
 * and the holder lets go only once the word says the waiter sleeps (2),
 * so a spin, if any, was lost. */
struct spinner {
	keel_mutex_t m;
	harness_event ready, go;
	int release_first;
	uint32_t won, lost;
};

static void *spin_waiter(void *arg)
{
	struct spinner *s = arg;

	if (s->release_first) {
		keel_mutex_lock(&s->m);
		keel_mutex_unlock(&s->m);
	}
	event_set(&s->ready);
	event_wait(&s->go);
	keel_mutex_lock(&s->m);
	s->won = keel__spin.won;
	s->lost = keel__spin.lost;
	keel_mutex_unlock(&s->m);
	return NULL;
}

static void spin_case(int release_first, uint32_t want_lost)
{
	struct spinner *s = calloc(1, sizeof *s);
	pthread_t th;

	CHECK(s != NULL);
	CHECK_OK(keel_mutex_init(&s->m, 4, "spun-for", 0));
	event_init(&s->ready);
	event_init(&s->go);
	s->release_first = release_first;
	th = harness_thread(spin_waiter, s);
	event_wait(&s->ready);
	keel_mutex_lock(&s->m);
	event_set(&s->go);
	while (__atomic_load_n(&s->m.k_state, __ATOMIC_ACQUIRE) != 2)
		sched_yield();
	keel_mutex_unlock(&s->m);
	harness_join(th);
	CHECK_EQ(s->won, 0);
	CHECK_EQ(s->lost, want_lost);
	CHECK_OK(keel_mutex_destroy(&s->m));
	free(s);
}

TEST(a_waiter_spins_before_it_sleeps)
{
	spin_case(0, 1);
}

TEST(a_thread_waiting_for_the_lock_it_released_last_sleeps_at_once)
{
	spin_case(1, 0);
}

/* A thread woken from a condition variable spins for its mutex even when
 * that mutex is the one it released last (its own unlock before it
 * waited): it waits for a signaller, not taking turns. The signaller
 * holds the mutex until the woken thread sleeps on it, so its spin, made,
 * was lost. */
struct cv_spinner {
	keel_mutex_t m;
	keel_cond_t c;
	int waiting, signalled;
	uint32_t won, lost;
};

static void *cv_spin_waiter(void *arg)
{
	struct cv_spinner *s = arg;
	uint32_t won, lost;

	keel_mutex_lock(&s->m);
	keel_mutex_unlock(&s->m); /* now the mutex it released last */
	keel_mutex_lock(&s->m);
	/* Spins before this one (the main thread polls under the mutex)
	 * do not count. */
	won = keel__spin.won;
	lost = keel__spin.lost;
	s->waiting = 1;
	while (!s->signalled)
		keel_cond_wait(&s->c, &s->m);
	s->won = keel__spin.won - won;
	s->lost = keel__spin.lost - lost;
	keel_mutex_unlock(&s->m);
	return NULL;
}

TEST(a_thread_woken_from_a_condition_variable_spins_for_its_mutex)
{
	struct cv_spinner *s = calloc(1, sizeof *s);
	pthread_t th;
	int waiting = 0;

	CHECK(s != NULL);
	CHECK_OK(keel_mutex_init(&s->m, 4, "cv-spun-for", 0));
	CHECK_OK(keel_cond_init(&s->c));
	th = harness_thread(cv_spin_waiter, s);
	/* Once its flag is seen under the mutex, the waiter is queued on
	 * the condition variable (it let the mutex go in the wait). */
	while (!waiting) {
		keel_mutex_lock(&s->m);
		waiting = s->waiting;
		if (waiting) {
			/* Taken as 2 if the waiter held it then: take it
			 * again, as 1 (the waiter is on the condition
			 * variable), so that only the woken waiter makes it
			 * 2. */
			while (__atomic_load_n(&s->m.k_state,
					       __ATOMIC_RELAXED) != 1) {
				keel_mutex_unlock(&s->m);
				keel_mutex_lock(&s->m);
			}
			s->signalled = 1;
			keel_cond_signal(&s->c);
		} else {
			keel_mutex_unlock(&s->m);
			sched_yield();
		}
	}
	while (__atomic_load_n(&s->m.k_state, __ATOMIC_ACQUIRE) != 2)
		sched_yield();
	keel_mutex_unlock(&s->m);
	harness_join(th);
	CHECK_EQ(s->won, 0);
	CHECK_EQ(s->lost, 1);
	CHECK_OK(keel_mutex_destroy(&s->m));
	free(s);
}

/* ---- Cancellable locking ---- */

static keel_mutex_t contended = KEEL_MUTEX_INIT(6, "contended");
static harness_event holding, release_it;

static void *hold_it(void *arg)
{
	(void)arg;
	keel_mutex_lock(&contended);
	event_set(&holding);
	event_wait(&release_it);
	keel_mutex_unlock(&contended);
	return NULL;
}

static int lock_until_cancelled(void *arg)
{
	int rc = keel_mutex_lock_until(&contended, KEEL_FOREVER);

	(void)arg;
	return rc == -ECANCELED ? 0 : -EPROTO;
}

TEST(mutex_lock_until_times_out_and_is_cancellable)
{
	keel_scope_t *s;
	pthread_t th;

	report_mode();
	event_init(&holding);
	event_init(&release_it);
	th = harness_thread(hold_it, NULL);
	event_wait(&holding);
	CHECK_RC(keel_mutex_lock_until(&contended, keel_after(KEEL_MS(5))),
		 -ETIMEDOUT);
	CHECK(!keel_mutex_held(&contended));
	CHECK_OK(keel_scope_open(&s, NULL));
	CHECK_OK(keel_spawn(s, lock_until_cancelled, NULL, NULL, NULL));
	CHECK_OK(keel_scope_cancel(s));
	CHECK_RC(keel_scope_close(s), -ECANCELED);
	event_set(&release_it);
	harness_join(th);
	/* Free again: a blocking lock works, and so does lock_until. */
	CHECK_OK(keel_mutex_lock_until(&contended, KEEL_FOREVER));
	keel_mutex_unlock(&contended);
	CHECK_EQ(new_reports(), 0);
}

/* A lock_until waiter sleeps on its task's parker, queued on the lock, and
 * the lock's KEEL__LOCK_QUEUED bit tells an unlocker to look at the queue.
 * A waiter that gives up must not clear the bit while another is queued,
 * and the unlock must wake the one left (not its deadline). */
static keel_mutex_t handoff = KEEL_MUTEX_INIT(6, "handoff");
static int handoff_rc = 1;

static unsigned handoff_flags(void)
{
	return __atomic_load_n(&handoff.k_flags, __ATOMIC_ACQUIRE);
}

static void *handoff_patient(void *arg)
{
	(void)arg;
	handoff_rc = keel_mutex_lock_until(&handoff, keel_after(KEEL_MS(20000)));
	if (handoff_rc == 0)
		keel_mutex_unlock(&handoff);
	return NULL;
}

static void *handoff_impatient(void *arg)
{
	(void)arg;
	return (void *)(intptr_t)keel_mutex_lock_until(
		&handoff, keel_after(KEEL_MS(5)));
}

TEST(unlock_wakes_the_queued_lock_until_waiter_left)
{
	pthread_t patient;
	void *rc;

	report_mode();
	keel_mutex_lock(&handoff);
	patient = harness_thread(handoff_patient, NULL);
	while (!(handoff_flags() & KEEL__LOCK_QUEUED))
		sched_yield();
	CHECK_OK(pthread_join(harness_thread(handoff_impatient, NULL), &rc));
	CHECK_EQ((intptr_t)rc, -ETIMEDOUT);
	CHECK(handoff_flags() & KEEL__LOCK_QUEUED); /* the patient one */
	keel_mutex_unlock(&handoff);
	harness_join(patient);
	CHECK_EQ(handoff_rc, 0);
	CHECK(!(handoff_flags() & KEEL__LOCK_QUEUED));
	CHECK_EQ(new_reports(), 0);
}

/* ---- Reader-writer locks ---- */

TEST(rwlock_rules)
{
	static keel_rwlock_t rw = KEEL_RWLOCK_INIT(6, "table");
	static keel_rwlock_t rrw = KEEL_RWLOCK_INIT_FLAGS(6, "rtable",
							  KEEL_LOCK_RECURSIVE);
	static keel_mutex_t low = KEEL_MUTEX_INIT(2, "rw-low");
	harness_capture cap;

	report_mode();
	keel_rwlock_rdlock(&rw);
	keel_mutex_lock(&low);
	keel_mutex_unlock(&low);
	keel_rwlock_unlock(&rw);
	keel_rwlock_wrlock(&rw);
	keel_rwlock_unlock(&rw);
	keel_rwlock_rdlock(&rrw);
	keel_rwlock_rdlock(&rrw); /* allowed: recursive */
	keel_rwlock_unlock(&rrw);
	keel_rwlock_unlock(&rrw);
	CHECK_EQ(new_reports(), 0);
	capture_begin(&cap);
	keel_rwlock_rdlock(&rw);
	keel_rwlock_rdlock(&rw); /* a reader again: can deadlock */
	keel_rwlock_unlock(&rw);
	keel_rwlock_unlock(&rw);
	keel_mutex_lock(&low);
	keel_rwlock_wrlock(&rw); /* level 6 under level 2 */
	keel_rwlock_unlock(&rw);
	keel_mutex_unlock(&low);
	capture_end(&cap);
	CHECK_EQ(new_reports(), 2);
	CHECK_SAID(&cap, "lock taken again by its holder: taking 'table'");
	CHECK_SAID(&cap, "lock order violation: taking 'table' (level 6)");
	CHECK_EQ(keel__locks.depth, 0);
	CHECK_OK(keel_rwlock_destroy(&rw));
}

/* ---- Asserts and integration ---- */

TEST(asserts_check_the_owner)
{
	static keel_mutex_t m = KEEL_MUTEX_INIT(5, "asserted");
	static keel_mutex_t na = KEEL_MUTEX_INIT_FLAGS(5, "no-alloc",
						       KEEL_LOCK_NOALLOC);
	harness_capture cap;

	report_mode();
	keel_mutex_lock(&m);
	keel_mutex_assert_held(&m);
	keel_mutex_unlock(&m);
	keel_assert_no_locks();
	keel_assert_may_alloc();
	CHECK_EQ(new_reports(), 0);
	capture_begin(&cap);
	keel_mutex_assert_held(&m);
	keel_mutex_lock(&na);
	keel_assert_may_alloc();
	keel_assert_no_locks();
	keel_mutex_unlock(&na);
	capture_end(&cap);
	CHECK_EQ(new_reports(), 3);
	CHECK_SAID(&cap, "does not hold the lock: 'asserted'");
	CHECK_SAID(&cap, "allocation while holding a no-alloc lock: 'no-alloc'");
	CHECK_SAID(&cap, "assertion failed: locks are held");
}

static keel_mutex_t serve_lock = KEEL_MUTEX_INIT(3, "serving-under");

static int end_holding(void *arg)
{
	(void)arg;
	keel_mutex_lock(&serve_lock);
	return 0; /* ends with the lock held */
}

TEST(serving_or_ending_while_holding_is_reported)
{
	harness_capture cap;
	keel_scope_t *s;
	keel_task_t t;

	report_mode();
	capture_begin(&cap);
	keel_mutex_lock(&serve_lock);
	CHECK_RC(keel_serve(0), -ETIMEDOUT);
	keel_mutex_unlock(&serve_lock);
	CHECK_OK(keel_scope_open(&s, NULL));
	CHECK_OK(keel_spawn(s, end_holding, NULL,
			    &(keel_spawn_opts){.name = "sloppy"}, &t));
	CHECK_OK(keel_join(t, NULL, KEEL_FOREVER));
	CHECK_OK(keel_scope_close(s));
	capture_end(&cap);
	CHECK_SAID(&cap, "keel_serve() while holding a lock");
	CHECK_SAID(&cap, "a task ended holding a lock: 'serving-under'");
	CHECK_SAID(&cap, "thread 'sloppy'");
}

/* ---- 6. The graph ---- */

TEST(graph_exports_exactly_the_observed_edges)
{
	keel_mutex_t top, mid, bottom, spare;
	char buf[32768], *p;
	FILE *f;
	int edges = 0;

	report_mode();
	CHECK_OK(keel_mutex_init(&top, 30, "g-top", 0));
	CHECK_OK(keel_mutex_init(&mid, 20, "g-mid", 0));
	CHECK_OK(keel_mutex_init(&bottom, 10, "g-bottom", 0));
	CHECK_OK(keel_mutex_init(&spare, 15, "g-spare", 0));
	keel_mutex_lock(&top);
	keel_mutex_lock(&mid);
	keel_mutex_lock(&bottom);
	keel_mutex_unlock(&bottom);
	keel_mutex_unlock(&mid);
	keel_mutex_lock(&bottom); /* a second edge from top */
	keel_mutex_unlock(&bottom);
	keel_mutex_unlock(&top);
	f = fmemopen(buf, sizeof buf, "w");
	CHECK_OK(keel_lockgraph_write(f, KEEL_FORMAT_JSON));
	fclose(f);
	for (p = buf; (p = strstr(p, "\"from\"")) != NULL; p++)
		edges++;
	/* top->mid, mid->bottom, top->bottom: nothing else (this test's
	 * process has no other locks). */
	CHECK_EQ(edges, 3);
	CHECK(contains(buf, "\"name\": \"g-spare\", \"level\": 15, \"taken\": false"));
	CHECK(contains(buf, "\"name\": \"g-top\", \"level\": 30, \"taken\": true"));
	f = fmemopen(buf, sizeof buf, "w");
	CHECK_OK(keel_lockgraph_write(f, KEEL_FORMAT_DOT));
	fclose(f);
	CHECK(strncmp(buf, "digraph keel_locks {", 20) == 0);
	CHECK(contains(buf, "color=grey")); /* g-spare, never taken */
	CHECK_RC(keel_lockgraph_write(NULL, KEEL_FORMAT_DOT), -EINVAL);
	CHECK_RC(keel_lockgraph_write(stdout, 7), -EINVAL);
}

TEST(policy_off_checks_nothing)
{
	static keel_mutex_t lo = KEEL_MUTEX_INIT(1, "off-lo");
	static keel_mutex_t hi = KEEL_MUTEX_INIT(2, "off-hi");

	report_mode();
	CHECK_EQ(keel_lockcheck_set(KEEL_LOCKCHECK_OFF), KEEL_LOCKCHECK_REPORT);
	keel_mutex_lock(&lo);
	keel_mutex_lock(&hi);
	keel_mutex_unlock(&hi);
	keel_mutex_unlock(&lo);
	CHECK_EQ(new_reports(), 0);
	CHECK_RC(keel_lockcheck_set(9), -EINVAL);
}

/* ---- The graph's formats ---- */

/* A JSON syntax check (RFC 8259 values): the end of the value, or NULL. */
static const char *json_ws(const char *p)
{
	while (*p == ' ' || *p == '\n' || *p == '\t' || *p == '\r')
		p++;
	return p;
}

static const char *json_value(const char *p);

static const char *json_string(const char *p)
{
	if (*p++ != '"')
		return NULL;
	for (; *p && *p != '"'; p++) {
		if ((unsigned char)*p < 0x20)
			return NULL;
		if (*p == '\\') {
			p++;
			if (*p == 'u') {
				for (int i = 1; i <= 4; i++)
					if (!strchr("0123456789abcdefABCDEF",
						    p[i]) || !p[i])
						return NULL;
				p += 4;
			} else if (!*p || !strchr("\"\\/bfnrt", *p)) {
				return NULL;
			}
		}
	}
	return *p == '"' ? p + 1 : NULL;
}

static const char *json_container(const char *p, char close, int keys)
{
	p = json_ws(p + 1);
	if (*p == close)
		return p + 1;
	for (;;) {
		if (keys) {
			if (!(p = json_string(json_ws(p))))
				return NULL;
			p = json_ws(p);
			if (*p++ != ':')
				return NULL;
		}
		if (!(p = json_value(p)))
			return NULL;
		p = json_ws(p);
		if (*p == close)
			return p + 1;
		if (*p++ != ',')
			return NULL;
	}
}

static const char *json_value(const char *p)
{
	p = json_ws(p);
	if (*p == '{')
		return json_container(p, '}', 1);
	if (*p == '[')
		return json_container(p, ']', 0);
	if (*p == '"')
		return json_string(p);
	if (strncmp(p, "true", 4) == 0)
		return p + 4;
	if (strncmp(p, "false", 5) == 0)
		return p + 5;
	if (strncmp(p, "null", 4) == 0)
		return p + 4;
	if (*p == '-' || (*p >= '0' && *p <= '9')) {
		char *end;

		strtod(p, &end);
		return end > p ? end : NULL;
	}
	return NULL;
}

static int json_valid(const char *text)
{
	const char *end = json_value(text);

	return end && *json_ws(end) == '\0';
}

static void make_some_order(void)
{
	static keel_mutex_t a = KEEL_MUTEX_INIT(9, "quote\"and\\slash");
	static keel_mutex_t b = KEEL_MUTEX_INIT(5, "b");
	static keel_mutex_t c = KEEL_MUTEX_INIT(0, "learned");

	keel_mutex_lock(&a);
	keel_mutex_lock(&b);
	keel_mutex_lock(&c);
	keel_mutex_unlock(&c);
	keel_mutex_unlock(&b);
	keel_mutex_unlock(&a);
	keel_mutex_lock(&b);
	keel_mutex_lock(&a); /* a violation: red in the graph */
	keel_mutex_unlock(&a);
	keel_mutex_unlock(&b);
}

TEST(graph_json_parses)
{
	char buf[32768];
	FILE *f;

	report_mode();
	make_some_order();
	f = fmemopen(buf, sizeof buf, "w");
	CHECK_OK(keel_lockgraph_write(f, KEEL_FORMAT_JSON));
	fclose(f);
	printf("%s", buf);
	CHECK(json_valid(buf));
	CHECK(contains(buf, "\"violation\": true"));
	CHECK(contains(buf, "quote\\\"and\\\\slash"));
	/* The checker itself rejects broken text. */
	CHECK(!json_valid("{\"a\": [1, 2,]}"));
	CHECK(!json_valid("{\"a\" 1}"));
}

TEST(graph_dot_renders_with_graphviz)
{
	char path[] = "/tmp/keel-lockgraph-XXXXXX", cmd[256];
	FILE *f;
	int fd;

	HARNESS_NEED(HOST_FILES); /* dot reads the file the program wrote */
	if (system("command -v dot >/dev/null 2>&1") != 0)
		harness_skip("Graphviz's dot is not installed");
	report_mode();
	make_some_order();
	CHECK((fd = mkstemp(path)) >= 0);
	f = fdopen(fd, "w");
	CHECK_OK(keel_lockgraph_write(f, KEEL_FORMAT_DOT));
	fclose(f);
	snprintf(cmd, sizeof cmd, "dot -Tsvg %s -o %s.svg", path, path);
	CHECK_EQ(system(cmd), 0);
	snprintf(cmd, sizeof cmd, "grep -q '<svg' %s.svg", path);
	CHECK_EQ(system(cmd), 0);
	unlink(path);
	snprintf(cmd, sizeof cmd, "%s.svg", path);
	unlink(cmd);
}
