/* Locks inside malloc: this program's allocator (it replaces the C
 * library's, for the C library's own calls too: the checker's dlsym and
 * backtrace included) takes a pthread mutex on every call. Locks are
 * nested around allocations, threads come and go, and an ABBA is
 * reported: nothing recurses, deadlocks or crashes, and the report
 * itself allocates nothing (the count of allocations made while it was
 * written is checked). */
#include <errno.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

#include "pairs.h"

pthread_mutex_t heap_lock = PTHREAD_MUTEX_INITIALIZER;
pthread_mutex_t lock_a = PTHREAD_MUTEX_INITIALIZER;
pthread_mutex_t lock_b = PTHREAD_MUTEX_INITIALIZER;
static atomic_long allocations;

#define ARENA (64u << 20)
static _Alignas(64) unsigned char arena[ARENA];
static size_t used;

struct hdr {
	size_t size;
	size_t pad;
};

void *malloc(size_t n);
void free(void *p);
void *calloc(size_t k, size_t n);
void *realloc(void *p, size_t n);
int posix_memalign(void **out, size_t align, size_t n);
void *aligned_alloc(size_t align, size_t n);
void *memalign(size_t align, size_t n);

static void *take(size_t n, size_t align)
{
	struct hdr *h;
	size_t start;

	if (align < 16)
		align = 16;
	pthread_mutex_lock(&heap_lock);
	start = (used + sizeof *h + align - 1) & ~(align - 1);
	if (start + n > ARENA) {
		pthread_mutex_unlock(&heap_lock);
		errno = ENOMEM;
		return NULL;
	}
	used = start + n;
	pthread_mutex_unlock(&heap_lock);
	h = (struct hdr *)(void *)(arena + start) - 1;
	h->size = n;
	atomic_fetch_add(&allocations, 1);
	return arena + start;
}

void *malloc(size_t n)
{
	return take(n, 16);
}

void free(void *p)
{
	(void)p; /* a bump allocator */
}

void *calloc(size_t k, size_t n)
{
	void *p = take(k * n, 16); /* the arena is zero and never reused */

	return p;
}

void *realloc(void *p, size_t n)
{
	void *q = take(n, 16);

	if (p && q) {
		size_t old = ((struct hdr *)p - 1)->size;

		memcpy(q, p, old < n ? old : n);
	}
	return q;
}

int posix_memalign(void **out, size_t align, size_t n)
{
	*out = take(n, align);
	return *out ? 0 : ENOMEM;
}

void *aligned_alloc(size_t align, size_t n)
{
	return take(n, align);
}

void *memalign(size_t align, size_t n)
{
	return take(n, align);
}

static void *worker(void *arg)
{
	(void)arg;
	for (int i = 0; i < 1000; i++) {
		pthread_mutex_lock(&lock_a);
		free(malloc(32)); /* lock_a -> heap_lock */
		pthread_mutex_unlock(&lock_a);
	}
	return NULL;
}

int main(void)
{
	pthread_t t[4];
	long before;

	for (int i = 0; i < 4; i++)
		CHECK(pthread_create(&t[i], NULL, worker, NULL) == 0);
	for (int i = 0; i < 4; i++)
		pthread_join(t[i], NULL);
	NEST(&lock_a, &lock_b);
	before = atomic_load(&allocations);
	NEST(&lock_b, &lock_a); /* reported */
	CHECK(atomic_load(&allocations) == before);
	printf("allocations: %ld\n", atomic_load(&allocations));
	return 0;
}
