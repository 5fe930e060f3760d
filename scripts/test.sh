#!/usr/bin/env bash
# The whole test suite: Rust unit and end-to-end tests (real gRPC against
# servers on loopback ports), then the checks from outside Rust: a Python
# grpcio client (with the Python example), the Node.js example's test, a
# grpcurl smoke script against the built binary, and the Helm chart's checks.
# Installs what it needs through scripts/install-test-tools.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== tools"
eval "$(bash scripts/install-test-tools.sh)"

echo "== proto lint and breaking changes (buf)"
(cd proto && buf lint)
# The API is a contract with clients in other languages: against the
# previous commit (on a fresh clone of main, the last one before it), no
# field, number, name or service may change incompatibly. Override with
# SWITCHYARD_BUF_AGAINST (a git ref) to compare with a release instead.
against="${SWITCHYARD_BUF_AGAINST:-HEAD~1}"
if git rev-parse --verify --quiet "$against^{commit}" >/dev/null \
   && git cat-file -e "$against:proto/buf.yaml" 2>/dev/null; then
  (cd proto && buf breaking --against "../.git#ref=$(git rev-parse "$against"),subdir=proto")
  echo "buf breaking: no incompatible change against $against"
else
  echo "buf breaking: $against has no proto/buf.yaml to compare with; skipped"
fi

echo "== build"
cargo build --workspace --locked
target_dir=$(cargo metadata --format-version 1 --no-deps --locked \
  | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
export SWITCHYARD_BIN="$target_dir/debug/switchyard"

echo "== Rust tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --no-fail-fast
fi

echo "== Python grpcio interop"
pytest -q tests/interop/python

echo "== Node.js interop"
# examples/node/conflict.js through its test, with the dependencies the
# tools script installed from its lockfile (found through NODE_PATH). The
# test files are named (not the directory): from Node 21 on, `node --test`
# takes files or globs, and a directory is no longer searched.
node --test examples/node/*.test.js

echo "== grpcurl smoke"
bash tests/interop/grpcurl_smoke.sh

echo "== Helm chart"
# helm/switchyard without a cluster: helm lint --strict, each ci/ scenario
# rendered and validated against Kubernetes' schemas, yamllint, and the
# combinations the chart must refuse.
bash scripts/check-helm.sh

echo "== benchmarks, small (they work; figures: docs/performance.md)"
bench="$target_dir/debug/switchyard-bench"
"$bench" push --n 500 --c 8 --devices 20
"$bench" dispatch --n 200 --c 8
"$bench" scale --actions 5000 --devices 500 --n 200 --c 8
"$bench" events --n 200 --watchers 10 --c 4
"$bench" webhooks --n 200 --endpoints 2 --c 4
