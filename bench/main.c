/*
 * main.c: the benchmark harness; see bench.h for how benchmarks are written.
 *
 * DESIGN
 * Benchmarks register themselves from constructors, so adding a file with
 * BENCH(...) definitions to the executable is all it takes to run it. The
 * harness groups registrations by bench id, in the order ids were first
 * registered, and puts "keel" first in each group.
 *
 * A group is measured as one unit: one untimed warm-up repetition of every
 * impl, then KEEL_BENCH_REPS (default 7) rounds in which each impl runs one
 * timed repetition in turn. Interleaving the impls means a burst of noise
 * on a shared machine lands on all of them rather than on one impl's
 * consecutive repetitions, so the ratios to keel stay meaningful even when
 * the absolute figures move. Each impl is reported by its median over the
 * repetitions, with the minimum and maximum to show the spread.
 *
 * An impl that returns BENCH_DNF for any repetition (the watchdog gave up
 * on it) runs no further repetitions, is printed as "did not finish" and is
 * left out of the JSON file and of the ratios.
 *
 * After the tables come the target checks that the benchmark files
 * registered: the measured ratio of keel's median to a peer's and whether
 * it meets the target. They are information only: the exit status is 0
 * whatever they say. It is non-zero only for a usage error, or an abort
 * when a benchmark computed a wrong result.
 *
 * Usage: keel_bench [-o results.json] [--list] [filter...]
 * A filter is a substring of "id/impl", or its end if the filter ends in
 * '$' (mailbox_1p1c/keel$); an impl runs if it matches any
 * filter given as an argument or in KEEL_BENCH_FILTER, or if none is
 * given. Environment: KEEL_BENCH_REPS, KEEL_BENCH_SCALE (a multiplier of
 * operation counts), KEEL_BENCH_TIMEOUT (seconds allowed per repetition),
 * KEEL_BENCH_VERBOSE=1 (print every repetition's figures to stderr).
 */
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench.h"

#define MAX_ENTRIES 256
#define MAX_TARGETS 64
#define DEFAULT_REPS 7
#define DEFAULT_LIMIT_S 10.0

struct entry {
	const char *id;
	const char *impl;
	bench_fn fn;       /* NULL for a skipped impl */
	const char *skip;  /* why it is skipped */
	int selected;      /* matched the filter */
	int dnf;           /* a repetition did not finish */
	int nsamples;
	double *samples;   /* ns per operation, one per timed repetition */
	double median, min, max;
	/* Figures recorded with bench_extra(), one sample per timed rep. */
	int nextras;
	struct extra {
		const char *name;
		int n;
		double *samples;
		double median, min, max;
	} extras[BENCH_MAX_EXTRAS];
};

struct target {
	const char *id;
	const char *impl; /* keel's impl the target is for */
	const char *peer; /* NULL: the fastest peer */
	double max_ratio;
};

static struct entry entries[MAX_ENTRIES];
static int nentries;
static struct target targets[MAX_TARGETS];
static int ntargets;

static double scale = 1.0;
static int verbose;
static int64_t rep_limit_ns = (int64_t)(DEFAULT_LIMIT_S * 1e9);

atomic_int bench_abort;

/* ---- Registration -------------------------------------------------------- */

static struct entry *new_entry(const char *id, const char *impl)
{
	if (nentries == MAX_ENTRIES) {
		fprintf(stderr, "keel_bench: too many benchmarks\n");
		abort();
	}
	entries[nentries].id = id;
	entries[nentries].impl = impl;
	return &entries[nentries++];
}

void bench_register(const char *id, const char *impl, bench_fn fn)
{
	new_entry(id, impl)->fn = fn;
}

void bench_register_skip(const char *id, const char *impl, const char *why)
{
	new_entry(id, impl)->skip = why;
}

void bench_register_target(const char *id, const char *impl, const char *peer,
			   double max_ratio)
{
	if (ntargets == MAX_TARGETS) {
		fprintf(stderr, "keel_bench: too many targets\n");
		abort();
	}
	targets[ntargets].id = id;
	targets[ntargets].impl = impl;
	targets[ntargets].peer = peer;
	targets[ntargets].max_ratio = max_ratio;
	ntargets++;
}

/* ---- Services for the benchmarks ---------------------------------------- */

double bench_scale(void)
{
	return scale;
}

long bench_count(long base, long min)
{
	double n = (double)base * scale;

	return n < (double)min ? min : (long)(n + 0.5);
}

int64_t bench_rep_limit(void)
{
	return rep_limit_ns;
}

void bench_fail(const char *fmt, ...)
{
	va_list ap;

	fflush(stdout);
	fprintf(stderr, "keel_bench: FAILED: ");
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fprintf(stderr, "\n");
	fflush(stderr);
	abort();
}

pthread_t bench_thread(void *(*fn)(void *), void *arg)
{
	pthread_t th;
	int rc = pthread_create(&th, NULL, fn, arg);

	if (rc != 0)
		bench_fail("pthread_create: %s", strerror(rc));
	return th;
}

void bench_join(pthread_t th)
{
	int rc = pthread_join(th, NULL);

	if (rc != 0)
		bench_fail("pthread_join: %s", strerror(rc));
}

void bench_event_init(struct bench_event *e)
{
	pthread_condattr_t ca;

	pthread_mutex_init(&e->mu, NULL);
	/* The deadline is on CLOCK_MONOTONIC, so a clock step cannot
	 * stretch or cut the watchdog's limit. */
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&e->cv, &ca);
	pthread_condattr_destroy(&ca);
	e->set = 0;
}

void bench_event_destroy(struct bench_event *e)
{
	pthread_cond_destroy(&e->cv);
	pthread_mutex_destroy(&e->mu);
}

void bench_event_set(struct bench_event *e)
{
	pthread_mutex_lock(&e->mu);
	e->set = 1;
	pthread_cond_broadcast(&e->cv);
	pthread_mutex_unlock(&e->mu);
}

int bench_event_wait(struct bench_event *e)
{
	int64_t deadline = bench_now() + rep_limit_ns;
	struct timespec ts = {
		.tv_sec = (time_t)(deadline / 1000000000),
		.tv_nsec = (long)(deadline % 1000000000),
	};
	int rc = 0;

	pthread_mutex_lock(&e->mu);
	while (!e->set && rc != ETIMEDOUT)
		rc = pthread_cond_timedwait(&e->cv, &e->mu, &ts);
	rc = e->set ? 0 : -1;
	pthread_mutex_unlock(&e->mu);
	if (rc < 0)
		atomic_store(&bench_abort, 1);
	return rc;
}

/* ---- Running ----------------------------------------------------------- */

/* The impls run, in the order of the table. */
static struct entry *run_order[MAX_ENTRIES];
static int nrun;

static const char *filters[64];
static int nfilters;

static int matches(const struct entry *e)
{
	char name[256];

	if (nfilters == 0)
		return 1;
	snprintf(name, sizeof name, "%s/%s", e->id, e->impl);
	for (int i = 0; i < nfilters; i++) {
		size_t n = strlen(filters[i]), len = strlen(name);

		/* "...$": the name ends with it (mailbox_2p1c/keel$ is keel
		 * alone, without keel_msg). */
		if (n && filters[i][n - 1] == '$') {
			n--;
			if (n <= len &&
			    strncmp(name + len - n, filters[i], n) == 0)
				return 1;
		} else if (strstr(name, filters[i])) {
			return 1;
		}
	}
	return 0;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return (x > y) - (x < y);
}

/* Sort n samples; their median, minimum and maximum. */
static void stats(double *s, int n, double *median, double *min, double *max)
{
	qsort(s, (size_t)n, sizeof *s, cmp_double);
	*min = s[0];
	*max = s[n - 1];
	*median = n % 2 ? s[n / 2] : (s[n / 2 - 1] + s[n / 2]) / 2;
}

static void summarise(struct entry *e)
{
	stats(e->samples, e->nsamples, &e->median, &e->min, &e->max);
	for (int i = 0; i < e->nextras; i++) {
		struct extra *x = &e->extras[i];

		if (x->n > 0)
			stats(x->samples, x->n, &x->median, &x->min, &x->max);
	}
}

/* The impl whose repetition runs, for bench_extra(), and whether it is
 * timed. */
static struct entry *cur_entry;
static int cur_timed;
static int total_reps;

void bench_extra(const char *name, double value)
{
	struct entry *e = cur_entry;
	struct extra *x = NULL;

	if (!e || !cur_timed)
		return;
	for (int i = 0; i < e->nextras; i++)
		if (strcmp(e->extras[i].name, name) == 0)
			x = &e->extras[i];
	if (!x) {
		if (e->nextras == BENCH_MAX_EXTRAS)
			bench_fail("%s/%s: too many bench_extra names", e->id,
				   e->impl);
		x = &e->extras[e->nextras++];
		x->name = name;
		x->samples = calloc((size_t)total_reps, sizeof(double));
		if (!x->samples)
			bench_fail("out of memory");
	}
	if (x->n < total_reps)
		x->samples[x->n++] = value;
}

/* One repetition of one impl; a DNF ends the impl's run. */
static void run_rep(struct entry *e, int timed)
{
	double ns;

	if (e->dnf)
		return;
	atomic_store(&bench_abort, 0);
	cur_entry = e;
	cur_timed = timed;
	ns = e->fn();
	cur_entry = NULL;
	if (ns < 0 || atomic_load(&bench_abort)) {
		e->dnf = 1;
		fprintf(stderr, "  %s/%s did not finish within %g s\n", e->id,
			e->impl, (double)rep_limit_ns / 1e9);
		return;
	}
	if (verbose) {
		fprintf(stderr, "  %s/%s %s: %.1f ns", e->id, e->impl,
			timed ? "rep" : "warm-up", ns);
		/* This repetition's own figures, to tell a slow repetition's
		 * cause (a sleeping consumer, a busy sender) from the rest. */
		for (int i = 0; timed && i < e->nextras; i++)
			if (e->extras[i].n == e->nsamples + 1)
				fprintf(stderr, " %s %.3g", e->extras[i].name,
					e->extras[i].samples[e->nsamples]);
		fputc('\n', stderr);
	}
	if (timed)
		e->samples[e->nsamples++] = ns;
}

/* Format ns as a plain decimal with a precision that suits its size. */
static const char *fmt_ns(char *buf, size_t size, double ns)
{
	if (ns < 1)
		snprintf(buf, size, "%.3f", ns);
	else if (ns < 10)
		snprintf(buf, size, "%.2f", ns);
	else
		snprintf(buf, size, "%.1f", ns);
	return buf;
}

static struct entry *find(const char *id, const char *impl)
{
	for (int i = 0; i < nentries; i++)
		if (strcmp(entries[i].id, id) == 0 &&
		    strcmp(entries[i].impl, impl) == 0)
			return &entries[i];
	return NULL;
}

/* A measured impl: selected, run, and finished. */
static int measured(const struct entry *e)
{
	return e && e->fn && e->selected && !e->dnf && e->nsamples > 0;
}

static void print_group(const char *id, struct entry **group, int n)
{
	const struct entry *keel = find(id, "keel");
	char a[32], b[32], c[32];

	for (int i = 0; i < n; i++) {
		const struct entry *e = group[i];
		const char *col = i == 0 ? id : "";

		if (e->dnf) {
			printf("%-16s %-22s %12s\n", col, e->impl,
			       "did not finish");
			continue;
		}
		printf("%-16s %-22s %12s %10s %10s", col, e->impl,
		       fmt_ns(a, sizeof a, e->median),
		       fmt_ns(b, sizeof b, e->min), fmt_ns(c, sizeof c, e->max));
		if (measured(keel))
			printf(" %10.2f\n", keel->median / e->median);
		else
			printf(" %10s\n", "-");
	}
	/* The figures measured beside the time, median (min-max). */
	for (int i = 0; i < n; i++) {
		const struct entry *e = group[i];

		if (e->dnf || e->nextras == 0)
			continue;
		printf("%-16s   %s:", "", e->impl);
		for (int k = 0; k < e->nextras; k++) {
			const struct extra *x = &e->extras[k];

			if (x->n > 0)
				printf(" %s %.3g (%.3g-%.3g)", x->name, x->median,
				       x->min, x->max);
		}
		printf("\n");
	}
	fflush(stdout);
}

static void run_group(const char *id, int reps)
{
	struct entry *group[MAX_ENTRIES];
	int n = 0;

	/* keel first, then the peers in registration order. */
	for (int pass = 0; pass < 2; pass++)
		for (int i = 0; i < nentries; i++) {
			struct entry *e = &entries[i];
			int is_keel = strcmp(e->impl, "keel") == 0;

			if (strcmp(e->id, id) != 0 || !e->selected || !e->fn ||
			    is_keel != (pass == 0))
				continue;
			group[n++] = e;
		}
	if (n == 0)
		return;
	fprintf(stderr, "running %s: %d impl%s, 1 warm-up + %d reps\n", id, n,
		n == 1 ? "" : "s", reps);
	for (int i = 0; i < n; i++) {
		group[i]->samples = calloc((size_t)reps, sizeof(double));
		if (!group[i]->samples)
			bench_fail("out of memory");
		run_rep(group[i], 0);
	}
	for (int r = 0; r < reps; r++)
		for (int i = 0; i < n; i++)
			run_rep(group[i], 1);
	for (int i = 0; i < n; i++) {
		if (!group[i]->dnf)
			summarise(group[i]);
		run_order[nrun++] = group[i];
	}
	print_group(id, group, n);
}

/* Impls named <peer>_prealloc measure a peer without the per-message
 * allocation keel_post() does: a reference, not a like-for-like peer. */
#define VARIANT_SUFFIX "_prealloc"

static int is_variant(const char *impl)
{
	size_t n = strlen(impl), k = strlen(VARIANT_SUFFIX);

	return n > k && strcmp(impl + n - k, VARIANT_SUFFIX) == 0;
}

/* Impls named <peer>_line are reference rows: a _prealloc variant
 * reshaped to show one cost of keel's (bench_mailbox.c), compared with
 * nothing. */
#define REFERENCE_SUFFIX "_line"

static int is_reference(const char *impl)
{
	size_t n = strlen(impl), k = strlen(REFERENCE_SUFFIX);

	return n > k && strcmp(impl + n - k, REFERENCE_SUFFIX) == 0;
}

/* The fastest measured impl of a bench other than keel's own (keel and
 * keel_*) and the reference rows: among the like-for-like peers, or
 * (variants != 0) among the variants. */
static const struct entry *fastest_peer(const char *id, int variants)
{
	const struct entry *best = NULL;

	for (int i = 0; i < nentries; i++) {
		const struct entry *e = &entries[i];

		if (strcmp(e->id, id) == 0 && strncmp(e->impl, "keel", 4) != 0 &&
		    !is_reference(e->impl) &&
		    is_variant(e->impl) == variants && measured(e) &&
		    (!best || e->median < best->median))
			best = e;
	}
	return best;
}

static void check_target(const struct target *t)
{
	const struct entry *keel = find(t->id, t->impl), *peer = NULL;
	char what[160];

	if (t->peer && strcmp(t->peer, VARIANT_SUFFIX) == 0) {
		peer = fastest_peer(t->id, 1);
		snprintf(what, sizeof what,
			 "%s <= %.2f x fastest %s variant (%s)", t->impl,
			 t->max_ratio, &VARIANT_SUFFIX[1],
			 peer ? peer->impl : "none measured");
	} else if (t->peer) {
		peer = find(t->id, t->peer);
		snprintf(what, sizeof what, "%s <= %.2f x %s", t->impl,
			 t->max_ratio, t->peer);
	} else {
		peer = fastest_peer(t->id, 0);
		snprintf(what, sizeof what, "%s <= %.2f x fastest peer (%s)",
			 t->impl, t->max_ratio,
			 peer ? peer->impl : "none measured");
	}
	if (!keel || !keel->selected)
		return; /* keel was filtered out of this run */
	printf("target %s: %s: ", t->id, what);
	if (!measured(keel))
		printf("not checked (%s not measured)\n", t->impl);
	else if (!measured(peer))
		printf("not checked (%s not measured)\n",
		       peer ? peer->impl : t->peer ? t->peer : "no peer");
	else {
		double ratio = keel->median / peer->median;

		printf("%s/%s = %.2f: %s\n", t->impl, peer->impl, ratio,
		       ratio <= t->max_ratio ? "met" : "NOT met");
	}
}

#define MAX_NOTES 16

static char notes[MAX_NOTES][256];
static int nnotes;

void bench_note(const char *fmt, ...)
{
	char line[256];
	size_t key;
	va_list ap;
	int i;

	va_start(ap, fmt);
	vsnprintf(line, sizeof line, fmt, ap);
	va_end(ap);
	key = strcspn(line, ":");
	for (i = 0; i < nnotes; i++)
		if (strncmp(notes[i], line, key + 1) == 0)
			break;
	if (i == MAX_NOTES)
		return;
	if (i == nnotes)
		nnotes++;
	memcpy(notes[i], line, sizeof line);
}

static int write_json(const char *path)
{
	FILE *f = fopen(path, "w");
	char a[32], b[32], c[32];
	int first = 1;

	if (!f) {
		fprintf(stderr, "keel_bench: cannot write %s: %s\n", path,
			strerror(errno));
		return -1;
	}
	fprintf(f, "[");
	for (int i = 0; i < nrun; i++) {
		const struct entry *e = run_order[i];

		if (!measured(e))
			continue;
		fprintf(f,
			"%s\n  {\"bench\": \"%s\", \"impl\": \"%s\", "
			"\"median_ns\": %s, \"min_ns\": %s, \"max_ns\": %s, "
			"\"reps\": %d",
			first ? "" : ",", e->id, e->impl,
			fmt_ns(a, sizeof a, e->median),
			fmt_ns(b, sizeof b, e->min), fmt_ns(c, sizeof c, e->max),
			e->nsamples);
		for (int k = 0; k < e->nextras; k++)
			if (e->extras[k].n > 0)
				fprintf(f, ", \"%s\": %.6g", e->extras[k].name,
					e->extras[k].median);
		fprintf(f, "}");
		first = 0;
	}
	fprintf(f, "%s]\n", first ? "" : "\n");
	if (fclose(f) != 0) {
		fprintf(stderr, "keel_bench: cannot write %s: %s\n", path,
			strerror(errno));
		return -1;
	}
	return 0;
}

static double env_double(const char *name, double dflt)
{
	const char *v = getenv(name);
	char *end;
	double d;

	if (!v || !*v)
		return dflt;
	d = strtod(v, &end);
	if (*end || !(d > 0) || !isfinite(d)) {
		fprintf(stderr, "keel_bench: %s=%s: want a positive number\n",
			name, v);
		exit(2);
	}
	return d;
}

static void usage(void)
{
	fprintf(stderr,
		"usage: keel_bench [-o results.json] [--list] [filter...]\n"
		"  filter: a substring of \"id/impl\", or its end if it ends\n"
		"          in $ (also KEEL_BENCH_FILTER)\n"
		"  env: KEEL_BENCH_REPS (7), KEEL_BENCH_SCALE (1),\n"
		"       KEEL_BENCH_TIMEOUT (seconds per repetition, 10),\n"
		"       KEEL_BENCH_VERBOSE=1 (every repetition to stderr)\n");
	exit(2);
}

int main(int argc, char **argv)
{
	const char *out = NULL, *env_filter = getenv("KEEL_BENCH_FILTER");
	const char *ids[MAX_ENTRIES];
	int list = 0, nids = 0, reps;

	for (int i = 1; i < argc; i++) {
		if (strcmp(argv[i], "-o") == 0 ||
		    strcmp(argv[i], "--output") == 0) {
			if (++i == argc)
				usage();
			out = argv[i];
		} else if (strcmp(argv[i], "--list") == 0) {
			list = 1;
		} else if (argv[i][0] == '-') {
			usage();
		} else if (nfilters < 63) {
			filters[nfilters++] = argv[i];
		}
	}
	if (env_filter && *env_filter && nfilters < 63)
		filters[nfilters++] = env_filter;
	verbose = getenv("KEEL_BENCH_VERBOSE") &&
		  strcmp(getenv("KEEL_BENCH_VERBOSE"), "0") != 0;
	reps = (int)env_double("KEEL_BENCH_REPS", DEFAULT_REPS);
	if (reps < 1)
		reps = 1;
	total_reps = reps;
	scale = env_double("KEEL_BENCH_SCALE", 1.0);
	rep_limit_ns = (int64_t)(env_double("KEEL_BENCH_TIMEOUT",
					    DEFAULT_LIMIT_S) * 1e9);

	for (int i = 0; i < nentries; i++) {
		int seen = 0;

		entries[i].selected = matches(&entries[i]);
		for (int j = 0; j < nids; j++)
			seen |= strcmp(ids[j], entries[i].id) == 0;
		if (!seen)
			ids[nids++] = entries[i].id;
	}
	if (list) {
		for (int i = 0; i < nentries; i++)
			if (entries[i].selected)
				printf("%s/%s%s\n", entries[i].id,
				       entries[i].impl,
				       entries[i].fn ? "" : " (skipped)");
		return 0;
	}

	printf("keel_bench: %d reps + 1 warm-up per impl, scale %g, "
	       "limit %g s per rep, %ld CPUs\n",
	       reps, scale, (double)rep_limit_ns / 1e9,
	       sysconf(_SC_NPROCESSORS_ONLN));
	for (int j = 0; j < nids; j++)
		for (int i = 0; i < nentries; i++)
			if (entries[i].selected && !entries[i].fn &&
			    strcmp(entries[i].id, ids[j]) == 0)
				printf("skipped %s/%s: %s\n", entries[i].id,
				       entries[i].impl, entries[i].skip);
	printf("%-16s %-22s %12s %10s %10s %10s\n", "bench", "impl",
	       "median ns", "min ns", "max ns", "keel/impl");
	fflush(stdout);
	for (int i = 0; i < nids; i++)
		run_group(ids[i], reps);

	printf("\n");
	for (int i = 0; i < ntargets; i++)
		check_target(&targets[i]);
	if (nnotes)
		printf("\n");
	for (int i = 0; i < nnotes; i++)
		printf("note %s\n", notes[i]);
	if (out) {
		if (write_json(out) < 0)
			return 1;
		printf("\nwrote %s\n", out);
	}
	return 0;
}
