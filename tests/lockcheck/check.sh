#!/bin/sh
# check.sh LIB POLICY WANT PATTERN... -- COMMAND...
#
# Runs COMMAND with LIB preloaded (LIB "-": the command preloads it, as
# the keel-lockcheck wrapper does) and KEEL_LOCKCHECK=POLICY, within a
# time limit that a blocked deadlock would exceed, then checks:
#   WANT      ok (exit 0) or abort (ended by SIGABRT);
#   PATTERN   an extended regular expression the output (stderr and
#             stdout) must match; with a leading "!" one it must not.
# Skips (77) when the program is built with a sanitizer: their run-times
# interpose the pthread calls themselves and must be loaded first.
lib=$1 policy=$2 want=$3
shift 3
patterns=
n=0
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
	n=$((n + 1))
	eval "pat_$n=\$1"
	shift
done
[ "$1" = "--" ] && shift

for arg in "$@"; do
	if [ -f "$arg" ] && [ -x "$arg" ] &&
	   { nm -D "$arg" 2>/dev/null | grep -qE '__(asan|tsan|ubsan)_' ||
	     ldd "$arg" 2>/dev/null | grep -qE 'lib(a|t|ub)san'; }; then
		echo "skipped: $arg is built with a sanitizer, whose run-time" \
		     "interposes the pthread calls itself (the preload tests run" \
		     "in the plain build)"
		exit 77
	fi
done

out=$(mktemp "${TMPDIR:-/tmp}/lockcheck-test.XXXXXX")
trap 'rm -f "$out"' EXIT
if [ "$lib" = "-" ]; then
	KEEL_LOCKCHECK=$policy timeout 30 "$@" >"$out" 2>&1
else
	LD_PRELOAD=$lib KEEL_LOCKCHECK=$policy timeout 30 "$@" >"$out" 2>&1
fi
status=$?
cat "$out"
echo "--- exit status $status"
case $status in
77) exit 77 ;;
124) echo "FAIL: still running after 30 s (a deadlock the checker let block?)"; exit 1 ;;
esac
case $want in
ok) [ $status -eq 0 ] || { echo "FAIL: wanted exit status 0"; exit 1; } ;;
abort) [ $status -eq 134 ] || { echo "FAIL: wanted an abort (134)"; exit 1; } ;;
esac
fail=0
i=1
while [ $i -le $n ]; do
	eval "p=\$pat_$i"
	case $p in
	!*)
		if grep -qE -- "${p#!}" "$out"; then
			echo "FAIL: output matches '${p#!}'"
			fail=1
		fi
		;;
	*)
		if ! grep -qE -- "$p" "$out"; then
			echo "FAIL: output does not match '$p'"
			fail=1
		fi
		;;
	esac
	i=$((i + 1))
done
exit $fail
