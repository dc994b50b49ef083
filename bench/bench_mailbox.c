/*
 * bench_mailbox.c: message passing between threads, keel's mailbox against
 * the queues and hand-offs C programs use instead.
 *
 * WHAT IS MEASURED
 * mailbox_1p1c, mailbox_2p1c: post-to-run throughput, in ns per message.
 *   One or two producer threads send N messages in all (2 million at scale
 *   1, split evenly) to one consumer thread. All threads start on a
 *   barrier; a repetition's time runs from the earliest thread leaving the
 *   barrier to the consumer having run the last message, and is divided by
 *   N. One operation is one message sent and run. Producers send as fast
 *   as they can, so this is the throughput of a saturated queue, which
 *   includes whatever waking and sleeping the consumer does when it
 *   catches up with the producers.
 * call_roundtrip: a synchronous call from thread A to thread B and back, in
 *   ns per call. A makes calls one after another (at most 200,000, and
 *   stops early once 0.4 s have passed, both at scale 1); B serves them.
 *   The time runs from A leaving the barrier to the return of its last
 *   call, divided by the calls made. This is latency: each call is a
 *   hand-off to a thread that may be asleep and a hand-off back.
 *
 * What a message is. keel_post() sends a unit of work: a function, its
 * argument and a cancel handler, in a record keel allocates; keel_serve()
 * runs the function through its pointer and recycles the record. The
 * peers are measured the same way, as a program would use them to post
 * work to a thread: each message is allocated (malloc) by its producer,
 * carries a function pointer and a value, and the consumer frees it and
 * calls the function. Those rows carry the peers' own names.
 *
 * Every peer is also measured in a "_prealloc" variant, the queue alone
 * at its best: nodes come from one array allocated and page-faulted
 * before the timed span, the consumer adds the value without calling
 * anything, and no memory is allocated or freed per message. Those rows
 * show what the per-message allocation and call cost the peers. The
 * targets compare keel with both: within 1.5x of the fastest _prealloc
 * variant, and at most half the fastest like-for-like peer.
 *
 * The work itself is the same trivial thing in every impl: the
 * consumer adds the message's payload (a number, 1 to N) to a sum of its
 * own and counts it. After the repetition the sum and count are checked
 * against N(N+1)/2 and N, so no impl can lose, repeat or skip messages
 * unnoticed; a wrong result aborts the run. In call_roundtrip B adds the
 * argument to its sum and replies with argument + 1, which A checks.
 *
 * Every repetition starts fresh threads and a fresh queue for every impl;
 * thread creation and the allocation and page-faulting of message nodes
 * are outside the timed span. No thread is pinned to a CPU.
 *
 * THE IMPLS
 * keel:            the consumer loops on keel_serve(KEEL_FOREVER); producers
 *                  call keel_post() with the payload as the message's arg.
 *                  keel_call() for call_roundtrip, B looping on keel_serve().
 *                  Calls go through the shared library, as users' do.
 * keel_msg:        the same with keel_post_msg(): each message a keel_msg_t
 *                  from an array the producers own, registered before the
 *                  timed span (the like-for-like match of the _prealloc
 *                  variants below).
 * mutex_condvar:   a mutex-protected intrusive list; a producer signals the condvar only when it made the
 *                  list non-empty; the consumer takes the whole list under
 *                  the lock and runs it outside. The strongest simple
 *                  variant. For call_roundtrip: one request slot, a mutex
 *                  and two condvars.
 * libuv_async:     the consumer runs a uv_loop with a uv_async_t; producers
 *                  append to a mutex-protected list and call
 *                  uv_async_send(); the async callback drains the list.
 * glib_asyncqueue: GAsyncQueue, g_async_queue_push / g_async_queue_pop,
 *                  with the payload as the (non-NULL) pointer.
 * ck_ring:         a bounded Concurrency Kit ring of 4096 pointers, SPSC
 *                  mode for one producer and MPSC mode
 *                  (ck_ring_enqueue_mpsc) for two. A producer that finds
 *                  it full spins with a pause until there is room.
 * urcu_wfcq:       liburcu's wait-free concurrent queue (cds_wfcq_enqueue,
 *                  static inline versions); the consumer splices the whole
 *                  queue out at once and walks it.
 * urcu_wfcq_line: urcu_wfcq_prealloc with each node on a cache line of its
 *                  own (64 bytes, a keel_msg_t's size) instead of 24 bytes
 *                  side by side. A reference row, compared with nothing
 *                  (no target picks it as a peer): keel_msg moves a line a
 *                  message, and this row shows what a line a message costs
 *                  the fastest queue, beside what keel_msg costs.
 * For ck_ring and urcu_wfcq the consumer, finding the queue empty, spins
 *   for up to 2 us and then sleeps on a futex word with a "sleeping" flag
 *   (set the flag, look at the queue once more, FUTEX_WAIT); a producer
 *   looks at the flag after each enqueue and wakes the consumer only if it
 *   is set. The consumers of keel, libuv and GLib sleep as those libraries
 *   do; mutex_condvar sleeps at once.
 * futex_spin_then_wait (call_roundtrip only): two 32-bit futex words, one
 *   per direction; each side spins up to 2 us for the other's flag, then
 *   announces that it sleeps and FUTEX_WAITs; the other side calls
 *   FUTEX_WAKE only after such an announcement. Raw syscall(SYS_futex).
 *
 * HANGS AND LIVELOCKS
 * ck_ring's MPSC mode makes a producer wait for another producer that
 * reserved a slot before it to commit; a producer preempted in between
 * stalls the others, and on a 2-CPU machine this has been seen to livelock.
 * So every wait loop here also checks bench_abort, and the main thread
 * waits for each repetition with a time limit (bench_event_wait). When
 * the limit passes it sets bench_abort, wakes whoever may sleep (the
 * impl's kick), joins the threads, and the impl is reported as "did not
 * finish". A spin inside ck's own commit cannot see the flag, but it ends
 * as soon as the preempted producer runs again.
 */
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "bench.h"
#include "keel.h"

#ifdef HAVE_GLIB
#include <glib.h>
#endif
#ifdef HAVE_LIBUV
#include <uv.h>
#endif
#ifdef HAVE_CK
#include <ck_ring.h>
#endif
#ifdef HAVE_URCU
#define _LGPL_SOURCE
#include <urcu/wfcqueue.h>
#endif

/* Messages per mailbox repetition, at scale 1. */
#define MB_MESSAGES 2000000L
/* Most calls per call_roundtrip repetition, and its time budget, scale 1. */
#define RT_CALLS 200000L
#define RT_BUDGET_NS 400000000.0
/* How long the peers' hand-written waits spin before they sleep. */
#define PEER_SPIN_NS 2000
/* ck_ring's size, in pointers (one slot is always left free). */
#define RING_SIZE 4096
#define MAX_PRODUCERS 2
#define CACHELINE 64

struct mb_rep;

/* A message of the list-based impls (and of GLib and ck, by pointer). */
struct node {
	struct node *next;
	uint64_t value;
	void (*fn)(struct mb_rep *r, uint64_t value);
};

/* Zeroed, page-faulted memory: allocation stays out of the timed span. */
static void *prealloc(size_t size)
{
	size_t rounded = (size + CACHELINE - 1) / CACHELINE * CACHELINE;
	void *p = aligned_alloc(CACHELINE, rounded);

	if (!p)
		bench_fail("out of memory (%zu bytes)", rounded);
	memset(p, 0, rounded);
	return p;
}

/* ---- The mailbox benchmarks' frame -------------------------------------- */

/*
 * One impl of the mailbox benchmarks. setup and teardown run on the main
 * thread, before the threads start and after they are joined; prepare runs
 * on the consumer thread before the barrier; consume runs until r->n
 * messages have run or bench_abort is set; produce sends the payloads
 * first..first+count-1; kick wakes the consumer after bench_abort was set.
 */
struct mb_impl {
	void (*setup)(struct mb_rep *r);
	void (*prepare)(struct mb_rep *r);
	void (*consume)(struct mb_rep *r);
	void (*produce)(struct mb_rep *r, uint64_t first, long count);
	void (*kick)(struct mb_rep *r);
	void (*teardown)(struct mb_rep *r);
};

/* mb_rep.prealloc for urcu_wfcq_line: preallocated nodes a line each. */
#define PREALLOC_LINE 2

struct mb_rep {
	const struct mb_impl *impl;
	int nprod;
	/* The _prealloc variant: see the top of the file; PREALLOC_LINE
	 * for urcu_wfcq_line. */
	int prealloc;
	long n;
	void *q; /* the impl's queue */
	pthread_barrier_t gate;
	struct bench_event done;
	/* Each written by one thread, read by the main thread after joins. */
	int64_t started[MAX_PRODUCERS + 1];
	int64_t finished;
	uint64_t sum;
	long count;
	/* Context switches in the timed span (see thread_switches()): the
	 * consumer's voluntary ones, and every thread's involuntary ones. */
	long sleeps;
	long preempts[MAX_PRODUCERS + 1];
	/* Page faults in the timed span, per thread: memory a queue touched
	 * for the first time (or again, after giving it back). */
	long faults[MAX_PRODUCERS + 1];
	/* The producers' voluntary context switches: the times a send
	 * blocked (on a lock of the queue's, or for room). */
	long send_sleeps[MAX_PRODUCERS];
	/* CPU time of each thread in the timed span, ns (thread_cpu()). */
	int64_t cpu[MAX_PRODUCERS + 1];
};

/*
 * The CPU time the calling thread has run, ns (CLOCK_THREAD_CPUTIME_ID,
 * the scheduler's own count). Unlike the elapsed time, it does not grow
 * while the thread waits for a CPU, so on a loaded machine the producers'
 * CPU time per message is a steadier measure of what a send costs. The
 * consumer's includes its spinning while the queue is empty.
 */
static int64_t thread_cpu(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/*
 * The calling thread's context switches so far, from the kernel's count
 * (getrusage RUSAGE_THREAD): voluntary ones are the times it blocked (a
 * futex wait, a condvar, a poll: it slept until something woke it), and
 * involuntary ones the times the scheduler took its CPU away (another
 * thread of this run or of another process needed it). Reported per
 * message beside each time, so that a slow figure can be told apart: a
 * queue that costs more per message, a consumer that keeps falling asleep
 * and paying for its wake-ups, or threads that share a CPU. And, if
 * faults is not NULL, its page faults so far.
 */
static void thread_switches(long *voluntary, long *involuntary, long *faults)
{
	struct rusage ru;

	if (getrusage(RUSAGE_THREAD, &ru) != 0)
		bench_fail("getrusage(RUSAGE_THREAD) failed");
	*voluntary = ru.ru_nvcsw;
	*involuntary = ru.ru_nivcsw;
	if (faults)
		*faults = ru.ru_minflt + ru.ru_majflt;
}

struct mb_producer {
	struct mb_rep *r;
	int idx;
};

static void *mb_consumer_main(void *arg)
{
	struct mb_rep *r = arg;
	long v0, i0, f0, v1, i1, f1;

	if (r->impl->prepare)
		r->impl->prepare(r);
	pthread_barrier_wait(&r->gate);
	r->started[0] = bench_now();
	thread_switches(&v0, &i0, &f0);
	r->cpu[0] = -thread_cpu();
	r->impl->consume(r);
	r->finished = bench_now();
	r->cpu[0] += thread_cpu();
	thread_switches(&v1, &i1, &f1);
	r->sleeps = v1 - v0;
	r->preempts[0] = i1 - i0;
	r->faults[0] = f1 - f0;
	bench_event_set(&r->done);
	return NULL;
}

static void *mb_producer_main(void *arg)
{
	struct mb_producer *p = arg;
	struct mb_rep *r = p->r;
	long per = r->n / r->nprod;
	long count = p->idx == r->nprod - 1 ? r->n - per * p->idx : per;
	long v0, i0, f0, v1, i1, f1;

	pthread_barrier_wait(&r->gate);
	r->started[1 + p->idx] = bench_now();
	thread_switches(&v0, &i0, &f0);
	r->cpu[1 + p->idx] = -thread_cpu();
	r->impl->produce(r, (uint64_t)(per * p->idx) + 1, count);
	r->cpu[1 + p->idx] += thread_cpu();
	thread_switches(&v1, &i1, &f1);
	r->preempts[1 + p->idx] = i1 - i0;
	r->faults[1 + p->idx] = f1 - f0;
	r->send_sleeps[p->idx] = v1 - v0;
	return NULL;
}

static double mb_measure(const struct mb_impl *impl, int nprod, int prealloc)
{
	struct mb_rep r = {.impl = impl, .nprod = nprod, .prealloc = prealloc};
	struct mb_producer prod[MAX_PRODUCERS];
	pthread_t consumer, producers[MAX_PRODUCERS];
	uint64_t n, want;
	int64_t start;
	int64_t send_cpu;
	long preempts, faults, send_sleeps;
	int timed_out;

	r.n = bench_count(MB_MESSAGES, 1000);
	n = (uint64_t)r.n;
	want = n * (n + 1) / 2;
	impl->setup(&r);
	pthread_barrier_init(&r.gate, NULL, (unsigned)nprod + 1);
	bench_event_init(&r.done);
	consumer = bench_thread(mb_consumer_main, &r);
	for (int i = 0; i < nprod; i++) {
		prod[i] = (struct mb_producer){.r = &r, .idx = i};
		producers[i] = bench_thread(mb_producer_main, &prod[i]);
	}
	timed_out = bench_event_wait(&r.done) < 0;
	if (timed_out)
		impl->kick(&r);
	bench_join(consumer);
	for (int i = 0; i < nprod; i++)
		bench_join(producers[i]);
	impl->teardown(&r);
	bench_event_destroy(&r.done);
	pthread_barrier_destroy(&r.gate);
	if (timed_out)
		return BENCH_DNF;
	if ((uint64_t)r.count != n || r.sum != want)
		bench_fail("mailbox with %d producer(s): ran %ld of %ld "
			   "messages, sum %llu, want %llu",
			   nprod, r.count, r.n, (unsigned long long)r.sum,
			   (unsigned long long)want);
	start = r.started[0];
	preempts = r.preempts[0];
	faults = r.faults[0];
	send_sleeps = 0;
	send_cpu = 0;
	for (int i = 1; i <= nprod; i++) {
		if (r.started[i] < start)
			start = r.started[i];
		preempts += r.preempts[i];
		faults += r.faults[i];
		send_sleeps += r.send_sleeps[i - 1];
		send_cpu += r.cpu[i];
	}
	bench_extra("send_cpu_ns/msg", (double)send_cpu / (double)r.n);
	bench_extra("recv_cpu_ns/msg", (double)r.cpu[0] / (double)r.n);
	/* Each sleep of the consumer ends in one wake-up (no impl sleeps
	 * with a timeout here), so this is its wakes per message too. */
	bench_extra("sleeps/msg", (double)r.sleeps / (double)r.n);
	bench_extra("send_sleeps/msg", (double)send_sleeps / (double)r.n);
	bench_extra("preempts/msg", (double)preempts / (double)r.n);
	bench_extra("faults/msg", (double)faults / (double)r.n);
	return (double)(r.finished - start) / (double)r.n;
}

/* The work of one message, called by the consumer through the pointer the
 * message carries, as keel calls a posted work function. */
static void item_work(struct mb_rep *r, uint64_t value)
{
	r->sum += value;
	r->count++;
}

/* A message: malloc'd by the producer, or taken from the preallocated
 * array in the _prealloc variant. */
static struct node *node_new(struct mb_rep *r, struct node *pool,
			     uint64_t value)
{
	struct node *m = r->prealloc ? &pool[value - 1] : malloc(sizeof *m);

	if (!m)
		bench_fail("out of memory");
	m->next = NULL;
	m->value = value;
	m->fn = item_work;
	return m;
}

/* The consumer's side: free the message and run its work, or (in the
 * _prealloc variant) just add its value. */
static inline void node_take(struct mb_rep *r, struct node *m)
{
	void (*fn)(struct mb_rep *, uint64_t);
	uint64_t value = m->value;

	if (r->prealloc) {
		r->sum += value;
		r->count++;
		return;
	}
	fn = m->fn;
	free(m);
	fn(r, value);
}

/* The array of nodes the _prealloc variant takes its messages from. */
static struct node *node_pool(struct mb_rep *r)
{
	return r->prealloc ? prealloc((size_t)r->n * sizeof(struct node))
			   : NULL;
}

#if defined(HAVE_CK) || defined(HAVE_URCU)
/*
 * The consumer's sleep for the impls with hand-written waits (ck_ring,
 * urcu_wfcq). The word is 1 while the consumer is asleep or about to be,
 * else 0. The consumer stores 1 and then looks at the queue once more; a
 * producer enqueues, fences, and then loads the word. Both orderings are
 * sequentially consistent, so either the consumer's second look sees the
 * message or the producer sees the 1 (and exchanges it for 0 and wakes).
 */
static void consumer_wait(_Atomic uint32_t *sleeping, int (*ready)(void *),
			  void *q)
{
	int64_t stop = bench_now() + PEER_SPIN_NS;

	for (unsigned i = 1;; i++) {
		if (ready(q) || bench_aborted())
			return;
		bench_cpu_relax();
		if ((i & 15) == 0 && bench_now() >= stop)
			break;
	}
	atomic_store(sleeping, 1);
	/* The abort check comes after the store: pairs with kick_sleeper(),
	 * which sets bench_abort before it clears the word. */
	if (ready(q) || bench_aborted()) {
		atomic_store_explicit(sleeping, 0, memory_order_relaxed);
		return;
	}
	while (atomic_load(sleeping) == 1 && !bench_aborted())
		bench_futex_wait(sleeping, 1);
}

/* A producer, after its enqueue and a seq_cst fence. */
static inline void producer_wake(_Atomic uint32_t *sleeping)
{
	if (atomic_load_explicit(sleeping, memory_order_relaxed) &&
	    atomic_exchange(sleeping, 0))
		bench_futex_wake(sleeping, 1);
}

static void kick_sleeper(_Atomic uint32_t *sleeping)
{
	atomic_store(sleeping, 0);
	bench_futex_wake(sleeping, 1);
}

#endif /* HAVE_CK || HAVE_URCU */

/* ---- keel ---------------------------------------------------------------- */

/* The consumer's handle, published before the barrier. */
static _Atomic keel_task_t keel_consumer;
/* Touched only by the consumer thread, in keel_work(). */
static uint64_t keel_sum;
static long keel_count;

static void keel_work(void *arg)
{
	keel_sum += (uint64_t)(uintptr_t)arg;
	keel_count++;
}

static void keel_nop(void *arg)
{
	(void)arg;
}

static void kq_setup(struct mb_rep *r)
{
	(void)r;
	keel_sum = 0;
	keel_count = 0;
	atomic_store(&keel_consumer, KEEL_TASK_NONE);
}

static void kq_prepare(struct mb_rep *r)
{
	keel_task_t self = keel_self();

	(void)r;
	if (self == KEEL_TASK_NONE)
		bench_fail("keel_self: the consumer could not be adopted");
	atomic_store(&keel_consumer, self);
}

static void kq_consume(struct mb_rep *r)
{
	while (keel_count < r->n && !bench_aborted()) {
		int rc = keel_serve(KEEL_FOREVER);

		if (rc < 0)
			bench_fail("keel_serve: %s", keel_strerror(rc));
	}
	r->sum = keel_sum;
	r->count = keel_count;
}

static void kq_produce(struct mb_rep *r, uint64_t first, long count)
{
	keel_task_t to = atomic_load(&keel_consumer);

	(void)r;
	for (uint64_t v = first; v < first + (uint64_t)count; v++) {
		int rc = keel_post(to, keel_work, NULL, (void *)(uintptr_t)v);

		if (rc < 0) {
			if (bench_aborted())
				return;
			bench_fail("keel_post: %s", keel_strerror(rc));
		}
	}
}

static void kq_kick(struct mb_rep *r)
{
	keel_task_t to = atomic_load(&keel_consumer);

	(void)r;
	/* -ESRCH if the consumer has already ended, which is as good. */
	if (to != KEEL_TASK_NONE)
		keel_post(to, keel_nop, NULL, NULL);
}

static void kq_teardown(struct mb_rep *r)
{
	(void)r;
}

static const struct mb_impl keel_mb = {
	kq_setup, kq_prepare, kq_consume, kq_produce, kq_kick, kq_teardown,
};

/* keel_msg: the same, each message a keel_msg_t of the producers' own,
 * from an array registered before the threads start. */
static void km_setup(struct mb_rep *r)
{
	keel_msg_t *msgs = prealloc((size_t)r->n * sizeof *msgs);

	kq_setup(r);
	for (long i = 0; i < r->n; i++)
		if (keel_msg_init(&msgs[i]) != 0)
			bench_fail("keel_msg_init failed");
	r->q = msgs;
}

static void km_produce(struct mb_rep *r, uint64_t first, long count)
{
	keel_task_t to = atomic_load(&keel_consumer);
	keel_msg_t *msgs = r->q;

	for (uint64_t v = first; v < first + (uint64_t)count; v++) {
		int rc = keel_post_msg(to, &msgs[v - 1], keel_work, NULL,
				       (void *)(uintptr_t)v);

		if (rc < 0) {
			if (bench_aborted())
				return;
			bench_fail("keel_post_msg: %s", keel_strerror(rc));
		}
	}
}

static void km_teardown(struct mb_rep *r)
{
	keel_msg_t *msgs = r->q;

	/* A message still queued (a repetition that did not finish) stays
	 * registered and its memory is leaked: keel may still read it. */
	int busy = 0;

	for (long i = 0; i < r->n; i++)
		busy |= keel_msg_fini(&msgs[i]) != 0;
	if (!busy)
		free(msgs);
}

static const struct mb_impl keel_msg_mb = {
	km_setup, kq_prepare, kq_consume, km_produce, kq_kick, km_teardown,
};

/* ---- mutex_condvar ------------------------------------------------------- */

struct mc_queue {
	pthread_mutex_t mu;
	pthread_cond_t cv;
	struct node *head;
	struct node **tailp;
	struct node *nodes;
};

static void mc_setup(struct mb_rep *r)
{
	struct mc_queue *q = prealloc(sizeof *q);

	pthread_mutex_init(&q->mu, NULL);
	pthread_cond_init(&q->cv, NULL);
	q->tailp = &q->head;
	q->nodes = node_pool(r);
	r->q = q;
}

static void mc_consume(struct mb_rep *r)
{
	struct mc_queue *q = r->q;

	while (r->count < r->n) {
		struct node *m, *next;

		pthread_mutex_lock(&q->mu);
		while (!q->head && !bench_aborted())
			pthread_cond_wait(&q->cv, &q->mu);
		m = q->head;
		q->head = NULL;
		q->tailp = &q->head;
		pthread_mutex_unlock(&q->mu);
		if (!m)
			break; /* aborted */
		for (; m; m = next) {
			next = m->next;
			node_take(r, m);
		}
	}
}

static void mc_produce(struct mb_rep *r, uint64_t first, long count)
{
	struct mc_queue *q = r->q;

	for (uint64_t v = first; v < first + (uint64_t)count; v++) {
		struct node *m = node_new(r, q->nodes, v);
		int was_empty;

		pthread_mutex_lock(&q->mu);
		was_empty = q->head == NULL;
		*q->tailp = m;
		q->tailp = &m->next;
		pthread_mutex_unlock(&q->mu);
		/* Outside the lock, so the woken consumer does not block on
		 * it at once. Not lost: the consumer waits only after seeing
		 * the list empty under the lock, before this push. */
		if (was_empty)
			pthread_cond_signal(&q->cv);
	}
}

static void mc_kick(struct mb_rep *r)
{
	struct mc_queue *q = r->q;

	pthread_mutex_lock(&q->mu);
	pthread_cond_broadcast(&q->cv);
	pthread_mutex_unlock(&q->mu);
}

static void mc_teardown(struct mb_rep *r)
{
	struct mc_queue *q = r->q;

	pthread_cond_destroy(&q->cv);
	pthread_mutex_destroy(&q->mu);
	free(q->nodes);
	free(q);
}

static const struct mb_impl mutex_condvar_mb = {
	mc_setup, NULL, mc_consume, mc_produce, mc_kick, mc_teardown,
};

/* ---- libuv_async ------------------------------------------------------- */

#ifdef HAVE_LIBUV
struct uvq {
	uv_loop_t loop;
	uv_async_t async;
	pthread_mutex_t mu;
	struct node *head;
	struct node **tailp;
	struct node *nodes;
	struct mb_rep *r;
};

static void uvq_drain(uv_async_t *async)
{
	struct uvq *q = async->data;
	struct node *m, *next;

	pthread_mutex_lock(&q->mu);
	m = q->head;
	q->head = NULL;
	q->tailp = &q->head;
	pthread_mutex_unlock(&q->mu);
	for (; m; m = next) {
		next = m->next;
		node_take(q->r, m);
	}
	if (q->r->count >= q->r->n || bench_aborted())
		uv_stop(&q->loop);
}

/* The loop is set up here, before the threads start, and run by the
 * consumer: a uv loop belongs to no thread, only to one at a time. */
static void uvq_setup(struct mb_rep *r)
{
	struct uvq *q = prealloc(sizeof *q);
	int rc;

	pthread_mutex_init(&q->mu, NULL);
	q->tailp = &q->head;
	q->nodes = node_pool(r);
	q->r = r;
	if ((rc = uv_loop_init(&q->loop)) < 0 ||
	    (rc = uv_async_init(&q->loop, &q->async, uvq_drain)) < 0)
		bench_fail("libuv: %s", uv_strerror(rc));
	q->async.data = q;
	r->q = q;
}

static void uvq_consume(struct mb_rep *r)
{
	struct uvq *q = r->q;

	uv_run(&q->loop, UV_RUN_DEFAULT);
}

static void uvq_produce(struct mb_rep *r, uint64_t first, long count)
{
	struct uvq *q = r->q;

	for (uint64_t v = first; v < first + (uint64_t)count; v++) {
		struct node *m = node_new(r, q->nodes, v);

		pthread_mutex_lock(&q->mu);
		*q->tailp = m;
		q->tailp = &m->next;
		pthread_mutex_unlock(&q->mu);
		uv_async_send(&q->async);
	}
}

static void uvq_kick(struct mb_rep *r)
{
	struct uvq *q = r->q;

	/* The handle stays open until teardown. */
	uv_async_send(&q->async);
}

static void uvq_teardown(struct mb_rep *r)
{
	struct uvq *q = r->q;

	/* The handle is closed only now, after the joins: a producer may
	 * still have been inside uv_async_send() for its last message when
	 * the consumer ran it. The loop has no other thread any more. */
	uv_close((uv_handle_t *)&q->async, NULL);
	uv_run(&q->loop, UV_RUN_DEFAULT);
	uv_loop_close(&q->loop);
	pthread_mutex_destroy(&q->mu);
	free(q->nodes);
	free(q);
}

static const struct mb_impl libuv_mb = {
	uvq_setup, NULL, uvq_consume, uvq_produce, uvq_kick,
	uvq_teardown,
};
#endif /* HAVE_LIBUV */

/* ---- glib_asyncqueue ------------------------------------------------------ */

#ifdef HAVE_GLIB
/* Pushed by the kick after an abort; never a payload. */
#define GQ_KICK ((gpointer)UINTPTR_MAX)

static void gq_setup(struct mb_rep *r)
{
	r->q = g_async_queue_new();
}

static void gq_consume(struct mb_rep *r)
{
	GAsyncQueue *q = r->q;

	while (r->count < r->n) {
		gpointer p = g_async_queue_pop(q);

		if (p == GQ_KICK) {
			if (bench_aborted())
				break;
			continue;
		}
		if (r->prealloc) {
			r->sum += (uint64_t)(uintptr_t)p;
			r->count++;
		} else {
			node_take(r, p);
		}
	}
}

static void gq_produce(struct mb_rep *r, uint64_t first, long count)
{
	GAsyncQueue *q = r->q;

	for (uint64_t v = first; v < first + (uint64_t)count; v++)
		g_async_queue_push(q, r->prealloc ? (gpointer)(uintptr_t)v
						  : (gpointer)node_new(r, NULL, v));
}

static void gq_kick(struct mb_rep *r)
{
	g_async_queue_push(r->q, GQ_KICK);
}

static void gq_teardown(struct mb_rep *r)
{
	g_async_queue_unref(r->q);
}

static const struct mb_impl glib_mb = {
	gq_setup, NULL, gq_consume, gq_produce, gq_kick, gq_teardown,
};
#endif /* HAVE_GLIB */

/* ---- ck_ring ------------------------------------------------------------ */

#ifdef HAVE_CK
struct ckq {
	struct ck_ring ring; /* ck pads its producer and consumer fields */
	struct ck_ring_buffer *buf;
	_Alignas(CACHELINE) _Atomic uint32_t sleeping;
};

static int ckq_ready(void *arg)
{
	struct ckq *q = arg;

	return ck_ring_size(&q->ring) != 0;
}

static void ckq_setup(struct mb_rep *r)
{
	struct ckq *q = prealloc(sizeof *q);

	ck_ring_init(&q->ring, RING_SIZE);
	q->buf = prealloc(RING_SIZE * sizeof(struct ck_ring_buffer));
	r->q = q;
}

static void ckq_consume(struct mb_rep *r)
{
	struct ckq *q = r->q;

	while (r->count < r->n && !bench_aborted()) {
		void *p;

		if (ck_ring_dequeue_spsc(&q->ring, q->buf, &p)) {
			if (r->prealloc) {
				r->sum += (uint64_t)(uintptr_t)p;
				r->count++;
			} else {
				node_take(r, p);
			}
			continue;
		}
		consumer_wait(&q->sleeping, ckq_ready, q);
	}
}

/* What a producer puts in the ring: the value itself in the _prealloc
 * variant, else a pointer to a malloc'd message. */
static void *ckq_item(struct mb_rep *r, uint64_t v)
{
	return r->prealloc ? (void *)(uintptr_t)v : (void *)node_new(r, NULL, v);
}

/* A full ring: spin for the consumer, unless the watchdog gave up. */
static int ckq_full(void)
{
	if (bench_aborted())
		return -1;
	bench_cpu_relax();
	return 0;
}

static void ckq_produce_sp(struct mb_rep *r, uint64_t first, long count)
{
	struct ckq *q = r->q;

	for (uint64_t v = first; v < first + (uint64_t)count; v++) {
		void *item = ckq_item(r, v);

		while (!ck_ring_enqueue_spsc(&q->ring, q->buf, item))
			if (ckq_full() < 0)
				return;
		/* Orders the enqueue before the load of the flag; pairs
		 * with the store in consumer_wait(). */
		atomic_thread_fence(memory_order_seq_cst);
		producer_wake(&q->sleeping);
	}
}

static void ckq_produce_mp(struct mb_rep *r, uint64_t first, long count)
{
	struct ckq *q = r->q;

	for (uint64_t v = first; v < first + (uint64_t)count; v++) {
		void *item = ckq_item(r, v);

		while (!ck_ring_enqueue_mpsc(&q->ring, q->buf, item))
			if (ckq_full() < 0)
				return;
		atomic_thread_fence(memory_order_seq_cst);
		producer_wake(&q->sleeping);
	}
}

static void ckq_kick(struct mb_rep *r)
{
	kick_sleeper(&((struct ckq *)r->q)->sleeping);
}

static void ckq_teardown(struct mb_rep *r)
{
	struct ckq *q = r->q;

	free(q->buf);
	free(q);
}

static const struct mb_impl ck_spsc_mb = {
	ckq_setup, NULL, ckq_consume, ckq_produce_sp, ckq_kick, ckq_teardown,
};
static const struct mb_impl ck_mpsc_mb = {
	ckq_setup, NULL, ckq_consume, ckq_produce_mp, ckq_kick, ckq_teardown,
};
#endif /* HAVE_CK */

/* ---- urcu_wfcq ---------------------------------------------------------- */

#ifdef HAVE_URCU
struct wnode {
	struct cds_wfcq_node link; /* first, so a link is its node */
	uint64_t value;
	void (*fn)(struct mb_rep *r, uint64_t value);
};

/*
 * The head is the consumer's and the tail the producers', so they sit on
 * lines of their own. The head needs no lock: there is one consumer.
 */
struct wq {
	_Alignas(CACHELINE) struct __cds_wfcq_head head;
	_Alignas(CACHELINE) struct cds_wfcq_tail tail;
	_Alignas(CACHELINE) _Atomic uint32_t sleeping;
	struct wnode *nodes;
};

static int wq_ready(void *arg)
{
	struct wq *q = arg;

	return !cds_wfcq_empty(&q->head, &q->tail);
}

_Static_assert(sizeof(struct wnode) <= CACHELINE, "a node fits a line");

/* The node the producer sends as value v (from 1) in a _prealloc rep:
 * side by side, or one to a cache line in urcu_wfcq_line. */
static struct wnode *wq_node(struct mb_rep *r, struct wq *q, uint64_t v)
{
	size_t size = r->prealloc == PREALLOC_LINE ? CACHELINE
						   : sizeof(struct wnode);

	return (struct wnode *)(void *)((char *)q->nodes + (v - 1) * size);
}

static void wq_setup(struct mb_rep *r)
{
	struct wq *q = prealloc(sizeof *q);
	size_t size = r->prealloc == PREALLOC_LINE ? CACHELINE
						   : sizeof(struct wnode);

	__cds_wfcq_init(&q->head, &q->tail);
	q->nodes = r->prealloc ? prealloc((size_t)r->n * size) : NULL;
	r->q = q;
}

static void wq_consume(struct mb_rep *r)
{
	struct wq *q = r->q;
	struct __cds_wfcq_head batch_head;
	struct cds_wfcq_tail batch_tail;

	__cds_wfcq_init(&batch_head, &batch_tail);
	while (r->count < r->n && !bench_aborted()) {
		struct cds_wfcq_node *node, *next;

		if (__cds_wfcq_splice_blocking(&batch_head, &batch_tail,
					       &q->head, &q->tail) ==
		    CDS_WFCQ_RET_SRC_EMPTY) {
			consumer_wait(&q->sleeping, wq_ready, q);
			continue;
		}
		__cds_wfcq_for_each_blocking_safe(&batch_head, &batch_tail,
						  node, next)
		{
			struct wnode *m = (struct wnode *)(void *)node;
			void (*fn)(struct mb_rep *, uint64_t) = m->fn;
			uint64_t value = m->value;

			if (r->prealloc) {
				r->sum += value;
				r->count++;
			} else {
				free(m);
				fn(r, value);
			}
		}
		__cds_wfcq_init(&batch_head, &batch_tail);
	}
}

static void wq_produce(struct mb_rep *r, uint64_t first, long count)
{
	struct wq *q = r->q;

	for (uint64_t v = first; v < first + (uint64_t)count; v++) {
		struct wnode *m = r->prealloc ? wq_node(r, q, v)
					      : malloc(sizeof *m);

		if (!m)
			bench_fail("out of memory");
		cds_wfcq_node_init(&m->link);
		m->value = v;
		m->fn = item_work;
		cds_wfcq_enqueue(&q->head, &q->tail, &m->link);
		/* Pairs with the store in consumer_wait(). */
		atomic_thread_fence(memory_order_seq_cst);
		producer_wake(&q->sleeping);
	}
}

static void wq_kick(struct mb_rep *r)
{
	kick_sleeper(&((struct wq *)r->q)->sleeping);
}

static void wq_teardown(struct mb_rep *r)
{
	struct wq *q = r->q;

	free(q->nodes);
	free(q);
}

static const struct mb_impl urcu_mb = {
	wq_setup, NULL, wq_consume, wq_produce, wq_kick, wq_teardown,
};
#endif /* HAVE_URCU */

/* ---- The mailbox benchmarks -------------------------------------------- */

BENCH(mailbox_1p1c, keel)
{
	return mb_measure(&keel_mb, 1, 0);
}

BENCH(mailbox_2p1c, keel)
{
	return mb_measure(&keel_mb, 2, 0);
}

BENCH(mailbox_1p1c, keel_msg)
{
	return mb_measure(&keel_msg_mb, 1, 1);
}

BENCH(mailbox_2p1c, keel_msg)
{
	return mb_measure(&keel_msg_mb, 2, 1);
}

/* Each peer, like for like and in its _prealloc variant. */
#define MB_PEER(impl_name, ops1, ops2)                                      \
	BENCH(mailbox_1p1c, impl_name)                                      \
	{                                                                   \
		return mb_measure(&(ops1), 1, 0);                           \
	}                                                                   \
	BENCH(mailbox_2p1c, impl_name)                                      \
	{                                                                   \
		return mb_measure(&(ops2), 2, 0);                           \
	}                                                                   \
	BENCH(mailbox_1p1c, impl_name##_prealloc)                           \
	{                                                                   \
		return mb_measure(&(ops1), 1, 1);                           \
	}                                                                   \
	BENCH(mailbox_2p1c, impl_name##_prealloc)                           \
	{                                                                   \
		return mb_measure(&(ops2), 2, 1);                           \
	}

#define MB_PEER_MISSING(impl_name, lib)                                     \
	BENCH_SKIP(mailbox_1p1c, impl_name, BENCH_PEER_MISSING(lib))        \
	BENCH_SKIP(mailbox_2p1c, impl_name, BENCH_PEER_MISSING(lib))

MB_PEER(mutex_condvar, mutex_condvar_mb, mutex_condvar_mb)

#ifdef HAVE_LIBUV
MB_PEER(libuv_async, libuv_mb, libuv_mb)
#else
MB_PEER_MISSING(libuv_async, "libuv")
#endif

#ifdef HAVE_GLIB
MB_PEER(glib_asyncqueue, glib_mb, glib_mb)
#else
MB_PEER_MISSING(glib_asyncqueue, "GLib")
#endif

#ifdef HAVE_CK
MB_PEER(ck_ring, ck_spsc_mb, ck_mpsc_mb)
#else
MB_PEER_MISSING(ck_ring, "Concurrency Kit")
#endif

#ifdef HAVE_URCU
MB_PEER(urcu_wfcq, urcu_mb, urcu_mb)
BENCH(mailbox_1p1c, urcu_wfcq_line)
{
	return mb_measure(&urcu_mb, 1, PREALLOC_LINE);
}
BENCH(mailbox_2p1c, urcu_wfcq_line)
{
	return mb_measure(&urcu_mb, 2, PREALLOC_LINE);
}
#else
MB_PEER_MISSING(urcu_wfcq, "liburcu")
#endif

/* The targets of issue 13: keel within 1.5x of the queue alone (the
 * fastest _prealloc variant), either its send without allocation
 * (keel_msg, like for like) or keel_post() itself, which allocates a
 * record per message and still may be; and keel_post() at most half the
 * cost of the fastest peer used as programs use it (a malloc per
 * message). */
BENCH_TARGET_FOR(mailbox_1p1c, keel_msg, BENCH_FASTEST_PREALLOC, 1.5)
BENCH_TARGET(mailbox_1p1c, BENCH_FASTEST_PREALLOC, 1.5)
BENCH_TARGET(mailbox_1p1c, NULL, 0.5)
BENCH_TARGET_FOR(mailbox_2p1c, keel_msg, BENCH_FASTEST_PREALLOC, 1.5)
BENCH_TARGET(mailbox_2p1c, BENCH_FASTEST_PREALLOC, 1.5)
BENCH_TARGET(mailbox_2p1c, NULL, 0.5)

/* ---- The call benchmark's frame ---------------------------------------- */

struct rt_rep;

/*
 * One impl of call_roundtrip. prepare runs on B before the barrier; serve
 * runs on B until it has served a call with argument 0 or bench_abort is
 * set; call makes one call from A and returns B's reply (anything, once
 * bench_abort is set); kick wakes both sides after bench_abort was set.
 */
struct rt_impl {
	void (*setup)(struct rt_rep *r);
	void (*prepare)(struct rt_rep *r);
	void (*serve)(struct rt_rep *r);
	uint64_t (*call)(struct rt_rep *r, uint64_t arg);
	void (*kick)(struct rt_rep *r);
	void (*teardown)(struct rt_rep *r);
};

struct rt_rep {
	const struct rt_impl *impl;
	long max_calls;
	int64_t budget_ns;
	void *q;
	pthread_barrier_t gate;
	struct bench_event done;
	/* A's results. */
	long calls;
	int64_t elapsed;
	/* B's, read after the join. */
	uint64_t sum;
	long count;
	/* Voluntary context switches (sleeps) of A and B in the timed span,
	 * and involuntary ones (preemptions); see thread_switches(). */
	long sleeps[2], preempts[2];
};

static void *rt_server_main(void *arg)
{
	struct rt_rep *r = arg;
	long v0, i0, v1, i1;

	if (r->impl->prepare)
		r->impl->prepare(r);
	pthread_barrier_wait(&r->gate);
	/* B's span runs to the untimed stop call: one call more than A's. */
	thread_switches(&v0, &i0, NULL);
	r->impl->serve(r);
	thread_switches(&v1, &i1, NULL);
	r->sleeps[1] = v1 - v0;
	r->preempts[1] = i1 - i0;
	return NULL;
}

static void *rt_caller_main(void *arg)
{
	struct rt_rep *r = arg;
	int64_t start, now;
	long i, v0, i0, v1, i1;

	pthread_barrier_wait(&r->gate);
	start = now = bench_now();
	thread_switches(&v0, &i0, NULL);
	for (i = 1; i <= r->max_calls; i++) {
		uint64_t reply = r->impl->call(r, (uint64_t)i);

		if (bench_aborted())
			break;
		if (reply != (uint64_t)i + 1)
			bench_fail("call_roundtrip: call %ld replied %llu", i,
				   (unsigned long long)reply);
		if ((i & 63) == 0 && (now = bench_now()) - start >= r->budget_ns) {
			i++;
			break;
		}
	}
	now = bench_now();
	thread_switches(&v1, &i1, NULL);
	r->sleeps[0] = v1 - v0;
	r->preempts[0] = i1 - i0;
	r->calls = i - 1;
	r->elapsed = now - start;
	/* Untimed: tells B to stop. */
	if (!bench_aborted())
		r->impl->call(r, 0);
	bench_event_set(&r->done);
	return NULL;
}

static double rt_measure(const struct rt_impl *impl)
{
	struct rt_rep r = {.impl = impl};
	pthread_t server, caller;
	uint64_t n;
	int timed_out;

	r.max_calls = bench_count(RT_CALLS, 100);
	r.budget_ns = (int64_t)(RT_BUDGET_NS * bench_scale());
	impl->setup(&r);
	pthread_barrier_init(&r.gate, NULL, 2);
	bench_event_init(&r.done);
	server = bench_thread(rt_server_main, &r);
	caller = bench_thread(rt_caller_main, &r);
	timed_out = bench_event_wait(&r.done) < 0;
	if (timed_out)
		impl->kick(&r);
	bench_join(caller);
	bench_join(server);
	impl->teardown(&r);
	bench_event_destroy(&r.done);
	pthread_barrier_destroy(&r.gate);
	if (timed_out)
		return BENCH_DNF;
	n = (uint64_t)r.calls;
	if (r.calls < 1 || r.count != r.calls || r.sum != n * (n + 1) / 2)
		bench_fail("call_roundtrip: %ld calls made, %ld served, "
			   "sum %llu",
			   r.calls, r.count, (unsigned long long)r.sum);
	bench_extra("A_sleeps/call", (double)r.sleeps[0] / (double)r.calls);
	bench_extra("B_sleeps/call", (double)r.sleeps[1] / (double)r.calls);
	bench_extra("preempts/call",
		    (double)(r.preempts[0] + r.preempts[1]) / (double)r.calls);
	return (double)r.elapsed / (double)r.calls;
}

/* ---- call_roundtrip: keel ------------------------------------------------ */

struct krt_arg {
	uint64_t value;
	uint64_t reply;
};

static _Atomic keel_task_t krt_server;
/* B's, touched only in krt_work() and after the join. */
static uint64_t krt_sum;
static long krt_count;
static int krt_stop;

static void krt_work(void *arg)
{
	struct krt_arg *a = arg;

	if (a->value == 0) {
		krt_stop = 1;
	} else {
		krt_sum += a->value;
		krt_count++;
	}
	a->reply = a->value + 1;
}

static void krt_setup(struct rt_rep *r)
{
	(void)r;
	krt_sum = 0;
	krt_count = 0;
	krt_stop = 0;
	atomic_store(&krt_server, KEEL_TASK_NONE);
}

static void krt_prepare(struct rt_rep *r)
{
	keel_task_t self = keel_self();

	(void)r;
	if (self == KEEL_TASK_NONE)
		bench_fail("keel_self: the server could not be adopted");
	atomic_store(&krt_server, self);
}

static void krt_serve(struct rt_rep *r)
{
	while (!krt_stop && !bench_aborted()) {
		int rc = keel_serve(KEEL_FOREVER);

		if (rc < 0)
			bench_fail("keel_serve: %s", keel_strerror(rc));
	}
	r->sum = krt_sum;
	r->count = krt_count;
}

static uint64_t krt_call(struct rt_rep *r, uint64_t value)
{
	struct krt_arg a = {.value = value};
	int rc = keel_call(atomic_load_explicit(&krt_server,
						memory_order_relaxed),
			   krt_work, &a, KEEL_FOREVER);

	(void)r;
	if (rc < 0 && !bench_aborted())
		bench_fail("keel_call: %s", keel_strerror(rc));
	return a.reply;
}

static void krt_kick(struct rt_rep *r)
{
	keel_task_t to = atomic_load(&krt_server);

	(void)r;
	if (to != KEEL_TASK_NONE)
		keel_post(to, keel_nop, NULL, NULL);
}

static void krt_teardown(struct rt_rep *r)
{
	(void)r;
}

static const struct rt_impl keel_rt = {
	krt_setup, krt_prepare, krt_serve, krt_call, krt_kick, krt_teardown,
};

/* ---- call_roundtrip: mutex_condvar -------------------------------------- */

/* Slot states: empty, a request waiting for B, a reply waiting for A. */
enum { MRT_EMPTY, MRT_REQUEST, MRT_REPLY };

struct mrt {
	pthread_mutex_t mu;
	pthread_cond_t request_cv;
	pthread_cond_t reply_cv;
	int state;
	uint64_t value;
	uint64_t reply;
};

static void mrt_setup(struct rt_rep *r)
{
	struct mrt *q = prealloc(sizeof *q);

	pthread_mutex_init(&q->mu, NULL);
	pthread_cond_init(&q->request_cv, NULL);
	pthread_cond_init(&q->reply_cv, NULL);
	r->q = q;
}

static void mrt_serve(struct rt_rep *r)
{
	struct mrt *q = r->q;
	uint64_t sum = 0;
	long count = 0;

	pthread_mutex_lock(&q->mu);
	for (;;) {
		uint64_t v;

		while (q->state != MRT_REQUEST && !bench_aborted())
			pthread_cond_wait(&q->request_cv, &q->mu);
		if (bench_aborted())
			break;
		v = q->value;
		if (v != 0) {
			sum += v;
			count++;
		}
		q->reply = v + 1;
		q->state = MRT_REPLY;
		pthread_cond_signal(&q->reply_cv);
		if (v == 0)
			break;
	}
	pthread_mutex_unlock(&q->mu);
	r->sum = sum;
	r->count = count;
}

static uint64_t mrt_call(struct rt_rep *r, uint64_t value)
{
	struct mrt *q = r->q;
	uint64_t reply;

	pthread_mutex_lock(&q->mu);
	q->value = value;
	q->state = MRT_REQUEST;
	pthread_cond_signal(&q->request_cv);
	while (q->state != MRT_REPLY && !bench_aborted())
		pthread_cond_wait(&q->reply_cv, &q->mu);
	reply = q->reply;
	q->state = MRT_EMPTY;
	pthread_mutex_unlock(&q->mu);
	return reply;
}

static void mrt_kick(struct rt_rep *r)
{
	struct mrt *q = r->q;

	pthread_mutex_lock(&q->mu);
	pthread_cond_broadcast(&q->request_cv);
	pthread_cond_broadcast(&q->reply_cv);
	pthread_mutex_unlock(&q->mu);
}

static void mrt_teardown(struct rt_rep *r)
{
	struct mrt *q = r->q;

	pthread_cond_destroy(&q->reply_cv);
	pthread_cond_destroy(&q->request_cv);
	pthread_mutex_destroy(&q->mu);
	free(q);
}

static const struct rt_impl mutex_condvar_rt = {
	mrt_setup, NULL, mrt_serve, mrt_call, mrt_kick, mrt_teardown,
};

/* ---- call_roundtrip: futex_spin_then_wait ------------------------------- */

/*
 * One futex word per direction, each with one poster and one waiter:
 *   FX_EMPTY   nothing posted, and the waiter is not asleep;
 *   FX_POSTED  posted, not yet taken;
 *   FX_ASLEEP  the waiter is asleep (or about to be) and needs a wake.
 * Poster: exchange to POSTED; FUTEX_WAKE if the old value was ASLEEP.
 * Waiter: spin for POSTED; else CAS EMPTY -> ASLEEP (failing only if
 * POSTED came meanwhile) and FUTEX_WAIT while the word is ASLEEP; take a
 * POSTED word by storing EMPTY. The request and reply alternate, so a
 * word is always taken before it is posted again.
 */
enum { FX_EMPTY, FX_POSTED, FX_ASLEEP };

struct frt {
	_Alignas(CACHELINE) _Atomic uint32_t request;
	_Alignas(CACHELINE) _Atomic uint32_t reply_word;
	/* Published by the exchange in fx_post(), taken by the waiter's
	 * acquiring load of POSTED. */
	uint64_t value;
	uint64_t reply;
};

static void fx_post(_Atomic uint32_t *w)
{
	if (atomic_exchange(w, FX_POSTED) == FX_ASLEEP)
		bench_futex_wake(w, 1);
}

/* 0 once a post was taken, -1 if bench_abort was set. */
static int fx_wait(_Atomic uint32_t *w)
{
	int64_t stop = bench_now() + PEER_SPIN_NS;
	uint32_t expected = FX_EMPTY;

	for (unsigned i = 1;; i++) {
		if (atomic_load(w) == FX_POSTED)
			goto taken;
		if (bench_aborted())
			return -1;
		bench_cpu_relax();
		if ((i & 15) == 0 && bench_now() >= stop)
			break;
	}
	if (atomic_compare_exchange_strong(w, &expected, FX_ASLEEP)) {
		/* After the CAS: pairs with fx_kick(), which sets bench_abort
		 * before it posts. */
		while (!bench_aborted() && atomic_load(w) == FX_ASLEEP)
			bench_futex_wait(w, FX_ASLEEP);
		if (atomic_load(w) != FX_POSTED)
			return -1;
	}
taken:
	atomic_store_explicit(w, FX_EMPTY, memory_order_relaxed);
	return bench_aborted() ? -1 : 0;
}

static void frt_setup(struct rt_rep *r)
{
	r->q = prealloc(sizeof(struct frt));
}

static void frt_serve(struct rt_rep *r)
{
	struct frt *q = r->q;
	uint64_t sum = 0;
	long count = 0;

	while (fx_wait(&q->request) == 0) {
		uint64_t v = q->value;

		if (v != 0) {
			sum += v;
			count++;
		}
		q->reply = v + 1;
		fx_post(&q->reply_word);
		if (v == 0)
			break;
	}
	r->sum = sum;
	r->count = count;
}

static uint64_t frt_call(struct rt_rep *r, uint64_t value)
{
	struct frt *q = r->q;

	q->value = value;
	fx_post(&q->request);
	if (fx_wait(&q->reply_word) < 0)
		return 0;
	return q->reply;
}

static void fx_kick(_Atomic uint32_t *w)
{
	atomic_store(w, FX_POSTED);
	bench_futex_wake(w, 1);
}

static void frt_kick(struct rt_rep *r)
{
	struct frt *q = r->q;

	fx_kick(&q->request);
	fx_kick(&q->reply_word);
}

static void frt_teardown(struct rt_rep *r)
{
	free(r->q);
}

static const struct rt_impl futex_rt = {
	frt_setup, NULL, frt_serve, frt_call, frt_kick, frt_teardown,
};

/* ---- The call benchmark ------------------------------------------------- */

BENCH(call_roundtrip, keel)
{
	return rt_measure(&keel_rt);
}

BENCH(call_roundtrip, mutex_condvar)
{
	return rt_measure(&mutex_condvar_rt);
}

BENCH(call_roundtrip, futex_spin_then_wait)
{
	return rt_measure(&futex_rt);
}

BENCH_TARGET(call_roundtrip, "futex_spin_then_wait", 1.2)
BENCH_TARGET(call_roundtrip, "mutex_condvar", 0.2)
