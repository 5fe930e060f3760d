"""The examples a user runs, run end to end against a real server.

examples/python/conflict.py runs as a user would run it: a subprocess with
SWITCHYARD_ADDR and SWITCHYARD_API_KEY, a key with only the scopes it
needs. Its output must show the conflict decoded (reason ACTION_CONFLICT,
the booked charge named as the colliding action) and the discharge queued
to start when the charge ends. (The Node.js example has its own test,
examples/node/conflict.test.js, under `node --test`.)
"""

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import INTEROP_TENANT, KEY_RE, _admin_cli

REPO = Path(__file__).resolve().parents[3]
PYTHON_EXAMPLE = REPO / "examples" / "python" / "conflict.py"
EXAMPLE_TIMEOUT_S = 60  # includes generating the stubs with protoc

# The lines of the example's output that the test reads.
BOOKED_RE = re.compile(r"^booked COMMAND_CHARGE (\S+) from (\S+) to (\S+)$", re.M)
REASON_RE = re.compile(r"^  ErrorInfo: reason (\S+), domain (\S+)$", re.M)
CONFLICT_RE = re.compile(r"^    (\S+) (ACTION_STATE_\w+) COMMAND_CHARGE on \S+ from (\S+) to (\S+)$", re.M)
STRATEGIES_RE = re.compile(r"^    strategies: (.*)$", re.M)
QUEUED_RE = re.compile(r"^queued COMMAND_DISCHARGE (\S+) from (\S+) to (\S+) after (\S+)$", re.M)


def run_example(server, script):
    # A key of its own, with just the scopes the example needs. A running
    # server looks up a key id it has not seen, so the key works at once.
    key = _admin_cli(server.bin, server.database, "key", "create", "--tenant", INTEROP_TENANT,
                     "--scopes", "devices:write,actions:read,actions:write",
                     "--description", "examples test")
    assert KEY_RE.fullmatch(key)
    env = {**os.environ, "SWITCHYARD_ADDR": server.addr, "SWITCHYARD_API_KEY": key}
    run = subprocess.run([sys.executable, str(script)], env=env, stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=EXAMPLE_TIMEOUT_S)
    assert run.returncode == 0, f"{script.name} failed (rc={run.returncode}):\n{run.stdout}\n{run.stderr}"
    return run.stdout


def test_python_example_decodes_the_conflict_and_queues_after(server):
    out = run_example(server, PYTHON_EXAMPLE)

    booked = BOOKED_RE.search(out)
    assert booked, f"no 'booked' line:\n{out}"
    charge_id, charge_start, charge_end = booked.groups()

    reason = REASON_RE.search(out)
    assert reason and reason.groups() == ("ACTION_CONFLICT", "switchyard"), out
    assert f"conflicting_action_ids = {charge_id}" in out, out

    conflicts = CONFLICT_RE.findall(out)
    assert conflicts == [(charge_id, "ACTION_STATE_SCHEDULED", charge_start, charge_end)], out
    strategies = STRATEGIES_RE.search(out).group(1).split(", ")
    assert "CONFLICT_STRATEGY_CANCEL_AND_REPLACE" in strategies, out
    assert "CONFLICT_STRATEGY_QUEUE_AFTER" in strategies, out

    queued = QUEUED_RE.search(out)
    assert queued, f"no 'queued' line:\n{out}"
    queued_id, queued_start, _queued_end, after = queued.groups()
    assert queued_id != charge_id
    assert queued_start == charge_end, f"queued to start at {queued_start}, not at the charge's end {charge_end}"
    assert after == charge_id
