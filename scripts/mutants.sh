#!/usr/bin/env bash
# Mutation testing of the booking rules and the error mapping: cargo-mutants
# changes one thing at a time in service/src/domain and
# service/src/api/status.rs (an operator, a constant, a function body) and
# runs the whole workspace's tests against each change. A mutant the tests
# do not catch ("missed") is a rule no test would notice breaking.
#
#   scripts/mutants.sh            # every mutant, every test (hours on 2 cores)
#   scripts/mutants.sh --list     # just list them
#   scripts/mutants.sh -F etag    # only mutants whose name matches a regex
#
# Not part of CI (too slow). Installs cargo-mutants with cargo if missing.
# Results: mutants.out/ (caught.txt, missed.txt, unviable.txt, timeout.txt).
set -euo pipefail
cd "$(dirname "$0")/.."

version=27.1.0
if ! cargo mutants --version 2>/dev/null | grep -q "$version"; then
    echo "installing cargo-mutants $version" >&2
    cargo install --locked --version "$version" cargo-mutants
fi

tool=cargo
if cargo nextest --version >/dev/null 2>&1; then tool=nextest; fi

exec cargo mutants \
    --file 'service/src/domain/**' \
    --file service/src/api/status.rs \
    --test-package switchyard \
    --test-package switchyard-drivers \
    --test-package switchyard-tests \
    --test-tool "$tool" \
    --timeout 180 \
    "$@"
