#!/bin/sh
# The test suite on WebAssembly threads: built with Emscripten (emcmake),
# run under Node by CTest. `make test-wasm` runs it; see docs/webassembly.md.
#   tests/wasm/run-suite.sh BUILD_DIR JOBS [cmake arguments...]
# Installs Debian's emscripten and nodejs with apt-get when missing, and
# chromium for the browser check (tests/wasm/browser/check.py; skipped with
# a message where it cannot be installed or started). Prints
# how many cases passed, were skipped (the platform lacks what they need:
# harness.h, HARNESS_NEED) and failed; exits non-zero if any failed.
set -eu
build=$1
jobs=$2
shift 2
src=$(cd "$(dirname "$0")/../.." && pwd)

as_root() {
	if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

missing=
command -v emcc >/dev/null || missing="$missing emscripten"
command -v node >/dev/null || missing="$missing nodejs"
if [ -n "$missing" ]; then
	echo "== installing:$missing"
	as_root apt-get update -qq
	as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
		$missing >/dev/null
fi
have_chromium() {
	command -v chromium >/dev/null || command -v chromium-headless-shell >/dev/null
}
if ! have_chromium; then
	echo "== installing: chromium (the browser check)"
	{ as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
		chromium >/dev/null 2>&1 ||
		{ as_root apt-get update -qq &&
			as_root env DEBIAN_FRONTEND=noninteractive \
				apt-get install -y -qq chromium >/dev/null 2>&1; }; } ||
		echo "== chromium could not be installed: the browser check is skipped"
fi

# Debian's emcc finds its JavaScript modules (acorn) here.
export NODE_PATH="${NODE_PATH:+$NODE_PATH:}/usr/share/nodejs"
node=$(command -v node)

# Node 20's fetch() cannot load the .wasm file beside the program.
mkdir -p "$build"
emcmake cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
	-DKEEL_BUILD_EXAMPLES=OFF \
	"-DCMAKE_CROSSCOMPILING_EMULATOR=$node;--no-experimental-fetch" \
	"$@" >"$build/configure.log" 2>&1 ||
	{ cat "$build/configure.log"; exit 1; }
cmake --build "$build" -j "$jobs"

log=$build/ctest.log
status=0
(cd "$build" && ctest -j "$jobs" --output-on-failure) >"$log" 2>&1 || status=$?
cat "$log"
passed=$(grep -cE '^ *[0-9]+/[0-9]+ Test +#[0-9]+: .* Passed ' "$log" || true)
skipped=$(grep -cE '^ *[0-9]+/[0-9]+ Test +#[0-9]+: .*\*\*\*Skipped ' "$log" || true)
failed=$(grep -cE '^ *[0-9]+/[0-9]+ Test +#[0-9]+: .*\*\*\*(Failed|Timeout|Exception|Not Run)' "$log" || true)
if grep -qE 'browser\.check .*Skipped' "$log"; then
	why=$(grep -hE '^SKIP: .*(Chromium|Python)' \
		"$build/Testing/Temporary/LastTest.log" | head -1)
	echo "the browser check was skipped: ${why#SKIP: }"
fi
echo "wasm suite under Node (and the browser check): $passed passed, $skipped skipped (the platform lacks what they need), $failed failed"
if [ "$status" -ne 0 ] && [ "$failed" -eq 0 ]; then
	failed=1 # ctest failed for a reason the counts do not show
fi
[ "$failed" -eq 0 ]
