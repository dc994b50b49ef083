/*
 * lockgraph.c: every lock keel has seen, and the order they were taken in.
 *
 * DESIGN
 * Nodes are locks (instances): a lock gets a node when it is initialised
 * with keel_*_init() or, for a statically initialised one, when it is
 * first taken. An edge A -> B means "B was taken while A was held", with
 * the site where B was taken and where A had been. Edges come from the
 * lock on top of the holder's record. Since a thread's held locks form a
 * chain of such edges, a cycle in the order ever taken shows up as a cycle
 * in this graph.
 *
 * For learned locks the graph is the check: before an edge with a learned
 * lock at either end is added, a breadth-first search from its head (over
 * every lock, ranked ones included: a learned lock taken both before and
 * after a ranked one is a cycle too) looks for its tail; if found, taking
 * the lock would close a cycle (a potential deadlock) and the shortest such
 * cycle, with every edge's sites, goes in the report. Edges between two
 * ranked locks need no search: they follow the levels, which are acyclic.
 * This runs before the lock is taken.
 *
 * Storage is fixed: a node table and an edge table, so the graph never
 * allocates. A lock's out-edges are a list linked through the edge table
 * (each edge knows the next and previous of its tail's, and which node's
 * list it is on), so a lock may be taken before any number of others:
 * memcached takes thousands of hash-striped item locks under one. The
 * out-degree is bounded only by the edge table.
 *
 * If a table fills, nothing switches off: the edge (or the lock) that
 * does not fit is not recorded, one warning says so, and the checking
 * goes on over what is recorded. That is sound in one direction: every
 * recorded edge is an order some thread took, so a cycle found is real;
 * a cycle through an unrecorded edge goes unseen. Level checks go on.
 *
 * A destroyed lock's node gets a new generation and its edges (which
 * record both ends' generations) are stale from then on, so a lock
 * initialised again at the same address carries no stale order. Its
 * out-list is emptied there and then (the node may be reused at once);
 * a stale edge into it stays on its tail's list until a search walks past
 * it or its slot is reused, either of which unlinks it, under the graph
 * lock. A node not live (destroyed, waiting on the free list) takes no
 * edge, and the free list has a link of its own.
 *
 * Edge lookups that find an edge already recorded take no lock: a
 * lock-free probe of a hash table whose slots are published with a release
 * store of their key. Everything else happens under the graph lock.
 */
#include <stdio.h>
#include <string.h>

#include "internal.h"

/* The interposer (libkeel-lockcheck.so) builds this file with larger
 * tables: a whole program's locks, not only keel's. */
#ifndef KEEL_GRAPH_NODES
#define KEEL_GRAPH_NODES 4096
#endif
#ifndef KEEL_GRAPH_EDGES
#define KEEL_GRAPH_EDGES 16384
#endif
#define MAX_NODES KEEL_GRAPH_NODES
#define MAX_EDGES KEEL_GRAPH_EDGES
_Static_assert(MAX_NODES < 65536, "held entries keep node ids in 16 bits");
#define NODE_TAKEN 0x80000000u

struct gnode {
	const void *lock;
	const char *name;
	_Atomic uint32_t gen; /* read by lock-free edge lookups */
	uint16_t level, flags;
	uint8_t live, taken;
	uint32_t next_free; /* the free list's link, while not live */
	uint32_t out_head;  /* first out-edge: its index + 1; 0: none */
};

struct gedge {
	_Atomic uint64_t key; /* from << 32 | to; 0: empty */
	/* Read by lock-free lookups while a slot may be rewritten. */
	_Atomic uint32_t from_gen, to_gen;
	_Atomic uint8_t violation;
	const char *site;      /* where `to` was taken */
	const char *from_site; /* where `from` had been taken */
	/* Under glock: the out-list this slot is on (its tail's, when it
	 * was recorded; 0: none) and its neighbours there (index + 1). */
	uint32_t owner, next_out, prev_out;
};

static pthread_mutex_t glock = PTHREAD_MUTEX_INITIALIZER;
static struct gnode nodes[MAX_NODES + 1]; /* 1-based */
/* KEEL_GRAPH_TABLE_ALIGN: the interposer's tables start on a huge-page
 * boundary (see keel__graph_table()). */
#ifndef KEEL_GRAPH_TABLE_ALIGN
#define KEEL_GRAPH_TABLE_ALIGN 64
#endif
static struct gedge edges[MAX_EDGES]
	__attribute__((aligned(KEEL_GRAPH_TABLE_ALIGN)));
static uint32_t nnodes, free_node;
static _Atomic int graph_warned;
_Atomic uint32_t keel__graph_epoch;

void keel__lockgraph_fork(int phase)
{
	if (phase == 0)
		pthread_mutex_lock(&glock);
	else
		pthread_mutex_unlock(&glock);
}

#define KEEL_STR_(x) #x
#define KEEL_STR(x) KEEL_STR_(x)

static void graph_full(const char *what)
{
	if (load_relaxed(&graph_warned))
		return;
	store_relaxed(&graph_warned, 1);
	keel__report("the lock graph is full (%s): what does not fit is not "
		     "recorded, and a cycle through it goes unseen; checking "
		     "goes on with what is recorded",
		     what);
}

uint32_t keel__graph_node(const struct keel__lockinfo *li, int taken)
{
	uint32_t id, w;

	pthread_mutex_lock(&glock);
	w = __atomic_load_n(li->node, __ATOMIC_RELAXED);
	id = w & ~NODE_TAKEN;
	if (id && nodes[id].live && nodes[id].lock == li->lock) {
		if (taken && !(w & NODE_TAKEN)) {
			nodes[id].taken = 1;
			__atomic_store_n(li->node, id | NODE_TAKEN,
					 __ATOMIC_RELEASE);
		}
		pthread_mutex_unlock(&glock);
		return id;
	}
	if (free_node) {
		id = free_node;
		free_node = nodes[id].next_free;
		/* The id meant another lock: threads' caches of known edges
		 * (by id) start again. */
		fetch_add_relaxed(&keel__graph_epoch, 1);
	} else if (nnodes < MAX_NODES) {
		id = ++nnodes;
	} else {
		graph_full("more than " KEEL_STR(KEEL_GRAPH_NODES) " locks");
		/* Mark it taken anyway, so the fast path stops asking. */
		__atomic_store_n(li->node, NODE_TAKEN, __ATOMIC_RELEASE);
		pthread_mutex_unlock(&glock);
		return 0;
	}
	nodes[id].lock = li->lock;
	nodes[id].name = li->name;
	nodes[id].level = li->level;
	nodes[id].flags = li->flags;
	nodes[id].live = 1;
	nodes[id].taken = taken ? 1 : 0;
	__atomic_store_n(li->node, id | (taken ? NODE_TAKEN : 0),
			 __ATOMIC_RELEASE);
	pthread_mutex_unlock(&glock);
	return id;
}

/* Under glock: take edge slot i off the out-list it is on, if any. */
static void out_unlink(uint32_t i)
{
	struct gedge *e = &edges[i];

	if (!e->owner)
		return;
	if (e->prev_out)
		edges[e->prev_out - 1].next_out = e->next_out;
	else
		nodes[e->owner].out_head = e->next_out;
	if (e->next_out)
		edges[e->next_out - 1].prev_out = e->prev_out;
	e->owner = e->next_out = e->prev_out = 0;
}

/* Under glock: put edge slot i first on u's out-list. */
static void out_link(uint32_t u, uint32_t i)
{
	struct gedge *e = &edges[i];

	e->owner = u;
	e->prev_out = 0;
	e->next_out = nodes[u].out_head;
	if (e->next_out)
		edges[e->next_out - 1].prev_out = i + 1;
	nodes[u].out_head = i + 1;
}

void keel__graph_forget(uint32_t *node)
{
	uint32_t id;

	pthread_mutex_lock(&glock);
	id = __atomic_load_n(node, __ATOMIC_RELAXED) & ~NODE_TAKEN;
	if (id && nodes[id].live) {
		/* A new generation: every edge to or from the old one is
		 * stale now. */
		nodes[id].live = 0;
		nodes[id].lock = NULL;
		store_relaxed(&nodes[id].gen, load_relaxed(&nodes[id].gen) + 1);
		/* Its out-edges are all stale now; the id may be handed out
		 * again at once, with an empty list. */
		while (nodes[id].out_head)
			out_unlink(nodes[id].out_head - 1);
		nodes[id].next_free = free_node;
		free_node = id;
	}
	__atomic_store_n(node, 0u, __ATOMIC_RELEASE);
	pthread_mutex_unlock(&glock);
}

uint64_t keel__graph_identity(uint32_t id)
{
	if (!id || id > MAX_NODES)
		return 0;
	/* The top bit: no user-space address has it. */
	return (uint64_t)1 << 63 | (uint64_t)load_relaxed(&nodes[id].gen) << 16 |
	       id;
}

static uint64_t key_of(uint32_t from, uint32_t to)
{
	return (uint64_t)from << 32 | to;
}

static size_t slot_of(uint64_t key)
{
	key *= 0x9E3779B97F4A7C15ull;
	return (size_t)(key >> 40) % MAX_EDGES;
}

/* An edge's index if it is recorded and current; -1. Lock-free. */
static int edge_find(uint32_t from, uint32_t to)
{
	uint64_t key = key_of(from, to);
	size_t i = slot_of(key);

	for (size_t probe = 0; probe < 64; probe++, i = (i + 1) % MAX_EDGES) {
		/* Pairs with the release store in edge_insert(). */
		uint64_t k = load_acquire(&edges[i].key);

		if (k == 0)
			return -1;
		if (k == key &&
		    load_relaxed(&edges[i].from_gen) ==
			    load_relaxed(&nodes[from].gen) &&
		    load_relaxed(&edges[i].to_gen) == load_relaxed(&nodes[to].gen))
			return (int)i;
	}
	return -1;
}

/* Under glock. */
static int edge_insert(uint32_t from, uint32_t to, const char *site,
		       const char *from_site, int violation)
{
	uint64_t key = key_of(from, to);
	size_t i = slot_of(key);

	for (size_t probe = 0; probe < 64; probe++, i = (i + 1) % MAX_EDGES) {
		uint64_t k = load_relaxed(&edges[i].key);
		struct gedge *e = &edges[i];

		/* A stale edge's slot (an end was destroyed) is reused. */
		if (k && (load_relaxed(&e->from_gen) !=
				  load_relaxed(&nodes[k >> 32].gen) ||
			  load_relaxed(&e->to_gen) !=
				  load_relaxed(&nodes[(uint32_t)k].gen))) {
			out_unlink((uint32_t)i);
			store_relaxed(&e->key, 0);
			k = 0;
		}
		if (k != 0)
			continue;
		store_relaxed(&e->from_gen, load_relaxed(&nodes[from].gen));
		store_relaxed(&e->to_gen, load_relaxed(&nodes[to].gen));
		e->site = site;
		e->from_site = from_site;
		store_relaxed(&e->violation, (uint8_t)violation);
		/* Pairs with the acquire load in edge_find(). */
		store_release(&e->key, key);
		out_link(from, (uint32_t)i);
		return (int)i;
	}
	graph_full("more than " KEEL_STR(KEEL_GRAPH_EDGES) " lock-order edges");
	return -1;
}

static int edge_current(struct gedge *e, uint64_t *k);

/* Under glock: a shortest path from -> ... -> to over current edges, as
 * edge indices into path (reversed); its length, or 0 if there is none. */
static int shortest_path(uint32_t from, uint32_t to, int *path)
{
	static uint32_t queue[MAX_NODES + 1];
	static int via[MAX_NODES + 1]; /* edge that reached the node, or -1 */
	/* seen[v] == mark: reached in this search. A new mark per search
	 * instead of clearing the array: a search usually visits a few
	 * nodes, and clearing all of them cost more than the search. */
	static uint32_t seen[MAX_NODES + 1], mark;
	uint32_t head = 0, tail = 0;
	int n = 0;

	if (++mark == 0) {
		memset(seen, 0, sizeof seen);
		mark = 1;
	}
	queue[tail++] = from;
	seen[from] = mark;
	via[from] = -1;
	while (head < tail) {
		uint32_t u = queue[head++];

		if (u == to)
			break;
		for (uint32_t j = nodes[u].out_head, next; j; j = next) {
			struct gedge *e = &edges[j - 1];
			uint64_t k = load_relaxed(&e->key);
			uint32_t v = (uint32_t)k;

			next = e->next_out;
			if (!k || (uint32_t)(k >> 32) != u ||
			    load_relaxed(&e->from_gen) !=
				    load_relaxed(&nodes[u].gen) ||
			    load_relaxed(&e->to_gen) !=
				    load_relaxed(&nodes[v].gen) ||
			    !nodes[v].live) {
				/* Stale (its head was destroyed): off the
				 * list, so searches stop paying for it. */
				out_unlink(j - 1);
				continue;
			}
			if (seen[v] == mark)
				continue;
			seen[v] = mark;
			via[v] = (int)(j - 1);
			queue[tail++] = v;
		}
	}
	if (seen[to] != mark)
		return 0;
	for (uint32_t v = to; v != from;) {
		path[n++] = via[v];
		v = (uint32_t)(load_relaxed(&edges[via[v]].key) >> 32);
	}
	return n;
}

int keel__graph_edge_each(uint32_t from, uint32_t to, const char *site,
			  const char *from_site, int learned, int violation,
			  keel__graph_each_fn each, void *ctx)
{
	/* Under glock: static, not on a stack that may be a signal's. */
	static int path[MAX_NODES];
	int n = 0, idx;

	if (from == to || !from || !to || from > MAX_NODES || to > MAX_NODES)
		return 0;
	if ((idx = edge_find(from, to)) >= 0 &&
	    (!violation || load_relaxed(&edges[idx].violation)))
		return 0; /* seen before: the common case, lock-free */
	pthread_mutex_lock(&glock);
	if (!nodes[from].live || !nodes[to].live) {
		pthread_mutex_unlock(&glock);
		return 0; /* a stale id: no edge, no cycle */
	}
	if ((idx = edge_find(from, to)) >= 0) {
		if (violation)
			store_relaxed(&edges[idx].violation, 1);
		pthread_mutex_unlock(&glock);
		return 0;
	}
	/* Adding from -> to closes a cycle if to already reaches from. */
	if (learned && each)
		n = shortest_path(to, from, path);
	if (n) {
		/* The new edge first, then the path back to its tail. */
		each(ctx, from, to, site, from_site);
		for (int i = n; i-- > 0;) {
			struct gedge *e = &edges[path[i]];
			uint64_t k = load_relaxed(&e->key);

			each(ctx, (uint32_t)(k >> 32), (uint32_t)k, e->site,
			     e->from_site);
		}
		violation = 1;
	}
	edge_insert(from, to, site, from_site, violation);
	pthread_mutex_unlock(&glock);
	return n;
}

/* keel's own report text for a cycle, as keel__graph_edge() writes it. */
struct cycle_text {
	char *b;
	size_t size, n;
};

static void cycle_edge(void *ctx, uint32_t from, uint32_t to, const char *site,
		       const char *from_site)
{
	struct cycle_text *c = ctx;
	int len;

	if (c->n >= c->size)
		return;
	len = snprintf(c->b + c->n, c->size - c->n,
		       "\nkeel:     '%s' -> '%s': taken at %s while holding it "
		       "from %s%s",
		       nodes[from].name, nodes[to].name, site, from_site,
		       c->n ? "" : " (this taking)");
	c->n += len > 0 && (size_t)len < c->size - c->n ? (size_t)len
							 : c->size - c->n;
}

int keel__graph_edge(uint32_t from, uint32_t to, const char *site,
		     const char *from_site, int learned, int violation,
		     char *buf, size_t size)
{
	struct cycle_text c = {buf, size, 0};

	if (buf && size)
		buf[0] = '\0';
	return keel__graph_edge_each(from, to, site, from_site, learned,
				     violation, buf && size ? cycle_edge : NULL,
				     &c) != 0;
}

const char *keel__graph_name(uint32_t id)
{
	return id && id <= MAX_NODES ? nodes[id].name : NULL;
}

const void *keel__graph_lock(uint32_t id)
{
	return id && id <= MAX_NODES ? nodes[id].lock : NULL;
}

const char *keel__graph_site(uint32_t from, uint32_t to)
{
	int idx;

	if (!from || !to || from > MAX_NODES || to > MAX_NODES)
		return NULL;
	idx = edge_find(from, to);
	return idx >= 0 ? edges[idx].site : NULL;
}

void keel__graph_table(void **start, size_t *bytes)
{
	*start = edges;
	*bytes = sizeof edges;
}

void keel__graph_count(uint32_t *nlocks, uint32_t *nedges)
{
	uint32_t l = 0, e = 0;
	uint64_t k;

	/* Over the live locks' out-lists (every current edge is on its
	 * tail's), not the whole edge table: the table is hashed, and
	 * reading all of it touched every page of it (14.7 MB in the
	 * preload) in a process that learned a handful of edges. */
	pthread_mutex_lock(&glock);
	for (uint32_t id = 1; id <= nnodes; id++) {
		if (!nodes[id].live)
			continue;
		l++;
		for (uint32_t j = nodes[id].out_head; j; j = edges[j - 1].next_out)
			e += edge_current(&edges[j - 1], &k);
	}
	pthread_mutex_unlock(&glock);
	*nlocks = l;
	*nedges = e;
}

/* ---- Export ------------------------------------------------------------------ */

static void put_json_string(FILE *f, const char *s)
{
	fputc('"', f);
	for (; s && *s; s++) {
		unsigned char c = (unsigned char)*s;

		if (c == '"' || c == '\\')
			fprintf(f, "\\%c", c);
		else if (c < 0x20)
			fprintf(f, "\\u%04x", c);
		else
			fputc(c, f);
	}
	fputc('"', f);
}

/* DOT labels: the same escaping keeps them valid. */
static void put_dot_string(FILE *f, const char *s)
{
	put_json_string(f, s);
}

static const char *flag_names[] = {"leaf", "root", "noblock", "noalloc",
				   "recursive"};

static int edge_current(struct gedge *e, uint64_t *k)
{
	*k = load_relaxed(&e->key);
	return *k && nodes[*k >> 32].live && nodes[(uint32_t)*k].live &&
	       load_relaxed(&e->from_gen) == load_relaxed(&nodes[*k >> 32].gen) &&
	       load_relaxed(&e->to_gen) == load_relaxed(&nodes[(uint32_t)*k].gen);
}

static void write_json(FILE *f)
{
	int first = 1;
	uint64_t k;

	fprintf(f, "{\n  \"locks\": [");
	for (uint32_t id = 1; id <= nnodes; id++) {
		struct gnode *n = &nodes[id];
		int ff = 1;

		if (!n->live)
			continue;
		fprintf(f, "%s\n    {\"id\": %u, \"name\": ", first ? "" : ",", id);
		put_json_string(f, n->name);
		fprintf(f, ", \"level\": %u, \"taken\": %s, \"flags\": [", n->level,
			n->taken ? "true" : "false");
		for (int b = 0; b < 5; b++)
			if (n->flags & (1u << b)) {
				fprintf(f, "%s\"%s\"", ff ? "" : ", ", flag_names[b]);
				ff = 0;
			}
		fprintf(f, "]}");
		first = 0;
	}
	fprintf(f, "\n  ],\n  \"edges\": [");
	first = 1;
	for (size_t i = 0; i < MAX_EDGES; i++) {
		struct gedge *e = &edges[i];

		if (!edge_current(e, &k))
			continue;
		fprintf(f, "%s\n    {\"from\": %u, \"to\": %u, \"site\": ",
			first ? "" : ",", (uint32_t)(k >> 32), (uint32_t)k);
		put_json_string(f, e->site);
		fprintf(f, ", \"held_at\": ");
		put_json_string(f, e->from_site);
		fprintf(f, ", \"violation\": %s}",
			load_relaxed(&e->violation) ? "true" : "false");
		first = 0;
	}
	fprintf(f, "\n  ]\n}\n");
}

static void write_dot(FILE *f)
{
	static uint32_t order[MAX_NODES];
	uint32_t count = 0;
	uint64_t k;

	fprintf(f, "digraph keel_locks {\n  rankdir=TB;\n  node [shape=box];\n");
	/* The live locks by level, highest first (insertion sort: no
	 * allocation), one rank per declared level; learned locks apart. */
	for (uint32_t id = 1; id <= nnodes; id++) {
		uint32_t j = count++;

		if (!nodes[id].live) {
			count--;
			continue;
		}
		while (j > 0 && nodes[order[j - 1]].level < nodes[id].level) {
			order[j] = order[j - 1];
			j--;
		}
		order[j] = id;
	}
	for (uint32_t i = 0; i < count;) {
		uint32_t level = nodes[order[i]].level, j = i;

		if (level)
			fprintf(f, "  { rank=same;\n");
		for (; j < count && nodes[order[j]].level == level; j++) {
			struct gnode *n = &nodes[order[j]];

			fprintf(f, "    n%u [label=", order[j]);
			put_dot_string(f, n->name);
			if (level)
				fprintf(f, " xlabel=\"level %u\"", level);
			fprintf(f, "%s];\n",
				n->taken ? ""
					 : " color=grey fontcolor=grey style=dashed");
		}
		if (level)
			fprintf(f, "  }\n");
		i = j;
	}
	for (size_t i = 0; i < MAX_EDGES; i++) {
		struct gedge *e = &edges[i];
		const char *base;

		if (!edge_current(e, &k))
			continue;
		base = e->site ? strrchr(e->site, '/') : NULL;
		/* The drawing names the file without its directory; the JSON
		 * keeps the whole site. */
		fprintf(f, "  n%u -> n%u [label=", (uint32_t)(k >> 32),
			(uint32_t)k);
		put_dot_string(f, base ? base + 1 : e->site);
		fprintf(f, " tooltip=");
		put_dot_string(f, e->site);
		fprintf(f, "%s];\n", load_relaxed(&e->violation)
					     ? " color=red fontcolor=red"
					     : "");
	}
	fprintf(f, "}\n");
}

int keel_lockgraph_write(FILE *f, int format)
{
	if (!f || (format != KEEL_FORMAT_DOT && format != KEEL_FORMAT_JSON))
		return -EINVAL;
	pthread_mutex_lock(&glock);
	if (format == KEEL_FORMAT_DOT)
		write_dot(f);
	else
		write_json(f);
	pthread_mutex_unlock(&glock);
	fflush(f);
	return 0;
}
