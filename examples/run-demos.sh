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
echo "All demonstrations passed."
