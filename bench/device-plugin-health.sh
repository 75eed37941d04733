#!/usr/bin/env bash
# The device plugin's idle CPU and detection time with 64 fake GPUs, in one run: kernel events
# with a 30 s safety-net poll against the 1 s poll without events the plugin had before.
# Prints figures, never pass/fail (tests/tests/device_plugin_bench.rs measures).
#
# Usage: bench/device-plugin-health.sh [--debug]   (from anywhere; about four minutes after
# the build). BENCH_IDLE_S sets the idle window (default 60 s). Optimised by default, as
# shipped, with the release profile's link-time optimisation off to keep the build short.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=(--release)
if [ "${1:-}" = "--debug" ]; then profile=(); fi
CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
  cargo test "${profile[@]}" -p gpu-passthrough-tests --test device_plugin_bench -- \
  --ignored --nocapture 2>&1 | grep -E '^(64 GPUs|before|now|test result)'
