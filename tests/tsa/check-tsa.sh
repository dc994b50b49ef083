#!/bin/sh
# keel's clang thread-safety annotations catch misuse in user code.
#   check-tsa.sh <clang> <keel include dir> <this directory>
# good.c must compile cleanly with -Wthread-safety -Werror; bad.c must be
# rejected, for the three misuses it contains.
set -eu
clang=$1 inc=$2 dir=$3
out=$(mktemp)
trap 'rm -f "$out"' EXIT

"$clang" -std=c11 -fsyntax-only -Wthread-safety -Werror -I "$inc" \
	"$dir/good.c"
if "$clang" -std=c11 -fsyntax-only -Wthread-safety -Werror -I "$inc" \
	"$dir/bad.c" >"$out" 2>&1; then
	echo "bad.c compiled: the annotations caught nothing"
	exit 1
fi
cat "$out"
grep -q "writing variable 'counter' requires holding mutex 'lock'" "$out"
grep -q "calling function 'add_locked' requires holding mutex 'lock'" "$out"
grep -q "writing variable 'table' requires holding rwlock 'rw' exclusively" "$out"
echo "the misuse was caught"
