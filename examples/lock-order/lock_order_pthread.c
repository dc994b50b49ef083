/*
 * lock-order-pthread: lock-order's twin, written with plain pthreads and
 * nothing of keel, as an existing program would be: the same small bank,
 * the same latent ABBA deadlock that does not happen on this run. Run it
 * under keel-lockcheck and the cycle is reported anyway, before the
 * second teller would block, with the stacks of both orders:
 *
 *     keel-lockcheck -- ./lock-order-pthread
 *
 * Each account has its own mutex; transfer(from, to) takes the source
 * account's, then the destination's. Accounts are found through the
 * registry, whose mutex is held only for the lookup; under the account
 * mutexes the audit log's mutex guards the log. The first teller moves
 * money from alice to bob, the second, once the first has finished, from
 * bob to alice: they never overlap, so nothing deadlocks, but had they
 * overlapped each could have held one account and waited for the other
 * for ever.
 *
 * Built with -rdynamic, so that the checker can name the accounts (the
 * variables `alice` and `bob`) and the functions in its report;
 * `keel-lockcheck --symbolize` adds file:line.
 */
#include <pthread.h>
#include <stdio.h>
#include <string.h>

struct account {
	const char *owner;
	long balance;
	pthread_mutex_t lock;
};

pthread_mutex_t registry = PTHREAD_MUTEX_INITIALIZER;
pthread_mutex_t audit = PTHREAD_MUTEX_INITIALIZER;
static long audit_entries;

struct account alice = {"alice", 100, PTHREAD_MUTEX_INITIALIZER};
struct account bob = {"bob", 100, PTHREAD_MUTEX_INITIALIZER};
static struct account *accounts[] = {&alice, &bob};

static struct account *lookup(const char *owner)
{
	struct account *found = NULL;

	pthread_mutex_lock(&registry);
	for (size_t i = 0; i < sizeof accounts / sizeof accounts[0]; i++)
		if (strcmp(accounts[i]->owner, owner) == 0)
			found = accounts[i];
	pthread_mutex_unlock(&registry);
	return found;
}

static void record(const struct account *from, const struct account *to,
		   long amount)
{
	pthread_mutex_lock(&audit);
	audit_entries++;
	printf("  audit: %s -> %s: %ld\n", from->owner, to->owner, amount);
	pthread_mutex_unlock(&audit);
}

/* The latent bug: the lock order depends on the direction of the
 * transfer. (The fix: take the two account locks in one global order,
 * for instance by account number.) */
void transfer(const char *payer, const char *payee, long amount);

void transfer(const char *payer, const char *payee, long amount)
{
	struct account *from = lookup(payer), *to = lookup(payee);

	pthread_mutex_lock(&from->lock);
	pthread_mutex_lock(&to->lock);
	from->balance -= amount;
	to->balance += amount;
	record(from, to, amount);
	pthread_mutex_unlock(&to->lock);
	pthread_mutex_unlock(&from->lock);
}

/* Not static: exported (-rdynamic), the report names them. */
void *teller_alice_to_bob(void *arg);
void *teller_bob_to_alice(void *arg);

void *teller_alice_to_bob(void *arg)
{
	(void)arg;
	transfer("alice", "bob", 30);
	return NULL;
}

void *teller_bob_to_alice(void *arg)
{
	(void)arg;
	transfer("bob", "alice", 10);
	return NULL;
}

/* One teller at a time: start it and wait for it before the next. */
static int run_teller(void *(*fn)(void *))
{
	pthread_t t;

	if (pthread_create(&t, NULL, fn, NULL) != 0)
		return -1;
	return pthread_join(t, NULL) == 0 ? 0 : -1;
}

int main(void)
{
	printf("teller 1 moves 30 from alice to bob:\n");
	fflush(stdout);
	if (run_teller(teller_alice_to_bob) < 0)
		return 1;
	printf("teller 2, later, moves 10 from bob to alice:\n");
	fflush(stdout);
	if (run_teller(teller_bob_to_alice) < 0)
		return 1;
	printf("balances: alice %ld, bob %ld; %ld audit entries\n",
	       alice.balance, bob.balance, audit_entries);
	return alice.balance + bob.balance == 200 ? 0 : 1;
}
