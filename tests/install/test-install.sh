#!/bin/sh
# Install keel from a build tree into a temporary prefix, then build a tiny
# out-of-tree program against it.
#   test-install.sh cmake <build dir> <source dir> <cc> "<c flags>"
#       through find_package(keel CONFIG): keel::keel and keel::keel_static
#   test-install.sh pkg-config <build dir> <source dir> <cc> "<c flags>"
#       through `pkg-config keel`; exits 77 (skipped) without pkg-config
set -eu
mode=$1 build=$2 src=$3 cc=$4 cflags=${5:-}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
prefix=$work/prefix

cmake --install "$build" --prefix "$prefix" >"$work/install.log"
for f in include/keel.h include/keel/mailbox.h include/keel/task.h \
	include/keel/common.h; do
	[ -f "$prefix/$f" ] || { echo "not installed: $f"; exit 1; }
done
libdir=$(dirname "$(find "$prefix" -name 'libkeel.so' | head -n 1)")
for f in libkeel.a libkeel.so pkgconfig/keel.pc cmake/keel/keelConfig.cmake \
	cmake/keel/keelConfigVersion.cmake cmake/keel/keelTargets.cmake; do
	[ -e "$libdir/$f" ] || { echo "not installed: $libdir/$f"; exit 1; }
done
# keel-lockcheck, where it is built: the wrapper finds the library
# installed beside it (relative to itself: the prefix may move) and runs a
# program with it preloaded.
if [ -e "$build/libkeel-lockcheck.so" ]; then
	[ -x "$prefix/bin/keel-lockcheck" ] || { echo "not installed: bin/keel-lockcheck"; exit 1; }
	[ -e "$libdir/libkeel-lockcheck.so" ] || { echo "not installed: $libdir/libkeel-lockcheck.so"; exit 1; }
	# A sanitizer build's library needs the sanitizer's run-time loaded
	# first: it cannot be preloaded into sh (the preload runs in the plain
	# build).
	if ldd "$build/libkeel-lockcheck.so" 2>/dev/null | grep -qE 'lib(a|t|ub)san'; then
		echo "keel-lockcheck: installed; not run (a sanitizer build)"
	else
	"$prefix/bin/keel-lockcheck" -- sh -c '
		case $LD_PRELOAD in *"$1"/libkeel-lockcheck.so) exit 0 ;; esac
		echo "LD_PRELOAD=$LD_PRELOAD"; exit 1' sh "$(cd "$libdir" && pwd)" \
		2>"$work/lockcheck.log" ||
		{ echo "keel-lockcheck did not preload its library"; exit 1; }
	fi
fi
# Internal headers are never installed.
if find "$prefix" -name internal.h -o -name platform.h | grep -q .; then
	echo "an internal header was installed"
	exit 1
fi

case $mode in
cmake)
	cmake -S "$src/tests/install/consumer" -B "$work/build" \
		-DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_C_COMPILER="$cc" \
		-DCMAKE_C_FLAGS="$cflags" -DCMAKE_EXE_LINKER_FLAGS="$cflags" \
		>"$work/configure.log" || { cat "$work/configure.log"; exit 1; }
	cmake --build "$work/build" >"$work/build.log" 2>&1 ||
		{ cat "$work/build.log"; exit 1; }
	LD_LIBRARY_PATH=$libdir "$work/build/consumer"
	"$work/build/consumer_static"
	;;
pkg-config)
	if ! command -v pkg-config >/dev/null 2>&1; then
		echo "SKIP: pkg-config is not installed"
		exit 77
	fi
	export PKG_CONFIG_PATH="$libdir/pkgconfig"
	pkg-config --exists keel
	# The README's command for a non-system prefix: the rpath lets the
	# program start with no LD_LIBRARY_PATH.
	# shellcheck disable=SC2046
	"$cc" $cflags "$src/tests/install/consumer/main.c" -o "$work/consumer" \
		$(pkg-config --cflags --libs keel) -Wl,-rpath,"$libdir"
	env -u LD_LIBRARY_PATH "$work/consumer"
	;;
*)
	echo "unknown mode: $mode"
	exit 2
	;;
esac
