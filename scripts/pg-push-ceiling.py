#!/usr/bin/env python3
"""What PostgreSQL alone can store of durable pushes on this machine.

Drives pgbench (no switchyard server) with the statements a push runs on
PostgreSQL, in groups of pushes per transaction as group commit makes
them (`--group`, 64 by default; the service's lanes see about 8 from 64
clients), three ways:

- per push, as the service runs them: a savepoint, the request_id key
  read, the device row locked, the channel's holders read, and the
  action, its audit entry and its key written in one statement;
- reads set-wise: the key reads, the devices' locks and the holders'
  reads (locked) one statement each for the group, then per push a
  savepoint and the combined write (what a group that gathered its
  members' reads first would run);
- set-wise: the same reads and writes, one statement each for the group.

Each pgbench client books on 25 devices of its own (as each of the
service's write lanes books on devices of its own); a group's pushes are
on distinct devices as long as it has at most 25 (one device after
another, from a random one). Each push has a unique request_id and a
window after every other (no collisions), as `switchyard-bench push`
sends them. Prints pushes per second each way, in alternating rounds
(the cores' speed drifts from minute to minute). Needs psql and pgbench
(postgresql-client) and an empty database, which it migrates with
`switchyard migrate` and fills.

    scripts/pg-push-ceiling.py --switchyard target/release/switchyard \\
        --database postgres://postgres@127.0.0.1:5432/ceiling
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile

DEVICES = 100
PER_CLIENT = 25

HOLDERS = (
    "SELECT a.* FROM actions a WHERE a.tenant_id = 'default' AND a.device_id = {dev} "
    "AND (work <> 'NONE' AND (state IN ('SCHEDULED', 'ACKNOWLEDGED', 'ACTIVE') OR work = 'REVERT')) "
    "AND a.channel = 'mode' AND (a.end_ns IS NULL OR a.end_ns > {t}) "
    "AND a.start_ns >= COALESCE((SELECT MAX(start_ns) FROM actions b WHERE b.tenant_id = 'default' "
    "AND b.device_id = {dev} AND b.channel = 'mode' AND (work <> 'NONE' AND "
    "(state IN ('SCHEDULED', 'ACKNOWLEDGED', 'ACTIVE') OR work = 'REVERT')) AND b.start_ns <= {t}), "
    "-9223372036854775808) ORDER BY a.start_ns, a.action_id{lock}"
)
ACTION_COLUMNS = (
    "tenant_id, action_id, device_id, channel, command, power_value, power_unit, target_value, "
    "target_unit, reserve_value, reserve_unit, start_ns, end_ns, immediate, state, replaced_by, "
    "queued_after, error_code, error_message, revision, create_ns, update_ns, work, due_ns, "
    "lease_until_ns, lease_owner, attempts, clear_native, oem_raw, verified, driver_memo, fence"
)
KEY_UPSERT = (
    "ON CONFLICT (tenant_id, request_id) DO UPDATE SET method = excluded.method, "
    "request_body = excluded.request_body, response_body = excluded.response_body, "
    "lease_until_ns = excluded.lease_until_ns, claim = excluded.claim, "
    "create_ns = excluded.create_ns, expire_ns = excluded.expire_ns "
    "WHERE idempotency_keys.expire_ns <= 5 OR (idempotency_keys.response_body IS NULL AND "
    "(idempotency_keys.lease_until_ns IS NULL OR idempotency_keys.lease_until_ns <= 5))"
)
# After every window booked: the holders' read finds none.
LATER = "2000000000000000000"
# Each window after the one before, on whichever device.
START = "(1900000000000000000 + nextval('ceiling_windows') * 1000000)"


def action_values(action_id, dev, start):
    return (
        f"'default', {action_id}, {dev}, 'mode', 'CHARGE', 2.5, 'kW', NULL, NULL, NULL, NULL, "
        f"{start}, {start} + 500000, false, 'SCHEDULED', NULL, '', NULL, NULL, 1, 1, 1, 'APPLY', "
        f"{start}, NULL, NULL, 0, false, NULL, false, NULL, 0"
    )


def write_statement(select_from, dev, rid, action_id, start):
    """The action, its audit entry and its key: one statement."""
    src = f" FROM {select_from}" if select_from else ""
    verb = "SELECT" if select_from else "VALUES ("
    end = "" if select_from else ")"
    return (
        f"WITH w0 AS (INSERT INTO actions ({ACTION_COLUMNS}) {verb} "
        f"{action_values(action_id, dev, start)}{end}{src}), "
        f"w1 AS (INSERT INTO audit_log (tenant_id, device_id, action_id, from_state, to_state, "
        f"reason, request_id, at_ns) {verb} 'default', {dev}, {action_id}, NULL, 'SCHEDULED', "
        f"'PUSHED', {rid}, 1{end}{src}) "
        f"INSERT INTO idempotency_keys (tenant_id, request_id, method, request_body, "
        f"response_body, lease_until_ns, claim, create_ns, expire_ns) {verb} 'default', {rid}, "
        f"'push', '\\x00', '\\x0102', NULL, NULL, 1, 9000000000000000000{end}{src} {KEY_UPSERT};"
    )


def draws(group):
    """pgbench variables: d<i>, the group's devices (distinct up to 25: one
    after another from a random one, among the client's own), r<i>, its
    request_ids."""
    out = [f"\\set o random(0, {PER_CLIENT - 1})"]
    for i in range(group):
        out.append(f"\\set d{i} :client_id * {PER_CLIENT} + (:o + {i}) % {PER_CLIENT}")
        out.append(f"\\set r{i} random(1, 1000000000000)")
    return out


def per_push(group):
    out = draws(group)
    out.append("BEGIN;")
    for i in range(group):
        dev = f"'ceiling-' || :d{i}"
        rid = f"'r' || :client_id || '-' || :r{i}"
        out.append("SAVEPOINT m;" if i == 0 else "RELEASE SAVEPOINT m; SAVEPOINT m;")
        out.append(
            f"SELECT * FROM idempotency_keys WHERE tenant_id = 'default' AND request_id = {rid} FOR UPDATE;"
        )
        out.append(
            f"SELECT * FROM devices WHERE tenant_id = 'default' AND device_id = {dev} FOR UPDATE;"
        )
        out.append(HOLDERS.format(dev=dev, t=LATER, lock=" FOR UPDATE") + ";")
        out.append(write_statement(None, dev, rid, "gen_random_uuid()::text", START))
    out.append("RELEASE SAVEPOINT m;")
    out.append("COMMIT;")
    return "\n".join(out) + "\n"


def reads_set_wise(group):
    out = draws(group)
    devs = ", ".join(f"'ceiling-' || :d{i}" for i in range(group))
    rids = ", ".join(f"'r' || :client_id || '-' || :r{i}" for i in range(group))
    out.append("BEGIN;")
    out.append(
        f"SELECT * FROM idempotency_keys WHERE tenant_id = 'default' AND request_id IN ({rids}) FOR UPDATE;"
    )
    out.append(
        f"SELECT * FROM devices WHERE tenant_id = 'default' AND device_id IN ({devs}) "
        "ORDER BY device_id FOR UPDATE;"
    )
    out.append(
        f"SELECT h.* FROM (SELECT DISTINCT unnest(ARRAY[{devs}]) dev) q, LATERAL ("
        + HOLDERS.format(dev="q.dev", t=LATER, lock=" FOR UPDATE")
        + ") h;"
    )
    for i in range(group):
        dev = f"'ceiling-' || :d{i}"
        rid = f"'r' || :client_id || '-' || :r{i}"
        out.append("SAVEPOINT m;" if i == 0 else "RELEASE SAVEPOINT m; SAVEPOINT m;")
        out.append(write_statement(None, dev, rid, "gen_random_uuid()::text", START))
    out.append("RELEASE SAVEPOINT m;")
    out.append("COMMIT;")
    return "\n".join(out) + "\n"


def set_wise(group):
    return "\n".join(
        [
            f"\\set o random(0, {PER_CLIENT - 1})",
            "BEGIN;",
            "CREATE TEMP TABLE IF NOT EXISTS g (dev text, rid text, aid text, s bigint) ON COMMIT DELETE ROWS;",
            f"INSERT INTO g SELECT 'ceiling-' || (:client_id * {PER_CLIENT} + (:o + i) % {PER_CLIENT}), "
            f"'r' || md5(random()::text), gen_random_uuid()::text, {START} FROM generate_series(0, {group - 1}) i;",
            "SELECT k.* FROM idempotency_keys k JOIN g ON k.tenant_id = 'default' AND k.request_id = g.rid FOR UPDATE OF k;",
            "SELECT d.* FROM devices d WHERE d.tenant_id = 'default' AND d.device_id IN (SELECT dev FROM g) "
            "ORDER BY d.device_id FOR UPDATE;",
            "SELECT h.* FROM (SELECT DISTINCT dev FROM g) q, LATERAL ("
            + HOLDERS.format(dev="q.dev", t=LATER, lock=" FOR UPDATE")
            + ") h;",
            write_statement("g", "dev", "rid", "aid", "s"),
            "COMMIT;",
        ]
    ) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--switchyard", required=True, help="the switchyard binary (for `migrate`)")
    p.add_argument("--database", required=True, help="an empty PostgreSQL database")
    p.add_argument("--seconds", type=int, default=15, help="each round's length")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--clients", type=int, default=4, help="pgbench clients (at most 4)")
    p.add_argument("--group", type=int, default=64, help="pushes per transaction (1 to 127)")
    a = p.parse_args()
    if not 1 <= a.clients <= 4:
        sys.exit("--clients: 1 to 4 (each books on 25 devices of its own)")
    # pgbench allows 255 variables in one statement; the reads' gathered
    # key lookup names two for each push.
    if not 1 <= a.group <= 127:
        sys.exit("--group: 1 to 127")
    m = re.match(r"postgres(?:ql)?://([^@/]+)@([^:/]+)(?::(\d+))?/([^?]+)", a.database)
    if not m:
        sys.exit("--database: postgres://USER@HOST[:PORT]/DATABASE")
    user, host, port, db = m.group(1).split(":")[0], m.group(2), m.group(3) or "5432", m.group(4)
    conn = ["-h", host, "-p", port, "-U", user]
    subprocess.run([a.switchyard, "migrate", "--database", a.database], check=True)
    # pgbench's planner sees what a replica would once the tables are
    # analysed; JIT off, as a statement of this size gains nothing from it.
    subprocess.run(
        ["psql", *conn, "-d", db, "-qAt", "-v", "ON_ERROR_STOP=1", "-c",
         "CREATE SEQUENCE IF NOT EXISTS ceiling_windows; "
         "INSERT INTO devices (tenant_id, device_id, display_name, family, driver, oem_device_id, "
         "timezone, settings, revision, create_ns, update_ns) SELECT 'default', 'ceiling-' || i, "
         "'ceiling', 'BATTERY', 'simulated', 'x', 'UTC', '{}', 1, 0, 0 "
         f"FROM generate_series(0, {DEVICES - 1}) i ON CONFLICT DO NOTHING; ANALYZE;",
         "-c", f"ALTER DATABASE \"{db}\" SET jit = off"],
        check=True,
    )
    def analyze():
        # As the service keeps them: statistics of the table as it is now
        # (of an empty table they would mislead the planner as it grows).
        subprocess.run(["psql", *conn, "-d", db, "-qAt", "-c", "ANALYZE"], check=True)

    def bench(path, seconds):
        out = subprocess.run(
            ["pgbench", *conn, "-n", "-M", "prepared", "-c", str(a.clients), "-j", "2",
             "-T", str(seconds), "-f", path, db],
            check=True, capture_output=True, text=True,
        ).stdout
        return float(re.search(r"^tps = ([\d.]+)", out, re.M).group(1))

    with tempfile.TemporaryDirectory() as d:
        scripts = {}
        for name, text in (
            ("per push", per_push(a.group)),
            ("reads set-wise", reads_set_wise(a.group)),
            ("set-wise", set_wise(a.group)),
        ):
            scripts[name] = os.path.join(d, name.replace(" ", "_") + ".sql")
            with open(scripts[name], "w") as f:
                f.write(text)
        # A warm-up, so that the table has rows to take statistics of.
        bench(scripts["set-wise"], 5)
        for r in range(a.rounds):
            for name, path in scripts.items():
                analyze()
                tps = bench(path, a.seconds)
                print(f"round {r + 1}, {name}: {tps * a.group:,.0f} pushes/s ({tps:.1f} groups of {a.group}/s)")


if __name__ == "__main__":
    main()
