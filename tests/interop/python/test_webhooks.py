"""Webhook delivery, proved from outside Rust.

The real server binary delivers a tenant's events to HTTP receivers written
here in plain Python (http.server), and every request is checked with the
Standard Webhooks reference library (PyPI `standardwebhooks`, the version
pinned in scripts/install-test-tools.sh), as any receiver would check it.

    eval "$(scripts/install-test-tools.sh)"
    SWITCHYARD_BIN=path/to/switchyard pytest tests/interop/python/test_webhooks.py -v

What the tests prove (docs/events.md, proto/switchyard/v1/webhook.proto):

- Chaos: a receiver answering at random (seeded: 25% 500, 15% 429, 10% no
  answer within the server's 1 s timeout, the rest 200), and stopped for a
  while (connections refused), still gets every event of the tenant
  committed after its endpoint was made: none missed, none it should not
  get, every request signed (zero verification failures), each body the
  event WatchEvents streams (proto3 JSON under the .proto field names), a
  retry under the same `webhook-id` with the same `data`, and nothing sent
  before every earlier event was delivered (strict cursor order).
  ListWebhookDeliveries logs the 500s, the 429s, the failures without an
  answer (with why) and the deliveries, one per event, one attempt at a
  time.
- Crash: a server SIGKILLed while a request is in flight leaves its
  endpoint to the next server on the same database once the claim's lease
  (2 x timeout + 5 s = 7 s) expires; every event, from before and after the
  kill, is then delivered, the interrupted one under the same `webhook-id`.
- 410 Gone disables the endpoint at once (reason GONE, one GONE attempt,
  nothing more sent to it) and writes an EVENT_TYPE_WEBHOOK_ENDPOINT_DISABLED
  event that WatchEvents and the tenant's other endpoints see.
- The signing secret (`whsec_...`) is in CreateWebhookEndpoint's and
  RotateWebhookSecret's answers only, never in Get/List; while a rotated
  secret overlaps, a delivery carries two signatures and either secret
  verifies it.

How:

- Each test has its own SQLite database, tenant and key (made with
  `switchyard admin` before its server starts) and starts its own server(s)
  with --webhook-retry-min-ms 50 --webhook-timeout-ms 1000 and one
  --webhook-url-allow per receiver (receivers listen on 127.0.0.1 ports the
  kernel picks, so they exist before the server that must allow them).
- Every action is booked hours ahead: the dispatcher never runs one, so the
  tenant's events are exactly those the test makes (counted as it makes
  them, and read back with WatchEvents).
- Nothing sleeps to wait for a schedule: the tests poll the receiver or the
  API with a deadline. The receiver's answers are a function of
  (seed, webhook-id, how many times that id came before), so a failing run
  can be repeated: SWITCHYARD_CHAOS_SEED overrides the seed. From an
  event's third request on the answer is 200, so its retries wait 50 ms,
  then 150 ms (x3, +-20%), rarely more, and the file takes about 40 s.
"""

import base64
import collections
import dataclasses
import http.server
import math
import os
import random
import threading
import time
from types import SimpleNamespace

import grpc
import pytest
from google.protobuf import field_mask_pb2, json_format, timestamp_pb2
from standardwebhooks import Webhook

from conftest import (HOUR, RPC_TIMEOUT_S, BearerKey, base_time, cancel_action, create_battery,
                      create_tenant_key, push, start_server, switchyard_bin, windowed)

TENANT = "hooks"
SCOPES = "devices:read,devices:write,actions:read,actions:write,events:read,webhooks:manage"
RATE = "100000"
TIMEOUT_MS = 1000
RETRY_MIN_MS = 50
# The claim on an endpoint: 2 x timeout + 5 s (service/src/delivery.rs).
LEASE_S = 2 * TIMEOUT_MS / 1000 + 5
# A hung request is held this long: past the server's timeout.
HANG_S = TIMEOUT_MS / 1000 + 0.5
# Held until the receiver is closed.
HOLD = math.inf
CHAOS_SEED = int(os.environ.get("SWITCHYARD_CHAOS_SEED", "16"))
# How long "no further event" is waited for after the last expected one.
QUIET_S = 0.5
POLL_S = 0.02


# --------------------------------------------------------------------------
# The receiver
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Hit:
    """One request as the receiver got it."""

    webhook_id: str
    headers: dict
    raw: bytes
    body: object  # the verified JSON; None when verification failed
    answer: object  # the status answered at once; None: hung, held or closed
    at: float  # time.monotonic() on arrival

    @property
    def delivered(self):
        return self.answer is not None and 200 <= self.answer < 300


def answer(status):
    """A script: always `status`, at once."""
    return lambda webhook_id, n: (0, status)


def hold_all(webhook_id, n):
    """A script: never answer (until the receiver is closed)."""
    return HOLD, None


def chaos(seed, calm_after=2):
    """A script: ~25% 500, ~15% 429, ~10% no answer within the server's
    timeout (then 500 or a closed connection), else 200; drawn from
    (seed, webhook-id, n), and 200 from an id's (calm_after + 1)-th request
    on."""
    def script(webhook_id, n):
        if n >= calm_after:
            return 0, 200
        r = random.Random(f"{seed}/{webhook_id}/{n}").random()
        if r < 0.25:
            return 0, 500
        if r < 0.40:
            return 0, 429
        if r < 0.50:
            return HANG_S, (500 if r < 0.45 else None)
        return 0, 200
    return script


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's naming)
        rx = self.server.receiver
        raw = self.rfile.read(int(self.headers.get("content-length") or 0))
        delay, status = rx.take({k.lower(): v for k, v in self.headers.items()}, raw)
        if delay:
            rx.released.wait(None if delay == HOLD else delay)
        if status is None:
            self.close_connection = True  # no answer at all
            return
        try:
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()
        except OSError:
            pass  # the server gave up on this request already

    def log_message(self, *args):
        pass


class Receiver:
    """A webhook receiver on 127.0.0.1, served by a thread of its own.

    Every request is verified with standardwebhooks against `secret` (a
    failure, or a request before the secret is known, goes to `bad`),
    recorded as a Hit, and answered as `script(webhook_id, n)` says, n being
    how many requests with that id came before: (delay, status), a delay
    of HOLD holding it until close(), a status of None closing the
    connection without an answer. stop() closes the listening socket (new
    connections are refused), start() listens again on the same port.
    """

    def __init__(self, script):
        self.script = script
        self.secret = None
        self.hits = []
        self.bad = []
        self.port = 0
        self.released = threading.Event()
        self._seen = collections.Counter()
        self._lock = threading.Lock()
        self._httpd = None
        self.start()

    @property
    def origin(self):
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self):
        return f"{self.origin}/hooks"

    def start(self):
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), _Handler)
        httpd.receiver = self
        self.port = httpd.server_address[1]
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"receiver-{self.port}", daemon=True)
        self._thread.start()
        self._httpd = httpd

    def stop(self):
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = None

    def close(self):
        self.released.set()
        self.stop()

    def take(self, headers, raw):
        """Verifies and records one request (headers: lower-case names);
        returns the script's answer."""
        webhook_id = headers.get("webhook-id", "")
        with self._lock:
            try:
                body = Webhook(self.secret).verify(raw, headers)
            except Exception as e:  # noqa: BLE001 (any failure to verify is one)
                body = None
                self.bad.append(f"{webhook_id or '(no webhook-id)'}: {type(e).__name__}: {e}")
            n = self._seen[webhook_id]
            self._seen[webhook_id] += 1
            delay, status = self.script(webhook_id, n)
            self.hits.append(Hit(webhook_id, headers, raw, body, None if delay else status,
                                 time.monotonic()))
        return delay, status

    def snapshot(self):
        with self._lock:
            return list(self.hits)

    def delivered_ids(self):
        return {h.webhook_id for h in self.snapshot() if h.delivered}


# --------------------------------------------------------------------------
# Servers, API and events
# --------------------------------------------------------------------------


class Stack:
    """One test's database (tenant TENANT, a key with SCOPES), the servers
    started on it, the receivers they may deliver to, and `api`: stubs of
    the newest server, sending the key."""

    def __init__(self, pb, tmp_path):
        self.pb = pb
        self.bin = switchyard_bin()
        self.database = f"sqlite://{tmp_path / 'webhooks.db'}"
        self.key = create_tenant_key(self.bin, self.database, TENANT, RATE, SCOPES, "webhook interop")
        self.servers, self.receivers, self._channels = [], [], []
        self.api = None

    def receiver(self, script):
        rx = Receiver(script)
        self.receivers.append(rx)
        return rx

    def start(self):
        """Starts a server allowed to reach every receiver made so far."""
        flags = ["--webhook-retry-min-ms", str(RETRY_MIN_MS), "--webhook-timeout-ms", str(TIMEOUT_MS)]
        for rx in self.receivers:
            flags += ["--webhook-url-allow", rx.origin]
        server = start_server(self.bin, self.database, *flags)
        self.servers.append(server)
        raw = grpc.insecure_channel(server.addr)
        self._channels.append(raw)
        ch = grpc.intercept_channel(raw, BearerKey(self.key))
        pb = self.pb
        self.api = SimpleNamespace(devices=pb.device_grpc.DeviceServiceStub(ch),
                                   actions=pb.action_grpc.ActionServiceStub(ch),
                                   events=pb.event_grpc.EventServiceStub(ch),
                                   webhooks=pb.webhook_grpc.WebhookServiceStub(ch))
        return server

    def close(self):
        for server in self.servers:
            server.stop()
            print(f"server {server.addr} stopped (rc={server.proc.returncode}); log tail:\n"
                  f"{server.log_tail(20)}")
        for ch in self._channels:
            ch.close()
        for rx in self.receivers:
            rx.close()

    def endpoint(self, rx, event_types=(), description=""):
        """Creates an endpoint for rx and gives rx its secret; returns the
        CreateWebhookEndpoint answer."""
        made = self.api.webhooks.CreateWebhookEndpoint(
            self.pb.webhook.CreateWebhookEndpointRequest(url=rx.url, event_types=event_types,
                                                         description=description),
            timeout=RPC_TIMEOUT_S)
        rx.secret = made.secret
        return made

    def get(self, endpoint_id):
        return self.api.webhooks.GetWebhookEndpoint(
            self.pb.webhook.GetWebhookEndpointRequest(endpoint_id=endpoint_id), timeout=RPC_TIMEOUT_S)

    def deliveries(self, endpoint_id, newest=None):
        """The endpoint's delivery attempts, newest first: every page, or
        only the `newest` ones."""
        out, token = [], ""
        while True:
            resp = self.api.webhooks.ListWebhookDeliveries(
                self.pb.webhook.ListWebhookDeliveriesRequest(endpoint_id=endpoint_id,
                                                             page_size=newest or 1000, page_token=token),
                timeout=RPC_TIMEOUT_S)
            out.extend(resp.deliveries)
            token = resp.next_page_token
            if not token or newest:
                return out

    def events(self, after, n, event_types=()):
        """The n events after cursor `after`, by WatchEvents; fails if fewer
        come within RPC_TIMEOUT_S, or another follows within QUIET_S."""
        req = self.pb.event.WatchEventsRequest
        call = self.api.events.WatchEvents(req(after_cursor=after, event_types=event_types),
                                           timeout=RPC_TIMEOUT_S)
        got = []
        try:
            for e in call:
                got.append(e)
                if len(got) == n:
                    break
        except grpc.RpcError as err:
            pytest.fail(f"WatchEvents after {after}: {len(got)} of {n} events, then {err.code()}: "
                        f"{err.details()}", pytrace=False)
        finally:
            call.cancel()
        more = self.api.events.WatchEvents(req(after_cursor=got[-1].cursor, event_types=event_types),
                                           timeout=QUIET_S)
        try:
            extra = next(more)
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED, f"{err.code()}: {err.details()}"
        else:
            pytest.fail(f"WatchEvents after {after}: more than the {n} events expected: {extra}",
                        pytrace=False)
        return got


@pytest.fixture
def stack(pb, tmp_path):
    st = Stack(pb, tmp_path)
    try:
        yield st
    finally:
        st.close()


class Traffic:
    """Makes the tenant's events through the API, counting them in `made`.
    Every window is hours ahead: nothing is ever dispatched."""

    def __init__(self, stack):
        self.stack, self.pb, self.made = stack, stack.pb, 0
        self.t0 = base_time()

    def device(self, device_id):
        create_battery(self.pb, self.stack.api.devices, device_id)
        self.made += 1
        return device_id

    def rename(self, device_id, name):
        self.stack.api.devices.UpdateDevice(self.pb.device.UpdateDeviceRequest(
            device=self.pb.device.Device(device_id=device_id, display_name=name),
            update_mask=field_mask_pb2.FieldMask(paths=["display_name"])), timeout=RPC_TIMEOUT_S)
        self.made += 1

    def book(self, device_id, hours, minutes=30, on_conflict=None, discharge=False):
        """Books [t0 + hours, + minutes); returns the action (a push that
        cancels the actions it replaces makes an event for each)."""
        command = self.pb.common.COMMAND_DISCHARGE if discharge else self.pb.common.COMMAND_CHARGE
        start = self.t0 + int(hours * HOUR)
        resp = push(self.pb, self.stack.api.actions, device_id,
                    windowed(self.pb, command, start, start + minutes * 60), on_conflict=on_conflict)
        self.made += 1 + len(resp.cancelled_actions)
        return resp.action

    def cancel(self, device_id, action_id):
        cancel_action(self.pb, self.stack.api.actions, device_id, action_id)
        self.made += 1


def wait_for(condition, timeout):
    """Polls condition() until true; seconds it took, or None at timeout."""
    began = time.monotonic()
    while not condition():
        if time.monotonic() - began > timeout:
            return None
        time.sleep(POLL_S)
    return time.monotonic() - began


def message_type(pb, event_type):
    """The Standard Webhooks `type` of an EventType: action.failed, ..."""
    name = pb.event.EventType.Name(event_type).removeprefix("EVENT_TYPE_").lower()
    head, _, tail = name.rpartition("_")
    return f"{head}.{tail}"


def without_action(pb, event):
    """The event without its `action`: that is the action as read when the
    event is sent or streamed, so it may differ between the two."""
    out = pb.event.Event()
    out.CopyFrom(event)
    out.ClearField("action")
    return out


def assert_delivered(pb, rx, events):
    """rx got every one of `events` (as WatchEvents streamed them) answered
    2xx and nothing else: every request verified, each body the event, a
    retry the same message, and no request sent while an earlier event was
    still undelivered. Returns rx's hits."""
    hits = rx.snapshot()
    assert not rx.bad, f"{len(rx.bad)} requests failed standardwebhooks verification: {rx.bad[:5]}"
    by_id = {e.event_id: e for e in events}
    unexpected = sorted({h.webhook_id for h in hits} - by_id.keys())
    assert not unexpected, f"requests for events not expected here: {unexpected[:10]}"
    delivered = {h.webhook_id for h in hits if h.delivered}
    missed = [e.event_id for e in events if e.event_id not in delivered]
    assert not missed, (f"{len(missed)} of {len(events)} events never answered 2xx: {missed[:10]}; "
                        f"{len(hits)} requests so far")

    for h in hits:
        event = by_id[h.webhook_id]
        data = h.body["data"]
        assert data["event_id"] == h.webhook_id, f"webhook-id {h.webhook_id} carries {data['event_id']}"
        assert h.body["type"] == message_type(pb, event.type), (h.webhook_id, h.body["type"])
        stamp = timestamp_pb2.Timestamp()
        stamp.FromJsonString(h.body["timestamp"])
        assert stamp == event.time, f"{h.webhook_id}: timestamp {h.body['timestamp']}, event time {event.time}"
        parsed = json_format.ParseDict(data, pb.event.Event())
        assert without_action(pb, parsed) == without_action(pb, event), (
            f"{h.webhook_id}: the body's data is not the event WatchEvents streams:\n"
            f"body: {parsed}\nwatch: {event}")
        if parsed.HasField("action"):
            assert parsed.action.action_id == event.action_id

    # Strict cursor order: a request for an event only once every event
    # before it was delivered (a failing one holds back the rest).
    cursors = sorted(e.cursor for e in events)
    done = set()
    for i, h in enumerate(hits):
        c = by_id[h.webhook_id].cursor
        ahead = [x for x in cursors if x < c and x not in done]
        assert not ahead, (f"request {i} ({h.webhook_id}) came while ev-{ahead[0]} "
                           f"(and {len(ahead) - 1} more before it) was not delivered yet")
        if h.delivered:
            done.add(c)
    firsts = []
    for h in hits:
        if h.delivered and h.webhook_id not in firsts:
            firsts.append(h.webhook_id)
    first_cursors = [by_id[i].cursor for i in firsts]
    assert first_cursors == sorted(first_cursors), f"first 2xx out of cursor order: {firsts}"
    return hits


def delivered_all(rx, events):
    ids = {e.event_id for e in events}
    return lambda: ids <= rx.delivered_ids()


# --------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------


def test_chaos_every_event_arrives_signed_in_order_as_watch_events_streams_it(pb, stack):
    rx = stack.receiver(chaos(CHAOS_SEED))
    stack.start()
    create_battery(pb, stack.api.devices, "chaos-before")  # before the endpoint: never sent to it
    ep = stack.endpoint(rx, description="chaos").endpoint
    assert ep.enabled and ep.delivered_cursor > 0
    traffic = Traffic(stack)

    devices = [traffic.device(f"chaos-{i}") for i in range(6)]
    booked = {d: [traffic.book(d, h).action_id for h in range(1, 6)] for d in devices}

    # The receiver goes away: connections are refused until it is back.
    stopped = time.time()
    rx.stop()
    for d in devices:
        traffic.cancel(d, booked[d][0])
        traffic.cancel(d, booked[d][1])
        # Over the third booking (hour 3, 30 min): cancels it, books itself.
        replaced = traffic.book(d, 3.25, on_conflict=pb.action.CONFLICT_STRATEGY_CANCEL_AND_REPLACE,
                                discharge=True)
        assert replaced.state == pb.action.ACTION_STATE_SCHEDULED
    traffic.book(devices[0], 4.25, on_conflict=pb.action.CONFLICT_STRATEGY_QUEUE_AFTER)
    traffic.rename(devices[1], "renamed while the receiver was down")

    def refused():
        recent = stack.deliveries(ep.endpoint_id, newest=50)
        return any(d.outcome == pb.webhook.WEBHOOK_DELIVERY_OUTCOME_FAILED and d.http_status == 0
                   and d.attempt_time.ToNanoseconds() >= stopped * 1e9
                   and "no answer within" not in d.error for d in recent)

    assert wait_for(refused, 10) is not None, "no attempt was refused while the receiver was stopped"
    rx.start()
    for d in devices[2:]:
        traffic.book(d, 7)
    traffic.rename(devices[2], "renamed after the receiver came back")
    assert traffic.made >= 60, f"only {traffic.made} events made"

    events = stack.events(ep.delivered_cursor, traffic.made)
    took = wait_for(delivered_all(rx, events), 40)
    hits = assert_delivered(pb, rx, events)
    assert took is not None, "not every event delivered within 40 s"

    answers = collections.Counter("hung" if h.answer is None else h.answer for h in hits)
    twice = collections.Counter(h.webhook_id for h in hits if h.delivered)
    duplicates = {i: n for i, n in twice.items() if n > 1}
    print(f"{len(events)} events, {len(hits)} requests {dict(answers)}, all delivered {took:.1f} s "
          f"after the last was made; delivered twice: {duplicates or 'none'} (seed {CHAOS_SEED})")

    # The server's own log of it: every kind of failure, and one delivery
    # per event (once it recorded the last answer).
    assert wait_for(lambda: stack.get(ep.endpoint_id).delivered_cursor == events[-1].cursor, 5) is not None
    log = stack.deliveries(ep.endpoint_id)
    out = pb.webhook
    failed = [d for d in log if d.outcome == out.WEBHOOK_DELIVERY_OUTCOME_FAILED]
    ok = [d for d in log if d.outcome == out.WEBHOOK_DELIVERY_OUTCOME_DELIVERED]
    statuses = collections.Counter(d.http_status for d in failed)
    assert statuses[500] >= 1 and statuses[429] >= 1, f"failed attempts by status: {dict(statuses)}"
    unanswered = [d for d in failed if d.http_status == 0]
    assert unanswered and all(d.error for d in unanswered), [d.error for d in unanswered]
    assert any("no answer within" in d.error for d in unanswered), [d.error for d in unanswered]
    for status in (500, 429):
        assert statuses[status] <= answers[status], (
            f"{statuses[status]} attempts logged {status}, the receiver answered {answers[status]}")
    assert all(d.HasField("next_attempt_time") for d in failed), "a failed attempt without its retry time"
    assert sorted(d.event_id for d in ok) == sorted(e.event_id for e in events), (
        "the log does not hold exactly one delivery per event")
    assert all(200 <= d.http_status < 300 and not d.HasField("next_attempt_time") for d in ok)
    for e in events:
        tries = sorted(d.attempt for d in log if d.event_id == e.event_id)
        assert tries == list(range(1, len(tries) + 1)), f"{e.event_id}: attempts numbered {tries}"
    types = {e.event_id: e.type for e in events}
    assert all(d.event_type == types[d.event_id] for d in log)
    # One in flight: each attempt began after the one before it ended.
    spans = sorted((d.attempt_time.ToNanoseconds() - d.latency.ToNanoseconds(),
                    d.attempt_time.ToNanoseconds(), d.event_id, d.attempt) for d in log)
    for (_, end, *was), (began, _, *this) in zip(spans, spans[1:]):
        assert began >= end - 5_000_000, f"attempt {this} began {(end - began) / 1e6:.0f} ms before {was} ended"

    caught_up = stack.get(ep.endpoint_id)
    assert caught_up.enabled
    assert caught_up.failed_attempts == 0 and not caught_up.HasField("failing_since")


def test_a_server_killed_mid_delivery_is_taken_over_and_nothing_is_missed(pb, stack):
    rx = stack.receiver(hold_all)
    first = stack.start()
    ep = stack.endpoint(rx, description="crash").endpoint
    traffic = Traffic(stack)
    device = traffic.device("crash-before")
    for h in (1, 2):
        traffic.book(device, h)

    assert wait_for(lambda: rx.hits, 10) is not None, "no request reached the receiver"
    first.kill()
    killed = time.monotonic()
    held = rx.snapshot()[0]
    assert killed - held.at < TIMEOUT_MS / 1000, "the server was killed after its attempt timed out"

    rx.script = answer(200)
    stack.start()
    device = traffic.device("crash-after")
    traffic.book(device, 1)
    events = stack.events(ep.delivered_cursor, traffic.made)
    assert held.webhook_id == events[0].event_id, "the first request was not for the first event"

    took = wait_for(delivered_all(rx, events), 30)
    hits = assert_delivered(pb, rx, events)
    assert took is not None, "not every event delivered within 30 s of the restart"
    again = [h for h in hits if h.webhook_id == held.webhook_id and h.delivered]
    assert again, f"{held.webhook_id}, in flight at the kill, was never sent again"
    takeover = again[0].at - held.at
    print(f"{len(events)} events, {len(hits)} requests; the interrupted {held.webhook_id} "
          f"sent again {takeover:.1f} s after its first request (lease {LEASE_S:.0f} s)")
    # The dead server's claim held until its lease ran out: no one sent
    # to the endpoint meanwhile.
    assert takeover > LEASE_S - 1, f"the endpoint was taken over {takeover:.1f} s in, within the lease"
    assert takeover < LEASE_S + 10, f"the endpoint was taken over only {takeover:.1f} s in"


def test_a_410_disables_its_endpoint_at_once_and_says_so(pb, stack):
    fine = stack.receiver(answer(204))
    gone = stack.receiver(answer(410))
    stack.start()
    ok_ep = stack.endpoint(fine, description="stays").endpoint
    gone_ep = stack.endpoint(gone, description="gone").endpoint
    traffic = Traffic(stack)
    traffic.device("gone-1")

    assert wait_for(lambda: not stack.get(gone_ep.endpoint_id).enabled, 10) is not None, (
        "the endpoint answering 410 is still enabled")
    got = stack.get(gone_ep.endpoint_id)
    assert got.disabled_reason == pb.webhook.WEBHOOK_DISABLED_REASON_GONE
    assert not got.HasField("next_attempt_time")
    log = stack.deliveries(gone_ep.endpoint_id)
    assert [(d.outcome, d.http_status, d.attempt) for d in log] == [
        (pb.webhook.WEBHOOK_DELIVERY_OUTCOME_GONE, 410, 1)], log
    assert not log[0].HasField("next_attempt_time")

    more = traffic.device("gone-2")
    traffic.book(more, 1)
    # The device's creation, the endpoint disabled, then the rest.
    events = stack.events(ok_ep.delivered_cursor, traffic.made + 1)
    assert wait_for(delivered_all(fine, events), 15) is not None, "the other endpoint missed events"
    assert_delivered(pb, fine, events)

    disabled = stack.events(ok_ep.delivered_cursor, 1,
                            event_types=[pb.event.EVENT_TYPE_WEBHOOK_ENDPOINT_DISABLED])[0]
    assert disabled.webhook_endpoint_id == gone_ep.endpoint_id
    assert disabled.reason == "GONE" and disabled.device_id == ""
    assert [e.event_id for e in events].index(disabled.event_id) == 1
    sent = [h.body["type"] for h in fine.snapshot() if h.webhook_id == disabled.event_id]
    assert sent and set(sent) == {"webhook_endpoint.disabled"}

    # Nothing more went to the gone receiver, though it had events to get.
    assert not gone.bad, gone.bad
    assert [(h.webhook_id, h.answer) for h in gone.snapshot()] == [(events[0].event_id, 410)]
    assert len(stack.deliveries(gone_ep.endpoint_id)) == 1
    assert stack.get(ok_ep.endpoint_id).enabled


def test_the_signing_secret_is_shown_once(pb, stack):
    rx = stack.receiver(answer(200))
    stack.start()
    made = stack.endpoint(rx, event_types=[pb.event.EVENT_TYPE_DEVICE_CREATED], description="secret")
    secret, ep = made.secret, made.endpoint
    assert secret.startswith("whsec_"), "CreateWebhookEndpoint returned no whsec_ secret"
    assert len(base64.b64decode(secret.removeprefix("whsec_"), validate=True)) >= 24

    got = stack.get(ep.endpoint_id)
    listed = stack.api.webhooks.ListWebhookEndpoints(pb.webhook.ListWebhookEndpointsRequest(),
                                                     timeout=RPC_TIMEOUT_S)
    assert got == ep
    assert [e.endpoint_id for e in listed.endpoints] == [ep.endpoint_id]

    rotated = stack.api.webhooks.RotateWebhookSecret(
        pb.webhook.RotateWebhookSecretRequest(endpoint_id=ep.endpoint_id), timeout=RPC_TIMEOUT_S)
    assert rotated.secret.startswith("whsec_") and rotated.secret != secret
    after = stack.get(ep.endpoint_id)
    assert after.HasField("previous_secret_expire_time"), "the old secret does not overlap"
    for label, msg in (("the created endpoint", ep), ("GetWebhookEndpoint", got),
                       ("ListWebhookEndpoints", listed), ("the rotated endpoint", rotated.endpoint),
                       ("GetWebhookEndpoint after the rotation", after)):
        text = str(msg)
        assert "whsec_" not in text, f"{label} shows a secret"
        for s in (secret, rotated.secret):
            assert s.removeprefix("whsec_") not in text, f"{label} shows a secret's bytes"

    # While they overlap, both secrets sign: each verifies the delivery.
    rx.secret = rotated.secret
    Traffic(stack).device("secret-1")
    assert wait_for(lambda: rx.delivered_ids(), 10) is not None, "nothing delivered"
    assert not rx.bad, rx.bad
    hit = rx.snapshot()[0]
    assert len(hit.headers["webhook-signature"].split(" ")) == 2, hit.headers["webhook-signature"]
    assert Webhook(secret).verify(hit.raw, hit.headers) == hit.body
