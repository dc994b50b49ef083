#!/usr/bin/env bash
# Installs the peer libraries that keel_bench measures keel against (GLib,
# libuv, Concurrency Kit, liburcu) and pkg-config, which the build uses to
# find them, and the programs keel-lockcheck is measured on (memcached with
# memcslap, pigz, pbzip2) beside Helgrind (valgrind). Debian and Ubuntu (apt-get) only. Safe to run again: packages
# already installed are left alone, and nothing is done if all are there.
#
# Usage: bash bench/install-deps.sh     (or: make bench-deps)
set -euo pipefail

packages=(libglib2.0-dev libuv1-dev libck-dev liburcu-dev pkg-config
	memcached libmemcached-tools pigz pbzip2 valgrind)

missing=()
for p in "${packages[@]}"; do
	if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null |
		grep -q 'install ok installed'; then
		missing+=("$p")
	fi
done
if [ ${#missing[@]} -eq 0 ]; then
	echo "bench deps: all installed (${packages[*]})"
	exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
	echo "bench deps: apt-get not found. Install these by hand with your" \
		"package manager: ${missing[*]}" >&2
	echo "(the benchmarks build and run without them, skipping those peers)" >&2
	exit 1
fi

if [ "$(id -u)" -eq 0 ]; then
	as_root=()
elif command -v sudo >/dev/null 2>&1; then
	as_root=(sudo)
else
	echo "bench deps: need root to install ${missing[*]}, and sudo is not" \
		"available. Run this script as root, or install them by hand." >&2
	exit 1
fi

echo "bench deps: installing ${missing[*]}"
${as_root[@]+"${as_root[@]}"} apt-get update
${as_root[@]+"${as_root[@]}"} env DEBIAN_FRONTEND=noninteractive \
	apt-get install -y --no-install-recommends "${missing[@]}"
