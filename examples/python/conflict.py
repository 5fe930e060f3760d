#!/usr/bin/env python3
"""A switchyard client in Python (grpcio + grpcio-status): authenticate,
book a charge, hit a conflict with a discharge, read the typed error
details (google.rpc.ErrorInfo and switchyard.v1.ConflictDetail), then
resolve the conflict by queueing the discharge after the charge.

    pip install grpcio grpcio-tools grpcio-status
    SWITCHYARD_ADDR=127.0.0.1:50051 SWITCHYARD_API_KEY=sy_... python3 conflict.py

The key needs the scopes devices:write, actions:read and actions:write.
The stubs are generated at run time from ../../proto into a temporary
directory (a real client would generate them once, at build time).
The same example in Node.js: ../node/conflict.js.
"""

import importlib
import importlib.resources
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent.parent.parent / "proto"
RPC_TIMEOUT_S = 10.0
HOUR = 3600
# The generated modules (load_api's namespace), set once at start.
pb = None


def load_api(out_dir):
    """Compiles proto/switchyard/v1/*.proto into `out_dir` and imports the
    message modules and service stubs that this example uses."""
    protos = sorted(PROTO_ROOT.glob("switchyard/v1/*.proto"))
    # The well-known google/protobuf/*.proto ship inside grpcio-tools.
    wkt_include = importlib.resources.files("grpc_tools") / "_proto"
    rc = protoc.main([
        "grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{wkt_include}",
        f"--python_out={out_dir}", f"--grpc_python_out={out_dir}",
        *(str(p.relative_to(PROTO_ROOT)) for p in protos),
    ])
    if rc != 0:
        sys.exit(f"protoc failed ({rc})")
    sys.path.insert(0, str(out_dir))

    def mod(name):
        return importlib.import_module(f"switchyard.v1.{name}")

    return SimpleNamespace(common=mod("common_pb2"), device=mod("device_pb2"), action=mod("action_pb2"),
                           errors=mod("errors_pb2"), device_grpc=mod("device_pb2_grpc"),
                           action_grpc=mod("action_pb2_grpc"))


def decode_details(call):
    """The ErrorInfo and ConflictDetail of a failed call (grpc.RpcError),
    decoded from its `grpc-status-details-bin` trailer: (info, conflict),
    each None when absent."""
    status = rpc_status.from_call(call)  # google.rpc.Status, or None
    info = conflict = None
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
        elif detail.Is(pb.errors.ConflictDetail.DESCRIPTOR):
            conflict = pb.errors.ConflictDetail()
            detail.Unpack(conflict)
    return info, conflict


def window(command, start, end):
    """A 3 kW `command` from `start` to `end` (Unix seconds)."""
    return pb.action.Action(
        command=command,
        power=pb.common.Quantity(value=3.0, unit=pb.common.UNIT_KILOWATT),
        start_time=timestamp_pb2.Timestamp(seconds=start),
        end_time=timestamp_pb2.Timestamp(seconds=end),
    )


def iso(ts):
    return ts.ToJsonString()


def main():
    addr = os.environ.get("SWITCHYARD_ADDR", "127.0.0.1:50051")
    key = os.environ.get("SWITCHYARD_API_KEY")
    if not key:
        print("SWITCHYARD_API_KEY is not set: calls go out without a key", file=sys.stderr)
    # Every call carries the key.
    auth = (("authorization", f"Bearer {key}"),) if key else ()
    opts = dict(metadata=auth, timeout=RPC_TIMEOUT_S)

    with grpc.insecure_channel(addr) as channel:
        devices = pb.device_grpc.DeviceServiceStub(channel)
        actions = pb.action_grpc.ActionServiceStub(channel)
        command_name = pb.common.Command.Name

        # A simulated battery; the server picks its device_id.
        device = devices.CreateDevice(pb.device.CreateDeviceRequest(device=pb.device.Device(
            family=pb.common.DEVICE_FAMILY_BATTERY, driver="simulated", timezone="UTC")), **opts)
        print(f"registered simulated battery {device.device_id}")

        # Windows a few hours ahead, on whole minutes: a 2 h charge, then a
        # 2 h discharge that overlaps its second hour.
        t0 = int(time.time()) // 60 * 60
        charge = actions.PushAction(pb.action.PushActionRequest(
            device_id=device.device_id,
            action=window(pb.common.COMMAND_CHARGE, t0 + 2 * HOUR, t0 + 4 * HOUR)), **opts).action
        print(f"booked {command_name(charge.command)} {charge.action_id} "
              f"from {iso(charge.start_time)} to {iso(charge.end_time)}")

        discharge = window(pb.common.COMMAND_DISCHARGE, t0 + 3 * HOUR, t0 + 5 * HOUR)
        try:
            actions.PushAction(pb.action.PushActionRequest(device_id=device.device_id, action=discharge), **opts)
            sys.exit("the overlapping discharge was booked: expected a conflict")
        except grpc.RpcError as call:
            err = call

        # Branch on ErrorInfo.reason, never on the message text.
        info, conflict = decode_details(err)
        print(f"push refused: {err.code().name}: {err.details()}")
        if info is None:
            raise err  # not a switchyard error
        print(f"  ErrorInfo: reason {info.reason}, domain {info.domain}")
        for k, v in sorted(info.metadata.items()):
            print(f"    {k} = {v}")
        if info.reason != "ACTION_CONFLICT" or conflict is None:
            raise err
        print(f"  ConflictDetail: {conflict.conflict_count} colliding action(s)")
        for c in conflict.conflicts:
            print(f"    {c.action_id} {pb.action.ActionState.Name(c.state)} {command_name(c.command)} "
                  f"on {c.channel} from {iso(c.start_time)} to {iso(c.end_time)}")
        strategies = [pb.action.ConflictStrategy.Name(s) for s in conflict.strategies]
        print(f"    strategies: {', '.join(strategies)}")

        # The existing plan wins: the discharge goes after the charge,
        # keeping its two hours.
        if "CONFLICT_STRATEGY_QUEUE_AFTER" not in strategies:
            raise err
        resolved = actions.PushAction(pb.action.PushActionRequest(
            device_id=device.device_id, action=discharge,
            on_conflict=pb.action.CONFLICT_STRATEGY_QUEUE_AFTER), **opts)
        queued = resolved.action
        print(f"queued {command_name(queued.command)} {queued.action_id} "
              f"from {iso(queued.start_time)} to {iso(queued.end_time)} "
              f"after {', '.join(resolved.queued_after_action_ids)}")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="switchyard-example-pb-") as out:
        pb = load_api(out)
        try:
            main()
        except grpc.RpcError as e:
            info, _ = decode_details(e)
            reason = f" (reason {info.reason}, {dict(info.metadata)})" if info else ""
            sys.exit(f"failed: {e.code().name}: {e.details()}{reason}")
