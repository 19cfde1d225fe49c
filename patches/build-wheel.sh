#!/usr/bin/env bash
# Build the llama-cpp-python wheel the project runs on: the PyPI sdist of VERSION with the project's
# llama.cpp patch applied (file-backed RPC tensors: patches/README.md), compiled with $CMAKE_ARGS.
#   patches/build-wheel.sh VERSION PATCH OUT_DIR PYTHON
# The sdist is kept in ~/.cache/mesh-llm/sdist (tests check the patch against it too).
set -euo pipefail
version=$1
patch=$(realpath "$2")
out=$3
python=$4
sdists="$HOME/.cache/mesh-llm/sdist"
sdist="$sdists/llama_cpp_python-$version.tar.gz"
mkdir -p "$sdists" "$out"
if [ ! -f "$sdist" ]; then
	"$python" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$sdists"
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tar xzf "$sdist" -C "$work"
src="$work/llama_cpp_python-$version"
# git apply works as a patch tool outside a repository; it refuses a patch that does not apply
# exactly (no fuzz), so a new sdist fails here rather than building something else.
(cd "$src" && git apply -p1 "$patch")
echo "llama-cpp-python $version: applied $(basename "$patch"); building (about 4 minutes on 2 cores)"
"$python" -m pip wheel --quiet --no-deps --no-cache-dir "$src" -w "$out"
