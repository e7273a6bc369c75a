#!/usr/bin/env bash
# On a GPU machine without network: install what bench/gpu_bundle.py packed and join the GGUF pieces.
#   bash bench/gpu_unpack.sh BUNDLE_DIR PARTS_DIR
# BUNDLE_DIR holds site.tar.xz, wheels/ and cache/ (prebuilt offline data); PARTS_DIR the gguf.part_NN
# pieces (each carried by its own call) and gguf.sha256. Installs into /tmp/site (put it on PYTHONPATH) and
# places the joined GGUF where qgate looks for an assembled split member ($QGATE_CACHE/gguf/<sha256>/).
set -euo pipefail
bundle=$1 parts=$2
mkdir -p /tmp/site
tar -xJf "$bundle/site.tar.xz" -C /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$bundle"/wheels/*.whl
export QGATE_CACHE=${QGATE_CACHE:-/tmp/qgate-cache}
mkdir -p "$QGATE_CACHE"
cp -r "$bundle/cache/." "$QGATE_CACHE/"
read -r sha name < "$parts/gguf.sha256"
dest="$QGATE_CACHE/gguf/$sha"
mkdir -p "$dest"
cat "$parts"/gguf.part_* > "$dest/$name"
echo "$sha  $dest/$name" | sha256sum -c -
