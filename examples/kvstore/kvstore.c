/*
 * kvstore: one task owns a store; other tasks call into it; the owner
 * shuts down while calls are in flight, and no caller is left hanging.
 *
 * The store is a plain single-threaded table: only its owner task touches
 * it, so it needs no lock. Clients reach it with keel_call(), passing the
 * request on their own stacks. Part-way through, the owner closes its
 * mailbox and exits. Every call then ends one of two ways: answered (0),
 * or refused or cancelled (-ESHUTDOWN / -ESRCH), never stuck. At the end
 * the demo checks the tally: every call accounted for, and every write
 * that was answered is in the store.
 */
#define _POSIX_C_SOURCE 200809L
#include <keel.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>

#define CLIENTS 4
#define CALLS_PER_CLIENT 50000
#define SERVE_BEFORE_SHUTDOWN 60000
#define KEYS 4096

/* The store: owned by one task, touched by no other thread. */
static struct {
	long value[KEYS];
	long writes;
} store;

static keel_task_t store_task;
static pthread_barrier_t store_ready;

struct request {
	int key;
	long value; /* in: the value to add; out: the new value */
};

static void add_to_key(void *arg)
{
	struct request *r = arg;

	store.value[r->key] += r->value;
	store.writes++;
	r->value = store.value[r->key];
}

static void *store_main(void *arg)
{
	long served = 0;

	(void)arg;
	keel_set_name("store");
	store_task = keel_self();
	pthread_barrier_wait(&store_ready);
	while (served < SERVE_BEFORE_SHUTDOWN) {
		int n = keel_serve(KEEL_FOREVER);

		if (n < 0) {
			fprintf(stderr, "store: serve: %s\n", keel_strerror(n));
			exit(1);
		}
		served += n;
	}
	/* Shut down with clients still calling: queued calls are cancelled
	 * (their callers get -ESHUTDOWN), later ones are refused. */
	keel_mailbox_close();
	printf("store: served %ld calls, then shut down\n", served);
	return NULL;
}

struct client {
	pthread_t th;
	unsigned seed;
	long answered, shut_down, gone, added;
};

static void *client_main(void *arg)
{
	struct client *c = arg;
	keel_task_t store_id = store_task;

	for (int i = 0; i < CALLS_PER_CLIENT; i++) {
		struct request r = {(int)(rand_r(&c->seed) % KEYS), 1};
		int rc = keel_call(store_id, add_to_key, &r, KEEL_FOREVER);

		if (rc == 0) {
			c->answered++;
			c->added += 1;
		} else if (rc == -ESHUTDOWN) {
			c->shut_down++; /* cancelled in the queue, or refused */
		} else if (rc == -ESRCH) {
			c->gone++; /* the store task has ended */
		} else {
			fprintf(stderr, "client: %s\n", keel_strerror(rc));
			exit(1);
		}
	}
	return NULL;
}

int main(void)
{
	struct client clients[CLIENTS] = {0};
	pthread_t store_th;
	long answered = 0, shut = 0, gone = 0, added = 0, in_store = 0;

	pthread_barrier_init(&store_ready, NULL, 2);
	pthread_create(&store_th, NULL, store_main, NULL);
	pthread_barrier_wait(&store_ready);
	for (int i = 0; i < CLIENTS; i++) {
		clients[i].seed = (unsigned)i + 1;
		pthread_create(&clients[i].th, NULL, client_main, &clients[i]);
	}
	for (int i = 0; i < CLIENTS; i++) {
		pthread_join(clients[i].th, NULL);
		answered += clients[i].answered;
		shut += clients[i].shut_down;
		gone += clients[i].gone;
		added += clients[i].added;
	}
	pthread_join(store_th, NULL);
	for (int k = 0; k < KEYS; k++)
		in_store += store.value[k];

	printf("calls made:      %d\n", CLIENTS * CALLS_PER_CLIENT);
	printf("  answered:      %ld\n", answered);
	printf("  -ESHUTDOWN:    %ld (store shutting down)\n", shut);
	printf("  -ESRCH:        %ld (store task ended)\n", gone);
	printf("writes answered: %ld, found in the store: %ld\n", added,
	       in_store);
	if (answered + shut + gone != CLIENTS * CALLS_PER_CLIENT ||
	    added != in_store ||
	    store.writes != answered) {
		printf("FAILED: a call was lost\n");
		return 1;
	}
	printf("ok: every call got its answer or an error; nothing lost\n");
	return 0;
}
