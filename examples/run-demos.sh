#!/bin/sh
# Run each demonstration program in turn; stop at the first that fails.
# Usage: run-demos.sh <directory holding the built examples>
set -e
dir=${1:?usage: run-demos.sh <examples build directory>}

run() {
	echo
	echo "== $1: $2"
	"$dir/$1"
}

run kvstore "one task owns a store, others call into it, it shuts down mid-traffic"
echo
echo "== echo-server: one task per connection; Ctrl-C in the middle of the traffic"
"$dir/echo-drive" "$dir/echo-server" 16
echo
echo "== lock-order: a latent ABBA deadlock that does not happen, reported anyway"
"$dir/lock-order" "$dir/lock-order.dot" "$dir/lock-order.json"
if command -v dot >/dev/null 2>&1; then
	dot -Tsvg "$dir/lock-order.dot" -o "$dir/lock-order.svg"
	echo "rendered the lock graph: $dir/lock-order.svg"
else
	echo "(Graphviz's dot is not installed: the graph is not rendered to SVG)"
fi

if [ -x "$dir/lock-order-pthread" ] && [ -x "$dir/../keel-lockcheck" ]; then
	echo
	echo "== lock-order-pthread: the same bank with plain pthread mutexes, run unmodified under keel-lockcheck"
	echo "   (add --symbolize for file:line)"
	"$dir/../keel-lockcheck" --lib "$dir/../libkeel-lockcheck.so" -- \
		"$dir/lock-order-pthread"
fi

run lazy-init "a shared cache whose first builder dies mid-build"

# Built only where pkg-config found the library (keel/uv.h, keel/glib.h).
loop_demo() {
	if [ -x "$dir/$1" ]; then
		run "$1" "$2"
	else
		echo
		echo "== $1: skipped: $3 not found when keel was configured"
	fi
}
loop_demo uv-loop "a libuv loop serves a mailbox; cancelling its scope stops it" libuv
loop_demo glib-loop "a GLib main loop serves a mailbox; cancelling its scope quits it" glib-2.0
echo
echo "All demonstrations passed."
