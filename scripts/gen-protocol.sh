#!/usr/bin/env bash
# Regenerate the committed protobuf code from Protocols/vist2.proto (run by hand after editing it):
#   Sources/VistProtocol/vist2.pb.swift   swift-protobuf (protoc + protoc-gen-swift)
#   clients/c/gen/vist2.pb-c.{h,c}        protobuf-c (protoc-c)
# Needs: apt-get install protobuf-compiler protobuf-c-compiler; protoc-gen-swift is built from
# the swift-protobuf package this project depends on (a one-time build of several minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v protoc >/dev/null && command -v protoc-c >/dev/null || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq protobuf-compiler protobuf-c-compiler
}
PLUGIN_DIR=".build-protoc"
if [[ ! -x "$PLUGIN_DIR/release/protoc-gen-swift" ]]; then
    rm -rf "$PLUGIN_DIR/src"
    mkdir -p "$PLUGIN_DIR"
    git clone -q --depth 1 --branch 1.39.0 https://github.com/apple/swift-protobuf "$PLUGIN_DIR/src"
    swift build -c release --package-path "$PLUGIN_DIR/src" --scratch-path "$PLUGIN_DIR" --product protoc-gen-swift
fi
mkdir -p Sources/VistProtocol clients/c/gen
protoc --plugin=protoc-gen-swift="$PLUGIN_DIR/release/protoc-gen-swift" \
    --swift_out=Sources/VistProtocol --swift_opt=Visibility=Public -I Protocols Protocols/vist2.proto
protoc-c --c_out=clients/c/gen -I Protocols Protocols/vist2.proto
echo "regenerated Sources/VistProtocol/vist2.pb.swift and clients/c/gen/vist2.pb-c.{h,c}"
