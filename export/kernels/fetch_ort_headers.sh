#!/usr/bin/env bash
# Fetch the ONNX Runtime C/C++ API headers into $1 (default: build/ort-include) at build time.
#
# No PyPI wheel ships them; Debian trixie's libonnxruntime-dev does (API version 21, which the
# current onnxruntime wheels load). The .deb is fetched with Debian's own tools through a private
# apt configuration (the system's sources and state are not touched) and only the headers are
# unpacked. Nothing fetched here is committed (build/ is git-ignored).
set -euo pipefail

DEST=${1:-build/ort-include}
SUITE=${TAPF_ORT_SUITE:-trixie}
MIRROR=${TAPF_ORT_MIRROR:-http://deb.debian.org/debian}
KEYRING=${TAPF_ORT_KEYRING:-/usr/share/keyrings/debian-archive-keyring.gpg}

if [[ -f "$DEST/onnxruntime_cxx_api.h" ]]; then
  exit 0
fi
for tool in apt-get dpkg-deb; do
  command -v "$tool" >/dev/null || { echo "fetch_ort_headers: $tool not found (needs a Debian-based system)" >&2; exit 3; }
done

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/etc/sources.list.d" "$WORK/lists/partial" "$WORK/cache/archives/partial" "$WORK/deb" "$WORK/root"
cat >"$WORK/etc/sources.list.d/ort.sources" <<SRC
Types: deb
URIs: $MIRROR
Suites: $SUITE
Components: main
Signed-By: $KEYRING
SRC
APT_OPTS=(
  -o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$WORK/etc/sources.list.d"
  -o "Dir::State::Lists=$WORK/lists" -o "Dir::Cache=$WORK/cache" -o "Debug::NoLocking=1"
  -o "APT::Sandbox::User=root" -q
)
apt-get "${APT_OPTS[@]}" update >/dev/null
(cd "$WORK/deb" && apt-get "${APT_OPTS[@]}" download libonnxruntime-dev >/dev/null)
dpkg-deb -x "$WORK"/deb/libonnxruntime-dev_*.deb "$WORK/root"
mkdir -p "$DEST"
cp -r "$WORK/root/usr/include/onnxruntime/." "$DEST/"
grep -m1 "#define ORT_API_VERSION" "$DEST/onnxruntime_c_api.h" >&2
