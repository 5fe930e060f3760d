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
- Every action is booked hours ahead, so nothing ever starts during a run:
  no test waits on the scheduler.
"""

import base64
import importlib
import importlib.resources
import json
import os
import queue
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from google.protobuf import empty_pb2, field_mask_pb2, timestamp_pb2, wrappers_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from grpc_tools import protoc

PROTO_ROOT = (Path(__file__).resolve().parent / ".." / ".." / ".." / "proto").resolve()
STARTUP_TIMEOUT_S = 20.0
RPC_TIMEOUT_S = 10.0
DOMAIN = "switchyard"
CONFLICT_DETAIL_URL = "type.googleapis.com/switchyard.v1.ConflictDetail"
HOUR = 3600


# --------------------------------------------------------------------------
# Stubs generated from the protos at test time
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pb():
    """Compiles proto/switchyard/v1/*.proto and imports the generated code.

    Returns a namespace with the message modules (common, device, action,
    errors) and the service stubs modules (device_grpc, action_grpc).
    """
    protos = sorted(PROTO_ROOT.glob("switchyard/v1/*.proto"))
    assert protos, f"no protos under {PROTO_ROOT}"
    # The well-known google/protobuf/*.proto ship inside grpcio-tools.
    wkt_include = importlib.resources.files("grpc_tools") / "_proto"
    with tempfile.TemporaryDirectory(prefix="switchyard-pb-") as out:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{wkt_include}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            *(str(p.relative_to(PROTO_ROOT)) for p in protos),
        ]
        rc = protoc.main(args)
        assert rc == 0, f"protoc failed ({rc}) on {[p.name for p in protos]}"
        sys.path.insert(0, out)
        try:
            return SimpleNamespace(
                common=importlib.import_module("switchyard.v1.common_pb2"),
                device=importlib.import_module("switchyard.v1.device_pb2"),
                action=importlib.import_module("switchyard.v1.action_pb2"),
                errors=importlib.import_module("switchyard.v1.errors_pb2"),
                device_grpc=importlib.import_module("switchyard.v1.device_pb2_grpc"),
                action_grpc=importlib.import_module("switchyard.v1.action_pb2_grpc"),
            )
        finally:
            # Imported modules keep their descriptors: the directory can go.
            sys.path.remove(out)


# --------------------------------------------------------------------------
# The server under test
# --------------------------------------------------------------------------


def _health_check(channel, timeout):
    """grpc.health.v1.Health/Check for the whole server ("").

    No health stubs are needed: HealthCheckRequest{service: ""} encodes to
    zero bytes (as Empty does), and HealthCheckResponse{status = 1} has the
    same wire shape as Int32Value{value = 1}. Returns the status number
    (1 = SERVING).
    """
    check = channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=empty_pb2.Empty.SerializeToString,
        response_deserializer=wrappers_pb2.Int32Value.FromString,
    )
    return check(empty_pb2.Empty(), timeout=timeout).value


def _listening_addr(line):
    """The "addr" of a JSON log line whose message is "listening", else None.

    Accepts the message at the top level or under "fields" (tracing's JSON
    layout).
    """
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    if not isinstance(rec, dict):
        return None
    for obj in (rec, rec.get("fields")):
        if isinstance(obj, dict) and obj.get("message") == "listening" and obj.get("addr"):
            return obj["addr"]
    return None


@pytest.fixture(scope="module")
def server():
    """Starts `$SWITCHYARD_BIN serve` and yields its "host:port".

    Port 0 lets the kernel pick a free loopback port (no race between
    choosing and binding); the address comes from the "listening" log line.
    The server is then polled with the gRPC health check until SERVING,
    within STARTUP_TIMEOUT_S overall.
    """
    bin_path = os.environ.get("SWITCHYARD_BIN")
    if not bin_path:
        pytest.fail("SWITCHYARD_BIN is not set: point it at the switchyard server binary", pytrace=False)
    if not (os.path.isfile(bin_path) and os.access(bin_path, os.X_OK)):
        pytest.fail(f"SWITCHYARD_BIN={bin_path!r} is not an executable file", pytrace=False)

    workdir = tempfile.TemporaryDirectory(prefix="switchyard-interop-")
    db = Path(workdir.name) / "interop.db"
    cmd = [
        bin_path, "serve",
        "--listen", "127.0.0.1:0",
        "--database", f"sqlite://{db}",
        "--no-demo",
        "--log-format", "json",
    ]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)

    # Drain stderr for the server's whole life (a full pipe would block it),
    # keeping every line for the failure report.
    log_lines = []
    lines = queue.Queue()

    def pump():
        for line in proc.stderr:
            log_lines.append(line.rstrip("\n"))
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=pump, name="switchyard-stderr", daemon=True)
    reader.start()

    def log_tail(n=40):
        return "\n".join(log_lines[-n:]) or "(no output)"

    def stop():
        if proc.poll() is None:
            proc.terminate()  # SIGTERM: graceful drain
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        reader.join(timeout=5)
        workdir.cleanup()

    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        addr = None
        while addr is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no 'listening' log line within {STARTUP_TIMEOUT_S}s:\n{log_tail()}")
            try:
                line = lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"server exited early (rc={proc.wait()}):\n{log_tail()}")
            addr = _listening_addr(line)
        assert addr.startswith("127.0.0.1:"), f"server listens on {addr}, not loopback"

        with grpc.insecure_channel(addr) as ch:
            status, last_err = None, None
            while status != 1:
                if proc.poll() is not None:
                    raise AssertionError(f"server exited early (rc={proc.returncode}):\n{log_tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"health check not SERVING within {STARTUP_TIMEOUT_S}s "
                        f"(last status {status}, last error {last_err}):\n{log_tail()}")
                try:
                    status = _health_check(ch, timeout=min(1.0, left))
                except grpc.RpcError as e:
                    last_err = e.code()
                if status != 1:
                    time.sleep(0.05)  # startup poll only; never used to wait for schedules
    except BaseException:
        stop()
        raise

    yield addr

    stop()
    print(f"switchyard server stopped (rc={proc.returncode}); log tail:\n{log_tail(15)}")


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server) as ch:
        yield ch


@pytest.fixture(scope="module")
def devices(pb, channel):
    return pb.device_grpc.DeviceServiceStub(channel)


@pytest.fixture(scope="module")
def actions(pb, channel):
    return pb.action_grpc.ActionServiceStub(channel)


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def ts(seconds):
    return timestamp_pb2.Timestamp(seconds=int(seconds))


def base_time():
    """Now, rounded down to the minute: windows are built from it."""
    return int(time.time()) // 60 * 60


def create_battery(pb, devices, device_id):
    dev = pb.device.Device(
        family=pb.common.DEVICE_FAMILY_BATTERY,
        driver="simulated",
        timezone="Europe/London",
    )
    return devices.CreateDevice(
        pb.device.CreateDeviceRequest(device_id=device_id, device=dev),
        timeout=RPC_TIMEOUT_S,
    )


def windowed(pb, command, start, end, kw=3.0):
    return pb.action.Action(
        command=command,
        start_time=ts(start),
        end_time=ts(end),
        power=pb.common.Quantity(value=kw, unit=pb.common.UNIT_KILOWATT),
    )


def push(pb, actions, device_id, action, on_conflict=None, request_id=""):
    req = pb.action.PushActionRequest(device_id=device_id, action=action, request_id=request_id)
    if on_conflict is not None:
        req.on_conflict = on_conflict
    return actions.PushAction(req, timeout=RPC_TIMEOUT_S)


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
