# The commands users type. CMake is the build; this file only drives it.
#
#   make demo         build the library and the demonstrations only, quietly
#                     (the build's output shows if it fails), and run them
#   make test         build and run the whole test suite (CTest)
#   make bench        optimised build, run the benchmarks, write
#                     build/bench/results.json
#   make bench-deps   install the benchmark peers (apt-get)
#   make sanitize     the suite under ASan+UBSan, then under TSan
#   make test-m32     build and run the suite for a 32-bit target (gcc -m32;
#                     on Debian: gcc-multilib and g++-multilib)
#   make test-wasm    the suite on WebAssembly threads (Emscripten), under
#                     Node; installs Debian's emscripten and nodejs if
#                     missing (docs/webassembly.md)
#   make bench-wasm   keel's mailbox beside Emscripten's proxying queues,
#                     under Node (docs/webassembly.md)
#   make fuzz         the libFuzzer harnesses (clang), FUZZ_TIME seconds
#                     each (default 600); FUZZ_HARNESSES picks some
#   make install PREFIX=/usr/local
#
# Variables: CC (compiler), BUILD (build root, default build), WERROR=1
# (warnings are errors), JOBS (parallel jobs), CMAKE_ARGS (extra flags).

BUILD ?= build
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
PREFIX ?= /usr/local
CMAKE ?= cmake
CTEST ?= ctest

ifeq ($(WERROR),1)
WERROR_FLAG := -DKEEL_WERROR=ON
endif
ifneq ($(origin CC),default)
CC_FLAG := -DCMAKE_C_COMPILER=$(CC)
endif

CONFIGURE = $(CMAKE) -S . -B $(1) $(CC_FLAG) $(WERROR_FLAG) $(CMAKE_ARGS) $(2) >/dev/null

FUZZ_TIME ?= 600
FUZZ_HARNESSES ?= mailbox scope lock once
FUZZ_CC ?= clang

.PHONY: all build demo test test-m32 test-wasm bench-wasm bench bench-deps sanitize asan tsan fuzz install clean

all: build

build:
	@$(call CONFIGURE,$(BUILD)/default,-DCMAKE_BUILD_TYPE=RelWithDebInfo)
	$(CMAKE) --build $(BUILD)/default -j $(JOBS)

# The target `demos` (examples/CMakeLists.txt) is the library and what the
# demonstrations run. The build's output goes to a log: shown whole if the
# build fails, and its warnings shown if it succeeds.
DEMO_LOG = $(BUILD)/default/demo-build.log

demo:
	@$(call CONFIGURE,$(BUILD)/default,-DCMAKE_BUILD_TYPE=RelWithDebInfo)
	@echo "building the library and the demonstrations (log: $(DEMO_LOG))"
	@$(CMAKE) --build $(BUILD)/default -j $(JOBS) --target demos \
		>$(DEMO_LOG) 2>&1 || \
		{ cat $(DEMO_LOG); echo "make demo: the build failed"; exit 1; }
	@grep -E "warning:" $(DEMO_LOG) || true
	@sh examples/run-demos.sh $(BUILD)/default/examples

test: build
	cd $(BUILD)/default && $(CTEST) --output-on-failure -j $(JOBS)

# 32-bit pointers on this machine: what a 32-bit target (wasm32, i386,
# arm) changes in handles, lock layouts and the once, checked natively.
# pkg-config looks for 32-bit libraries only, so the libuv and GLib
# adapters are left out unless their i386 packages are installed.
M32_PKG_CONFIG_LIBDIR ?= /usr/lib/i386-linux-gnu/pkgconfig:/usr/lib32/pkgconfig
test-m32:
	@PKG_CONFIG_LIBDIR=$(M32_PKG_CONFIG_LIBDIR) $(call CONFIGURE,$(BUILD)/m32,-DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_C_FLAGS=-m32 -DCMAKE_CXX_FLAGS=-m32)
	PKG_CONFIG_LIBDIR=$(M32_PKG_CONFIG_LIBDIR) $(CMAKE) --build $(BUILD)/m32 -j $(JOBS)
	cd $(BUILD)/m32 && $(CTEST) --output-on-failure -j $(JOBS)

# Cross-compiled: CC does not apply; CMAKE_ARGS and WERROR=1 do.
test-wasm:
	sh tests/wasm/run-suite.sh $(BUILD)/wasm $(JOBS) $(WERROR_FLAG) $(CMAKE_ARGS)

# Release build into $(BUILD)/wasm-bench; needs emcc and node (make
# test-wasm installs them).
bench-wasm:
	@NODE_PATH=/usr/share/nodejs emcmake $(CMAKE) -S . -B $(BUILD)/wasm-bench \
		-DCMAKE_BUILD_TYPE=Release -DKEEL_BUILD_TESTS=OFF \
		-DKEEL_BUILD_EXAMPLES=OFF -DKEEL_BUILD_BENCH=ON $(CMAKE_ARGS) >/dev/null
	NODE_PATH=/usr/share/nodejs $(CMAKE) --build $(BUILD)/wasm-bench -j $(JOBS) --target keel_bench_wasm
	cd $(BUILD)/wasm-bench/bench && node --no-experimental-fetch keel_bench_wasm.js

bench:
	@$(call CONFIGURE,$(BUILD)/bench,-DCMAKE_BUILD_TYPE=Release -DKEEL_BUILD_BENCH=ON -DKEEL_BUILD_TESTS=OFF -DKEEL_BUILD_EXAMPLES=OFF)
	$(CMAKE) --build $(BUILD)/bench -j $(JOBS)
	$(CMAKE) --build $(BUILD)/bench --target run-bench

bench-deps:
	bash bench/install-deps.sh

# Stress cases run at their default size; KEEL_YIELD widens race windows
# at keel's internal synchronisation points (compiled in for these builds).
sanitize: asan tsan

asan:
	@$(call CONFIGURE,$(BUILD)/asan,-DCMAKE_BUILD_TYPE=RelWithDebInfo -DKEEL_SANITIZE=address$(,)undefined -DKEEL_DEBUG_YIELD=ON)
	$(CMAKE) --build $(BUILD)/asan -j $(JOBS)
	cd $(BUILD)/asan && KEEL_YIELD=1000 $(CTEST) --output-on-failure -j $(JOBS)

tsan:
	@$(call CONFIGURE,$(BUILD)/tsan,-DCMAKE_BUILD_TYPE=RelWithDebInfo -DKEEL_SANITIZE=thread -DKEEL_DEBUG_YIELD=ON)
	$(CMAKE) --build $(BUILD)/tsan -j $(JOBS)
	cd $(BUILD)/tsan && KEEL_YIELD=1000 $(CTEST) --output-on-failure -j $(JOBS)

# One libFuzzer job per harness at a time; inputs and crashes go under
# $(BUILD)/fuzz/fuzz-runs/, the checked-in corpus is only read.
fuzz:
	@$(call CONFIGURE,$(BUILD)/fuzz,-DCMAKE_C_COMPILER=$(FUZZ_CC) -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKEEL_BUILD_FUZZ=ON -DKEEL_BUILD_EXAMPLES=OFF)
	$(CMAKE) --build $(BUILD)/fuzz -j $(JOBS) --target $(patsubst %,fuzz_%_libfuzzer,$(FUZZ_HARNESSES))
	sh tests/fuzz/run-fuzz.sh $(BUILD)/fuzz $(FUZZ_TIME) $(FUZZ_HARNESSES)

install:
	@$(call CONFIGURE,$(BUILD)/install,-DCMAKE_BUILD_TYPE=Release -DKEEL_BUILD_TESTS=OFF -DKEEL_BUILD_EXAMPLES=OFF -DCMAKE_INSTALL_PREFIX=$(PREFIX))
	$(CMAKE) --build $(BUILD)/install -j $(JOBS)
	$(CMAKE) --install $(BUILD)/install
	@libdir=$(PREFIX)/$$(sed -n 's/^CMAKE_INSTALL_LIBDIR:PATH=//p' $(BUILD)/install/CMakeCache.txt); \
	echo; \
	echo "keel is installed; the library is in $$libdir. To build against it:"; \
	echo "  export PKG_CONFIG_PATH=$$libdir/pkgconfig"; \
	echo "  cc app.c \$$(pkg-config --cflags --libs keel) -Wl,-rpath,$$libdir"; \
	echo "For a system prefix, run ldconfig (as root) once instead of the rpath."; \
	echo "See README.md, \"Using it\"."

clean:
	rm -rf $(BUILD)

# A literal comma for use inside $(call ...).
, := ,
