"""Interop checks of the switchyard gRPC API from outside Rust.

A Python client, built only from the published protos, talks to the real
server binary over real gRPC and decodes the rich error model the way any
other-language client would (grpc_status + google.rpc error details + our
own switchyard.v1.ConflictDetail).

    eval "$(scripts/install-test-tools.sh)"
    SWITCHYARD_BIN=path/to/switchyard pytest tests/interop/python -v

- SWITCHYARD_BIN must name the server binary; without it every test errors.
- The Python stubs are generated at test time from ../../../proto with
  grpc_tools.protoc into a temporary directory: nothing generated is kept.
- One server (fresh temporary SQLite database, --no-demo, loopback port
  picked by the kernel) serves the whole module and is stopped at the end.
  Each test registers its own device, so tests do not depend on each
  other's order.
- Auth is on from the first call: before the server starts, the fixture
  creates (with `switchyard admin` on the same database) the tenant
  `interop`, with a rate high enough for the bookings below, and one key
  with every scope (events:read too). The `channel` fixture sends that key
  on every call (`authorization: Bearer sy_...`, added by a client
  interceptor); `raw_channel` sends none. The auth tests make their own tenants and
  keys, with the command line or AdminService.
- Every action is booked hours ahead, so nothing ever starts during a run:
  no test waits on the scheduler.
- The "bounded errors" tests provoke the largest error of each RPC (300 and
  600 booked actions, 100 bad mask paths, 4 KB etags, 64 bad settings,
  malformed bodies) on a channel with grpcio's default options, and check
  that each arrives typed within grpcio's 8 KiB metadata limit. One case
  needs curl with HTTP/2 (a gRPC frame cut short) and is skipped without it.
- The "events" tests read WatchEvents streams (docs/events.md) on a thread
  of their own (`Watch`), so every read has a timeout, and every stream also
  has a deadline: a watch that sends nothing fails the test, never hangs it.
"""

import base64
import math
import os
import queue
import secrets
import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import grpc
import pytest
from google.protobuf import duration_pb2, field_mask_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from conftest import (HOUR, INTEROP_TENANT, KEY_RE, RPC_TIMEOUT_S, BearerKey, _admin_cli, _health_check,
                      base_time, cancel_action, create_battery, push, ts, windowed)

DOMAIN = "switchyard"
CONFLICT_DETAIL_URL = "type.googleapis.com/switchyard.v1.ConflictDetail"


# --------------------------------------------------------------------------
# The server under test
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def raw_channel(server):
    """A channel that sends no key."""
    with grpc.insecure_channel(server.addr) as ch:
        yield ch


@pytest.fixture(scope="module")
def channel(server, raw_channel):
    """The same connection, sending the interop key on every call."""
    return grpc.intercept_channel(raw_channel, BearerKey(server.key))


@pytest.fixture(scope="module")
def devices(pb, channel):
    return pb.device_grpc.DeviceServiceStub(channel)


@pytest.fixture(scope="module")
def actions(pb, channel):
    return pb.action_grpc.ActionServiceStub(channel)


@pytest.fixture(scope="module")
def events(pb, channel):
    return pb.event_grpc.EventServiceStub(channel)


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def expect_error(code, fn, *args, **kwargs):
    """Calls fn, which must fail with `code`; returns the decoded
    google.rpc.Status from the grpc-status-details-bin trailer."""
    with pytest.raises(grpc.RpcError) as ei:
        fn(*args, **kwargs)
    err = ei.value
    assert err.code() == code, f"expected {code}, got {err.code()}: {err.details()}"
    st = rpc_status.from_call(err)
    assert st is not None, "no google.rpc.Status in the trailers (grpc-status-details-bin)"
    assert st.code == code.value[0], f"Status.code {st.code} does not match the call's {code}"
    assert st.message == err.details(), "Status.message differs from the grpc-message"
    return st


def detail(st, msg_cls):
    """Unpacks the single detail of type msg_cls from a google.rpc.Status."""
    found = [d for d in st.details if d.Is(msg_cls.DESCRIPTOR)]
    assert len(found) == 1, (
        f"expected one {msg_cls.DESCRIPTOR.full_name} detail, got {len(found)} "
        f"among {[d.type_url for d in st.details]}")
    out = msg_cls()
    assert found[0].Unpack(out)
    return out


def error_info(st, reason):
    """The ErrorInfo (docs/errors.md: always present, always first)."""
    assert st.details and st.details[0].Is(error_details_pb2.ErrorInfo.DESCRIPTOR), (
        f"first detail is not ErrorInfo: {[d.type_url for d in st.details]}")
    info = detail(st, error_details_pb2.ErrorInfo)
    assert info.domain == DOMAIN
    assert info.reason == reason, f"ErrorInfo.reason {info.reason!r} != {reason!r} ({st.message})"
    return info


def list_actions(pb, actions, device_id):
    return list(actions.ListActions(
        pb.action.ListActionsRequest(device_id=device_id, page_size=100),
        timeout=RPC_TIMEOUT_S,
    ).actions)


# --------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------


def test_create_battery_device_and_read_capabilities(pb, devices):
    created = create_battery(pb, devices, "py-battery-caps")
    assert created.device_id == "py-battery-caps"
    assert created.family == pb.common.DEVICE_FAMILY_BATTERY
    assert created.driver == "simulated"
    assert created.timezone == "Europe/London"
    assert created.etag, "no etag on the created device"
    assert created.HasField("create_time")

    # Read it back: the stored device carries the driver's capabilities.
    got = devices.GetDevice(pb.device.GetDeviceRequest(device_id="py-battery-caps"),
                            timeout=RPC_TIMEOUT_S)
    assert got.capabilities == created.capabilities
    charge = [c for c in got.capabilities.commands if c.command == pb.common.COMMAND_CHARGE]
    assert len(charge) == 1, f"COMMAND_CHARGE listed {len(charge)} times"
    assert charge[0].channel == "mode"
    assert pb.device.TIMING_SHAPE_WINDOWED in charge[0].timing_shapes
    power = [p for p in charge[0].parameters if p.name == "power"]
    assert power and pb.common.UNIT_KILOWATT in power[0].units


def test_collision_is_rejected_with_typed_details(pb, devices, actions):
    dev = "py-battery-conflict"
    create_battery(pb, devices, dev)
    t0 = base_time()
    start, end = t0 + 1 * HOUR, t0 + 2 * HOUR

    first = push(pb, actions, dev, windowed(pb, pb.common.COMMAND_CHARGE, start, end)).action
    assert first.action_id
    assert first.state == pb.action.ACTION_STATE_SCHEDULED
    assert first.start_time == ts(start) and first.end_time == ts(end)
    assert first.channel == "mode"

    # The same window, another command on the same channel, no strategy.
    st = expect_error(grpc.StatusCode.FAILED_PRECONDITION, push, pb, actions, dev,
                      windowed(pb, pb.common.COMMAND_DISCHARGE, start, end))

    info = error_info(st, "ACTION_CONFLICT")
    assert info.metadata["device_id"] == dev
    assert info.metadata["conflicting_action_ids"] == first.action_id

    # Our own detail, under the type URL other-language clients resolve.
    cds = [d for d in st.details if d.type_url == CONFLICT_DETAIL_URL]
    assert len(cds) == 1, f"no {CONFLICT_DETAIL_URL} among {[d.type_url for d in st.details]}"
    cd = pb.errors.ConflictDetail()
    assert cds[0].Unpack(cd)
    assert len(cd.conflicts) == 1
    c = cd.conflicts[0]
    assert c.action_id == first.action_id
    assert c.state == pb.action.ACTION_STATE_SCHEDULED
    assert c.command == pb.common.COMMAND_CHARGE
    assert c.channel == "mode"
    assert c.start_time == ts(start)
    assert c.end_time == ts(end)
    assert pb.action.CONFLICT_STRATEGY_CANCEL_AND_REPLACE in cd.strategies
    assert pb.action.CONFLICT_STRATEGY_QUEUE_AFTER in cd.strategies
    assert list(cd.in_flight_action_ids) == []

    # A rejected push books nothing.
    assert [a.action_id for a in list_actions(pb, actions, dev)] == [first.action_id]


def test_queue_after_moves_start_and_keeps_duration(pb, devices, actions):
    dev = "py-battery-queue"
    create_battery(pb, devices, dev)
    t0 = base_time()
    first = push(pb, actions, dev,
                 windowed(pb, pb.common.COMMAND_CHARGE, t0 + 1 * HOUR, t0 + 2 * HOUR)).action

    # Overlaps the second half of the first window; 45 minutes long.
    asked_start, asked_end = t0 + 90 * 60, t0 + 135 * 60
    resp = push(pb, actions, dev,
                windowed(pb, pb.common.COMMAND_DISCHARGE, asked_start, asked_end),
                on_conflict=pb.action.CONFLICT_STRATEGY_QUEUE_AFTER)
    queued = resp.action
    assert queued.state == pb.action.ACTION_STATE_SCHEDULED
    assert queued.start_time == first.end_time, "start not moved to the first action's end"
    duration = queued.end_time.seconds - queued.start_time.seconds
    assert duration == asked_end - asked_start, "duration not kept"
    assert list(resp.queued_after_action_ids) == [first.action_id]
    assert list(queued.queued_after_action_ids) == [first.action_id]
    assert list(resp.cancelled_actions) == []

    # The first action is untouched.
    again = actions.GetAction(pb.action.GetActionRequest(device_id=dev, action_id=first.action_id),
                              timeout=RPC_TIMEOUT_S)
    assert again.state == pb.action.ACTION_STATE_SCHEDULED


def test_cancel_and_replace_cancels_the_colliding_action(pb, devices, actions):
    dev = "py-battery-replace"
    create_battery(pb, devices, dev)
    t0 = base_time()
    first = push(pb, actions, dev,
                 windowed(pb, pb.common.COMMAND_CHARGE, t0 + 1 * HOUR, t0 + 2 * HOUR)).action

    start, end = t0 + 90 * 60, t0 + 3 * HOUR
    resp = push(pb, actions, dev, windowed(pb, pb.common.COMMAND_DISCHARGE, start, end),
                on_conflict=pb.action.CONFLICT_STRATEGY_CANCEL_AND_REPLACE)
    new = resp.action
    assert new.state == pb.action.ACTION_STATE_SCHEDULED
    assert new.start_time == ts(start) and new.end_time == ts(end), "the winner's window was changed"
    assert len(resp.cancelled_actions) == 1
    gone = resp.cancelled_actions[0]
    assert gone.action_id == first.action_id
    assert gone.state == pb.action.ACTION_STATE_CANCELLED
    assert gone.replaced_by_action_id == new.action_id

    # The cancellation is stored, not only reported.
    stored = actions.GetAction(pb.action.GetActionRequest(device_id=dev, action_id=first.action_id),
                               timeout=RPC_TIMEOUT_S)
    assert stored.state == pb.action.ACTION_STATE_CANCELLED
    assert stored.replaced_by_action_id == new.action_id


def test_end_before_start_is_invalid_argument(pb, devices, actions):
    dev = "py-battery-window"
    create_battery(pb, devices, dev)
    t0 = base_time()
    st = expect_error(grpc.StatusCode.INVALID_ARGUMENT, push, pb, actions, dev,
                      windowed(pb, pb.common.COMMAND_CHARGE, t0 + 2 * HOUR, t0 + 1 * HOUR))
    error_info(st, "INVALID_WINDOW")
    bad = detail(st, error_details_pb2.BadRequest)
    fields = [v.field for v in bad.field_violations]
    assert "action.end_time" in fields, f"BadRequest names {fields}"
    assert list_actions(pb, actions, dev) == []


def test_unknown_device_is_not_found(pb, actions):
    t0 = base_time()
    st = expect_error(grpc.StatusCode.NOT_FOUND, push, pb, actions, "py-no-such-device",
                      windowed(pb, pb.common.COMMAND_CHARGE, t0 + 1 * HOUR, t0 + 2 * HOUR))
    info = error_info(st, "DEVICE_NOT_FOUND")
    assert info.metadata["device_id"] == "py-no-such-device"


def test_same_request_id_and_body_returns_the_same_action(pb, devices, actions):
    dev = "py-battery-idem"
    create_battery(pb, devices, dev)
    t0 = base_time()
    body = windowed(pb, pb.common.COMMAND_CHARGE, t0 + 1 * HOUR, t0 + 2 * HOUR)
    a = push(pb, actions, dev, body, request_id="py-idem-retry").action
    b = push(pb, actions, dev, body, request_id="py-idem-retry").action
    assert a.action_id and b.action_id == a.action_id
    # The retry booked nothing (a second booking would also have collided).
    assert [x.action_id for x in list_actions(pb, actions, dev)] == [a.action_id]


def test_same_request_id_other_body_is_rejected(pb, devices, actions):
    dev = "py-battery-reuse"
    create_battery(pb, devices, dev)
    t0 = base_time()
    first = push(pb, actions, dev,
                 windowed(pb, pb.common.COMMAND_CHARGE, t0 + 1 * HOUR, t0 + 2 * HOUR),
                 request_id="py-idem-reuse").action
    # Another body (other power, other window: no collision) under the same key.
    st = expect_error(grpc.StatusCode.FAILED_PRECONDITION, push, pb, actions, dev,
                      windowed(pb, pb.common.COMMAND_CHARGE, t0 + 3 * HOUR, t0 + 4 * HOUR, kw=2.0),
                      request_id="py-idem-reuse")
    info = error_info(st, "REQUEST_ID_REUSED")
    assert info.metadata["request_id"] == "py-idem-reuse"
    assert [x.action_id for x in list_actions(pb, actions, dev)] == [first.action_id]


# --------------------------------------------------------------------------
# Bounded errors: the largest error of each RPC reaches a default client
# --------------------------------------------------------------------------
#
# grpcio (like grpc-java) refuses a response whose metadata is larger than
# 8 KiB (its default GRPC_ARG_MAX_METADATA_SIZE; between 8 and 16 KiB it
# refuses at random), and the caller then sees RESOURCE_EXHAUSTED "received
# metadata size exceeds ..." instead of the error. The server bounds every
# error (docs/errors.md, service/src/api/status.rs): at most 8 listed
# entries with the total in the metadata, messages of at most 400 bytes, no
# caller value of unbounded size repeated back. These tests provoke the
# largest error each RPC can be made to produce, on a channel with grpcio's
# default options (never raise grpc.max_metadata_size here: the point is
# that a default client decodes every error), and measure what arrived.

GRPC_DEFAULT_MAX_METADATA_BYTES = 8192
MAX_LISTED = 8
MAX_MESSAGE_BYTES = 400
MAX_DESCRIPTION_BYTES = 160
BOOKING_WORKERS = 16


def long_device_id(tag):
    """A device id of the maximum length, 63 characters: the id is repeated
    in metadata, subjects and messages, so it makes each error its
    largest."""
    prefix = f"py-{tag}-"
    did = prefix + "x" * (63 - len(prefix))
    assert len(did) == 63, did
    return did


def book_minutes(pb, actions, device_id, first_start, n):
    """Books n back-to-back one-minute COMMAND_CHARGE windows, the first
    starting at first_start, concurrently; returns the action ids in start
    order."""
    def one(i):
        s = first_start + 60 * i
        return push(pb, actions, device_id,
                    windowed(pb, pb.common.COMMAND_CHARGE, s, s + 60)).action.action_id

    with ThreadPoolExecutor(max_workers=BOOKING_WORKERS) as pool:
        ids = list(pool.map(one, range(n)))
    assert len(set(ids)) == n, "a booking returned an action id twice"
    return ids


def _value_bytes(v):
    return v if isinstance(v, bytes) else v.encode()


def trailing_metadata_bytes(err):
    """The trailing metadata the client received: len(key) + len(value) +
    32 per entry of call.trailing_metadata() (binary values as grpcio hands
    them over, i.e. decoded)."""
    return sum(len(k) + len(_value_bytes(v)) + 32 for k, v in err.trailing_metadata() or ())


def wire_metadata_bound(err):
    """An upper bound of what gRPC core itself checks against its limit.

    It counts the header block as sent: binary values base64-encoded
    (unpadded; 4/3 of trailing_metadata_bytes' figure), and also the entries
    trailing_metadata() leaves out: :status, content-type, grpc-status and
    grpc-message (an error answered before any response header is one
    trailers-only block). grpc-message is percent-encoded on the wire: at
    most 3 bytes per byte of the message. (Checked against grpcio's own
    figure in its "received metadata size exceeds" message.)"""
    total = 0
    for k, v in err.trailing_metadata() or ():
        n = len(_value_bytes(v))
        total += len(k) + ((4 * n + 2) // 3 if k.endswith("-bin") else n) + 32
    message = _value_bytes(err.details() or "")
    return (total
            + len(":status") + len("200") + 32
            + len("content-type") + len("application/grpc") + 32
            + len("grpc-status") + 2 + 32
            + len("grpc-message") + 3 * len(message) + 32)


def expect_typed_error(code, reason, label, fn, *args, **kwargs):
    """Calls fn, which must fail with `code` and ErrorInfo `reason`, decoded
    from the trailers by a default grpcio client, within 8 KiB of metadata.

    Returns (err, status, error_info)."""
    with pytest.raises(grpc.RpcError) as ei:
        fn(*args, **kwargs)
    err = ei.value
    if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "metadata size" in (err.details() or ""):
        pytest.fail(f"{label}: the {reason} error never reached the client: grpcio refused "
                    f"its metadata with default options: {err.details()}", pytrace=False)
    assert err.code() == code, f"{label}: expected {code}, got {err.code()}: {err.details()}"
    st = rpc_status.from_call(err)
    assert st is not None, f"{label}: no google.rpc.Status in the trailers (grpc-status-details-bin)"
    assert st.code == code.value[0]
    assert st.message == err.details()
    info = error_info(st, reason)
    assert len(_value_bytes(err.details())) <= MAX_MESSAGE_BYTES, (
        f"{label}: message of {len(_value_bytes(err.details()))} bytes")
    got, bound = trailing_metadata_bytes(err), wire_metadata_bound(err)
    print(f"{label}: {reason}, trailing metadata {got} B, as gRPC core counts it at most {bound} B")
    # Above 8 KiB grpcio refuses at random: measure instead of relying on
    # the refusal.
    if got >= GRPC_DEFAULT_MAX_METADATA_BYTES or bound >= GRPC_DEFAULT_MAX_METADATA_BYTES:
        pytest.fail(f"{label}: the {reason} error reached the client only by chance: "
                    f"{got} bytes of trailing metadata, up to {bound} bytes as gRPC core counts them; "
                    f"grpcio's default limit is {GRPC_DEFAULT_MAX_METADATA_BYTES}", pytrace=False)
    return err, st, info


def assert_not_echoed(err, secret, label, chunk=32):
    """No `chunk`-byte piece of `secret` is in any trailer or the message."""
    hay = [_value_bytes(v) for _, v in err.trailing_metadata() or ()]
    hay.append(_value_bytes(err.details() or ""))
    raw = _value_bytes(secret)
    for i in range(0, max(1, len(raw) - chunk + 1), chunk):
        piece = raw[i:i + chunk]
        assert not any(piece in h for h in hay), f"{label}: the error repeats the caller's value ({piece!r})"


def test_push_colliding_with_300_actions_is_a_bounded_action_conflict(pb, devices, actions):
    dev = long_device_id("conflict300")
    create_battery(pb, devices, dev)
    first = base_time() + 2 * HOUR
    booked = book_minutes(pb, actions, dev, first, 300)

    # One window over all 300, another command, no strategy. Listing every
    # collider would take about 60 KiB of trailers.
    err, st, info = expect_typed_error(
        grpc.StatusCode.FAILED_PRECONDITION, "ACTION_CONFLICT", "PushAction over 300 colliders",
        push, pb, actions, dev,
        windowed(pb, pb.common.COMMAND_DISCHARGE, first, first + 300 * 60))

    md = info.metadata
    assert md["device_id"] == dev
    assert md["conflicting_action_count"] == "300"
    assert md["truncated"] == "true"
    cd = detail(st, pb.errors.ConflictDetail)
    assert cd.conflict_count == 300
    assert cd.truncated is True
    assert len(cd.conflicts) == MAX_LISTED
    # Oldest start first: the ones listed are the earliest, in order, and
    # the metadata lists the same ones.
    assert [c.action_id for c in cd.conflicts] == booked[:MAX_LISTED]
    assert [c.start_time.seconds for c in cd.conflicts] == [first + 60 * i for i in range(MAX_LISTED)]
    assert md["conflicting_action_ids"].split(",") == booked[:MAX_LISTED]
    assert pb.action.CONFLICT_STRATEGY_CANCEL_AND_REPLACE in cd.strategies
    assert pb.action.CONFLICT_STRATEGY_QUEUE_AFTER in cd.strategies
    pf = detail(st, error_details_pb2.PreconditionFailure)
    assert [v.subject for v in pf.violations] == [
        f"devices/{dev}/actions/{a}" for a in booked[:MAX_LISTED]]

    # Nothing was booked by the refused push.
    listed = actions.ListActions(pb.action.ListActionsRequest(device_id=dev, page_size=1000),
                                 timeout=RPC_TIMEOUT_S)
    assert sorted(a.action_id for a in listed.actions) == sorted(booked)


def test_delete_device_with_600_actions_is_a_bounded_refusal(pb, devices, actions):
    dev = long_device_id("delete600")
    create_battery(pb, devices, dev)
    booked = book_minutes(pb, actions, dev, base_time() + 2 * HOUR, 600)

    err, st, info = expect_typed_error(
        grpc.StatusCode.FAILED_PRECONDITION, "DEVICE_HAS_ACTIVE_ACTIONS", "DeleteDevice over 600 actions",
        devices.DeleteDevice, pb.device.DeleteDeviceRequest(device_id=dev), timeout=RPC_TIMEOUT_S)

    md = info.metadata
    assert md["device_id"] == dev
    assert md["action_count"] == "600"
    assert md["truncated"] == "true"
    ids = md["action_ids"].split(",")
    assert len(ids) == MAX_LISTED and len(set(ids)) == MAX_LISTED
    assert set(ids) <= set(booked), "action_ids names actions that were not booked"
    assert "in_flight_action_ids" not in md, "nothing is in flight: every action is hours ahead"
    pf = detail(st, error_details_pb2.PreconditionFailure)
    assert [(v.type, v.subject) for v in pf.violations] == [("DEVICE_HAS_ACTIVE_ACTIONS", f"devices/{dev}")]

    # Nothing was deleted.
    devices.GetDevice(pb.device.GetDeviceRequest(device_id=dev), timeout=RPC_TIMEOUT_S)


def test_update_device_with_100_bad_mask_paths_is_a_bounded_invalid_field(pb, devices):
    dev = long_device_id("mask100")
    created = create_battery(pb, devices, dev)
    # 100 unknown paths, distinct within the 64 characters the server
    # quotes, long and full of characters its quoting escapes (DEL becomes
    # \u{7f}); each given twice: one violation per distinct problem.
    distinct = [f"no_such_field_{i:03d}_" + "\x7f" * 300 for i in range(100)]
    req = pb.device.UpdateDeviceRequest(
        device=pb.device.Device(device_id=dev, display_name="renamed"),
        update_mask=field_mask_pb2.FieldMask(paths=distinct + distinct),
    )

    err, st, info = expect_typed_error(
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD", "UpdateDevice with 100 bad mask paths",
        devices.UpdateDevice, req, timeout=RPC_TIMEOUT_S)

    md = info.metadata
    assert md["fields"] == "update_mask"
    assert md["field_violation_count"] == "100"
    assert md["truncated"] == "true"
    bad = detail(st, error_details_pb2.BadRequest)
    assert len(bad.field_violations) == MAX_LISTED
    assert {(v.field, v.reason) for v in bad.field_violations} == {("update_mask", "INVALID_FIELD")}
    assert len({v.description for v in bad.field_violations}) == MAX_LISTED
    assert all(len(v.description.encode()) <= MAX_DESCRIPTION_BYTES for v in bad.field_violations)

    # Nothing changed.
    got = devices.GetDevice(pb.device.GetDeviceRequest(device_id=dev), timeout=RPC_TIMEOUT_S)
    assert got.etag == created.etag and got.display_name == created.display_name


@pytest.mark.parametrize("rpc", ["update", "delete"])
def test_a_4_kb_stale_etag_is_not_repeated_back(pb, devices, rpc):
    dev = long_device_id(f"etag4k-{rpc}")
    created = create_battery(pb, devices, dev)
    stale = secrets.token_hex(2048)  # 4096 characters, found nowhere else
    if rpc == "update":
        call, req = devices.UpdateDevice, pb.device.UpdateDeviceRequest(
            device=pb.device.Device(device_id=dev, etag=stale, display_name="renamed"),
            update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
        )
    else:
        call, req = devices.DeleteDevice, pb.device.DeleteDeviceRequest(device_id=dev, etag=stale)

    err, st, info = expect_typed_error(
        grpc.StatusCode.ABORTED, "ETAG_MISMATCH", f"{rpc} with a 4 KB etag",
        call, req, timeout=RPC_TIMEOUT_S)

    md = info.metadata
    assert md["resource"] == f"devices/{dev}"
    assert md["current_etag"] == created.etag
    assert "etag" not in md, "the etag the client sent is repeated in the metadata"
    assert_not_echoed(err, stale, f"{rpc} with a 4 KB etag")

    # Nothing changed, nothing deleted.
    got = devices.GetDevice(pb.device.GetDeviceRequest(device_id=dev), timeout=RPC_TIMEOUT_S)
    assert got.etag == created.etag and got.display_name == created.display_name


def _settings_call(pb, devices, rpc, dev, settings):
    """CreateDevice with `settings`, or (rpc "update") an UpdateDevice of
    an existing device's settings; returns (call, request, etag before)."""
    if rpc == "create":
        dev_msg = pb.device.Device(family=pb.common.DEVICE_FAMILY_BATTERY, driver="simulated",
                                   settings=settings)
        return devices.CreateDevice, pb.device.CreateDeviceRequest(device_id=dev, device=dev_msg), None
    etag = create_battery(pb, devices, dev).etag
    return devices.UpdateDevice, pb.device.UpdateDeviceRequest(
        device=pb.device.Device(device_id=dev, settings=settings),
        update_mask=field_mask_pb2.FieldMask(paths=["settings"]),
    ), etag


def _assert_settings_untouched(pb, devices, rpc, dev, etag):
    if rpc == "create":
        expect_error(grpc.StatusCode.NOT_FOUND, devices.GetDevice,
                     pb.device.GetDeviceRequest(device_id=dev), timeout=RPC_TIMEOUT_S)
    else:
        got = devices.GetDevice(pb.device.GetDeviceRequest(device_id=dev), timeout=RPC_TIMEOUT_S)
        assert got.etag == etag and dict(got.settings) == {}


@pytest.mark.parametrize("rpc", ["create", "update"])
def test_64_unknown_settings_are_a_bounded_invalid_settings(pb, devices, rpc):
    dev = long_device_id(f"settings64-{rpc}")
    # The most the server takes: 64 keys of 64 bytes, values of 2048 bytes.
    keys = [f"unknown_setting_{i:02d}_".ljust(64, "k") for i in range(64)]
    settings = {k: f"value-never-echoed-{i:02d}-".ljust(2048, "v") for i, k in enumerate(keys)}
    call, req, etag = _settings_call(pb, devices, rpc, dev, settings)

    err, st, info = expect_typed_error(
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_SETTINGS", f"{rpc} with 64 unknown settings",
        call, req, timeout=RPC_TIMEOUT_S)

    md = info.metadata
    assert md["field_violation_count"] == "64"
    assert md["truncated"] == "true"
    bad = detail(st, error_details_pb2.BadRequest)
    assert len(bad.field_violations) == MAX_LISTED
    fields = [v.field for v in bad.field_violations]
    assert len(set(fields)) == MAX_LISTED
    assert set(fields) <= {f"device.settings.{k}" for k in keys}, f"fields {fields}"
    assert md["fields"].split(",") == fields
    assert {v.reason for v in bad.field_violations} == {"INVALID_SETTINGS"}
    assert all(len(v.description.encode()) <= MAX_DESCRIPTION_BYTES for v in bad.field_violations)
    assert_not_echoed(err, "value-never-echoed-", f"{rpc} with 64 unknown settings", chunk=19)
    _assert_settings_untouched(pb, devices, rpc, dev, etag)


@pytest.mark.parametrize("rpc", ["create", "update"])
def test_unprintable_setting_keys_are_one_small_invalid_field(pb, devices, rpc):
    # Setting keys are names. Keys with other characters (here DEL, which
    # quoting would escape to 6 bytes each) are refused as one problem on
    # device.settings, not named one by one.
    dev = long_device_id(f"settingskeys-{rpc}")
    keys = [f"{i:02d}" + "\x7f" * 62 for i in range(64)]
    settings = {k: "v" * 2048 for k in keys}
    call, req, etag = _settings_call(pb, devices, rpc, dev, settings)

    err, st, info = expect_typed_error(
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD", f"{rpc} with 64 unprintable setting keys",
        call, req, timeout=RPC_TIMEOUT_S)

    md = info.metadata
    assert md["fields"] == "device.settings"
    assert md["field_violation_count"] == "1"
    bad = detail(st, error_details_pb2.BadRequest)
    assert [v.field for v in bad.field_violations] == ["device.settings"]
    assert "\x7f" not in str(err.details())
    _assert_settings_untouched(pb, devices, rpc, dev, etag)


def test_request_over_1_mib_is_request_too_large(pb, devices):
    dev = long_device_id("toolarge")
    big = pb.device.Device(family=pb.common.DEVICE_FAMILY_BATTERY, driver="simulated",
                           display_name="n" * ((1 << 20) + 1024))
    err, st, info = expect_typed_error(
        grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_TOO_LARGE", "CreateDevice of 1 MiB",
        devices.CreateDevice, pb.device.CreateDeviceRequest(device_id=dev, device=big),
        timeout=RPC_TIMEOUT_S)
    assert dict(info.metadata) == {}
    expect_error(grpc.StatusCode.NOT_FOUND, devices.GetDevice,
                 pb.device.GetDeviceRequest(device_id=dev), timeout=RPC_TIMEOUT_S)


PUSH_ACTION = "/switchyard.v1.ActionService/PushAction"


def _raw(b):
    return b


def test_a_zero_length_message_is_valid_protobuf_not_malformed(pb, channel):
    # What a unary call with an empty serialisation sends: one message of
    # 0 bytes, i.e. a PushActionRequest with every field at its default.
    # This is NOT an empty body; see the next test.
    call = channel.unary_unary(PUSH_ACTION, request_serializer=_raw, response_deserializer=_raw)
    st = expect_error(grpc.StatusCode.INVALID_ARGUMENT, call, b"", timeout=RPC_TIMEOUT_S)
    info = error_info(st, "MISSING_FIELD")
    assert "device_id" in info.metadata["fields"].split(",")


@pytest.mark.parametrize("case", ["no message", "two messages", "cut-short message"])
def test_a_malformed_body_is_malformed_request(pb, channel, case):
    # grpcio's unary calls always send exactly one length-prefixed message.
    # A client-streaming call to the same (unary) method sends what the
    # iterator yields: nothing at all (an empty request body: HEADERS with
    # END_STREAM, no DATA), or two messages.
    stream = channel.stream_unary(PUSH_ACTION, request_serializer=_raw, response_deserializer=_raw)
    unary = channel.unary_unary(PUSH_ACTION, request_serializer=_raw, response_deserializer=_raw)
    whole = pb.action.PushActionRequest(device_id="py-cut-short-device").SerializeToString()
    if case == "no message":
        fn, arg = stream, iter(())
    elif case == "two messages":
        fn, arg = stream, iter([whole, whole])
    else:
        # Well framed, but the protobuf inside ends in the middle of a
        # string: the codec cannot decode it.
        fn, arg = unary, whole[:-4]

    err, st, info = expect_typed_error(
        grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_REQUEST", f"PushAction, {case}",
        fn, arg, timeout=RPC_TIMEOUT_S)
    assert dict(info.metadata) == {}
    assert len(st.details) == 1, f"MALFORMED_REQUEST carries ErrorInfo only: {[d.type_url for d in st.details]}"


def _curl_http2():
    curl = shutil.which("curl")
    if not curl:
        return None
    out = subprocess.run([curl, "--version"], capture_output=True, text=True, timeout=10).stdout
    return curl if "HTTP2" in out else None


def test_a_body_cut_short_inside_the_grpc_frame_is_malformed_request(server, tmp_path):
    # grpcio frames every message itself, so a frame whose declared length
    # is more than the bytes sent needs a raw HTTP/2 client: curl.
    curl = _curl_http2()
    if curl is None:
        pytest.skip("needs curl with HTTP2 to send a gRPC frame cut short")
    body = tmp_path / "cut.bin"
    body.write_bytes(b"\x00" + (100).to_bytes(4, "big") + b"\x0a\x03abc")  # 5 of 100 bytes
    run = subprocess.run(
        [curl, "-sS", "--http2-prior-knowledge", "--max-time", str(int(RPC_TIMEOUT_S)),
         "-H", "content-type: application/grpc", "-H", "te: trailers",
         "-H", f"authorization: Bearer {server.key}",
         "--data-binary", f"@{body}", "-D", "-", "-o", os.devnull,
         f"http://{server.addr}{PUSH_ACTION}"],
        capture_output=True, text=True, timeout=RPC_TIMEOUT_S + 5)
    assert run.returncode == 0, f"curl failed ({run.returncode}): {run.stderr}"
    headers = {}
    for line in run.stdout.splitlines():
        name, sep, value = line.partition(":")
        if sep and not line.startswith("HTTP/"):
            headers[name.strip().lower()] = value.strip()
    assert headers.get("grpc-status") == str(grpc.StatusCode.INVALID_ARGUMENT.value[0]), run.stdout
    raw = headers["grpc-status-details-bin"]
    st = status_pb2.Status.FromString(base64.b64decode(raw + "=" * (-len(raw) % 4)))
    assert st.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    info = error_info(st, "MALFORMED_REQUEST")
    assert dict(info.metadata) == {}


# --------------------------------------------------------------------------
# Auth: API keys, scopes, rate limits, tenants (docs/security.md)
# --------------------------------------------------------------------------
#
# The server found a key in its database at startup, so every call but
# health and reflection needs one. Each test makes its own tenant or keys
# with `switchyard admin` on the server's database (a running server sees
# them at once, and a revocation within seconds) or with AdminService.


def admin_cli(server, *args):
    return _admin_cli(server.bin, server.database, *args)


def create_key(server, tenant, scopes):
    key = admin_cli(server, "key", "create", "--tenant", tenant, "--scopes", scopes,
                    "--description", "interop auth test")
    assert KEY_RE.fullmatch(key), "`switchyard admin key create` did not print a key (sy_...) alone"
    return key


def key_id(key):
    return KEY_RE.fullmatch(key).group(1)


def keyed(pb, raw_channel, key):
    """Stubs that send `key` on every call, over the module's connection."""
    ch = grpc.intercept_channel(raw_channel, BearerKey(key))
    return SimpleNamespace(devices=pb.device_grpc.DeviceServiceStub(ch),
                           actions=pb.action_grpc.ActionServiceStub(ch),
                           admin=pb.admin_grpc.AdminServiceStub(ch),
                           events=pb.event_grpc.EventServiceStub(ch))


def _b32(n):
    return base64.b32encode(secrets.token_bytes(n)).decode().lower().rstrip("=")


def test_health_needs_no_key(raw_channel):
    assert _health_check(raw_channel, RPC_TIMEOUT_S) == 1


@pytest.mark.parametrize("case", ["missing", "malformed", "unknown", "wrong secret"])
def test_a_call_without_a_valid_key_is_unauthenticated(pb, server, raw_channel, case):
    if case == "missing":
        metadata, sent, why = (), None, "missing"
    elif case == "malformed":
        sent = "not-a-switchyard-key-" + secrets.token_hex(16)
        metadata, why = (("authorization", f"Bearer {sent}"),), "malformed"
    else:
        # Well formed; an id nobody has, or the interop key's id with
        # another secret.
        kid = _b32(10)[:16] if case == "unknown" else key_id(server.key)
        sent = f"sy_{kid}_{_b32(32)[:52]}"
        assert KEY_RE.fullmatch(sent)
        metadata, why = (("authorization", f"Bearer {sent}"),), "unknown"
    devices = pb.device_grpc.DeviceServiceStub(raw_channel)

    err, st, info = expect_typed_error(
        grpc.StatusCode.UNAUTHENTICATED, "INVALID_API_KEY", f"ListDevices, key {case}",
        devices.ListDevices, pb.device.ListDevicesRequest(), metadata=metadata, timeout=RPC_TIMEOUT_S)
    assert info.metadata["why"] == why
    assert "key_id" not in info.metadata, "key_id named for a key that did not match"
    if sent is not None:
        assert_not_echoed(err, sent, f"key {case}", chunk=12)


def test_a_key_without_the_scope_is_permission_denied(pb, server, devices, actions, raw_channel):
    dev = "py-battery-readonly"
    create_battery(pb, devices, dev)
    key = create_key(server, INTEROP_TENANT, "devices:read")
    ro = keyed(pb, raw_channel, key)
    # What the scope allows works...
    assert ro.devices.GetDevice(pb.device.GetDeviceRequest(device_id=dev),
                                timeout=RPC_TIMEOUT_S).device_id == dev
    # ...what it does not is refused before the request is looked at.
    t0 = base_time()
    err, st, info = expect_typed_error(
        grpc.StatusCode.PERMISSION_DENIED, "MISSING_SCOPE", "PushAction with devices:read",
        push, pb, ro.actions, dev, windowed(pb, pb.common.COMMAND_CHARGE, t0 + HOUR, t0 + 2 * HOUR))
    md = info.metadata
    assert md["required_scope"] == "actions:write"
    assert md["method"] == "switchyard.v1.ActionService/PushAction"
    assert md["key_id"] == key_id(key)
    assert_not_echoed(err, key, "MISSING_SCOPE", chunk=12)
    assert list_actions(pb, actions, dev) == []


def test_a_key_over_its_rate_is_told_when_to_retry(pb, server, raw_channel):
    admin_cli(server, "tenant", "create", "py-rated", "--rate-per-second", "2", "--rate-burst", "2")
    key = create_key(server, "py-rated", "devices:read")
    devices = keyed(pb, raw_channel, key).devices
    req = pb.device.ListDevicesRequest()

    devices.ListDevices(req, timeout=RPC_TIMEOUT_S)
    devices.ListDevices(req, timeout=RPC_TIMEOUT_S)
    err, st, info = expect_typed_error(
        grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED", "third call at 2/s, burst 2",
        devices.ListDevices, req, timeout=RPC_TIMEOUT_S)

    md = info.metadata
    assert md["key_id"] == key_id(key)
    assert md["rate_per_second"] == "2"
    assert md["burst"] == "2"
    retry = detail(st, error_details_pb2.RetryInfo)
    delay = retry.retry_delay.ToTimedelta().total_seconds()
    assert 0 < delay <= 0.5, f"at 2 per second a token is never more than 0.5 s away, told {delay} s"
    assert abs(int(md["retry_after_ms"]) - math.ceil(delay * 1000)) <= 1, (
        f"retry_after_ms {md['retry_after_ms']} and RetryInfo {delay} s disagree")
    quota = detail(st, error_details_pb2.QuotaFailure)
    assert [v.subject for v in quota.violations] == [f"api_key:{key_id(key)}"]
    assert quota.violations[0].description

    # Waiting as long as told is enough.
    time.sleep(delay)
    devices.ListDevices(req, timeout=RPC_TIMEOUT_S)


def test_another_tenant_does_not_see_the_device(pb, server, devices, raw_channel):
    dev = "py-battery-private"
    created = create_battery(pb, devices, dev)
    admin_cli(server, "tenant", "create", "py-other")
    other = keyed(pb, raw_channel, create_key(
        server, "py-other", "devices:read,devices:write,actions:read,actions:write"))

    st = expect_error(grpc.StatusCode.NOT_FOUND, other.devices.GetDevice,
                      pb.device.GetDeviceRequest(device_id=dev), timeout=RPC_TIMEOUT_S)
    assert error_info(st, "DEVICE_NOT_FOUND").metadata["device_id"] == dev
    listed = other.devices.ListDevices(pb.device.ListDevicesRequest(page_size=1000), timeout=RPC_TIMEOUT_S)
    assert dev not in [d.device_id for d in listed.devices]
    t0 = base_time()
    st = expect_error(grpc.StatusCode.NOT_FOUND, push, pb, other.actions, dev,
                      windowed(pb, pb.common.COMMAND_CHARGE, t0 + HOUR, t0 + 2 * HOUR))
    error_info(st, "DEVICE_NOT_FOUND")

    # The id is free in the other tenant; each tenant keeps its own device.
    theirs = create_battery(pb, other.devices, dev)
    assert theirs.device_id == dev
    ours = devices.GetDevice(pb.device.GetDeviceRequest(device_id=dev), timeout=RPC_TIMEOUT_S)
    assert ours.etag == created.etag


def test_a_revoked_key_is_refused_within_5_seconds(pb, server, raw_channel):
    key = create_key(server, INTEROP_TENANT, "devices:read")
    kid = key_id(key)
    devices = keyed(pb, raw_channel, key).devices
    req = pb.device.ListDevicesRequest()
    devices.ListDevices(req, timeout=RPC_TIMEOUT_S)  # works (and is now cached)

    admin_cli(server, "key", "revoke", kid)
    revoked = time.monotonic()
    while True:
        try:
            devices.ListDevices(req, timeout=RPC_TIMEOUT_S)
        except grpc.RpcError as e:
            err = e
            break
        assert time.monotonic() - revoked < 5.0, "a revoked key still works after 5 s"
        time.sleep(0.1)
    print(f"revoked key refused {time.monotonic() - revoked:.2f} s after `key revoke`")

    assert err.code() == grpc.StatusCode.UNAUTHENTICATED, f"got {err.code()}: {err.details()}"
    st = rpc_status.from_call(err)
    assert st is not None, "no google.rpc.Status in the trailers (grpc-status-details-bin)"
    info = error_info(st, "INVALID_API_KEY")
    assert info.metadata["why"] == "revoked"
    assert info.metadata["key_id"] == kid
    assert_not_echoed(err, key, "revoked key", chunk=12)

    listed = [line for line in admin_cli(server, "key", "list", "--tenant", INTEROP_TENANT).splitlines()
              if line.startswith(kid)]
    assert len(listed) == 1 and "revoked -" not in listed[0], f"key list: {listed}"


def test_admin_service_creates_a_key_that_works(pb, devices, channel, raw_channel):
    admin = pb.admin_grpc.AdminServiceStub(channel)
    resp = admin.CreateApiKey(pb.admin.CreateApiKeyRequest(
        scopes=["devices:read", "devices:write"],
        expires_in=duration_pb2.Duration(seconds=HOUR),
        description="made over gRPC",
    ), timeout=RPC_TIMEOUT_S)
    made = resp.api_key
    assert KEY_RE.fullmatch(resp.key), "CreateApiKey did not return a key (sy_...)"
    assert key_id(resp.key) == made.key_id
    assert made.tenant == INTEROP_TENANT, "an empty tenant is the caller's own"
    assert list(made.scopes) == ["devices:read", "devices:write"]
    assert made.description == "made over gRPC"
    assert made.HasField("create_time") and not made.HasField("revoke_time")
    assert abs(made.expire_time.seconds - (made.create_time.seconds + HOUR)) <= 1

    new = keyed(pb, raw_channel, resp.key)
    dev = "py-battery-admin-key"
    create_battery(pb, new.devices, dev)
    # Same tenant: the interop key sees what the new key made.
    devices.GetDevice(pb.device.GetDeviceRequest(device_id=dev), timeout=RPC_TIMEOUT_S)
    # Its scopes hold.
    st = expect_error(grpc.StatusCode.PERMISSION_DENIED, new.actions.ListActions,
                      pb.action.ListActionsRequest(device_id=dev), timeout=RPC_TIMEOUT_S)
    assert error_info(st, "MISSING_SCOPE").metadata["required_scope"] == "actions:read"

    # Listed, never with its secret.
    listed = admin.ListApiKeys(pb.admin.ListApiKeysRequest(), timeout=RPC_TIMEOUT_S)
    assert made.key_id in [k.key_id for k in listed.api_keys]
    assert resp.key.split("_")[2] not in str(listed)

    # Only the operator's tenant (`default`) creates tenants.
    st = expect_error(grpc.StatusCode.PERMISSION_DENIED, admin.CreateTenant,
                      pb.admin.CreateTenantRequest(name="py-not-allowed"), timeout=RPC_TIMEOUT_S)
    error_info(st, "OPERATOR_ONLY")


# --------------------------------------------------------------------------
# Events: WatchEvents and ListActionHistory (docs/events.md)
# --------------------------------------------------------------------------
#
# A watch never ends by itself, so no test iterates one bare: `Watch` reads
# the stream on a thread into a queue, every read waits at most a timeout,
# and the call has a deadline as well (WATCH_DEADLINE_S), so a watch that
# sends nothing, or too much, fails its test instead of hanging the suite.

WATCH_DEADLINE_S = 60.0
# How long "nothing more" is waited for: this process's commits reach its
# watches within about 20 ms (docs/events.md, "When an event arrives").
QUIET_S = 0.5


class Watch:
    """A WatchEvents call, read by a thread of its own.

    Use it as a context manager: leaving cancels the call. `take(n)` returns
    the next n events or fails the test within its timeout; `quiet()` fails
    it if another event comes; `cancel()` ends the call and returns how it
    ended (the grpc.RpcError).
    """

    def __init__(self, stub, request, deadline=WATCH_DEADLINE_S):
        self.call = stub.WatchEvents(request, timeout=deadline)
        self.ended = None  # what stopped the stream: an RpcError, or "end"
        self._items = queue.Queue()  # (True, event), then (False, what ended it)
        self._started = threading.Event()
        self._reader = threading.Thread(target=self._pump, name="switchyard-watch", daemon=True)
        self._reader.start()

    def _pump(self):
        try:
            # The response headers come when the server has fixed where the
            # watch starts (for from_now: after the newest event then).
            self.call.initial_metadata()
            self._started.set()
            for event in self.call:
                self._items.put((True, event))
        except grpc.RpcError as e:
            self._items.put((False, e))
        else:
            self._items.put((False, "end"))
        finally:
            self._started.set()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cancel()

    def started(self, timeout=RPC_TIMEOUT_S):
        """Waits for the response headers: events committed after this
        return are after the watch's start."""
        assert self._started.wait(timeout), f"WatchEvents sent no response headers within {timeout} s"
        return self

    def _next(self, left):
        """The next event, or what ended the stream, or None after `left` s."""
        if self.ended is not None:
            return self.ended
        try:
            is_event, item = self._items.get(timeout=max(left, 0))
        except queue.Empty:
            return None
        if not is_event:
            self.ended = item
        return item

    def take(self, n, timeout=RPC_TIMEOUT_S):
        got = []
        deadline = time.monotonic() + timeout
        while len(got) < n:
            item = self._next(deadline - time.monotonic())
            if item is None:
                pytest.fail(f"WatchEvents: {len(got)} of {n} events within {timeout} s: "
                            f"{[_event_view(e) for e in got]}", pytrace=False)
            if isinstance(item, grpc.RpcError):
                pytest.fail(f"WatchEvents ended {item.code()} after {len(got)} of {n} events: "
                            f"{item.details()}", pytrace=False)
            if isinstance(item, str):
                pytest.fail(f"WatchEvents ended (without error) after {len(got)} of {n} events",
                            pytrace=False)
            got.append(item)
        return got

    def quiet(self, wait=QUIET_S):
        """Fails if the watch sends anything (or ends) within `wait`."""
        item = self._next(wait)
        assert item is None, f"WatchEvents sent more than expected: {_event_view(item)}"

    def cancel(self):
        self.call.cancel()
        self._reader.join(timeout=RPC_TIMEOUT_S)
        assert not self._reader.is_alive(), "the watch's reader still runs after cancel()"
        while self.ended is None:
            is_event, item = self._items.get_nowait()
            if not is_event:
                self.ended = item
        return self.ended


def _event_view(e):
    if isinstance(e, grpc.RpcError):
        return f"ended {e.code()}: {e.details()}"
    if isinstance(e, str):
        return e
    return (e.cursor, e.type, e.device_id, e.action_id, e.reason)


def action_history(pb, actions, device_id, action_id, page_size=1):
    """Every transition of an action, oldest first, read page by page
    (one per page by default, so the paging is used)."""
    out, token = [], ""
    for _ in range(100):
        resp = actions.ListActionHistory(
            pb.action.ListActionHistoryRequest(device_id=device_id, action_id=action_id,
                                               page_size=page_size, page_token=token),
            timeout=RPC_TIMEOUT_S)
        assert len(resp.transitions) <= page_size
        out.extend(resp.transitions)
        token = resp.next_page_token
        if not token:
            return out
    pytest.fail(f"ListActionHistory of {action_id}: more than 100 pages", pytrace=False)


def transition_of(x):
    """What an Event and an ActionTransition both say about a transition."""
    return (x.from_state, x.to_state, x.reason, x.error_code, x.request_id,
            (x.time.seconds, x.time.nanos))


def test_a_watch_from_now_sees_a_push_and_its_cancel_as_in_its_history(pb, devices, actions, events):
    dev = "py-battery-watch"
    create_battery(pb, devices, dev)
    t0 = base_time()
    with Watch(events, pb.event.WatchEventsRequest(device_id=dev, from_now=True)) as watch:
        watch.started()
        booked = push(pb, actions, dev, windowed(pb, pb.common.COMMAND_CHARGE, t0 + HOUR, t0 + 2 * HOUR),
                      request_id="py-watch-push").action
        assert booked.state == pb.action.ACTION_STATE_SCHEDULED
        gone = cancel_action(pb, actions, dev, booked.action_id, request_id="py-watch-cancel")
        assert gone.state == pb.action.ACTION_STATE_CANCELLED
        got = watch.take(2)
        # Nothing else: not the device's creation (before from_now), not
        # other tests' devices (the filter).
        watch.quiet()

    scheduled, cancelled = got
    assert scheduled.cursor < cancelled.cursor, f"cursors {scheduled.cursor}, {cancelled.cursor}"
    for e in got:
        assert e.event_id == f"ev-{e.cursor}"
        assert e.device_id == dev
        assert e.action_id == booked.action_id
        assert e.HasField("time")
        assert e.HasField("action") and e.action.action_id == booked.action_id
    assert scheduled.type == pb.event.EVENT_TYPE_ACTION_SCHEDULED
    assert (scheduled.from_state, scheduled.to_state) == (
        pb.action.ACTION_STATE_UNSPECIFIED, pb.action.ACTION_STATE_SCHEDULED)
    assert scheduled.reason == "PUSHED"
    assert scheduled.error_code == ""
    assert scheduled.request_id == "py-watch-push"
    assert cancelled.type == pb.event.EVENT_TYPE_ACTION_CANCELLED
    assert (cancelled.from_state, cancelled.to_state) == (
        pb.action.ACTION_STATE_SCHEDULED, pb.action.ACTION_STATE_CANCELLED)
    assert cancelled.reason == "CANCELLED_BY_CLIENT"
    assert cancelled.error_code == "CANCELLED_BY_CLIENT"
    assert cancelled.request_id == "py-watch-cancel"
    # `action` is the action as read, here after its cancel.
    assert cancelled.action.state == pb.action.ACTION_STATE_CANCELLED

    # The events are the action's history, one for one.
    history = action_history(pb, actions, dev, booked.action_id)
    assert [transition_of(t) for t in history] == [transition_of(e) for e in got]


def test_a_watch_resumed_after_its_last_cursor_gets_exactly_the_rest(pb, devices, actions, events):
    dev = "py-battery-resume"
    create_battery(pb, devices, dev)
    t0 = base_time()
    with Watch(events, pb.event.WatchEventsRequest(device_id=dev, from_now=True)) as first:
        first.started()
        # Five pushes, one after the other, in hours that do not collide.
        booked = [push(pb, actions, dev,
                       windowed(pb, pb.common.COMMAND_CHARGE, t0 + (i + 1) * HOUR, t0 + (i + 1) * HOUR + 1800),
                       request_id=f"py-resume-{i}").action.action_id
                  for i in range(5)]
        head = first.take(2)
        ended = first.cancel()
    assert isinstance(ended, grpc.RpcError) and ended.code() == grpc.StatusCode.CANCELLED, (
        f"the cancelled watch ended {_event_view(ended)}")
    assert [e.action_id for e in head] == booked[:2]

    last = head[-1].cursor
    with Watch(events, pb.event.WatchEventsRequest(device_id=dev, after_cursor=last)) as resumed:
        rest = resumed.take(3)
        resumed.quiet()

    got = head + rest
    assert [e.action_id for e in got] == booked, "an event missed or repeated across the resume"
    assert all(e.type == pb.event.EVENT_TYPE_ACTION_SCHEDULED for e in got)
    assert [e.request_id for e in got] == [f"py-resume-{i}" for i in range(5)]
    cursors = [e.cursor for e in got]
    assert cursors == sorted(cursors) and len(set(cursors)) == 5, f"cursors {cursors}"
    assert rest[0].cursor > last


def test_a_key_without_events_read_cannot_watch(pb, server, raw_channel):
    # Every other scope, the ones the interop key had before events.
    key = create_key(server, INTEROP_TENANT, "devices:read,devices:write,actions:read,actions:write,admin")
    other = keyed(pb, raw_channel, key)
    other.devices.ListDevices(pb.device.ListDevicesRequest(), timeout=RPC_TIMEOUT_S)  # the key works

    def first_event(req):
        # From the oldest retained: the tenant has events, so a watch let
        # through would return one at once rather than raise.
        return next(other.events.WatchEvents(req, timeout=RPC_TIMEOUT_S))

    err, st, info = expect_typed_error(
        grpc.StatusCode.PERMISSION_DENIED, "MISSING_SCOPE", "WatchEvents without events:read",
        first_event, pb.event.WatchEventsRequest())
    md = info.metadata
    assert md["required_scope"] == "events:read"
    assert md["method"] == "switchyard.v1.EventService/WatchEvents"
    assert md["key_id"] == key_id(key)
    assert_not_echoed(err, key, "MISSING_SCOPE", chunk=12)


@pytest.mark.parametrize("case, fields, field", [
    ("unspecified type", dict(event_types=[0]), "event_types"),
    ("unknown type", dict(event_types=[99]), "event_types"),
    ("negative cursor", dict(after_cursor=-1), "after_cursor"),
    ("cursor with from_now", dict(after_cursor=3, from_now=True), "after_cursor"),
    ("cursor past the newest event", dict(after_cursor=2**63 - 1), "after_cursor"),
    ("device id too long", dict(device_id="d" * 64), "device_id"),
])
def test_a_bad_watch_request_is_invalid_field(pb, events, case, fields, field):
    def first_event(req):
        return next(events.WatchEvents(req, timeout=RPC_TIMEOUT_S))

    err, st, info = expect_typed_error(
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD", f"WatchEvents, {case}",
        first_event, pb.event.WatchEventsRequest(**fields))
    assert info.metadata["fields"] == field
    bad = detail(st, error_details_pb2.BadRequest)
    assert [v.field for v in bad.field_violations] == [field]
    assert bad.field_violations[0].description
