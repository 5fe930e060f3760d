#!/usr/bin/env bash
# Smoke test of the switchyard gRPC API with grpcurl: what a person poking at
# the server by hand sees. Uses only server reflection (no proto files), so it
# also proves that reflection serves everything a generic client needs to
# decode our error details (google.rpc.* and switchyard.v1.ConflictDetail).
#
#   eval "$(scripts/install-test-tools.sh)"
#   SWITCHYARD_BIN=path/to/switchyard tests/interop/grpcurl_smoke.sh
#
# Starts its own server (fresh temporary SQLite database, demo devices on,
# loopback port chosen by the kernel), with auth on from the first call: an
# API key of the tenant `default` (which owns the demo devices), with every
# scope, is created with `switchyard admin` before the server starts and sent
# as `authorization: Bearer sy_...` on every switchyard.v1 call. Health and
# reflection (grpcurl list/describe) are called without it: they need none.
# Runs every check even after one fails, always stops the server, and ends
# with one line "N passed, M failed"; the exit status is non-zero when any
# check failed or the server did not start.
set -euo pipefail

STARTUP_TIMEOUT_S=20
GRPCURL_MAX_TIME_S=10

die() { printf 'grpcurl_smoke: %s\n' "$*" >&2; exit 2; }

[[ -n "${SWITCHYARD_BIN:-}" ]] || die "SWITCHYARD_BIN is not set: point it at the switchyard server binary"
[[ -f "$SWITCHYARD_BIN" && -x "$SWITCHYARD_BIN" ]] || die "SWITCHYARD_BIN=$SWITCHYARD_BIN is not an executable file"
command -v grpcurl >/dev/null || die "grpcurl is not on PATH (eval \"\$(scripts/install-test-tools.sh)\")"

tmp="$(mktemp -d "${TMPDIR:-/tmp}/switchyard-smoke.XXXXXX")"
log="$tmp/server.log"
server_pid=""

# Always stop the server (SIGTERM, then SIGKILL after 15 s) and clean up.
cleanup() {
    local rc=$?
    if [[ -n "$server_pid" ]] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid" 2>/dev/null || true
        for _ in $(seq 150); do
            kill -0 "$server_pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$server_pid" 2>/dev/null; then
            echo "server did not stop on SIGTERM; killing it" >&2
            kill -KILL "$server_pid" 2>/dev/null || true
        fi
        wait "$server_pid" 2>/dev/null || true
    fi
    rm -rf "$tmp"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

server_tail() { echo "--- server log (tail) ---" >&2; tail -n 30 "$log" >&2 || true; }

# ---- an API key, then the server -----------------------------------------
database="sqlite://$tmp/smoke.db"
# The key is printed alone on stdout. It has the default rate (50/s, burst
# 100 per key): this script makes fewer calls than the burst.
KEY="$("$SWITCHYARD_BIN" admin --database "$database" key create --tenant default \
    --scopes devices:read,devices:write,actions:read,actions:write,admin,webhooks:manage \
    --description "grpcurl smoke test" </dev/null 2>"$tmp/admin.err")" ||
    { cat "$tmp/admin.err" >&2; die "switchyard admin key create failed"; }
[[ "$KEY" =~ ^sy_[a-z2-7]{16}_[a-z2-7]{52}$ ]] || die "switchyard admin key create did not print a key (sy_...) alone"

echo "starting $SWITCHYARD_BIN (database $tmp/smoke.db, demo devices on, one API key)"
"$SWITCHYARD_BIN" serve --listen 127.0.0.1:0 --database "$database" \
    --log-format json </dev/null >/dev/null 2>"$log" &
server_pid=$!

# The kernel picks the port; the "listening" JSON log line says which.
deadline=$((SECONDS + STARTUP_TIMEOUT_S))
addr=""
while [[ -z "$addr" ]]; do
    if ! kill -0 "$server_pid" 2>/dev/null; then
        server_tail; die "server exited during startup"
    fi
    if ((SECONDS >= deadline)); then
        server_tail; die "no \"listening\" log line within ${STARTUP_TIMEOUT_S}s"
    fi
    addr="$(grep '"message":"listening"' "$log" 2>/dev/null | head -n 1 |
        grep -o '"addr":"[^"]*"' | cut -d'"' -f4 || true)"
    [[ -n "$addr" ]] || sleep 0.1
done
[[ "$addr" == 127.0.0.1:* ]] || die "server listens on $addr, not on loopback"
echo "server pid $server_pid listening on $addr"

# gc: no key (health, reflection, and the check that a key is needed);
# gk: with the key, for every switchyard.v1 call.
gc() { grpcurl -plaintext -max-time "$GRPCURL_MAX_TIME_S" "$@"; }
gk() { gc -H "authorization: Bearer $KEY" "$@"; }

# Poll the health check until SERVING (bounded by the same deadline).
until gc "$addr" grpc.health.v1.Health/Check 2>/dev/null | grep -q '"status": "SERVING"'; do
    if ! kill -0 "$server_pid" 2>/dev/null; then
        server_tail; die "server exited during startup"
    fi
    if ((SECONDS >= deadline)); then
        server_tail; die "health check not SERVING within ${STARTUP_TIMEOUT_S}s"
    fi
    sleep 0.1
done

# ---- checks ----------------------------------------------------------------
passed=0
failed=0
ok() { passed=$((passed + 1)); printf 'ok    %s\n' "$1"; }
fail() {
    failed=$((failed + 1))
    printf 'FAIL  %s\n' "$1"
    if [[ -n "${2:-}" ]]; then printf '%s\n' "$2" | sed 's/^/      | /'; fi
}
# check NAME OUTPUT PATTERN...: every fixed-string PATTERN is in OUTPUT.
check() {
    local name=$1 out=$2 p
    shift 2
    for p in "$@"; do
        if ! grep -qF -- "$p" <<<"$out"; then
            fail "$name" "missing: $p"$'\n'"$out"
            return 0
        fi
    done
    ok "$name"
}
# check_line NAME OUTPUT ANCHOR PATTERN...: OUTPUT has a line with the
# fixed string ANCHOR, and that same line holds every PATTERN.
check_line() {
    local name=$1 out=$2 anchor=$3 line
    shift 3
    line="$(grep -F -- "$anchor" <<<"$out" | head -n 1 || true)"
    if [[ -z "$line" ]]; then
        fail "$name" "no line with: $anchor"$'\n'"$out"
        return 0
    fi
    check "$name" "$line" "$@"
}
# run VAR_OUT VAR_RC cmd...: output (stdout+stderr) and exit code, never
# tripping set -e.
run() {
    local -n _out=$1 _rc=$2
    shift 2
    _rc=0
    _out="$("$@" 2>&1)" || _rc=$?
}

# Reflection (list, describe) and health are called without the key.
run out rc gc "$addr" list
if ((rc == 0)); then
    for svc in switchyard.v1.ActionService switchyard.v1.AdminService switchyard.v1.DeviceService switchyard.v1.WebhookService grpc.health.v1.Health; do
        if grep -qx -- "$svc" <<<"$out"; then ok "list shows $svc"; else fail "list shows $svc" "$out"; fi
    done
else
    for svc in switchyard.v1.ActionService switchyard.v1.AdminService switchyard.v1.DeviceService switchyard.v1.WebhookService grpc.health.v1.Health; do
        fail "list shows $svc" "grpcurl exit $rc: $out"
    done
fi

run out rc gc "$addr" describe switchyard.v1.ActionService
if ((rc == 0)); then
    check "describe switchyard.v1.ActionService" "$out" \
        "service ActionService {" "rpc PushAction ( .switchyard.v1.PushActionRequest )"
else
    fail "describe switchyard.v1.ActionService" "grpcurl exit $rc: $out"
fi

run out rc gc "$addr" grpc.health.v1.Health/Check
if ((rc == 0)); then check "health check without a key says SERVING" "$out" '"status": "SERVING"'
else fail "health check without a key says SERVING" "grpcurl exit $rc: $out"; fi

# Without the header: UNAUTHENTICATED (grpcurl exit 64 + 16), typed.
run out rc gc -d '{}' "$addr" switchyard.v1.DeviceService/ListDevices
if ((rc == 80)); then check "ListDevices without a key fails with Unauthenticated (grpcurl exit 80)" "$out" \
    "Code: Unauthenticated"
else fail "ListDevices without a key fails with Unauthenticated (grpcurl exit 80; got exit $rc)" "$out"; fi
check_line "error details carry a decoded google.rpc.ErrorInfo with reason INVALID_API_KEY, why missing" "$out" \
    '"@type":"type.googleapis.com/google.rpc.ErrorInfo"' \
    '"domain":"switchyard"' '"reason":"INVALID_API_KEY"' '"why":"missing"'

run out rc gk -d '{}' "$addr" switchyard.v1.DeviceService/ListDevices
if ((rc == 0)); then check "ListDevices shows demo-battery" "$out" '"deviceId": "demo-battery"'
else fail "ListDevices shows demo-battery" "grpcurl exit $rc: $out"; fi

# A window a few hours ahead, in whole minutes: nothing starts during the run.
start="$(date -u -d '+3 hours' +%Y-%m-%dT%H:%M:00Z)"
end="$(date -u -d '+4 hours' +%Y-%m-%dT%H:%M:00Z)"
push_body() { # COMMAND
    printf '{"device_id":"demo-battery","action":{"command":"%s","start_time":"%s","end_time":"%s","power":{"value":3,"unit":"UNIT_KILOWATT"}}}' \
        "$1" "$start" "$end"
}

run out rc gk -d "$(push_body COMMAND_CHARGE)" "$addr" switchyard.v1.ActionService/PushAction
first_id="$(grep -o '"actionId": "[^"]*"' <<<"$out" | head -n 1 | cut -d'"' -f4 || true)"
if ((rc == 0)) && [[ -n "$first_id" ]]; then
    check "push windowed COMMAND_CHARGE $start..$end on demo-battery is SCHEDULED" "$out" \
        '"state": "ACTION_STATE_SCHEDULED"'
else
    fail "push windowed COMMAND_CHARGE on demo-battery" "grpcurl exit $rc: $out"
    first_id="(none)"
fi

# The same window again, another command on the same channel, no strategy.
run out rc gk -d "$(push_body COMMAND_DISCHARGE)" "$addr" switchyard.v1.ActionService/PushAction
if ((rc == 73)); then ok "colliding push fails with FAILED_PRECONDITION (grpcurl exit 73)"
else fail "colliding push fails with FAILED_PRECONDITION (grpcurl exit 73; got exit $rc)" "$out"; fi
# grpcurl prints each detail as one JSON object on one line; a detail it
# could not resolve through reflection would not show its fields by name.
check_line "error details carry a decoded google.rpc.ErrorInfo with reason ACTION_CONFLICT" "$out" \
    '"@type":"type.googleapis.com/google.rpc.ErrorInfo"' \
    '"domain":"switchyard"' '"reason":"ACTION_CONFLICT"' "\"conflicting_action_ids\":\"$first_id\""
check_line "error details carry a decoded switchyard.v1.ConflictDetail naming the first action" "$out" \
    '"@type":"type.googleapis.com/switchyard.v1.ConflictDetail"' \
    "\"actionId\":\"$first_id\"" '"state":"ACTION_STATE_SCHEDULED"' \
    '"CONFLICT_STRATEGY_CANCEL_AND_REPLACE"' '"CONFLICT_STRATEGY_QUEUE_AFTER"'

# A push over many colliders: the error lists 8 of them, says how many
# there are and that it is truncated, and still arrives decoded (listing
# them all would not fit the 8 KiB of metadata gRPC clients accept).
many_dev="smoke-many-colliders"
many_n=50
many_first=$((($(date -u +%s) / 60 + 6 * 60) * 60)) # a whole minute, 6 hours ahead
rfc3339() { date -u -d "@$1" +%Y-%m-%dT%H:%M:%SZ; }
many_push_body() { # COMMAND START_EPOCH END_EPOCH
    printf '{"device_id":"%s","action":{"command":"%s","start_time":"%s","end_time":"%s"}}' \
        "$many_dev" "$1" "$(rfc3339 "$2")" "$(rfc3339 "$3")"
}
run out rc gk -d "{\"device_id\":\"$many_dev\",\"device\":{\"family\":\"DEVICE_FAMILY_BATTERY\",\"driver\":\"simulated\"}}" \
    "$addr" switchyard.v1.DeviceService/CreateDevice
if ((rc == 0)); then ok "create $many_dev"; else fail "create $many_dev" "grpcurl exit $rc: $out"; fi
# Back-to-back one-minute windows, booked 10 at a time. Wait for these
# jobs by pid: a bare `wait` would also wait for the server.
book_pids=()
for ((i = 0; i < many_n; i++)); do
    s=$((many_first + 60 * i))
    gk -d "$(many_push_body COMMAND_CHARGE "$s" $((s + 60)))" "$addr" \
        switchyard.v1.ActionService/PushAction >"$tmp/book.$i" 2>&1 &
    book_pids+=($!)
    if ((${#book_pids[@]} == 10 || i == many_n - 1)); then
        for pid in "${book_pids[@]}"; do wait "$pid" || true; done
        book_pids=()
    fi
done
booked="$(grep -l '"state": "ACTION_STATE_SCHEDULED"' "$tmp"/book.* 2>/dev/null | wc -l)"
if ((booked == many_n)); then ok "book $many_n back-to-back one-minute windows on $many_dev"
else fail "book $many_n back-to-back one-minute windows on $many_dev (booked $booked)" "$(cat "$tmp"/book.* | head -n 20)"; fi
# One window over all of them, another command, no strategy.
run out rc gk -d "$(many_push_body COMMAND_DISCHARGE "$many_first" $((many_first + 60 * many_n)))" \
    "$addr" switchyard.v1.ActionService/PushAction
if ((rc == 73)); then ok "push over $many_n colliders fails with FAILED_PRECONDITION (grpcurl exit 73)"
else fail "push over $many_n colliders fails with FAILED_PRECONDITION (grpcurl exit 73; got exit $rc)" "$out"; fi
check_line "the ErrorInfo over $many_n colliders counts them all and says it is truncated" "$out" \
    '"@type":"type.googleapis.com/google.rpc.ErrorInfo"' \
    '"reason":"ACTION_CONFLICT"' "\"conflicting_action_count\":\"$many_n\"" '"truncated":"true"'
check_line "the ConflictDetail over $many_n colliders is decoded with conflictCount and truncated" "$out" \
    '"@type":"type.googleapis.com/switchyard.v1.ConflictDetail"' \
    "\"conflictCount\":$many_n" '"truncated":true'

# Webhooks: an internal receiver is refused, typed; a public one gets its
# signing secret once, and never again (not in Get, not in the log).
run out rc gk -d '{"url":"http://169.254.169.254/latest/meta-data"}' "$addr" \
    switchyard.v1.WebhookService/CreateWebhookEndpoint
if ((rc == 67)); then check_line "a webhook to the metadata address is InvalidArgument, INVALID_FIELD on url" "$out" \
    '"@type":"type.googleapis.com/google.rpc.ErrorInfo"' '"reason":"INVALID_FIELD"' '"fields":"url"'
else fail "a webhook to the metadata address is InvalidArgument (grpcurl exit 67)" "grpcurl exit $rc: $out"; fi
run out rc gk -d '{"url":"https://hooks.example.com/switchyard","event_types":["EVENT_TYPE_ACTION_FAILED"]}' \
    "$addr" switchyard.v1.WebhookService/CreateWebhookEndpoint
secret="$(grep -o '"secret": "whsec_[^"]*"' <<<"$out" | cut -d'"' -f4 || true)"
endpoint="$(grep -o '"endpointId": "wh_[^"]*"' <<<"$out" | cut -d'"' -f4 || true)"
if ((rc == 0)) && [[ -n "$secret" && -n "$endpoint" ]]; then ok "CreateWebhookEndpoint answers the endpoint and its whsec_ secret"
else fail "CreateWebhookEndpoint answers the endpoint and its whsec_ secret" "grpcurl exit $rc: $out"; fi
run out rc gk -d "{\"endpoint_id\":\"$endpoint\"}" "$addr" switchyard.v1.WebhookService/GetWebhookEndpoint
if ((rc == 0)) && ! grep -qF -- "whsec_" <<<"$out"; then check "GetWebhookEndpoint never shows the secret" "$out" \
    "\"endpointId\": \"$endpoint\"" '"EVENT_TYPE_ACTION_FAILED"'
else fail "GetWebhookEndpoint never shows the secret" "grpcurl exit $rc: $out"; fi
if [[ -n "$secret" ]] && grep -qF -- "${secret#whsec_}" "$log"; then fail "the server log never holds a webhook secret"
else ok "the server log never holds a webhook secret"; fi

# The key was sent on every call above: the server never logs it.
if grep -qF -- "${KEY#sy_*_}" "$log"; then fail "the server log never holds the API key's secret"
else ok "the server log never holds the API key's secret"; fi

if ((failed > 0)); then server_tail; fi
echo "$passed passed, $failed failed"
((failed == 0))
