#!/bin/sh
# spread.sh: how much each impl's median moves from run to run.
#
#   bench/spread.sh [-n RUNS] [-b KEEL_BENCH] [-m FIGURE] [-k DIR [-r]] [filter...]
#
# Runs keel_bench RUNS times in a row (default 3) with the same filters
# (default: the mailbox benchmarks), each run writing its JSON file, then
# prints every impl's median in each run and the spread: (largest median -
# smallest) / smallest, in percent. A spread above 25% is marked. -m picks
# another figure of the JSON file than the time (median_ns), one recorded
# beside it such as send_cpu_ns/msg; -k keeps each run's table and JSON
# file in DIR, and -r tabulates the runs kept there before instead of
# running again (with -k). Since
# each run interleaves its impls, a burst of noise on the machine moves
# keel and its peers alike: compare keel's spread with the peers' in the
# same table before blaming keel. The load average is printed before each
# run. KEEL_BENCH_REPS and the other variables of keel_bench apply.
set -eu

runs=3
bin=build/bench/bench/keel_bench
metric=median_ns
keep=
reuse=
while [ $# -gt 0 ]; do
	case "$1" in
	-n) runs=$2; shift 2 ;;
	-b) bin=$2; shift 2 ;;
	-m) metric=$2; shift 2 ;;
	-k) keep=$2; shift 2 ;;
	-r) reuse=1; shift ;;
	--) shift; break ;;
	-*) echo "usage: $0 [-n RUNS] [-b KEEL_BENCH] [-m FIGURE] [-k DIR [-r]] [filter...]" >&2; exit 2 ;;
	*) break ;;
	esac
done
[ $# -gt 0 ] || set -- mailbox_1p1c mailbox_2p1c
[ -x "$bin" ] || { echo "$0: $bin not built (make bench)" >&2; exit 2; }

if [ -n "$keep" ]; then
	mkdir -p "$keep"
	dir=$keep
else
	dir=$(mktemp -d)
	trap 'rm -rf "$dir"' EXIT
fi
[ -z "$reuse" ] || [ -n "$keep" ] || { echo "$0: -r needs -k DIR" >&2; exit 2; }
i=1
[ -z "$reuse" ] || i=$((runs + 1))
while [ "$i" -le "$runs" ]; do
	echo "run $i of $runs: load average $(cut -d' ' -f1-3 /proc/loadavg)"
	"$bin" -o "$dir/run$i.json" "$@" >"$dir/run$i.txt" 2>/dev/null
	i=$((i + 1))
done

# The JSON files have one impl per line: pick bench, impl and the figure.
echo "$metric, median of each run:"
for f in $(seq 1 "$runs"); do
	sed -n "s|.*\"bench\": \"\([^\"]*\)\", \"impl\": \"\([^\"]*\)\".*\"$metric\": \([0-9.e+-]*\).*|\1 \2 \3|p" \
		"$dir/run$f.json" | sed "s/^/$f /"
done | awk -v runs="$runs" '
	{
		key = $2 " " $3
		if (!(key in seen)) { seen[key] = 1; order[n++] = key }
		med[key, $1] = $4
	}
	END {
		printf "%-16s %-24s", "bench", "impl"
		for (r = 1; r <= runs; r++) printf " %9s", "run " r
		printf " %8s\n", "spread"
		for (k = 0; k < n; k++) {
			key = order[k]
			split(key, p, " ")
			lo = ""; hi = ""; got = 0
			printf "%-16s %-24s", p[1], p[2]
			for (r = 1; r <= runs; r++) {
				if ((key, r) in med) {
					v = med[key, r] + 0; got++
					printf " %9.1f", v
					if (lo == "" || v < lo) lo = v
					if (hi == "" || v > hi) hi = v
				} else {
					printf " %9s", "-"
				}
			}
			if (got == runs && lo > 0) {
				s = (hi - lo) / lo * 100
				mark = ""
				if (s > 25) mark = "  >25%"
				printf " %7.0f%%%s\n", s, mark
			} else {
				printf " %8s\n", "-"
			}
		}
	}'
