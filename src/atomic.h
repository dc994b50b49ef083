/*
 * atomic.h: C11 atomics with the memory order in the name.
 *
 * Every use site says which order it needs, and comments say what each
 * release pairs with. Plain atomic_* calls (implicitly seq_cst) are not used
 * in keel's sources, so an order is always a choice, never a default.
 */
#ifndef KEEL_ATOMIC_H
#define KEEL_ATOMIC_H

#include <stdatomic.h>

#define load_relaxed(p) atomic_load_explicit((p), memory_order_relaxed)
#define load_acquire(p) atomic_load_explicit((p), memory_order_acquire)
#define load_seq_cst(p) atomic_load_explicit((p), memory_order_seq_cst)
#define store_relaxed(p, v) atomic_store_explicit((p), (v), memory_order_relaxed)
#define store_release(p, v) atomic_store_explicit((p), (v), memory_order_release)
#define store_seq_cst(p, v) atomic_store_explicit((p), (v), memory_order_seq_cst)

#define xchg_acq_rel(p, v) atomic_exchange_explicit((p), (v), memory_order_acq_rel)

#define fetch_add_relaxed(p, v) atomic_fetch_add_explicit((p), (v), memory_order_relaxed)
#define fetch_add_acquire(p, v) atomic_fetch_add_explicit((p), (v), memory_order_acquire)
#define fetch_add_acq_rel(p, v) atomic_fetch_add_explicit((p), (v), memory_order_acq_rel)
#define fetch_sub_release(p, v) atomic_fetch_sub_explicit((p), (v), memory_order_release)
#define fetch_sub_acq_rel(p, v) atomic_fetch_sub_explicit((p), (v), memory_order_acq_rel)
#define fetch_or_acq_rel(p, v) atomic_fetch_or_explicit((p), (v), memory_order_acq_rel)
#define fetch_and_acq_rel(p, v) atomic_fetch_and_explicit((p), (v), memory_order_acq_rel)

/* On failure *expp is updated with the value seen, loaded with acquire. */
#define cas_acq_rel(p, expp, v)                                           \
	atomic_compare_exchange_strong_explicit((p), (expp), (v),         \
						memory_order_acq_rel,     \
						memory_order_acquire)
#define cas_weak_acq_rel(p, expp, v)                                      \
	atomic_compare_exchange_weak_explicit((p), (expp), (v),           \
					      memory_order_acq_rel,       \
					      memory_order_acquire)
#define cas_weak_release(p, expp, v)                                      \
	atomic_compare_exchange_weak_explicit((p), (expp), (v),           \
					      memory_order_release,       \
					      memory_order_relaxed)

#define fence_seq_cst() atomic_thread_fence(memory_order_seq_cst)

#endif /* KEEL_ATOMIC_H */
