#!/usr/bin/env bash
# Build KenLM's lmplz, build_binary and query (the classic n-gram peer of
# benchmarks/quality_table.py) from the public kpu/kenlm source, with Debian's Boost.
#
#   benchmarks/build_kenlm.sh [KENLM_SOURCE_DIR]     prints the directory of the binaries
#
# KENLM_PREFIX (default .kenlm/ in the repository, git-ignored) receives src/, build/ and
# bin/; a finished build is reused.  Without a source directory the script clones
# https://github.com/kpu/kenlm (network needed).  Debian's cmake is preferred: a newer cmake
# first on PATH can refuse KenLM's CMakeLists.  ~2-3 minutes on 2 cores.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
prefix="${KENLM_PREFIX:-$root/.kenlm}"
if [ -x "$prefix/bin/lmplz" ] && [ -x "$prefix/bin/build_binary" ]; then
  echo "$prefix/bin"
  exit 0
fi
src="${1:-${KENLM_SRC:-}}"
if [ -z "$src" ]; then
  src="$prefix/src"
  [ -f "$src/CMakeLists.txt" ] || git clone --quiet --depth 1 https://github.com/kpu/kenlm "$src"
fi
packages="libboost-program-options-dev libboost-system-dev libboost-thread-dev libboost-test-dev zlib1g-dev libbz2-dev liblzma-dev"
missing=$(for p in $packages; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
if [ -n "$missing" ]; then
  echo "installing $missing" >&2
  apt-get install -y -q $missing >&2
fi
cmake_bin=/usr/bin/cmake
[ -x "$cmake_bin" ] || cmake_bin=cmake
mkdir -p "$prefix/build" "$prefix/bin"
(cd "$prefix/build" && "$cmake_bin" -DCMAKE_BUILD_TYPE=Release "$src" >&2 \
   && make -j"$(nproc)" lmplz build_binary query >&2)
cp "$prefix/build/bin/lmplz" "$prefix/build/bin/build_binary" "$prefix/build/bin/query" "$prefix/bin/"
echo "$prefix/bin"
