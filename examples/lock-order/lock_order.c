/*
 * lock-order: a latent ABBA deadlock that does not happen on this run, and
 * keel reporting it anyway.
 *
 * A small bank. Each account has its own lock; transfer(from, to) takes
 * the source account's lock, then the destination's. The account locks
 * have no declared level (they are all alike, so a level could not order
 * them): keel learns the order they are taken in. Accounts are found
 * through the bank's registry, whose lock (level 20) is held only for the
 * lookup; under the account locks, the audit log's lock (level 1, a leaf:
 * nothing is taken under it) guards the log.
 *
 * Two tellers run one after the other: the first moves money from alice
 * to bob, the second, later, from bob to alice. Nothing deadlocks, because
 * they never overlap; but had they overlapped, each could have held one
 * account and waited for the other forever. keel reports the cycle the
 * moment the second teller takes bob's lock and then reaches for alice's,
 * before it blocks, with the site of every edge. The program then writes
 * the lock graph: declared levels and every order observed, the edge that
 * closed the cycle in red.
 *
 *     lock-order [graph.dot [graph.json]]
 *
 * The report policy is set so the program carries on after the report
 * (the default, abort, would stop it there). It exits 0 when exactly one
 * report was made, so it is also a test.
 */
#include <keel.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct account {
	const char *owner;
	long balance;
	keel_mutex_t lock;
};

static keel_mutex_t registry = KEEL_MUTEX_INIT(20, "bank.registry");
static keel_mutex_t audit = KEEL_MUTEX_INIT_FLAGS(1, "audit.log",
						  KEEL_LOCK_LEAF);
static long audit_entries;

static struct account alice = {"alice", 100, KEEL_MUTEX_INIT(0, "account:alice")};
static struct account bob = {"bob", 100, KEEL_MUTEX_INIT(0, "account:bob")};
static struct account *accounts[] = {&alice, &bob};

static struct account *lookup(const char *owner)
{
	struct account *found = NULL;

	keel_mutex_lock(&registry);
	for (size_t i = 0; i < sizeof accounts / sizeof accounts[0]; i++)
		if (strcmp(accounts[i]->owner, owner) == 0)
			found = accounts[i];
	keel_mutex_unlock(&registry);
	return found;
}

static void record(const struct account *from, const struct account *to,
		   long amount)
{
	keel_mutex_lock(&audit);
	audit_entries++;
	printf("  audit: %s -> %s: %ld\n", from->owner, to->owner, amount);
	keel_mutex_unlock(&audit);
}

/* The latent bug: the lock order depends on the direction of the
 * transfer. (The fix: take the two account locks in one global order,
 * for instance by account number, or both at once with
 * keel_mutex_lock2() after giving them one level.) */
static void transfer(const char *payer, const char *payee, long amount)
{
	struct account *from = lookup(payer), *to = lookup(payee);

	keel_mutex_lock(&from->lock);
	keel_mutex_lock(&to->lock);
	from->balance -= amount;
	to->balance += amount;
	record(from, to, amount);
	keel_mutex_unlock(&to->lock);
	keel_mutex_unlock(&from->lock);
}

static int teller_alice_to_bob(void *arg)
{
	(void)arg;
	transfer("alice", "bob", 30);
	return 0;
}

static int teller_bob_to_alice(void *arg)
{
	(void)arg;
	transfer("bob", "alice", 10);
	return 0;
}

static int write_graph(const char *path, int format)
{
	FILE *f = fopen(path, "w");
	int rc;

	if (!f) {
		perror(path);
		return -1;
	}
	rc = keel_lockgraph_write(f, format);
	if (fclose(f) != 0 || rc < 0) {
		fprintf(stderr, "lock-order: writing %s failed\n", path);
		return -1;
	}
	printf("wrote the lock graph to %s\n", path);
	return 0;
}

/* One teller at a time: spawn it and wait for it before the next. */
static int run_teller(keel_scope_t *s, keel_fn fn, const char *name)
{
	keel_spawn_opts o = {.name = name};
	keel_task_t t;
	int rc, status;

	if ((rc = keel_spawn(s, fn, NULL, &o, &t)) < 0 ||
	    (rc = keel_join(t, &status, KEEL_FOREVER)) < 0) {
		fprintf(stderr, "lock-order: %s: %s\n", name, keel_strerror(rc));
		return -1;
	}
	return status;
}

int main(int argc, char **argv)
{
	const char *dot = argc > 1 ? argv[1] : "lock-order.dot";
	const char *json = argc > 2 ? argv[2] : NULL;
	keel_scope_t *s;
	unsigned long reports;
	int rc;

	keel_lockcheck_set(KEEL_LOCKCHECK_REPORT);
	if ((rc = keel_scope_open(&s, NULL)) < 0) {
		fprintf(stderr, "lock-order: %s\n", keel_strerror(rc));
		return 1;
	}
	printf("teller 1 moves 30 from alice to bob:\n");
	fflush(stdout);
	if (run_teller(s, teller_alice_to_bob, "teller-1") != 0)
		return 1;
	printf("teller 2, later, moves 10 from bob to alice:\n");
	fflush(stdout);
	if (run_teller(s, teller_bob_to_alice, "teller-2") != 0)
		return 1;
	keel_scope_close(s);

	reports = keel_lockcheck_reports();
	printf("balances: alice %ld, bob %ld; %ld audit entries; "
	       "%lu lock report%s\n",
	       alice.balance, bob.balance, audit_entries, reports,
	       reports == 1 ? "" : "s");
	if (write_graph(dot, KEEL_FORMAT_DOT) < 0 ||
	    (json && write_graph(json, KEEL_FORMAT_JSON) < 0))
		return 1;
	if (reports != 1 || alice.balance + bob.balance != 200) {
		printf("FAILED: expected exactly one report (the cycle)\n");
		return 1;
	}
	printf("ok: no deadlock on this run, and keel reported the one that "
	       "could have happened\n");
	return 0;
}
