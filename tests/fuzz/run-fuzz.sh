#!/bin/sh
# run-fuzz.sh: run each libFuzzer harness for a bounded time.
#
#   sh tests/fuzz/run-fuzz.sh BUILD_DIR SECONDS_EACH [HARNESS...]
#
# Each harness starts from a copy of its checked-in corpus
# (tests/fuzz/corpus/<harness>/), so the repository is never written; new
# inputs and crashes go to BUILD_DIR/fuzz-runs/<harness>/. One job at a
# time (-jobs=1). Exits non-zero if any harness found something; the
# crashing input's path is in libFuzzer's output ("Test unit written to").
set -u
build=$1
secs=$2
shift 2
src=$(cd "$(dirname "$0")" && pwd)
harnesses=${*:-mailbox scope lock once}
status=0
for h in $harnesses; do
	bin=$build/tests/fuzz/fuzz_${h}_libfuzzer
	out=$build/fuzz-runs/$h
	if [ ! -x "$bin" ]; then
		echo "run-fuzz: $bin is missing (configure with -DKEEL_BUILD_FUZZ=ON and clang)" >&2
		exit 2
	fi
	rm -rf "$out"
	mkdir -p "$out/corpus" "$out/artifacts"
	cp "$src/corpus/$h"/* "$out/corpus/" 2>/dev/null
	echo "== fuzz_$h: $secs s"
	# ASan's leak check at exit would flag the thread cache's idle
	# threads' stacks; the harnesses check their own invariants.
	if ! ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
		UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
		"$bin" -max_total_time="$secs" -timeout=120 -rss_limit_mb=4096 \
		-print_final_stats=1 -artifact_prefix="$out/artifacts/" \
		"$out/corpus" >"$out/log" 2>&1; then
		echo "run-fuzz: fuzz_$h FOUND something; see $out/log and $out/artifacts/" >&2
		grep -m1 -E "FINDING|ERROR: (AddressSanitizer|libFuzzer|UndefinedBehavior)|internal invariant|runtime error" "$out/log" >&2
		status=1
	else
		grep -E "^stat::number_of_executed_units" "$out/log" | sed "s/^/fuzz_$h: /"
	fi
done
exit $status
