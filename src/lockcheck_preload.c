/*
 * lockcheck_preload.c: libkeel-lockcheck.so, keel's lock-order checker for
 * any dynamically linked pthread program, loaded with LD_PRELOAD (the
 * keel-lockcheck wrapper sets it).
 *
 * DESIGN
 * The library defines the pthread lock calls (mutexes, rwlocks, spinlocks,
 * condition-variable waits); each one keeps the thread's held record (a
 * struct keel__lockstate, as keel's own locks keep, its entries marked
 * HELD_FOREIGN) and feeds the learned order graph (lockgraph.c), then
 * calls the C library's function, found with dlsym(RTLD_NEXT). A blocking
 * acquisition is checked BEFORE the real call: if the edge from the lock
 * on top of the record to this one would close a cycle, the shortest cycle
 * is reported while the thread can still print it.
 *
 * Fast paths: lock with nothing held and unlock of the lock on top are a
 * few TLS accesses and a tail call into the C library (see
 * pthread_mutex_lock). A nested lock whose nesting the thread has seen
 * before is answered by a per-thread cache (lc_thread.known).
 *
 * Locks are known by address. A lock gets a graph node lazily, the first
 * time it takes part in a nesting (as the lock held or the lock taken), so
 * a lock that is only ever taken alone costs a record push and pop and
 * nothing else. The address -> node table (`slots`) is lock-free to read;
 * pthread_*_init and _destroy forget the lock's node (a new generation in
 * the graph: its edges are gone), so memory freed and reused for another
 * lock starts clean as long as the new lock is initialised with *_init.
 * (A lock set up in reused memory by assigning a static initialiser keeps
 * the old lock's edges: see docs/lockcheck.md.)
 *
 * Each edge, when first learned, gets a record from a fixed ring with the
 * stack it was learned at (backtrace(), warmed at load so that it never
 * allocates later; reused for a later edge at the same two call sites)
 * and the modes of its two ends; the graph stores a pointer to it as the
 * edge's opaque "site". Reports symbolise with dladdr() (module + offset,
 * and the function when the module exports it); `keel-lockcheck
 * --symbolize` turns module + offset into file:line with addr2line
 * afterwards, outside the checked process. The report path allocates
 * nothing.
 *
 * Re-entrance: `busy` (per thread) is set while the checker runs. Lock
 * calls made meanwhile (the graph's own pthread lock, a signal handler
 * that interrupted the checker, a malloc that locks) still push and pop
 * their entries, which balance, but are not checked (a check would
 * re-enter the graph), and an unlock not found is not reported. Start-up
 * is lazy (the first call resolves everything); calls made while dlsym()
 * runs use the C library's compatibility aliases. A fork child keeps the
 * forking thread's record (its locks are held in the child too); the
 * graph's lock is taken around fork() so the child never finds it held.
 *
 * Reader-writer locks: an edge records whether its first end was held for
 * writing and its second taken for writing (bits OR-ed as more threads
 * learn it). A cycle is reported unless some lock in it is taken for
 * reading by one edge while held for reading by the next: glibc's default
 * rwlocks let a reader in while another reader holds the lock, so such a
 * link cannot block (see docs/lockcheck.md).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <dlfcn.h>
#include <errno.h>
#include <execinfo.h>
#include <link.h>
#include <pthread.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "lockcheck.h"

#define EXPORT __attribute__((visibility("default")))
#define RET_ADDR() __builtin_extract_return_addr(__builtin_return_address(0))

/* ---- The C library's functions ---------------------------------------------- */

#define FUNCS(X)                                                            \
	X(pthread_mutex_init) X(pthread_mutex_destroy) X(pthread_mutex_lock)    \
	X(pthread_mutex_trylock) X(pthread_mutex_timedlock)                     \
	X(pthread_mutex_clocklock) X(pthread_mutex_unlock)                      \
	X(pthread_rwlock_init) X(pthread_rwlock_destroy)                        \
	X(pthread_rwlock_rdlock) X(pthread_rwlock_tryrdlock)                    \
	X(pthread_rwlock_timedrdlock) X(pthread_rwlock_clockrdlock)             \
	X(pthread_rwlock_wrlock) X(pthread_rwlock_trywrlock)                    \
	X(pthread_rwlock_timedwrlock) X(pthread_rwlock_clockwrlock)             \
	X(pthread_rwlock_unlock) X(pthread_spin_init) X(pthread_spin_destroy)  \
	X(pthread_spin_lock) X(pthread_spin_trylock) X(pthread_spin_unlock)     \
	X(pthread_cond_wait) X(pthread_cond_timedwait) X(pthread_cond_clockwait)

#define ENUM(f) F_##f,
enum { FUNCS(ENUM) NFUNCS };
#define NAME(f) #f,
static const char *const fnames[NFUNCS] = {FUNCS(NAME)};
/* Any function, as C lets function pointers be converted among
 * themselves (not to or from void *). */
typedef void (*anyfn)(void);
static _Atomic(anyfn) real[NFUNCS];

/* The C library's own aliases, for calls made while dlsym() itself runs
 * (it may allocate, and a malloc may lock). They are compatibility
 * symbols, bound by version: x86-64's base version here; elsewhere such a
 * call finds no function and the library says so. */
#if defined(__x86_64__)
#define COMPAT(name, ret, args)                                             \
	extern ret lc_compat_##name args;                                   \
	__asm__(".symver lc_compat_" #name ", __" #name "@GLIBC_2.2.5");
COMPAT(pthread_mutex_lock, int, (pthread_mutex_t *))
COMPAT(pthread_mutex_trylock, int, (pthread_mutex_t *))
COMPAT(pthread_mutex_unlock, int, (pthread_mutex_t *))
COMPAT(pthread_mutex_init, int, (pthread_mutex_t *, const pthread_mutexattr_t *))
COMPAT(pthread_mutex_destroy, int, (pthread_mutex_t *))
COMPAT(pthread_rwlock_rdlock, int, (pthread_rwlock_t *))
COMPAT(pthread_rwlock_wrlock, int, (pthread_rwlock_t *))
COMPAT(pthread_rwlock_unlock, int, (pthread_rwlock_t *))
#define HAVE_COMPAT 1
#endif

#define KNOWN_BITS 9
#define KNOWN (1u << KNOWN_BITS)

/* The thread's record and flags, one TLS block: the fast paths reach
 * both from one thread-pointer offset. */
struct lc_thread {
	struct keel__lockstate ls; /* the held record */
	uint32_t busy; /* in the checker: lock calls go straight through */
	uint32_t in_dlsym;
	/* Nestings this thread knows are in the graph, by the addresses of
	 * the held lock and the taken one, so that a known nesting skips
	 * the address table and the graph (and, for a default mutex, the
	 * out-of-line path: pthread_mutex_lock() answers it inline).
	 * Direct-mapped; an entry is valid only while lc_forgets has not
	 * moved since it was written (an address may now be another lock;
	 * both had nodes when it was written, so either one's destroy or
	 * re-init moves lc_forgets). 512 entries: a server that stripes its
	 * data under thousands of locks (memcached's 4096 item locks, each
	 * taken before a few others) nests many locks, not deeply. */
	uint32_t known_epoch[KNOWN];
	uintptr_t known_from[KNOWN], known_to[KNOWN];
	/* Stacks recently taken at a pair of call sites (where the held
	 * lock was taken, where this one is): the index of the record
	 * holding it, +1. An unwind costs microseconds; locks created and
	 * destroyed under a long-lived one make a new edge at the same two
	 * sites each time. */
	uint32_t stack_at[16];
};
static KEEL_TLS struct lc_thread lc_t;

/* *_init and *_destroy: whatever was learned about this address is about
 * another lock. */
static _Atomic uint32_t lc_forgets;

static inline size_t known_at(const void *from, const void *to)
{
	uint64_t k = (uint64_t)(uintptr_t)from * 0x9E3779B97F4A7C15ull ^
		     (uint64_t)(uintptr_t)to;

	return (size_t)((k * 0xC2B2AE3D27D4EB4Full) >> (64 - KNOWN_BITS));
}

/* 1 if this thread knows "to taken while from is held" is in the graph. */
static inline int known_nesting(const void *from, const void *to)
{
	size_t i = known_at(from, to);

	return lc_t.known_from[i] == (uintptr_t)from &&
	       lc_t.known_to[i] == (uintptr_t)to &&
	       lc_t.known_epoch[i] ==
		       atomic_load_explicit(&lc_forgets, memory_order_relaxed);
}

static inline void know_nesting(const void *from, const void *to,
				uint32_t forgets)
{
	size_t i = known_at(from, to);

	lc_t.known_from[i] = (uintptr_t)from;
	lc_t.known_to[i] = (uintptr_t)to;
	lc_t.known_epoch[i] = forgets;
}

static anyfn fallback(int i)
{
#ifdef HAVE_COMPAT
	switch (i) {
	case F_pthread_mutex_lock: return (anyfn)lc_compat_pthread_mutex_lock;
	case F_pthread_mutex_trylock: return (anyfn)lc_compat_pthread_mutex_trylock;
	case F_pthread_mutex_unlock: return (anyfn)lc_compat_pthread_mutex_unlock;
	case F_pthread_mutex_init: return (anyfn)lc_compat_pthread_mutex_init;
	case F_pthread_mutex_destroy: return (anyfn)lc_compat_pthread_mutex_destroy;
	case F_pthread_rwlock_rdlock: return (anyfn)lc_compat_pthread_rwlock_rdlock;
	case F_pthread_rwlock_wrlock: return (anyfn)lc_compat_pthread_rwlock_wrlock;
	case F_pthread_rwlock_unlock: return (anyfn)lc_compat_pthread_rwlock_unlock;
	default: return NULL;
	}
#else
	(void)i;
	return NULL;
#endif
}

/* The C library's function i, resolved now if it is not yet; NULL if
 * the C library has none (an older glibc without the clock* calls: a
 * program that calls them could not have been linked against it). */
static anyfn resolve(int i)
{
	anyfn p = atomic_load_explicit(&real[i], memory_order_relaxed);
	void *sym;

	if (p)
		return p;
	if (lc_t.in_dlsym)
		return fallback(i);
	lc_t.in_dlsym = 1;
	sym = dlsym(RTLD_NEXT, fnames[i]);
	lc_t.in_dlsym = 0;
	_Static_assert(sizeof sym == sizeof p, "POSIX: dlsym gives functions");
	memcpy(&p, &sym, sizeof p);
	if (p)
		atomic_store_explicit(&real[i], p, memory_order_relaxed);
	return p;
}

static __attribute__((noinline)) anyfn real_slow(int i)
{
	anyfn p = resolve(i);

	if (!p)
		p = fallback(i);
	if (!p) {
		static const char msg[] = "keel-lockcheck: a pthread function "
					  "is missing from the C library\n";

		if (write(STDERR_FILENO, msg, sizeof msg - 1) < 0) {
			/* Nothing more can be done. */
		}
		abort();
	}
	return p;
}

static inline anyfn real_fn(int i)
{
	anyfn p = atomic_load_explicit(&real[i], memory_order_relaxed);

	return likely(p != NULL) ? p : real_slow(i);
}

#define REAL(f) ((__typeof__(&f))real_fn(F_##f))
/* Once on() said yes: start() has resolved every function. */
#define REAL_ON(f)                                                          \
	((__typeof__(&f))atomic_load_explicit(&real[F_##f], memory_order_relaxed))

/* ---- State ---------------------------------------------------------------- */

/* lockcheck.c's keel__locks (lock.c defines keel's): this library keeps
 * its record in lc_t and never calls what reads this one. */
KEEL_TLS struct keel__lockstate keel__locks;

/* ST_NEW until start() has run (it resolves every real function and
 * reads the policy), then ST_ON or ST_OFF: one load says both "started"
 * and "checking". lc_started makes start() run once. */
enum { ST_NEW, ST_ON, ST_OFF };
static _Atomic int lc_state;
static _Atomic int lc_started;
static int bt_warm;        /* backtrace() has loaded what it needs */
static void *self_base;    /* this library's load address */
static char exe_name[256]; /* the main program, for frames in it */

/* Lock kinds and flags, in the entry's bits beside HELD_FOREIGN. */
#define K_MUTEX 0
#define K_RW 64
#define K_SPIN 128
#define K_KIND (K_RW | K_SPIN)
#define K_TRY 32 /* taken by a trylock: no edge was learned to it */

static const char *kind_name(unsigned bits)
{
	switch (bits & K_KIND) {
	case K_RW: return "rwlock";
	case K_SPIN: return "spinlock";
	default: return "mutex";
	}
}

/* The hashed tables (this one and the graph's edges) are touched at
 * random: a few thousand locks touch every 4 KB page of them, two faults
 * each (a read maps the zero page, the first write copies it), which in a
 * short run cost more than the checking. They start on a huge-page
 * boundary and are advised to use huge pages (start()): a fault per 2 MB.
 * Where transparent huge pages are off, nothing changes. */
#define HUGE_PAGE ((size_t)2 << 20)

/* Address -> node id. A slot, once given to an address, keeps it; the
 * node is 0 until the lock first takes part in a nesting, and again after
 * its *_destroy or *_init (keel__graph_forget() writes the 0). */
#define SLOT_BITS 17
#define NSLOTS (1u << SLOT_BITS)
#define SLOT_PROBES 256
struct slot {
	_Atomic uintptr_t addr;
	uint32_t node; /* the graph's word for this lock (NODE_TAKEN | id) */
	uint32_t pad;
};
static struct slot slots[NSLOTS] __attribute__((aligned(HUGE_PAGE)));

static struct slot *slot_of(const void *lock, int create)
{
	uintptr_t a = (uintptr_t)lock;
	size_t i = (size_t)(((uint64_t)a * 0x9E3779B97F4A7C15ull) >> (64 - SLOT_BITS));

	for (size_t p = 0; p < SLOT_PROBES; p++, i = (i + 1) & (NSLOTS - 1)) {
		uintptr_t cur = load_acquire(&slots[i].addr);

		if (cur == a)
			return &slots[i];
		if (cur == 0) {
			if (!create)
				return NULL;
			if (atomic_compare_exchange_strong_explicit(
				    &slots[i].addr, &cur, a, memory_order_acq_rel,
				    memory_order_acquire) ||
			    cur == a)
				return &slots[i];
		}
	}
	return NULL;
}

/* The lock's node, made if it has none; 0 if the tables are full. */
static uint32_t node_of(void *lock)
{
	struct slot *s = slot_of(lock, 1);
	uint32_t w;
	struct keel__lockinfo li;

	if (!s)
		return 0;
	w = __atomic_load_n(&s->node, __ATOMIC_ACQUIRE) & ~NODE_TAKEN;
	if (w)
		return w;
	li = (struct keel__lockinfo){lock, NULL, &s->node, 0, 0};
	return keel__graph_node(&li, 1);
}

/* Under busy. */
static void forget(void *lock)
{
	struct slot *s = slot_of(lock, 0);

	if (s && __atomic_load_n(&s->node, __ATOMIC_RELAXED)) {
		keel__graph_forget(&s->node);
		atomic_fetch_add_explicit(&lc_forgets, 1, memory_order_relaxed);
	}
}

/* *_init: a new lock at this address. If the calling thread's record has
 * the old one (a fork child handler that makes a held lock anew, as
 * pthread_atfork users do), it is not held any more. Under busy. */
static void reinit(void *lock)
{
	struct keel__lockstate *ls = &lc_t.ls;

	forget(lock);
	for (int i = (int)ls->depth; i-- > 0;)
		if (ls->stack[i].lock == lock)
			keel__held_remove(ls, i);
}

/* ---- Edges' records ------------------------------------------------------- */

#define EDGE_FRAMES 16
#define HOLD_W 1 /* the first end was held for writing (or is not a rwlock) */
#define TAKE_W 2 /* the second end was taken for writing */
struct erec {
	void *frames[EDGE_FRAMES];
	void *held_at; /* where the first end had been taken */
	void *pc;      /* where the second end was taken */
	/* The edge it was made for (the ends' graph identities): the pool
	 * is a ring, and a record reused for a newer edge says so. */
	_Atomic uint64_t from_id, to_id;
	uint8_t nframes;
	_Atomic uint8_t modes;
	uint8_t from_bits, to_bits; /* kinds */
};
/* As many as the graph has edges: a program that learns more (locks
 * made and destroyed under a long-lived one, over and over) wraps round,
 * and the oldest edges' stacks are lost (their reports say so). */
#define NRECS KEEL_GRAPH_EDGES
static struct erec recs[NRECS];
static _Atomic uint32_t nrecs;

static struct erec *erec_new(void)
{
	uint32_t i = atomic_fetch_add_explicit(&nrecs, 1, memory_order_relaxed);

	return &recs[i % NRECS];
}

/* 1 if e is still the record of the edge from -> to. */
static int erec_is(const struct erec *e, uint32_t from, uint32_t to)
{
	return e &&
	       atomic_load_explicit(&e->from_id, memory_order_relaxed) ==
		       keel__graph_identity(from) &&
	       atomic_load_explicit(&e->to_id, memory_order_relaxed) ==
		       keel__graph_identity(to);
}

/* ---- Report text ----------------------------------------------------------- */

#define P "keel-lockcheck: "

/* A code address: function+offset when the module exports a symbol that
 * spans it, and always [module+offset] (what --symbolize reads). pc is a
 * return address: the call is at pc - 1. */
static void rb_pc(struct keel__rbuf *r, void *pc)
{
	Dl_info di;
	const ElfW(Sym) *sym = NULL;
	uintptr_t a = (uintptr_t)pc - 1;
	const char *mod;

	if (!pc || !dladdr1((void *)a, &di, (void **)(uintptr_t)&sym, RTLD_DL_SYMENT)) {
		keel__rb_add(r, "%p", pc);
		return;
	}
	mod = di.dli_fname && di.dli_fname[0] ? di.dli_fname : exe_name;
	keel__rb_add(r, "%p", pc);
	if (di.dli_sname && di.dli_saddr && sym &&
	    a < (uintptr_t)di.dli_saddr + (sym->st_size ? sym->st_size : 1))
		keel__rb_add(r, " %s+%#lx", di.dli_sname,
			     (unsigned long)(a - (uintptr_t)di.dli_saddr));
	keel__rb_add(r, " [%s+%#lx]", mod, (unsigned long)(a - (uintptr_t)di.dli_fbase));
}

static void rb_lock(struct keel__rbuf *r, const void *lock, unsigned bits)
{
	Dl_info di;
	const ElfW(Sym) *sym = NULL;

	keel__rb_add(r, "%s %p", kind_name(bits), lock);
	/* A lock that is a named variable of a module that exports it. */
	if (dladdr1(lock, &di, (void **)(uintptr_t)&sym, RTLD_DL_SYMENT) && di.dli_sname &&
	    sym && (uintptr_t)lock >= (uintptr_t)di.dli_saddr &&
	    (uintptr_t)lock < (uintptr_t)di.dli_saddr + sym->st_size) {
		if ((uintptr_t)lock == (uintptr_t)di.dli_saddr)
			keel__rb_add(r, " (%s)", di.dli_sname);
		else
			keel__rb_add(r, " (%s+%#lx)", di.dli_sname,
				     (unsigned long)((uintptr_t)lock -
						     (uintptr_t)di.dli_saddr));
	}
}

static int own_frame(void *pc)
{
	Dl_info di;

	return dladdr(pc, &di) && di.dli_fbase == self_base;
}

static void rb_frames(struct keel__rbuf *r, void *const *frames, int n,
		      int max)
{
	int shown = 0;

	for (int i = 0; i < n && shown < max; i++) {
		if (own_frame(frames[i]))
			continue;
		keel__rb_add(r, "\n" P "      #%d ", shown++);
		rb_pc(r, frames[i]);
	}
	if (!shown)
		keel__rb_add(r, "\n" P "      (no stack)");
}

/* The stack here; before backtrace() is warm (a constructor that ran
 * before this library's), only the caller's pc. */
static int stack_here(void **frames, int max, void *pc)
{
	if (!bt_warm) {
		frames[0] = pc;
		return 1;
	}
	return backtrace(frames, max);
}

static void rb_thread(struct keel__rbuf *r)
{
	char name[16] = "";

	/* pthread_getname_np reads /proc for other threads only: for the
	 * calling thread it is prctl(PR_GET_NAME), no allocation. */
	if (pthread_getname_np(pthread_self(), name, sizeof name) != 0)
		name[0] = '\0';
	keel__rb_add(r, "thread %ld", (long)gettid());
	if (name[0])
		keel__rb_add(r, " '%s'", name);
}

static void rb_held_list(struct keel__rbuf *r, struct keel__lockstate *ls)
{
	uint32_t d = ls->depth;

	keel__rb_add(r, "\n" P "  ");
	rb_thread(r);
	keel__rb_add(r, " holds %u lock%s%s", d + ls->unrec,
		     d + ls->unrec == 1 ? "" : "s", d + ls->unrec ? ":" : "");
	for (uint32_t i = 0; i < d; i++) {
		struct keel__held *h = &ls->stack[i];

		keel__rb_add(r, "\n" P "    #%u ", i);
		rb_lock(r, h->lock, h->bits);
		keel__rb_add(r, "%s%s, taken at ",
			     h->mode == LM_SHARED ? " (read)" : "",
			     h->bits & K_TRY ? " (trylock)" : "");
		rb_pc(r, (void *)(uintptr_t)h->site);
		if (h->bits & HELD_WAITING)
			keel__rb_add(r, " (released: waiting on a cond)");
	}
	if (ls->unrec)
		keel__rb_add(r, "\n" P "    ... and %u more, past the record's "
				"capacity", ls->unrec);
}

/* For keel's own report code, should it meet an entry of ours. */
static void describe(struct keel__rbuf *r, const struct keel__held *h)
{
	rb_lock(r, h->lock, h->bits);
	keel__rb_add(r, " taken at ");
	rb_pc(r, (void *)(uintptr_t)h->site);
}

/* ---- The record ------------------------------------------------------------ */

/* Signal-safe against a handler that takes locks on this thread: the
 * slot is claimed (depth raised) while its lock is NULL, which every
 * reader skips, and the lock is written last; a handler runs its pushes
 * and pops above it. Compiler fences suffice: the handler runs on this
 * thread. */
static inline void push(struct keel__lockstate *ls, void *lock, void *pc,
			int mode, unsigned bits)
{
	uint32_t d = ls->depth;
	struct keel__held *h;

	if (unlikely(d >= KEEL_LOCK_STACK)) {
		ls->unrec++;
		return;
	}
	h = &ls->stack[d];
	h->lock = NULL;
	atomic_signal_fence(memory_order_seq_cst);
	ls->depth = d + 1;
	atomic_signal_fence(memory_order_seq_cst);
	h->site = (const char *)pc;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
	{
		/* min, node 0 (none yet), mode, bits: one store, as
		 * held_tail() does for keel's locks. */
		uint64_t w = (uint64_t)LEVEL_NONE | (uint64_t)mode << 48 |
			     (uint64_t)(HELD_FOREIGN | bits) << 56;

		memcpy((char *)h + offsetof(struct keel__held, min), &w, sizeof w);
	}
#else
	h->min = LEVEL_NONE;
	h->node = 0;
	h->mode = (uint8_t)mode;
	h->bits = (uint8_t)(HELD_FOREIGN | bits);
#endif
	atomic_signal_fence(memory_order_seq_cst);
	h->lock = lock;
}

/* ---- Reports ---------------------------------------------------------------- */

static void report_self(void *lock, unsigned bits, int mode,
			const struct keel__held *held, const char *what, void *pc)
{
	struct keel__rbuf r;
	void *frames[EDGE_FRAMES];
	int n;

	if (!keel__lc_first_time(R_RECURSION, (uint64_t)(uintptr_t)lock,
				 (uint64_t)(uintptr_t)held->site))
		return;
	n = stack_here(frames, EDGE_FRAMES, pc);
	r.n = 0;
	keel__rb_add(&r, P "%s: ", what);
	rb_thread(&r);
	keel__rb_add(&r, " takes ");
	rb_lock(&r, lock, bits);
	keel__rb_add(&r, "%s again while holding it%s, at:",
		     mode == LM_SHARED ? " for reading" : "",
		     held->mode == LM_SHARED ? " for reading" : "");
	rb_frames(&r, frames, n, 10);
	keel__rb_add(&r, "\n" P "    it was taken at ");
	rb_pc(&r, (void *)(uintptr_t)held->site);
	rb_held_list(&r, &lc_t.ls);
	keel__lc_report_end(&r);
}

static void report_not_held(void *lock, unsigned bits, void *pc)
{
	struct keel__rbuf r;
	void *frames[EDGE_FRAMES];
	int n;

	if (!keel__lc_first_time(R_NOT_HELD, (uint64_t)(uintptr_t)lock,
				 (uint64_t)(uintptr_t)pc))
		return;
	n = stack_here(frames, EDGE_FRAMES, pc);
	r.n = 0;
	keel__rb_add(&r, P "unlock of a lock the thread does not hold: ");
	rb_thread(&r);
	keel__rb_add(&r, " unlocks ");
	rb_lock(&r, lock, bits);
	keel__rb_add(&r, " at:");
	rb_frames(&r, frames, n, 10);
	rb_held_list(&r, &lc_t.ls);
	keel__lc_report_end(&r);
}

/* A cycle as the graph gives it: the new edge, then the path back. */
#define CYCLE_MAX 64
#define CYCLE_SHOW 6
struct cycle {
	uint32_t n;
	uint32_t from[CYCLE_MAX], to[CYCLE_MAX];
	const struct erec *rec[CYCLE_MAX];
	const void *from_lock[CYCLE_MAX], *to_lock[CYCLE_MAX];
	uint64_t hash;
};

static void cycle_edge(void *ctx, uint32_t from, uint32_t to, const char *site,
		       const char *from_site)
{
	struct cycle *c = ctx;

	(void)from_site;
	/* Order-independent, so one cycle closed at different edges is
	 * one report. */
	c->hash += (keel__graph_identity(from) * 0x9E3779B97F4A7C15ull) ^
		   (keel__graph_identity(to) * 0xC2B2AE3D27D4EB4Full);
	if (c->n < CYCLE_MAX) {
		c->from[c->n] = from;
		c->to[c->n] = to;
		c->rec[c->n] = (const struct erec *)(const void *)site;
		c->from_lock[c->n] = keel__graph_lock(from);
		c->to_lock[c->n] = keel__graph_lock(to);
	}
	c->n++;
}

/* 1 if some lock in the cycle is taken for reading by one edge and held
 * for reading by the next: that link cannot block (glibc's rwlocks admit
 * a reader while readers hold the lock), so neither can the cycle. */
static int cycle_can_block(const struct cycle *c)
{
	uint32_t n = c->n < CYCLE_MAX ? c->n : CYCLE_MAX;

	if (c->n > CYCLE_MAX)
		return 1;
	/* Edge i takes to[i]; the edge that holds it is the one leaving
	 * to[i] (matched by node: the edges come in path order, not cycle
	 * order). */
	for (uint32_t i = 0; i < n; i++)
		for (uint32_t j = 0; j < n; j++)
			if (c->from[j] == c->to[i] &&
			    erec_is(c->rec[i], c->from[i], c->to[i]) &&
			    erec_is(c->rec[j], c->from[j], c->to[j]) &&
			    !(atomic_load_explicit(&c->rec[i]->modes,
						   memory_order_relaxed) & TAKE_W) &&
			    !(atomic_load_explicit(&c->rec[j]->modes,
						   memory_order_relaxed) & HOLD_W))
				return 0;
	return 1;
}

static void report_cycle(struct cycle *c, void *lock, unsigned bits,
			 const struct keel__held *top)
{
	struct keel__rbuf r;
	uint32_t n = c->n < CYCLE_MAX ? c->n : CYCLE_MAX;

	if (!cycle_can_block(c) ||
	    !keel__lc_first_time(R_CYCLE, c->hash | 1, 0))
		return;
	r.n = 0;
	keel__rb_add(&r, P "lock order cycle (a possible deadlock): ");
	rb_thread(&r);
	keel__rb_add(&r, " takes ");
	rb_lock(&r, lock, bits);
	keel__rb_add(&r, " while holding ");
	rb_lock(&r, top->lock, top->bits);
	keel__rb_add(&r, ", which closes a cycle of %u lock%s:", c->n,
		     c->n == 1 ? "" : "s");
	/* A long cycle is shown in part, fewer frames an edge, so the
	 * report fits its buffer. */
	if (n > CYCLE_SHOW)
		n = CYCLE_SHOW;
	for (uint32_t i = 0; i < n; i++) {
		const struct erec *e = c->rec[i];
		int valid = erec_is(e, c->from[i], c->to[i]);
		unsigned fb = valid ? e->from_bits : 0, tb = valid ? e->to_bits : 0;

		keel__rb_add(&r, "\n" P "  ");
		rb_lock(&r, c->from_lock[i], fb);
		keel__rb_add(&r, " -> ");
		rb_lock(&r, c->to_lock[i], tb);
		keel__rb_add(&r, "%s", i == 0 ? ": this thread, now, at:"
					      : ": learned at:");
		if (!valid) {
			keel__rb_add(&r, "\n" P "      (stack lost: more edges "
					 "were learned than are kept)");
		} else {
			rb_frames(&r, e->frames, e->nframes,
				  c->n <= 4 ? 10 : c->n <= 8 ? 3 : 1);
			if (c->n <= 8) {
				keel__rb_add(&r, "\n" P "    while holding the "
						 "first, taken at ");
				rb_pc(&r, e->held_at);
			}
		}
	}
	if (c->n > n)
		keel__rb_add(&r, "\n" P "  ... and %u more edges", c->n - n);
	rb_held_list(&r, &lc_t.ls);
	keel__lc_report_end(&r);
}

/* ---- The check -------------------------------------------------------------- */

/* Learn "lock taken while h is held"; report if that closes a cycle. */
static void learn(struct keel__held *h, void *lock, unsigned bits, int mode,
		  void *pc)
{
	uint32_t from, to;
	uint8_t modes = (uint8_t)((h->mode == LM_EXCL ? HOLD_W : 0) |
				  (mode == LM_EXCL ? TAKE_W : 0));
	struct erec *e;
	const char *known;
	struct cycle c;

	uint32_t forgets = atomic_load_explicit(&lc_forgets, memory_order_relaxed);

	if (known_nesting(h->lock, lock))
		return;
	if (!h->node)
		h->node = (uint16_t)node_of(h->lock);
	from = h->node;
	if (!from)
		return;
	to = node_of(lock);
	if (!to || from == to)
		return;
	know_nesting(h->lock, lock, forgets);
	/* Known to the graph already (another thread learned it): only
	 * its modes may grow. */
	if ((known = keel__graph_site(from, to)) != NULL) {
		e = (struct erec *)(uintptr_t)known;
		/* A write only when the modes grow: the record is shared,
		 * and threads that take the same order keep reading it. */
		if (erec_is(e, from, to) &&
		    (atomic_load_explicit(&e->modes, memory_order_relaxed) &
		     modes) != modes)
			atomic_fetch_or_explicit(&e->modes, modes,
						 memory_order_relaxed);
		return;
	}
	e = erec_new();
	e->pc = pc;
	{
		/* The same two call sites as a recent edge: its stack (the
		 * callers further up may differ; the sites do not). */
		uint32_t *sc = &lc_t.stack_at[(((uintptr_t)h->site ^
					     (uintptr_t)pc * 0x9E3779B97F4A7C15ull) >>
					    7) & 15];
		const struct erec *prev = *sc ? &recs[*sc - 1] : NULL;

		if (prev && prev != e && prev->pc == pc &&
		    prev->held_at == (void *)(uintptr_t)h->site && prev->nframes) {
			memcpy(e->frames, prev->frames, sizeof e->frames);
			e->nframes = prev->nframes;
		} else {
			e->nframes = (uint8_t)stack_here(e->frames, EDGE_FRAMES, pc);
		}
		*sc = (uint32_t)(e - recs) + 1;
	}
	e->held_at = (void *)(uintptr_t)h->site;
	atomic_store_explicit(&e->from_id, keel__graph_identity(from),
			      memory_order_relaxed);
	atomic_store_explicit(&e->to_id, keel__graph_identity(to),
			      memory_order_relaxed);
	e->from_bits = h->bits;
	e->to_bits = (uint8_t)bits;
	atomic_store_explicit(&e->modes, modes, memory_order_relaxed);
	c.n = 0;
	c.hash = 0;
	if (keel__graph_edge_each(from, to, (const char *)e, h->site, 1, 0,
				  cycle_edge, &c))
		report_cycle(&c, lock, bits, h);
}

/* Before a blocking acquisition. 1 if the lock is held by the thread
 * already and may be taken again (recursive mutex, read after read), so
 * no edge is learned; 0 otherwise (reported if it deadlocks). */
static int check(struct keel__lockstate *ls, void *lock, unsigned bits,
		 int mode, int recursive_ok, void *pc)
{
	int d = (int)ls->depth;

	for (int i = d; i-- > 0;) {
		struct keel__held *h = &ls->stack[i];

		if (h->lock != lock)
			continue;
		if (recursive_ok || (mode == LM_SHARED && h->mode == LM_SHARED &&
				     (bits & K_KIND) == K_RW))
			return 1;
		report_self(lock, bits, mode, h,
			    (bits & K_KIND) == K_RW
				    ? "rwlock taken again by its holder "
				      "(self-deadlock)"
				    : "lock taken again by its holder "
				      "(self-deadlock, AA)",
			    pc);
		return 0;
	}
	/* An edge from the lock on top, and from the ones under it while
	 * the one above was a trylock (an edge to a trylock was never
	 * learned, so the chain would not carry the order). */
	for (int i = d; i-- > 0;) {
		struct keel__held *h = &ls->stack[i];

		if (!h->lock || (h->bits & HELD_WAITING))
			continue;
		learn(h, lock, bits, mode, pc);
		if (!(h->bits & K_TRY))
			break;
	}
	return 0;
}

/* ---- Start-up and exit --------------------------------------------------------- */

/* The graph's lock around fork(), taken as the checker's own (busy): not
 * checked, and so never in the program's order. */
static void atfork_prepare(void)
{
	lc_t.busy++;
	keel__lockgraph_fork(0);
	lc_t.busy--;
}

static void atfork_parent(void)
{
	lc_t.busy++;
	keel__lockgraph_fork(1);
	lc_t.busy--;
}

static void atfork_child(void)
{
	lc_t.busy++;
	keel__lockgraph_fork(2);
	lc_t.busy--;
}

static void huge_pages(void *p, size_t n)
{
#ifdef MADV_HUGEPAGE
	uintptr_t a = ((uintptr_t)p + HUGE_PAGE - 1) & ~(uintptr_t)(HUGE_PAGE - 1);
	uintptr_t e = ((uintptr_t)p + n) & ~(uintptr_t)(HUGE_PAGE - 1);

	if (e > a)
		(void)madvise((void *)a, e - a, MADV_HUGEPAGE);
#else
	(void)p;
	(void)n;
#endif
}

static void start(void)
{
	void *table;
	size_t bytes;
	int expected = 0;
	Dl_info di;
	ssize_t n;

	if (!atomic_compare_exchange_strong(&lc_started, &expected, 1))
		return;
	lc_t.busy++;
	huge_pages(slots, sizeof slots);
	keel__graph_table(&table, &bytes);
	huge_pages(table, bytes);
	for (int i = 0; i < NFUNCS; i++)
		(void)resolve(i);
	if (dladdr((void *)(uintptr_t)start, &di))
		self_base = di.dli_fbase;
	n = readlink("/proc/self/exe", exe_name, sizeof exe_name - 1);
	exe_name[n > 0 ? n : 0] = '\0';
	keel__lc_describe = describe;
	/* report: see docs/lockcheck.md for why it is this tool's default. */
	keel__lc_read_policy(KEEL_LOCKCHECK_REPORT);
	atomic_store(&lc_state, keel__lc_checking() ? ST_ON : ST_OFF);
	lc_t.busy--;
}

__attribute__((constructor)) static void lc_init(void)
{
	void *frames[4];

	start();
	lc_t.busy++;
	/* backtrace() loads libgcc_s (allocating) on first use: now, not
	 * in a report or inside someone's malloc. */
	(void)backtrace(frames, 4);
	bt_warm = 1;
	pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
	lc_t.busy--;
}

__attribute__((destructor)) static void lc_fini(void)
{
	struct keel__rbuf r;
	uint32_t locks, edges;
	static const char *const names[] = {"abort", "report", "off"};

	if (atomic_load(&lc_state) != ST_ON)
		return;
	lc_t.busy++;
	keel__graph_count(&locks, &edges);
	r.n = 0;
	keel__rb_add(&r, P "%u locks seen nested, %u order edges, %lu "
			   "report%s (KEEL_LOCKCHECK=%s)\n",
		     locks, edges, load_relaxed(&keel__lc_nreports),
		     load_relaxed(&keel__lc_nreports) == 1 ? "" : "s",
		     names[load_relaxed(&keel__lc_policy)]);
	if (write(STDERR_FILENO, r.b, r.n) < 0) {
		/* Nothing more can be done. */
	}
	lc_t.busy--;
}

/* Checking is on (starting it if this is the first call). Lock and
 * unlock calls then keep the record even inside the checker (the
 * graph's own lock, a signal handler that interrupted the checker): a
 * push and its pop are balanced, and what `busy` forbids is only the
 * check, which would re-enter the graph. */
static inline int on(void)
{
	int st = atomic_load_explicit(&lc_state, memory_order_relaxed);

	if (unlikely(st == ST_NEW)) {
		start();
		st = atomic_load_explicit(&lc_state, memory_order_relaxed);
	}
	return likely(st == ST_ON);
}

/* On, and not inside the checker. */
static inline int active(void)
{
	return on() && likely(!lc_t.busy);
}

/* ---- Acquire and release, whatever the kind ------------------------------------ */

/* After a successful acquisition (or a failed one: rc != 0 records
 * nothing). */
static inline void acquired(void *lock, void *pc, int mode, unsigned bits)
{
	push(&lc_t.ls, lock, pc, mode, bits);
}

/* Before a blocking acquisition with something held. 1: a permitted
 * relock (no edge). */
static __attribute__((noinline)) int before(void *lock, unsigned bits,
					    int mode, int recursive_ok, void *pc)
{
	int r;

	lc_t.busy++;
	r = check(&lc_t.ls, lock, bits, mode, recursive_ok, pc);
	lc_t.busy--;
	return r;
}

/* The general way of a release: not the lock on top. Its newest entry
 * goes; without one, one of the locks taken past the record's capacity;
 * else the thread does not hold it: reported. */
static __attribute__((noinline)) void release_slow(void *lock, unsigned bits,
						   void *pc)
{
	struct keel__lockstate *ls = &lc_t.ls;
	int d = (int)ls->depth;

	lc_t.busy++;
	for (int i = d; i-- > 0;)
		if (ls->stack[i].lock == lock) {
			keel__held_remove(ls, i);
			lc_t.busy--;
			return;
		}
	if (ls->unrec)
		ls->unrec--;
	else if (lc_t.busy == 1)
		report_not_held(lock, bits, pc);
	/* else: inside the checker, no report (nor a check). */
	lc_t.busy--;
}

static inline void release(void *lock, unsigned bits, void *pc)
{
	struct keel__lockstate *ls = &lc_t.ls;
	uint32_t d = ls->depth;

	if (likely(d - 1 < KEEL_LOCK_STACK && ls->stack[d - 1].lock == lock)) {
		ls->depth = d - 1;
		return;
	}
	release_slow(lock, bits, pc);
}

/* A lock call with checking off: straight through. */
#define PASS_LOCK(call) return (call)

/* The check before a blocking acquisition applies: something is held,
 * and the caller is not the checker itself. */
static inline int must_check(void)
{
	return unlikely(lc_t.ls.depth != 0) && likely(!lc_t.busy);
}

/* ---- Mutexes --------------------------------------------------------------------- */

static inline int mutex_type(const pthread_mutex_t *m)
{
	return m->__data.__kind & 3; /* PTHREAD_MUTEX_KIND_MASK_NP */
}

EXPORT int pthread_mutex_init(pthread_mutex_t *m, const pthread_mutexattr_t *a)
{
	if (active()) {
		lc_t.busy++;
		reinit(m);
		lc_t.busy--;
	}
	return REAL(pthread_mutex_init)(m, a);
}

EXPORT int pthread_mutex_destroy(pthread_mutex_t *m)
{
	int rc = REAL(pthread_mutex_destroy)(m);

	if (rc == 0 && active()) {
		lc_t.busy++;
		forget(m);
		lc_t.busy--;
	}
	return rc;
}

/* The checks before a blocking mutex acquisition; 1: relock, no edge. */
static inline int mutex_before(pthread_mutex_t *m, void *pc)
{
	if (!must_check())
		return 0;
	return before(m, K_MUTEX, LM_EXCL,
		      mutex_type(m) == PTHREAD_MUTEX_RECURSIVE, pc);
}

static inline int mutex_after(pthread_mutex_t *m, int rc, void *pc)
{
	/* EOWNERDEAD: a robust mutex taken from a dead owner, held now. */
	if (likely(rc == 0) || rc == EOWNERDEAD)
		acquired(m, pc, LM_EXCL, K_MUTEX);
	return rc;
}

/* A mutex of the default kind (normal, not robust, not priority-aware:
 * __kind 0) cannot fail to lock: its entry is pushed first and the C
 * library's lock is a tail call, no frame of ours around it. A signal
 * handler that runs between the two and takes locks sees the mutex as
 * held, which it may as well have been had the signal come a moment
 * later: whatever it reports could happen. */
static __attribute__((noinline)) int mutex_lock_slow(pthread_mutex_t *m,
						     void *pc)
{
	if (unlikely(!on()))
		return REAL(pthread_mutex_lock)(m);
	mutex_before(m, pc);
	if (likely(m->__data.__kind == 0)) {
		acquired(m, pc, LM_EXCL, K_MUTEX);
		return REAL_ON(pthread_mutex_lock)(m);
	}
	return mutex_after(m, REAL_ON(pthread_mutex_lock)(m), pc);
}

/* A nesting the check would pass without learning anything: the lock on
 * top is an ordinary hold (not a trylock's, not released by a condition
 * wait), this thread has seen the same nesting in the graph, and the lock
 * is not held already (a self-deadlock is reported by the slow path). */
static inline int nested_known(struct keel__lockstate *ls, void *lock,
			       uint32_t d)
{
	const struct keel__held *top;

	if (unlikely(d - 1 >= KEEL_LOCK_STACK || lc_t.busy))
		return 0;
	top = &ls->stack[d - 1];
	if (!top->lock || (top->bits & (HELD_WAITING | K_TRY)))
		return 0;
	for (uint32_t i = 0; i < d; i++)
		if (ls->stack[i].lock == lock)
			return 0;
	return known_nesting(top->lock, lock);
}

/* The common cases inline: checking on, a default mutex, and nothing held
 * (nothing to check) or a nesting known to be in the graph; the entry
 * goes on the record. */
EXPORT int pthread_mutex_lock(pthread_mutex_t *m)
{
	uint32_t d = lc_t.ls.depth;

	if (likely(atomic_load_explicit(&lc_state, memory_order_relaxed) == ST_ON &&
		   m->__data.__kind == 0 &&
		   (d == 0 || nested_known(&lc_t.ls, m, d)))) {
		push(&lc_t.ls, m, RET_ADDR(), LM_EXCL, K_MUTEX);
		return REAL_ON(pthread_mutex_lock)(m);
	}
	return mutex_lock_slow(m, RET_ADDR());
}

EXPORT int pthread_mutex_timedlock(pthread_mutex_t *m, const struct timespec *t)
{
	if (unlikely(!on()))
		PASS_LOCK(REAL(pthread_mutex_timedlock)(m, t));
	mutex_before(m, RET_ADDR());
	return mutex_after(m, REAL_ON(pthread_mutex_timedlock)(m, t), RET_ADDR());
}

EXPORT int pthread_mutex_clocklock(pthread_mutex_t *m, clockid_t c,
				   const struct timespec *t)
{
	if (unlikely(!on()))
		PASS_LOCK(REAL(pthread_mutex_clocklock)(m, c, t));
	mutex_before(m, RET_ADDR());
	return mutex_after(m, REAL_ON(pthread_mutex_clocklock)(m, c, t), RET_ADDR());
}

EXPORT int pthread_mutex_trylock(pthread_mutex_t *m)
{
	int rc;

	if (unlikely(!on()))
		PASS_LOCK(REAL(pthread_mutex_trylock)(m));
	/* No check and no edge to it: a trylock cannot wait. */
	rc = REAL_ON(pthread_mutex_trylock)(m);
	if (rc == 0 || rc == EOWNERDEAD)
		acquired(m, RET_ADDR(), LM_EXCL, K_MUTEX | K_TRY);
	return rc;
}

static __attribute__((noinline)) int mutex_unlock_slow(pthread_mutex_t *m,
						       void *pc)
{
	if (likely(on())) {
		release(m, K_MUTEX, pc);
		return REAL_ON(pthread_mutex_unlock)(m);
	}
	return REAL(pthread_mutex_unlock)(m);
}

/* The common case inline: the mutex on top of the record. (Nothing is
 * ever recorded unless checking is on, so a match says it is.) */
EXPORT int pthread_mutex_unlock(pthread_mutex_t *m)
{
	uint32_t d = lc_t.ls.depth;

	if (likely(d - 1 < KEEL_LOCK_STACK && lc_t.ls.stack[d - 1].lock == m)) {
		lc_t.ls.depth = d - 1;
		return REAL_ON(pthread_mutex_unlock)(m);
	}
	return mutex_unlock_slow(m, RET_ADDR());
}

/* ---- Reader-writer locks ------------------------------------------------------------ */

EXPORT int pthread_rwlock_init(pthread_rwlock_t *l, const pthread_rwlockattr_t *a)
{
	if (active()) {
		lc_t.busy++;
		reinit(l);
		lc_t.busy--;
	}
	return REAL(pthread_rwlock_init)(l, a);
}

EXPORT int pthread_rwlock_destroy(pthread_rwlock_t *l)
{
	int rc = REAL(pthread_rwlock_destroy)(l);

	if (rc == 0 && active()) {
		lc_t.busy++;
		forget(l);
		lc_t.busy--;
	}
	return rc;
}

static inline int rw_after(pthread_rwlock_t *l, int rc, int mode, void *pc,
			   unsigned extra)
{
	if (rc == 0)
		acquired(l, pc, mode, K_RW | extra);
	return rc;
}

#define RW_BEFORE(l, mode)                                                  \
	do {                                                                \
		if (must_check())                                           \
			before((l), K_RW, (mode), 0, RET_ADDR());           \
	} while (0)

EXPORT int pthread_rwlock_rdlock(pthread_rwlock_t *l)
{
	if (unlikely(!on()))
		PASS_LOCK(REAL(pthread_rwlock_rdlock)(l));
	RW_BEFORE(l, LM_SHARED);
	return rw_after(l, REAL_ON(pthread_rwlock_rdlock)(l), LM_SHARED, RET_ADDR(), 0);
}

EXPORT int pthread_rwlock_timedrdlock(pthread_rwlock_t *l, const struct timespec *t)
{
	if (unlikely(!on()))
		PASS_LOCK(REAL(pthread_rwlock_timedrdlock)(l, t));
	RW_BEFORE(l, LM_SHARED);
	return rw_after(l, REAL_ON(pthread_rwlock_timedrdlock)(l, t), LM_SHARED,
			RET_ADDR(), 0);
}

EXPORT int pthread_rwlock_clockrdlock(pthread_rwlock_t *l, clockid_t c,
				      const struct timespec *t)
{
	if (unlikely(!on()))
		PASS_LOCK(REAL(pthread_rwlock_clockrdlock)(l, c, t));
	RW_BEFORE(l, LM_SHARED);
	return rw_after(l, REAL_ON(pthread_rwlock_clockrdlock)(l, c, t), LM_SHARED,
			RET_ADDR(), 0);
}

EXPORT int pthread_rwlock_tryrdlock(pthread_rwlock_t *l)
{
	if (unlikely(!on()))
		PASS_LOCK(REAL(pthread_rwlock_tryrdlock)(l));
	return rw_after(l, REAL_ON(pthread_rwlock_tryrdlock)(l), LM_SHARED,
			RET_ADDR(), K_TRY);
}

EXPORT int pthread_rwlock_wrlock(pthread_rwlock_t *l)
{
	if (unlikely(!on()))
		PASS_LOCK(REAL(pthread_rwlock_wrlock)(l));
	RW_BEFORE(l, LM_EXCL);
	return rw_after(l, REAL_ON(pthread_rwlock_wrlock)(l), LM_EXCL, RET_ADDR(), 0);
}

EXPORT int pthread_rwlock_timedwrlock(pthread_rwlock_t *l, const struct timespec *t)
{
	if (unlikely(!on()))
		PASS_LOCK(REAL(pthread_rwlock_timedwrlock)(l, t));
	RW_BEFORE(l, LM_EXCL);
	return rw_after(l, REAL_ON(pthread_rwlock_timedwrlock)(l, t), LM_EXCL,
			RET_ADDR(), 0);
}

EXPORT int pthread_rwlock_clockwrlock(pthread_rwlock_t *l, clockid_t c,
				      const struct timespec *t)
{
	if (unlikely(!on()))
		PASS_LOCK(REAL(pthread_rwlock_clockwrlock)(l, c, t));
	RW_BEFORE(l, LM_EXCL);
	return rw_after(l, REAL_ON(pthread_rwlock_clockwrlock)(l, c, t), LM_EXCL,
			RET_ADDR(), 0);
}

EXPORT int pthread_rwlock_trywrlock(pthread_rwlock_t *l)
{
	if (unlikely(!on()))
		PASS_LOCK(REAL(pthread_rwlock_trywrlock)(l));
	return rw_after(l, REAL_ON(pthread_rwlock_trywrlock)(l), LM_EXCL, RET_ADDR(),
			K_TRY);
}

EXPORT int pthread_rwlock_unlock(pthread_rwlock_t *l)
{
	if (likely(on())) {
		release(l, K_RW, RET_ADDR());
		return REAL_ON(pthread_rwlock_unlock)(l);
	}
	return REAL(pthread_rwlock_unlock)(l);
}

/* ---- Spinlocks ------------------------------------------------------------------------ */

EXPORT int pthread_spin_init(pthread_spinlock_t *s, int pshared)
{
	if (active()) {
		lc_t.busy++;
		reinit((void *)(uintptr_t)s);
		lc_t.busy--;
	}
	return REAL(pthread_spin_init)(s, pshared);
}

EXPORT int pthread_spin_destroy(pthread_spinlock_t *s)
{
	int rc = REAL(pthread_spin_destroy)(s);

	if (rc == 0 && active()) {
		lc_t.busy++;
		forget((void *)(uintptr_t)s);
		lc_t.busy--;
	}
	return rc;
}

EXPORT int pthread_spin_lock(pthread_spinlock_t *s)
{
	void *lock = (void *)(uintptr_t)s;

	if (unlikely(!on()))
		PASS_LOCK(REAL(pthread_spin_lock)(s));
	if (must_check())
		before(lock, K_SPIN, LM_EXCL, 0, RET_ADDR());
	if (REAL_ON(pthread_spin_lock)(s) == 0) {
		acquired(lock, RET_ADDR(), LM_EXCL, K_SPIN);
		return 0;
	}
	return EINVAL;
}

EXPORT int pthread_spin_trylock(pthread_spinlock_t *s)
{
	int rc;

	if (unlikely(!on()))
		PASS_LOCK(REAL(pthread_spin_trylock)(s));
	rc = REAL_ON(pthread_spin_trylock)(s);
	if (rc == 0)
		acquired((void *)(uintptr_t)s, RET_ADDR(), LM_EXCL, K_SPIN | K_TRY);
	return rc;
}

EXPORT int pthread_spin_unlock(pthread_spinlock_t *s)
{
	if (likely(on())) {
		release((void *)(uintptr_t)s, K_SPIN, RET_ADDR());
		return REAL_ON(pthread_spin_unlock)(s);
	}
	return REAL(pthread_spin_unlock)(s);
}

/* ---- Condition variables ------------------------------------------------------------------
 * The mutex is released while the thread waits and held again when the
 * call returns (whatever it returns): its entry stays, marked waiting, so
 * that no edge is learned from it meanwhile (a signal handler's lock). */

static int cond_mark(pthread_mutex_t *m)
{
	struct keel__lockstate *ls = &lc_t.ls;

	for (int i = (int)ls->depth; i-- > 0;)
		if (ls->stack[i].lock == m) {
			ls->stack[i].bits |= HELD_WAITING;
			return i;
		}
	return -1;
}

static void cond_unmark(pthread_mutex_t *m)
{
	struct keel__lockstate *ls = &lc_t.ls;

	for (int i = (int)ls->depth; i-- > 0;)
		if (ls->stack[i].lock == m && (ls->stack[i].bits & HELD_WAITING)) {
			ls->stack[i].bits &= (uint8_t)~HELD_WAITING;
			return;
		}
}

EXPORT int pthread_cond_wait(pthread_cond_t *c, pthread_mutex_t *m)
{
	int rc, i = active() ? cond_mark(m) : -1;

	rc = REAL(pthread_cond_wait)(c, m);
	if (i >= 0)
		cond_unmark(m);
	return rc;
}

EXPORT int pthread_cond_timedwait(pthread_cond_t *c, pthread_mutex_t *m,
				  const struct timespec *t)
{
	int rc, i = active() ? cond_mark(m) : -1;

	rc = REAL(pthread_cond_timedwait)(c, m, t);
	if (i >= 0)
		cond_unmark(m);
	return rc;
}

EXPORT int pthread_cond_clockwait(pthread_cond_t *c, pthread_mutex_t *m,
				  clockid_t clk, const struct timespec *t)
{
	int rc, i = active() ? cond_mark(m) : -1;

	rc = REAL(pthread_cond_clockwait)(c, m, clk, t);
	if (i >= 0)
		cond_unmark(m);
	return rc;
}
