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
 * LIFO cache of free records; a post allocates on the sender's thread and
 * frees on the target's, so records drift from senders to receivers. An
 * empty cache takes a batch from a global pool or carves a new one out of
 * the table; both take the pool lock once per batch.
 *
 * A record freed while the cache holds MSG_CACHE_BATCH goes back to its
 * home: the MSG_HOME records of its chunk, side by side in the table.
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
 * HOW MUCH A THREAD TAKES. A refill takes MSG_CACHE_BATCH records, or, if
 * the thread's last refill was less than keel__msg_stream_ns (1 ms) ago,
 * twice what that one took, up to a home; a batch longer than that is cut
 * and the rest goes back to the pool. So a thread that sends now and then
 * holds at most 64 free records, and a thread that streams takes whole
 * homes: its messages follow each other through 1024 neighbouring
 * records. That is for the owner of a deep queue. With homes of 64 the
 * queue was runs of 64 in an order the pool had shuffled (a sender took
 * the batch the owner had just given back, then an older one, ...): an
 * owner that fell behind its sender ran 15 to 19 ns a message even after
 * the sender had stopped, against 6 to 10 for a queue in carving order,
 * and never caught up while the sender ran. With homes of a chunk and
 * streaming senders taking them whole, the queue is runs of 1024, and
 * the owner keeps up or catches up (docs/performance.md).
 *
 * While free, a record's `next` links it in its cache or batch (it is the
 * queue link otherwise); a batch's first record keeps the batch's length
 * in `batch_n` and the next batch in `batch_next`. All three are in the
 * record's line 0, the only line a post touches: a chunk keeps its
 * records' line 0s in its first half and their line 1s (what calls use)
 * in its second (internal.h), so posts alone never fault the second half
 * in. With the two lines of a record side by side, a stream of posts
 * moved 128 bytes a message through memory for 64 it used.
 *
 * GIVING MEMORY BACK
 * A burst (a consumer that fell behind by a million messages) would leave
 * the table at its high-water mark for good. But a producer that floods
 * again and again must not pay page faults for memory given back in
 * between (a saturated 1p1c run re-faulted ~40,000 pages a repetition and
 * ran at twice the cost when the pool was trimmed as soon as it grew). So
 * memory goes back when it has stayed unused for a while, as allocators'
 * decay does: the pool tracks its low-water mark (`pool_low`, the fewest
 * free records it held) over an epoch of at least `keel__msg_decay_ns`
 * (10 s); records that stayed free through a whole epoch were not needed,
 * and at the epoch's end (seen by a give_back, every few of them) those
 * beyond MSG_POOL_KEEP go back, if there are more than `trim_at`. With an
 * epoch of 1 s, floods a second or two apart (the benchmark's) found
 * their memory gone each time: up to 25,000 page faults a repetition, and
 * 1p1c's median of six runs 13.8 ns a message against 10.7 with 10 s.
 *
 * The trim takes the whole pool out (under pool_lock), counts its records
 * per chunk outside the lock, picks the chunks all of whose records are
 * in it (none is in use or in any cache then), the highest first, up to
 * the surplus, and puts the rest back as batches. The picked chunks'
 * pages go back to the system (keel__pages_release) but stay mapped: a
 * stale ctx reads zeros there (no target: -ESTALE), never a hole, so the
 * table stays type-stable. Such a chunk is carved again, before any new
 * one, with every record's generation above the highest it had, so no
 * stale ctx can match a record reborn there. trim_at is then twice what
 * was kept (at least 2 * MSG_POOL_KEEP), so the walks cost O(1) per freed
 * record amortised, and it comes down again as the pool empties. Records
 * freed in FIFO order (a queue drained) free whole chunks in order, which
 * is the case that matters; a pool fragmented by long-lived records keeps
 * what it cannot release and only raises trim_at.
 *
 * The checks ride on give_backs: a burst's records, freed during one
 * epoch, have stayed free through the whole of the next one when a
 * give_back after it sees that, so its memory goes back within about 20
 * seconds once messages flow again (10^6 records queued and drained: RSS
 * 127 MB, then 5.6 MB), never while the program is wholly idle.
 */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define MSG_CHUNK ((uint32_t)1 << MSG_CHUNK_SHIFT)
/* The last chunk is never carved: a mailbox's tail word names its stub by
 * the index MSG_IDX_STUB (mailbox.c), which no record may have. */
#define MSG_MAX_CHUNKS_BITS                                                 \
	(((uint32_t)1 << (MSG_IDX_BITS - MSG_CHUNK_SHIFT)) - 1)
/* Nor those of registered keel_msg_t's (CALLER-OWNED MESSAGES). */
#define MSG_MAX_CHUNKS                                                      \
	(MSG_MAX_CHUNKS_BITS < (MSG_IDX_FOREIGN >> MSG_CHUNK_SHIFT)          \
		 ? MSG_MAX_CHUNKS_BITS                                       \
		 : (MSG_IDX_FOREIGN >> MSG_CHUNK_SHIFT))
_Static_assert(MSG_MAX_CHUNKS << MSG_CHUNK_SHIFT <= MSG_IDX_FOREIGN,
	       "a record index would collide with a keel_msg_t's or the stub's");

/* Free records the pool keeps at least, before giving memory back. */
#ifndef KEEL_MSG_POOL_KEEP
#define KEEL_MSG_POOL_KEEP (8 * MSG_CHUNK)
#endif
#define MSG_POOL_KEEP ((uint32_t)(KEEL_MSG_POOL_KEEP))
/* A chunk: its records' line 0s, then their line 1s (internal.h). */
#define MSG_CHUNK_BYTES (2 * sizeof(struct keel__msg) * MSG_CHUNK)

/* The chunks carved so far; read by keel__msg_at() (internal.h). */
_Atomic(struct keel__msg *) keel__msg_chunks[MSG_MAX_CHUNKS];
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;
static uint32_t msg_count;         /* records carved so far */
static struct keel__msg *batches;  /* global pool, under pool_lock */
/* Under pool_lock: records in the pool, the count that starts a trim, and
 * whether one runs. */
static uint32_t pool_free;
static uint32_t trim_at = 2 * MSG_POOL_KEEP;
static int trimming;
/* Under pool_lock: the epoch's start, its low-water mark of pool_free,
 * and records given back since the clock was last read. */
static keel_time_t epoch_start;
static uint32_t pool_low;
static uint32_t epoch_ticks;
/* The epoch's length; tests set 0 (trim as soon as the pool grows). */
_Atomic keel_time_t keel__msg_decay_ns = KEEL_SEC(10);
/* How soon a refill must follow the thread's last to take twice as much
 * (HOW MUCH A THREAD TAKES); tests set it. */
_Atomic keel_time_t keel__msg_stream_ns = KEEL_MS(1);
/* Chunks whose pages were given back, to carve again first (a stack,
 * under pool_lock), and per chunk the highest generation its records had
 * (written by the trimmer before the chunk is on the stack). */
static uint16_t released[MSG_MAX_CHUNKS];
static uint32_t nreleased;
static uint64_t released_gen[MSG_MAX_CHUNKS];
/* The same for ctx generations (proxy.c, CTX HANDLES). */
static uint64_t released_ctx_gen[MSG_MAX_CHUNKS];
/* The trimmer's per-chunk counts and the chunks it picked (only one trim
 * runs at a time). */
static uint16_t trim_count[MSG_MAX_CHUNKS];
static uint16_t picked[MSG_MAX_CHUNKS];
/* Tests: chunks given back so far. */
_Atomic uint64_t keel__msg_chunks_released;

struct keel__msg *keel__msg_at_checked(uint32_t idx)
{
	if (idx >> MSG_CHUNK_SHIFT >= MSG_MAX_CHUNKS)
		return NULL;
	return keel__msg_at(idx);
}

/* Under pool_lock: put a batch of n records, linked by next, in the pool. */
static void pool_push(struct keel__msg *head, uint32_t n)
{
	head->batch_n = n;
	head->batch_next = batches;
	batches = head;
	pool_free += n;
}

/* Under pool_lock: carve a chunk whose pages were given back again. Its
 * records read as zeros: each gets its index and a generation above any it
 * had. All but the first batch go to the pool; returns that one. */
static struct keel__msg *carve_released(uint32_t *n)
{
	uint32_t ci = released[--nreleased];
	struct keel__msg *c = load_relaxed(&keel__msg_chunks[ci]), *first = NULL;
	uint64_t gen = released_gen[ci] + 1;
	/* Not above: the next use as a ctx call raises it before its handle
	 * is made, and a record at MSG_CTX_GEN_LAST was never freed. */
	uint64_t ctx_gen = released_ctx_gen[ci];
	for (uint32_t b = MSG_CHUNK / MSG_HOME; b-- > 0;) {
		struct keel__msg *head = NULL;

		for (uint32_t i = MSG_HOME; i-- > 0;) {
			struct keel__msg *m = &c[b * MSG_HOME + i];

			m->idx = ci << MSG_CHUNK_SHIFT | (b * MSG_HOME + i);
			store_relaxed(&m->state, gen << MSG_STATE_BITS | ST_FREE);
			store_relaxed(&keel__msg_call(m)->ctx_gen, ctx_gen);
			store_relaxed(&m->next, head);
			head = m;
		}
		if (b == 0)
			first = head;
		else
			pool_push(head, MSG_HOME);
	}
	*n = MSG_HOME;
	return first;
}

/* Under pool_lock: a new batch of never-used records, or NULL. */
static struct keel__msg *carve(uint32_t *n)
{
	struct keel__msg *c, *head = NULL;
	uint32_t first = msg_count;

	if (nreleased)
		return carve_released(n);
	if (first >> MSG_CHUNK_SHIFT >= MSG_MAX_CHUNKS)
		return NULL;
	c = load_relaxed(&keel__msg_chunks[first >> MSG_CHUNK_SHIFT]);
	if (!c) {
		/* Zero-filled. */
		if (!(c = keel__pages_alloc(MSG_CHUNK_BYTES)))
			return NULL;
		for (uint32_t i = 0; i < MSG_CHUNK; i++) {
			c[i].idx = first + i;
			/* Generation 1: no ctx handle is ever NULL. */
			atomic_init(&c[i].state,
				    (uint64_t)1 << MSG_STATE_BITS | ST_FREE);
		}
		store_release(&keel__msg_chunks[first >> MSG_CHUNK_SHIFT], c);
	}
	/* MSG_CHUNK is a multiple of the batch: a batch never spans chunks. */
	for (uint32_t i = MSG_HOME; i-- > 0;) {
		struct keel__msg *m = &c[(first + i) & (MSG_CHUNK - 1)];

		store_relaxed(&m->next, head);
		head = m;
	}
	msg_count += MSG_HOME;
	*n = MSG_HOME;
	return head;
}

/* How many records this refill takes (HOW MUCH A THREAD TAKES). */
static uint32_t refill_want(struct keel__tls *tls)
{
	keel_time_t now = keel__clock_now();

	if (tls->want &&
	    now - tls->refill_at < load_relaxed(&keel__msg_stream_ns))
		tls->want = tls->want < MSG_HOME ? 2 * tls->want : MSG_HOME;
	else
		tls->want = MSG_CACHE_BATCH;
	tls->refill_at = now;
	return tls->want;
}

struct keel__msg *keel__msg_refill(void)
{
	struct keel__tls *tls = &keel__tls;
	struct keel__msg *b, *cut;
	uint32_t n, want;

	keel__tls_register();
	want = refill_want(tls);
	pthread_mutex_lock(&pool_lock);
	if ((b = batches) != NULL) {
		batches = b->batch_next;
		n = (uint32_t)b->batch_n;
		pool_free -= n;
	} else if (!(b = carve(&n))) {
		pthread_mutex_unlock(&pool_lock);
		return NULL;
	}
	if (n > want) {
		/* Keep the first `want`, in their order; the rest go back on
		 * top, under the lock, so that a refill meanwhile finds them
		 * (and does not carve a chunk of its own). A walk of want - 1
		 * records: 63 for a thread that sends now and then, none for
		 * a streaming one once it takes whole homes. */
		cut = b;
		for (uint32_t i = 1; i < want; i++)
			cut = load_relaxed(&cut->next);
		pool_push(load_relaxed(&cut->next), n - want);
		store_relaxed(&cut->next, NULL);
		n = want;
	}
	if (pool_free < pool_low)
		pool_low = pool_free;
	/* The pool is emptying: the next trim may come sooner. */
	if (pool_free < trim_at / 4 && trim_at > 2 * MSG_POOL_KEEP)
		trim_at /= 2;
	pthread_mutex_unlock(&pool_lock);
	tls->cache = load_relaxed(&b->next);
	tls->ncache = n - 1;
	return b;
}

/* Append the records of list (batches linked by batch_next) that are not
 * in a chunk being released to the batches being built in *out; note the
 * highest generation of those that are. */
static void rebatch(struct keel__msg *list, struct keel__msg **out,
		    uint32_t *kept)
{
	struct keel__msg *cur = NULL;
	uint32_t ncur = 0;

	for (struct keel__msg *b = list, *nb; b; b = nb) {
		struct keel__msg *m = b, *next;

		nb = b->batch_next;
		for (; m; m = next) {
			uint32_t ci = m->idx >> MSG_CHUNK_SHIFT;

			next = load_relaxed(&m->next);
			if (trim_count[ci] == UINT16_MAX) {
				struct keel__msg_call *call = keel__msg_call(m);
				uint64_t gen = load_relaxed(&m->state) >>
					       MSG_STATE_BITS;
				uint64_t ctx_gen = load_relaxed(&call->ctx_gen);

				if (gen > released_gen[ci])
					released_gen[ci] = gen;
				if (ctx_gen > released_ctx_gen[ci])
					released_ctx_gen[ci] = ctx_gen;
				continue;
			}
			store_relaxed(&m->next, cur);
			cur = m;
			(*kept)++;
			if (++ncur == MSG_HOME) {
				cur->batch_n = ncur;
				cur->batch_next = *out;
				*out = cur;
				cur = NULL;
				ncur = 0;
			}
		}
	}
	if (ncur) {
		cur->batch_n = ncur;
		cur->batch_next = *out;
		*out = cur;
	}
}

/* Give back the pages of the pool's wholly free chunks beyond
 * MSG_POOL_KEEP records (see GIVING MEMORY BACK). Called with pool_lock
 * held and `trimming` set by the caller; returns with it held. */
static void trim(uint32_t surplus)
{
	struct keel__msg *list = batches, *out = NULL, *tail;
	uint32_t nchunks, kept = 0, nrel = 0;

	batches = NULL;
	pool_free = 0;
	nchunks = (msg_count + MSG_CHUNK - 1) >> MSG_CHUNK_SHIFT;
	pthread_mutex_unlock(&pool_lock);

	/* The records are ours alone now: count them per chunk. */
	for (struct keel__msg *b = list; b; b = b->batch_next)
		for (struct keel__msg *m = b; m; m = load_relaxed(&m->next))
			trim_count[m->idx >> MSG_CHUNK_SHIFT]++;
	for (uint32_t ci = nchunks; ci-- > 0 && surplus >= MSG_CHUNK;) {
		if (trim_count[ci] != MSG_CHUNK)
			continue;
		trim_count[ci] = UINT16_MAX; /* picked */
		released_gen[ci] = 0;
		released_ctx_gen[ci] = 0;
		picked[nrel++] = (uint16_t)ci;
		surplus -= MSG_CHUNK;
	}
	rebatch(list, &out, &kept);
	for (uint32_t i = 0; i < nrel; i++) {
		struct keel__msg *c = load_relaxed(&keel__msg_chunks[picked[i]]);

		/* If the platform cannot, the memory stays; the chunk is
		 * carved again all the same, as if it read zeros. */
		(void)keel__pages_release(c, MSG_CHUNK_BYTES);
	}
	memset(trim_count, 0, nchunks * sizeof trim_count[0]);

	pthread_mutex_lock(&pool_lock);
	if (out) {
		for (tail = out; tail->batch_next; tail = tail->batch_next)
			;
		tail->batch_next = batches;
		batches = out;
		pool_free += kept;
	}
	for (uint32_t i = 0; i < nrel; i++)
		released[nreleased++] = picked[i];
	fetch_add_relaxed(&keel__msg_chunks_released, nrel);
	trim_at = 2 * (kept > MSG_POOL_KEEP ? kept : MSG_POOL_KEEP);
	trimming = 0;
}

/* Records given back between two reads of the clock by epoch_check(). */
#define EPOCH_CLOCK_RECORDS 1024

/* Under pool_lock, after a give_back: has an epoch ended? Then trim what
 * stayed free through it, if that is enough. The clock is read once per
 * EPOCH_CLOCK_RECORDS records given back (n, this give_back's): an
 * epoch's end is noticed a little late, which does not matter. */
static void epoch_check(uint32_t n)
{
	keel_time_t now;

	epoch_ticks += n;
	if (epoch_ticks < EPOCH_CLOCK_RECORDS || trimming)
		return;
	epoch_ticks = 0;
	now = keel__clock_now();
	if (now - epoch_start < load_relaxed(&keel__msg_decay_ns))
		return;
	if (pool_low > trim_at && pool_low - MSG_POOL_KEEP >= MSG_CHUNK) {
		trimming = 1;
		trim(pool_low - MSG_POOL_KEEP);
	}
	epoch_start = now;
	pool_low = pool_free;
}

static void give_back(struct keel__msg *head, uint32_t n)
{
	pthread_mutex_lock(&pool_lock);
	pool_push(head, n);
	epoch_check(n);
	pthread_mutex_unlock(&pool_lock);
}

void keel__msg_free_home(struct keel__msg *m)
{
	struct keel__tls *tls = &keel__tls;
	uint32_t home = m->idx / MSG_HOME;
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
	if (++h->n == MSG_HOME) {
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

/* ---- Caller-owned messages ---------------------------------------------
 *
 * CALLER-OWNED MESSAGES. A keel_msg_t lives in the sender's memory, but a
 * tail word names the last record by a 24-bit index (mailbox.c). So each
 * keel_msg_t is registered: keel_msg_init() gives it an index of its own
 * above MSG_IDX_FOREIGN, and keel__msg_at() turns such an index into the
 * message through a table of registrations that, like the record table,
 * only grows (chunks of 1 << MSG_CHUNK_SHIFT, never freed). An index is
 * free again after keel_msg_fini(); free indices form a stack linked
 * through their registrations, under foreign_lock (init and fini are not
 * on any hot path).
 *
 * Only line 0 of a record exists in a keel_msg_t, which holds only posts.
 * Nothing reads a message whose outcome has begun: the one reader that
 * would (a counted sender after its link, mailbox.c) reads the
 * registration's `served` instead, which stays keel's memory. */
_Atomic(struct keel__foreign *)
	keel__foreign_chunks[(MSG_FOREIGN_MAX >> MSG_CHUNK_SHIFT) + 1];
static pthread_mutex_t foreign_lock = PTHREAD_MUTEX_INITIALIZER;
static uint32_t foreign_used; /* indices handed out so far */
/* Free indices given back, a stack linked through their registrations
 * (next_free), + 1; 0 if empty. */
static uint32_t foreign_free;
/* Tests: registrations live now. */
_Atomic uint64_t keel__foreign_live;

/* Is m a keel_msg_t that keel_msg_init() registered (and no fini since)?
 * Reads only the registration table and m's own line 0. */
static struct keel__foreign *registered(struct keel__msg *m)
{
	uint32_t idx = m->idx;
	struct keel__foreign *chunk;

	if (m->kind != MSG_FOREIGN || idx < MSG_IDX_FOREIGN ||
	    idx >= MSG_IDX_STUB)
		return NULL;
	chunk = load_acquire(&keel__foreign_chunks[(idx - MSG_IDX_FOREIGN) >>
						   MSG_CHUNK_SHIFT]);
	if (!chunk)
		return NULL;
	chunk += (idx - MSG_IDX_FOREIGN) & ((1u << MSG_CHUNK_SHIFT) - 1);
	return load_acquire(&chunk->msg) == m ? chunk : NULL;
}

int keel_msg_init(keel_msg_t *msg)
{
	struct keel__msg *m = (struct keel__msg *)(void *)msg;
	struct keel__foreign *f;
	uint32_t i;

	if (!msg)
		return -EINVAL;
	if (registered(m)) {
		/* Initialised already: keep its index if it is idle. */
		uint64_t st = load_acquire(&m->state);

		if ((st & MSG_STATE_MASK) != ST_FREE)
			return -EBUSY;
		return 0;
	}
	pthread_mutex_lock(&foreign_lock);
	if (foreign_free) {
		i = foreign_free - 1;
		foreign_free = keel__foreign_at(MSG_IDX_FOREIGN + i)->next_free;
	} else if (foreign_used < MSG_FOREIGN_MAX) {
		i = foreign_used;
		if (!load_relaxed(&keel__foreign_chunks[i >> MSG_CHUNK_SHIFT])) {
			struct keel__foreign *c =
				calloc((size_t)1 << MSG_CHUNK_SHIFT, sizeof *c);

			if (!c) {
				pthread_mutex_unlock(&foreign_lock);
				return -ENOMEM;
			}
			store_release(&keel__foreign_chunks[i >> MSG_CHUNK_SHIFT],
				      c);
		}
		foreign_used++;
	} else {
		pthread_mutex_unlock(&foreign_lock);
		return -ENOMEM;
	}
	pthread_mutex_unlock(&foreign_lock);
	memset(msg, 0, sizeof *msg);
	m->idx = MSG_IDX_FOREIGN + i;
	m->kind = MSG_FOREIGN;
	m->key = keel__foreign_key(m, m->idx);
	f = keel__foreign_at(m->idx);
	/* Release: m's fields for whoever finds it through the table. */
	store_release(&f->msg, m);
	fetch_add_relaxed(&keel__foreign_live, 1);
	return 0;
}

int keel_msg_fini(keel_msg_t *msg)
{
	struct keel__msg *m = (struct keel__msg *)(void *)msg;
	struct keel__foreign *f;
	uint64_t st;

	if (!msg || !(f = registered(m)))
		return -EINVAL;
	/* A CAS: of two finishes of one message, one wins. (A send's check
	 * is a load and a store, mailbox.c: a send racing a finish of the
	 * same message is the program's race.) */
	st = load_relaxed(&m->state);
	if ((st & MSG_STATE_MASK) != ST_FREE ||
	    !cas_acq_rel(&m->state, &st, st | ST_ABANDONED))
		return -EBUSY;
	m->kind = MSG_FOREIGN_DEAD;
	m->key = 0;
	store_release(&f->msg, NULL);
	pthread_mutex_lock(&foreign_lock);
	f->next_free = foreign_free;
	foreign_free = m->idx - MSG_IDX_FOREIGN + 1;
	pthread_mutex_unlock(&foreign_lock);
	fetch_add_relaxed(&keel__foreign_live, (uint64_t)-1);
	return 0;
}

void keel__msg_fork(int phase)
{
	if (phase == 0) {
		pthread_mutex_lock(&pool_lock);
		pthread_mutex_lock(&foreign_lock);
	} else {
		pthread_mutex_unlock(&foreign_lock);
		pthread_mutex_unlock(&pool_lock);
	}
}
