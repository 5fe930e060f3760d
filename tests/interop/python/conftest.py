"""What the Python interop tests (test_interop.py, test_webhooks.py) share.

- `pb`: the Python stubs, generated at test time from ../../../proto with
  grpc_tools.protoc into a temporary directory (nothing generated is kept).
- `server`: one `$SWITCHYARD_BIN serve` for a module, on a fresh temporary
  SQLite database, with the tenant INTEROP_TENANT and a key with every
  scope of ALL_SCOPES (test_interop.py's setting; see its docstring).
- `start_server` / `ServerProcess`: any number of servers, with extra
  flags, on a database of the caller's choosing (test_webhooks.py kills one
  and starts another on the same file).
- `BearerKey`: a client interceptor sending `authorization: Bearer <key>`.
- Small builders of the calls every test makes: `create_battery`,
  `windowed`, `push`, `cancel_action`.

Test modules import the plain helpers with `from conftest import ...`
(pytest puts this directory on sys.path); fixtures need no import.
"""

import collections
import importlib
import importlib.resources
import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from google.protobuf import empty_pb2, timestamp_pb2, wrappers_pb2
from grpc_tools import protoc

PROTO_ROOT = (Path(__file__).resolve().parent / ".." / ".." / ".." / "proto").resolve()
STARTUP_TIMEOUT_S = 20.0
RPC_TIMEOUT_S = 10.0
HOUR = 3600
ALL_SCOPES = "devices:read,devices:write,actions:read,actions:write,admin,events:read"
# The tenant the `channel` fixture's key acts for. Its rate is far above the
# server's default (50/s, burst 100 per key): the bounded-errors tests book
# 600 actions as fast as 16 threads can.
INTEROP_TENANT = "interop"
INTEROP_RATE = "100000"
# An API key as `switchyard admin key create` prints it; group 1 is its id.
KEY_RE = re.compile(r"sy_([a-z2-7]{16})_[a-z2-7]{52}")


# --------------------------------------------------------------------------
# Stubs generated from the protos at test time
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pb():
    """Compiles proto/switchyard/v1/*.proto and imports the generated code.

    Returns a namespace with the message modules (common, device, action,
    errors, admin, event, webhook) and the service stubs modules
    (device_grpc, action_grpc, admin_grpc, event_grpc, webhook_grpc).
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
                admin=importlib.import_module("switchyard.v1.admin_pb2"),
                event=importlib.import_module("switchyard.v1.event_pb2"),
                webhook=importlib.import_module("switchyard.v1.webhook_pb2"),
                device_grpc=importlib.import_module("switchyard.v1.device_pb2_grpc"),
                action_grpc=importlib.import_module("switchyard.v1.action_pb2_grpc"),
                admin_grpc=importlib.import_module("switchyard.v1.admin_pb2_grpc"),
                event_grpc=importlib.import_module("switchyard.v1.event_pb2_grpc"),
                webhook_grpc=importlib.import_module("switchyard.v1.webhook_pb2_grpc"),
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


def _admin_cli(bin_path, database, *args):
    """Runs `switchyard admin --database DATABASE ARGS...`; returns its
    stdout, stripped (the key or tenant id it prints)."""
    run = subprocess.run([bin_path, "admin", "--database", database, *args],
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, (
        f"switchyard admin {' '.join(args)} failed (rc={run.returncode}):\n{run.stderr}")
    return run.stdout.strip()


def switchyard_bin():
    """$SWITCHYARD_BIN, checked: the test fails (not errors obscurely)
    without it."""
    bin_path = os.environ.get("SWITCHYARD_BIN")
    if not bin_path:
        pytest.fail("SWITCHYARD_BIN is not set: point it at the switchyard server binary", pytrace=False)
    if not (os.path.isfile(bin_path) and os.access(bin_path, os.X_OK)):
        pytest.fail(f"SWITCHYARD_BIN={bin_path!r} is not an executable file", pytrace=False)
    return bin_path


def create_tenant_key(bin_path, database, tenant, rate, scopes, description):
    """Creates `tenant` (at `rate` per second, with as large a burst) and
    a key of it with `scopes`, with `switchyard admin`; returns the key."""
    _admin_cli(bin_path, database, "tenant", "create", tenant,
               "--rate-per-second", rate, "--rate-burst", rate)
    key = _admin_cli(bin_path, database, "key", "create", "--tenant", tenant,
                     "--scopes", scopes, "--description", description)
    assert KEY_RE.fullmatch(key), "`switchyard admin key create` did not print a key (sy_...) alone"
    return key


class ServerProcess:
    """A `switchyard serve` child process (`cmd`), its stderr drained for
    its whole life (a full pipe would block it) and kept for failure
    reports. `wait_ready` finds its address; `stop` ends it gracefully,
    `kill` with SIGKILL."""

    def __init__(self, cmd):
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.addr = None
        self.log_lines = []
        self._lines = queue.Queue()
        self._reader = threading.Thread(target=self._pump, name="switchyard-stderr", daemon=True)
        self._reader.start()

    def _pump(self):
        for line in self.proc.stderr:
            self.log_lines.append(line.rstrip("\n"))
            self._lines.put(line)
        self._lines.put(None)

    def log_tail(self, n=40):
        return "\n".join(self.log_lines[-n:]) or "(no output)"

    def wait_ready(self, timeout):
        """Reads the address from the "listening" log line, then polls the
        gRPC health check (which needs no key) until SERVING, within
        `timeout` overall."""
        proc, log_tail = self.proc, self.log_tail
        deadline = time.monotonic() + timeout
        addr = None
        while addr is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no 'listening' log line within {timeout}s:\n{log_tail()}")
            try:
                line = self._lines.get(timeout=left)
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
                        f"health check not SERVING within {timeout}s "
                        f"(last status {status}, last error {last_err}):\n{log_tail()}")
                try:
                    status = _health_check(ch, timeout=min(1.0, left))
                except grpc.RpcError as e:
                    last_err = e.code()
                if status != 1:
                    time.sleep(0.05)  # startup poll only; never used to wait for schedules
        self.addr = addr

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: graceful drain
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=5)

    def kill(self):
        """SIGKILL: the server gets no chance to finish anything."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self._reader.join(timeout=5)


def start_server(bin_path, database, *extra_args):
    """Starts `switchyard serve` on `database` with `extra_args` and waits
    until it serves (STARTUP_TIMEOUT_S); returns the ServerProcess.

    Port 0 lets the kernel pick a free loopback port (no race between
    choosing and binding); the address comes from the "listening" log line.
    """
    cmd = [
        bin_path, "serve",
        "--listen", "127.0.0.1:0",
        "--database", database,
        "--no-demo",
        "--log-format", "json",
        *extra_args,
    ]
    running = ServerProcess(cmd)
    try:
        running.wait_ready(STARTUP_TIMEOUT_S)
    except BaseException:
        running.stop()
        raise
    return running


@pytest.fixture(scope="module")
def server():
    """Starts `$SWITCHYARD_BIN serve` and yields a namespace: `addr`
    ("host:port"), `bin` and `database` (for `switchyard admin`), and `key`,
    an API key of the tenant INTEROP_TENANT with every scope (ALL_SCOPES).

    The tenant and key are created on the fresh database before the server
    starts, so auth is on from its first call. The server is then polled
    with the gRPC health check (which needs no key) until SERVING, within
    STARTUP_TIMEOUT_S overall (see start_server).
    """
    bin_path = switchyard_bin()
    workdir = tempfile.TemporaryDirectory(prefix="switchyard-interop-")
    database = f"sqlite://{Path(workdir.name) / 'interop.db'}"
    try:
        key = create_tenant_key(bin_path, database, INTEROP_TENANT, INTEROP_RATE, ALL_SCOPES,
                                "interop tests")
        running = start_server(bin_path, database)
    except BaseException:
        workdir.cleanup()
        raise

    yield SimpleNamespace(addr=running.addr, bin=bin_path, database=database, key=key)

    running.stop()
    workdir.cleanup()
    print(f"switchyard server stopped (rc={running.proc.returncode}); log tail:\n{running.log_tail(15)}")


class _CallDetails(
        collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials",
                                                "wait_for_ready", "compression")),
        grpc.ClientCallDetails):
    pass


class BearerKey(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer <key>` to every call made through it."""

    def __init__(self, key):
        self._entry = ("authorization", f"Bearer {key}")

    def _with_key(self, d):
        return _CallDetails(d.method, d.timeout, [*(d.metadata or ()), self._entry],
                            d.credentials, d.wait_for_ready, d.compression)

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._with_key(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._with_key(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._with_key(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._with_key(client_call_details), request_iterator)


# --------------------------------------------------------------------------
# Builders of the calls every test makes
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


def cancel_action(pb, actions, device_id, action_id, request_id=""):
    return actions.CancelAction(
        pb.action.CancelActionRequest(device_id=device_id, action_id=action_id, request_id=request_id),
        timeout=RPC_TIMEOUT_S)
