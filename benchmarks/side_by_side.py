"""What the side-by-side benchmarks (vs_sparsify.py, vs_diffusers.py) share:
each side in its own long-lived worker process, driven over pipes with one
JSON line per command and per reply, and the machine's load beside every
figure.

A script runs itself as a worker with ``--worker <side>``: it calls
``become_worker()`` first (the replies get the real stdout; whatever the
libraries print goes to stderr), then ``serve(handle)``. The driver starts
it with ``Worker(name, script, argv, env)`` and calls ``ask(cmd=..., ...)``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

THREADS_NOTE = ("PyTorch's 2-thread runs slow down 10-20x when another process takes a core (its OpenMP "
                "threads wait on each other); XLA barely notices. The 1-thread peer figure is the robust one "
                "on a loaded machine.")

_PROTOCOL = None


def loadavg() -> str:
  """The 1, 5 and 15 minute load averages, as /proc/loadavg gives them."""
  try:
    with open("/proc/loadavg") as f:
      return " ".join(f.read().split()[:3])
  except OSError:
    return "n/a"


def become_worker() -> None:
  """Keeps stdout for the replies; library chatter (imports print) goes to stderr."""
  global _PROTOCOL
  _PROTOCOL = sys.stdout
  sys.stdout = sys.stderr


def serve(handle) -> None:
  """Reads JSON commands from stdin until {"cmd": "quit"}; answers one JSON line each."""
  for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["cmd"] == "quit":
      break
    try:
      reply = handle(cmd)
    except Exception as e:  # noqa: BLE001  (reported to the driver, which stops)
      import traceback
      traceback.print_exc()
      reply = {"error": f"{type(e).__name__}: {e}"}
    _PROTOCOL.write(json.dumps(reply) + "\n")
    _PROTOCOL.flush()


class Worker:
  """A long-lived worker process (``python script *argv``) answering one JSON line per command."""

  def __init__(self, name: str, script: str, argv: list[str], env: dict):
    self.name = name
    self.proc = subprocess.Popen([sys.executable, script, *argv], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True, env=env)

  def ask(self, **cmd) -> dict:
    self.proc.stdin.write(json.dumps(cmd) + "\n")
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"the {self.name} worker died (see its stderr above)")
    reply = json.loads(line)
    if "error" in reply:
      raise RuntimeError(f"{self.name} worker: {reply['error']}")
    return reply

  def close(self):
    try:
      self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
      self.proc.stdin.flush()
      self.proc.wait(timeout=60)
    except (OSError, subprocess.TimeoutExpired):
      self.proc.kill()


def write_results(path: str, cpus: int, results: list) -> None:
  """Prints the threads note and writes the run's figures (with its command line) as JSON."""
  print(f"note: {THREADS_NOTE}")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump({"command": " ".join(sys.argv), "note": THREADS_NOTE, "cpus": cpus, "results": results}, f, indent=2)
  print(f"wrote {path}")
