/*
 * msg.c: the message record table and its allocator.
 *
 * DESIGN
 * Records live in a table of chunks that only grows, like task slots: a
 * record is never freed, only recycled, so a stale pointer or ctx handle
 * always names memory that is a record (whose generation then tells that it
 * is stale). Each record knows its index.
 *
 * Allocation never takes a lock on the common path. Each thread keeps a
 * LIFO cache of up to one batch of free records; a post allocates on the
 * sender's thread and frees on the target's, so records drift from senders
 * to receivers. An empty cache takes a batch from a global pool or carves
 * a new one out of the table; both take the pool lock once per batch.
 *
 * A record freed while the cache is full goes back to its home: the batch
 * of MSG_CACHE_BATCH records carved together, side by side in the table.
 * The freeing thread gathers records by home, MSG_HOMES homes at a time,
 * and gives a home back to the pool when all its records are in (or, when
 * another home turns up and all places are taken, the part it has of one
 * of them, each in turn). So what the pool
 * hands out is a run of neighbouring records, as a fresh carving is.
 * Without this, a target of two senders freed their records interleaved,
 * the batches it gave back went to the senders and came back interleaved
 * again, and after some rounds a batch was records from all over the
 * table: with a deep queue, where a record has left the cache by the time
 * it is used again, every post and every run then paid cache and TLB
 * misses that a run of neighbours lets the prefetcher hide (a two-sender
 * bench went from about 30 to 150-300 ns a message over 20 repetitions;
 * now it stays at 25-50). A thread's records go back to the pool when it
 * exits.
 *
 * While free, a record's `next` links it in its cache or batch (it is the
 * queue link otherwise, and both uses stay in the record's first cache
 * line, the only one a post touches); a batch's first record keeps the
 * batch's length in `caller_id` and the next batch in `oprev`.
 */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define MSG_CHUNK_SHIFT 10
#define MSG_CHUNK ((uint32_t)1 << MSG_CHUNK_SHIFT)
#define MSG_MAX_CHUNKS ((uint32_t)1 << (24 - MSG_CHUNK_SHIFT))

static _Atomic(struct keel__msg *) msg_chunks[MSG_MAX_CHUNKS];
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;
static uint32_t msg_count;         /* records carved so far */
static struct keel__msg *batches;  /* global pool, under pool_lock */

struct keel__msg *keel__msg_at(uint32_t idx)
{
	struct keel__msg *chunk;

	if (idx >> MSG_CHUNK_SHIFT >= MSG_MAX_CHUNKS)
		return NULL;
	/* Pairs with the release in carve(). */
	chunk = load_acquire(&msg_chunks[idx >> MSG_CHUNK_SHIFT]);
	return chunk ? &chunk[idx & (MSG_CHUNK - 1)] : NULL;
}

/* Under pool_lock: a new batch of never-used records, or NULL. */
static struct keel__msg *carve(uint32_t *n)
{
	struct keel__msg *c, *head = NULL;
	uint32_t first = msg_count;

	if (first >> MSG_CHUNK_SHIFT >= MSG_MAX_CHUNKS)
		return NULL;
	c = load_relaxed(&msg_chunks[first >> MSG_CHUNK_SHIFT]);
	if (!c) {
		size_t bytes = sizeof(struct keel__msg) * MSG_CHUNK;

		if (!(c = aligned_alloc(KEEL_CACHELINE, bytes)))
			return NULL;
		memset(c, 0, bytes);
		for (uint32_t i = 0; i < MSG_CHUNK; i++) {
			c[i].idx = first + i;
			/* Generation 1: no ctx handle is ever NULL. */
			atomic_init(&c[i].state,
				    (uint64_t)1 << MSG_STATE_BITS | ST_FREE);
		}
		store_release(&msg_chunks[first >> MSG_CHUNK_SHIFT], c);
	}
	/* MSG_CHUNK is a multiple of the batch: a batch never spans chunks. */
	for (uint32_t i = MSG_CACHE_BATCH; i-- > 0;) {
		struct keel__msg *m = &c[(first + i) & (MSG_CHUNK - 1)];

		store_relaxed(&m->next, head);
		head = m;
	}
	msg_count += MSG_CACHE_BATCH;
	*n = MSG_CACHE_BATCH;
	return head;
}

struct keel__msg *keel__msg_refill(void)
{
	struct keel__msg *b;
	uint32_t n;

	keel__tls_register();
	pthread_mutex_lock(&pool_lock);
	if ((b = batches) != NULL) {
		batches = b->oprev;
		n = (uint32_t)b->caller_id;
	} else {
		b = carve(&n);
	}
	pthread_mutex_unlock(&pool_lock);
	if (!b)
		return NULL;
	keel__tls.cache = load_relaxed(&b->next);
	keel__tls.ncache = n - 1;
	return b;
}

static void give_back(struct keel__msg *head, uint32_t n)
{
	head->caller_id = n;
	pthread_mutex_lock(&pool_lock);
	head->oprev = batches;
	batches = head;
	pthread_mutex_unlock(&pool_lock);
}

void keel__msg_free_home(struct keel__msg *m)
{
	struct keel__tls *tls = &keel__tls;
	uint32_t home = m->idx / MSG_CACHE_BATCH;
	struct keel__msg_home *h = NULL;

	for (int i = 0; i < MSG_HOMES; i++)
		if (tls->homes[i].n && tls->homes[i].home == home) {
			h = &tls->homes[i];
			break;
		}
	if (!h) {
		for (int i = 0; i < MSG_HOMES && !h; i++)
			if (!tls->homes[i].n)
				h = &tls->homes[i];
		if (!h) { /* all taken: give one back as it is */
			h = &tls->homes[tls->home_next++ % MSG_HOMES];
			give_back(h->head, h->n);
			h->n = 0;
		}
		h->home = home;
	}
	store_relaxed(&m->next, h->n ? h->head : NULL);
	h->head = m;
	if (++h->n == MSG_CACHE_BATCH) {
		give_back(h->head, h->n);
		h->n = 0;
	}
}

void keel__msg_flush(void)
{
	struct keel__tls *tls = &keel__tls;

	if (tls->ncache) {
		give_back(tls->cache, tls->ncache);
		tls->cache = NULL;
		tls->ncache = 0;
	}
	for (int i = 0; i < MSG_HOMES; i++)
		if (tls->homes[i].n) {
			give_back(tls->homes[i].head, tls->homes[i].n);
			tls->homes[i].n = 0;
		}
}

void keel__msg_fork(int phase)
{
	if (phase == 0)
		pthread_mutex_lock(&pool_lock);
	else
		pthread_mutex_unlock(&pool_lock);
}
