//! Schema migrations, applied in order on start. Each is applied once, in
//! its own transaction, and recorded in `schema_migrations`. Never edit a
//! released migration: add one.

/// (version, statements).
pub const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        r#"
CREATE TABLE devices (
    tenant_id     TEXT    NOT NULL,
    device_id     TEXT    NOT NULL,
    display_name  TEXT    NOT NULL,
    family        TEXT    NOT NULL,
    driver        TEXT    NOT NULL,
    oem_device_id TEXT    NOT NULL,
    timezone      TEXT    NOT NULL,
    settings      TEXT    NOT NULL,
    revision      INTEGER NOT NULL,
    create_ns     INTEGER NOT NULL,
    update_ns     INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, device_id)
);

CREATE TABLE actions (
    tenant_id     TEXT    NOT NULL,
    action_id     TEXT    NOT NULL PRIMARY KEY,
    device_id     TEXT    NOT NULL,
    channel       TEXT    NOT NULL,
    command       TEXT    NOT NULL,
    power_value   REAL,
    power_unit    TEXT,
    target_value  REAL,
    target_unit   TEXT,
    reserve_value REAL,
    reserve_unit  TEXT,
    start_ns      INTEGER NOT NULL,
    end_ns        INTEGER,
    immediate     INTEGER NOT NULL,
    state         TEXT    NOT NULL,
    replaced_by   TEXT,
    queued_after  TEXT    NOT NULL,
    error_code    TEXT,
    error_message TEXT,
    revision      INTEGER NOT NULL,
    create_ns     INTEGER NOT NULL,
    update_ns     INTEGER NOT NULL,
    FOREIGN KEY (tenant_id, device_id) REFERENCES devices (tenant_id, device_id) ON DELETE CASCADE
);
CREATE INDEX actions_by_channel ON actions (tenant_id, device_id, channel, state, start_ns);
CREATE INDEX actions_by_device ON actions (tenant_id, device_id, action_id);
CREATE INDEX actions_by_tenant ON actions (tenant_id, action_id);

-- Every change of every resource, append-only. Kept when a device is
-- deleted, so the history of what was done to a device survives it.
CREATE TABLE audit_log (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant_id   TEXT    NOT NULL,
    device_id   TEXT    NOT NULL,
    action_id   TEXT,
    from_state  TEXT,
    to_state    TEXT    NOT NULL,
    reason      TEXT    NOT NULL,
    request_id  TEXT,
    at_ns       INTEGER NOT NULL
);
CREATE INDEX audit_by_action ON audit_log (tenant_id, action_id, seq);

CREATE TABLE idempotency_keys (
    tenant_id      TEXT    NOT NULL,
    request_id     TEXT    NOT NULL,
    method         TEXT    NOT NULL,
    request_body   BLOB    NOT NULL,
    response_body  BLOB,
    lease_until_ns INTEGER,
    claim          TEXT,
    create_ns      INTEGER NOT NULL,
    expire_ns      INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, request_id)
);
CREATE INDEX idempotency_by_expiry ON idempotency_keys (expire_ns);
"#,
    ),
    (
        2,
        r#"
-- Dispatch: what the dispatcher owes each action, and when.
--   work: APPLY (put the command in force at due_ns), REVERT (undo it at
--   due_ns), NONE. lease_until_ns: a dispatcher has claimed the work until
--   then (a crashed one's claim expires). attempts: failed tries of the
--   current work. clear_native: pushed with CANCEL_AND_REPLACE, so the
--   driver may clear the native scheduler. oem_raw: the OEM's last answer.
ALTER TABLE actions ADD COLUMN work TEXT NOT NULL DEFAULT 'NONE';
ALTER TABLE actions ADD COLUMN due_ns INTEGER;
ALTER TABLE actions ADD COLUMN lease_until_ns INTEGER;
ALTER TABLE actions ADD COLUMN lease_owner TEXT;
ALTER TABLE actions ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE actions ADD COLUMN clear_native INTEGER NOT NULL DEFAULT 0;
ALTER TABLE actions ADD COLUMN oem_raw TEXT;
UPDATE actions SET work = 'APPLY', due_ns = start_ns WHERE state IN ('SCHEDULED', 'ACKNOWLEDGED');
UPDATE actions SET work = 'REVERT', due_ns = end_ns WHERE state = 'ACTIVE' AND end_ns IS NOT NULL;
CREATE INDEX actions_due ON actions (work, due_ns);
CREATE INDEX actions_lease ON actions (lease_owner);

-- The device's state as its driver last observed it (JSON), and when.
ALTER TABLE devices ADD COLUMN observed TEXT;
ALTER TABLE devices ADD COLUMN observed_ns INTEGER;
"#,
    ),
    (
        3,
        r#"
-- Only owed work is indexed for the dispatcher, so claiming due work and
-- finding the next due time cost the same however long the history of
-- finished actions grows (the index on (work, due_ns) could not serve
-- work != 'NONE' and every round scanned the table). A finished action's
-- claim is released (lease_owner NULL), so the lease index holds only
-- claimed rows.
DROP INDEX actions_due;
CREATE INDEX actions_owed ON actions (due_ns) WHERE work != 'NONE';
UPDATE actions SET lease_owner = NULL, lease_until_ns = NULL WHERE work = 'NONE';
DROP INDEX actions_lease;
CREATE INDEX actions_leased ON actions (lease_owner) WHERE lease_owner IS NOT NULL;

-- The driver read the device back after its last write for the action
-- (the apply, then the revert) and found it as intended.
ALTER TABLE actions ADD COLUMN verified INTEGER NOT NULL DEFAULT 0;
"#,
    ),
    (
        4,
        r#"
-- A device's incarnation: a value fresh at every CreateDevice, part of its
-- etag, so that an etag read before a device was deleted and created again
-- never matches the new device. Devices created before keep '' (and the
-- etags they had).
ALTER TABLE devices ADD COLUMN incarnation TEXT NOT NULL DEFAULT '';
"#,
    ),
    (
        5,
        r#"
-- What the driver recorded when it applied the action (opaque to the
-- service): set by an apply the OEM accepted, cleared by the revert. While
-- set, the action's write may be in force on the device: its revert gets
-- it back, and the device's other actions see it as switchyard's.
ALTER TABLE actions ADD COLUMN driver_memo TEXT;
"#,
    ),
    (
        6,
        r#"
-- The fencing token of the action's work: one more at every claim, handed
-- to the driver with the call, so a call from a dispatcher that stalled
-- past its lease (the work claimed again since) can be refused.
ALTER TABLE actions ADD COLUMN fence INTEGER NOT NULL DEFAULT 0;
"#,
    ),
];
