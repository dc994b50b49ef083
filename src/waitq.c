/*
 * waitq.c: queues of cancellable waiters, shared by keel's mutexes,
 * condition variables (lock.c) and once (once.c).
 *
 * DESIGN
 * A waiter that must stay cancellable cannot sleep on a futex word of the
 * object it waits for: a canceller's wake-up could come just before the
 * sleep and be lost. It queues a node (struct keel__qnode, on its own
 * stack) on the object instead and sleeps on its task's parker, which
 * cancellation wakes too. The queue is a singly linked list guarded by a
 * small lock word of the object's (keel__qlock()); a waker unlinks the
 * node, then publishes `woken` with a release store, after which the node
 * may vanish (its owner returns).
 */
#include "internal.h"

#define A_LOAD(p) __atomic_load_n((p), __ATOMIC_RELAXED)
#define A_LOAD_ACQ(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define A_STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELAXED)
#define A_STORE_REL(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)

static _Atomic uint32_t *fword(uint32_t *p)
{
	return (_Atomic uint32_t *)(void *)p;
}

/* The queue lock: held for a few pointer moves, so a taker spins a
 * little, then sleeps (0 free, 1 held, 2 held and someone may sleep). A
 * pure spin lock convoys when threads outnumber CPUs: a holder preempted
 * inside leaves every spinner to burn its whole time slice before it runs
 * again (a thousand callers of one keel_once() stalled for minutes). */
#define QLOCK_SPINS 64

void keel__qlock(uint32_t *q)
{
	uint32_t z = 0;

	if (__atomic_compare_exchange_n(q, &z, 1, 0, __ATOMIC_ACQUIRE,
					__ATOMIC_RELAXED))
		return;
	for (int i = 0; i < QLOCK_SPINS; i++) {
		keel__cpu_relax();
		z = 0;
		if (A_LOAD(q) == 0 &&
		    __atomic_compare_exchange_n(q, &z, 1, 0, __ATOMIC_ACQUIRE,
						__ATOMIC_RELAXED))
			return;
	}
	while (__atomic_exchange_n(q, 2, __ATOMIC_ACQUIRE) != 0)
		keel__futex_wait(fword(q), 2, KEEL_FOREVER);
}

void keel__qunlock(uint32_t *q)
{
	if (__atomic_exchange_n(q, 0, __ATOMIC_RELEASE) == 2)
		keel__futex_wake(fword(q), 1);
}

void keel__q_append(void **head, struct keel__qnode *n)
{
	struct keel__qnode **pp = (struct keel__qnode **)head;

	n->next = NULL;
	A_STORE(&n->woken, 0);
	while (*pp)
		pp = &(*pp)->next;
	A_STORE_REL(pp, n);
}

void keel__q_remove(void **head, struct keel__qnode *n)
{
	for (struct keel__qnode **pp = (struct keel__qnode **)head; *pp; pp = &(*pp)->next)
		if (*pp == n) {
			A_STORE(pp, n->next);
			return;
		}
}

/* Wake the first queued waiter (or all); under nothing. */
void keel__q_wake(void **head, uint32_t *ql, int all)
{
	struct keel__qnode *n;

	if (!A_LOAD_ACQ(head))
		return;
	keel__qlock(ql);
	while ((n = *(struct keel__qnode **)head) != NULL) {
		struct keel__task *t = n->t;

		A_STORE(head, n->next);
		/* After this store the node's owner may return: read
		 * nothing from it afterwards. */
		A_STORE_REL(&n->woken, 1);
		keel__unpark(t);
		if (!all)
			break;
	}
	keel__qunlock(ql);
}
