"""Work units: ids, assignment, resumable results, merging, the launchers."""
import json
import os
import re
import stat
import subprocess
import sys
import textwrap

import pytest

from saemnesia_jax.runtime import units

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")


def make_units():
  return [{"method": m, "concept": c, "domain": d, "gamma": g, "seeds": [188, 288]}
          for m in ("saemnesia", "saeuron") for c, d in (("Disk", "object"), ("Neon", "style"))
          for g in (-1.0, -10.0, -25.0)]


def fake_result(u):
  # Deterministic, with floats that need all their digits to round-trip.
  return {"UA": abs(u["gamma"]) / 30.0, "IRA": 1.0 / (3.0 + len(u["concept"])), "n": sum(u["seeds"])}


def test_unit_id_is_stable_and_safe():
  u = {"method": "saemnesia", "concept": "Disk", "domain": "object", "gamma": -10.0, "seeds": [188, 288]}
  uid = units.unit_id(u)
  assert uid.startswith("Disk_object_-10.0_saemnesia_")
  assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*_[0-9a-f]{12}", uid)
  assert units.unit_id(dict(reversed(list(u.items())))) == uid           # key order
  assert units.unit_id({**u, "seeds": (188, 288)}) == uid                 # tuple == list
  assert units.unit_id({**u, "gamma": -10}) != uid                        # -10 is not -10.0
  assert units.unit_id({**u, "seeds": [188]}) != uid
  assert units.unit_id({"concept": "a/b c", "gamma": -1.0}).startswith("a-b-c_-1.0_")
  assert units.unit_id({"gamma": -5.0})[0].isalnum()                      # never starts with '-'
  with pytest.raises(ValueError, match="canonical JSON"):
    units.unit_id({"gamma": float("nan")})
  with pytest.raises(ValueError, match="dict"):
    units.unit_id(["gamma", 1])


@pytest.mark.parametrize("n_units, count", [(12, 1), (12, 2), (12, 5), (3, 4), (0, 3)])
def test_assign_is_a_disjoint_cover(n_units, count):
  us = [{"i": i} for i in range(n_units)]
  shares = [units.assign(us, p, count) for p in range(count)]
  ids = [units.unit_id(u) for s in shares for u in s]
  assert sorted(ids) == sorted(units.unit_id(u) for u in us)  # every unit once
  assert len(set(ids)) == len(ids)
  assert shares == [units.assign(list(us), p, count) for p in range(count)]  # stable
  assert max(len(s) for s in shares) - min(len(s) for s in shares) <= 1       # balanced


def test_assign_errors():
  with pytest.raises(ValueError, match="twice"):
    units.assign([{"a": 1}, {"a": 2}, {"a": 1}], 0, 1)
  with pytest.raises(ValueError, match=r"process_index=2 must be in \[0, process_count=2\)"):
    units.assign([{"a": 1}], 2, 2)


def test_write_read_resume(tmp_path):
  us = make_units()
  calls, crash = [], {"on": units.unit_id(us[4])}

  def fn(u):
    calls.append(units.unit_id(u))
    if calls[-1] == crash["on"]:
      raise RuntimeError("simulated crash")
    return fake_result(u)

  with pytest.raises(RuntimeError):
    units.run_units(str(tmp_path), us, fn, 0, 1, progress=False)
  res = units.UnitResults(str(tmp_path))
  assert [res.done(u) for u in us] == [True] * 4 + [False] * 8
  assert res.pending(us) == us[4:]
  crash["on"], calls[:] = None, []
  assert units.run_units(str(tmp_path), us, fn, 0, 1, progress=False) == 8
  assert calls == [units.unit_id(u) for u in us[4:]]  # only the missing units
  assert units.run_units(str(tmp_path), us, fn, 0, 1, progress=False) == 0
  assert res.pending(us) == []
  assert res.read(us[3]) == fake_result(us[3])
  pairs = res.all()
  assert len(pairs) == 12 and all(r == fake_result(f) for f, r in pairs)
  assert [f for f, _ in pairs] == sorted((units.canonical(u) for u in us),
                                         key=lambda f: json.dumps(f, sort_keys=True, separators=(",", ":")))
  with pytest.raises(ValueError, match="no result yet"):
    res.read({"method": "other"})


def test_stale_temp_file_is_ignored_and_cleaned(tmp_path):
  us = make_units()[:3]
  res = units.UnitResults(str(tmp_path))
  res.write(us[0], fake_result(us[0]))
  stale = os.path.join(res.dir, ".tmp-k3j2h1" + units.unit_id(us[1]) + ".json")
  with open(stale, "w") as f:
    f.write('{"id": "half-writ')  # a writer killed mid-way
  assert not res.done(us[1]) and res.pending(us) == us[1:]
  assert [f for f, _ in res.all()] == [units.canonical(us[0])]
  assert units.merge(str(tmp_path))[0]["unit"] == units.canonical(us[0])
  res.write(us[1], fake_result(us[1]))
  assert not os.path.exists(stale)
  assert sorted(os.listdir(res.dir)) == sorted(units.unit_id(u) + ".json" for u in us[:2])


def test_damaged_result_file_is_an_error(tmp_path):
  u = make_units()[0]
  res = units.UnitResults(str(tmp_path))
  with open(res.path(u), "w") as f:
    f.write("{not json")
  with pytest.raises(ValueError, match="delete it and rerun"):
    res.all()
  # A result stored under another unit's name is caught too.
  v = make_units()[1]
  res.write(v, {"UA": 1.0})
  os.replace(res.path(v), res.path(u))
  with pytest.raises(ValueError, match="disagree"):
    res.read(u)


def test_merge_is_independent_of_the_writers(tmp_path):
  us = make_units()
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  units.run_units(one, us, fake_result, 0, 1, progress=False)
  for p in (1, 0):  # another order of writing
    units.run_units(two, us, fake_result, p, 2, progress=False)
  units.merge(one, us)
  units.merge(two, us)
  a, b = (open(os.path.join(r, "results.json"), "rb").read() for r in (one, two))
  assert a == b and json.loads(a)["n_units"] == len(us)
  with pytest.raises(ValueError, match="1 of 13 units have no result"):
    units.merge(one, us + [{"method": "missing"}])
  # Only the listed units are merged when a list is given.
  assert [r["unit"] for r in units.merge(one, us[:2])] == sorted(
      (units.canonical(u) for u in us[:2]), key=lambda f: json.dumps(f, sort_keys=True, separators=(",", ":")))


WRITER = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {tests!r})
    from test_units import make_units, fake_result
    from saemnesia_jax.runtime import units
    root, i, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    done = units.run_units(root, make_units(), fake_result, i, n, progress=False)
    print(json.dumps({{"process": i, "written": done}}))
""")


def test_two_subprocesses_write_their_shares(tmp_path):
  script = tmp_path / "writer.py"
  script.write_text(WRITER.format(tests=os.path.dirname(__file__)))
  root = str(tmp_path / "two")
  procs = [subprocess.Popen([sys.executable, str(script), root, str(i), "2"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=60) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs
  assert [json.loads(o)["written"] for o, _ in outs] == [6, 6]
  ref = str(tmp_path / "one")
  units.run_units(ref, make_units(), fake_result, 0, 1, progress=False)
  assert units.merge(root, make_units()) == units.merge(ref, make_units())
  assert (open(os.path.join(root, "results.json"), "rb").read()
          == open(os.path.join(ref, "results.json"), "rb").read())


DISTRIBUTED = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {tests!r})
    from saemnesia_jax.runtime import units
    assert units.initialize_distributed()
    assert units.initialize_distributed()  # idempotent
    import jax
    from test_units import make_units, fake_result
    root = sys.argv[1]
    written = units.run_units(root, make_units(), fake_result, progress=False)
    merged = units.gather(root, make_units())
    print("REPORT " + json.dumps({{"index": jax.process_index(), "count": jax.process_count(),
                                  "devices": len(jax.devices()), "local": len(jax.local_devices()),
                                  "written": written, "merged": len(merged)}}))
""")


def test_local_launcher_with_jax_distributed(tmp_path):
  script = tmp_path / "dist.py"
  script.write_text(DISTRIBUTED.format(tests=os.path.dirname(__file__)))
  root, logs = str(tmp_path / "dist"), str(tmp_path / "logs")
  env = {k: v for k, v in os.environ.items() if not k.startswith("SAEMNESIA_") and k != "XLA_FLAGS"}
  env.update(SAEMNESIA_LOG_DIR=logs, SAEMNESIA_LOCAL_DEVICES="2", SAEMNESIA_INIT_TIMEOUT="60",
             PYTHON=sys.executable, JAX_PLATFORMS="cpu")
  p = subprocess.run(["bash", os.path.join(LAUNCH, "local.sh"), "2", sys.executable, str(script), root],
                     env=env, capture_output=True, text=True, timeout=150)
  logs_text = {f: open(os.path.join(logs, f)).read() for f in sorted(os.listdir(logs))}
  assert p.returncode == 0, (p.stderr, logs_text)
  assert sorted(logs_text) == ["process_0.log", "process_1.log"]
  reports = [json.loads(re.search(r"^REPORT (.*)$", logs_text[f"process_{i}.log"], re.M).group(1))
             for i in range(2)]
  assert reports == [{"index": i, "count": 2, "devices": 4, "local": 2, "written": 6, "merged": 12}
                     for i in range(2)]
  ref = str(tmp_path / "ref")
  units.run_units(ref, make_units(), fake_result, 0, 1, progress=False)
  units.merge(ref, make_units())
  assert (open(os.path.join(root, "results.json"), "rb").read()
          == open(os.path.join(ref, "results.json"), "rb").read())


def test_local_launcher_reports_a_failure(tmp_path):
  env = {**os.environ, "SAEMNESIA_LOG_DIR": str(tmp_path), "PYTHON": sys.executable}
  p = subprocess.run(["bash", os.path.join(LAUNCH, "local.sh"), "3", "bash", "-c",
                      'if [ "$SAEMNESIA_PROCESS_ID" = 1 ]; then echo boom; exit 7; fi; sleep 20'],
                     env=env, capture_output=True, text=True, timeout=15)
  assert p.returncode == 7
  assert "process 1 exited with status 7" in p.stderr and "boom" in p.stderr
  bad = subprocess.run(["bash", os.path.join(LAUNCH, "local.sh"), "zero", "true"], capture_output=True, text=True)
  assert bad.returncode == 2 and "positive integer" in bad.stderr


def _fake_bin(tmp_path, name, body):
  d = tmp_path / "bin"
  d.mkdir(exist_ok=True)
  f = d / name
  f.write_text("#!/usr/bin/env bash\n" + body)
  f.chmod(f.stat().st_mode | stat.S_IEXEC)
  return str(d)


SHOW_ENV = "import os; print('ENV', *[os.environ.get(k, '-') for k in " \
           "('SAEMNESIA_COORDINATOR', 'SAEMNESIA_NUM_PROCESSES', 'SAEMNESIA_PROCESS_ID', 'SAEMNESIA_AUTO_DISTRIBUTED')])"


def test_slurm_script_maps_the_slurm_variables(tmp_path):
  # Stand-ins for scontrol and srun: srun runs the task command once per task
  # with SLURM_PROCID / SLURM_NTASKS set, as SLURM does.
  _fake_bin(tmp_path, "scontrol", 'echo node-a1; echo node-b2\n')
  bin_dir = _fake_bin(tmp_path, "srun", textwrap.dedent("""
      while [[ $1 == --* ]]; do shift; done
      for i in 0 1; do SLURM_PROCID=$i SLURM_NTASKS=2 "$@" || exit $?; done
  """))
  env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"], "SLURM_JOB_NODELIST": "node-[a1,b2]",
         "SLURM_JOB_ID": "123456", "SLURM_NTASKS": "2"}
  for k in [k for k in env if k.startswith("SAEMNESIA_")]:
    env.pop(k)
  p = subprocess.run(["bash", os.path.join(LAUNCH, "slurm.sh"), sys.executable, "-c", SHOW_ENV],
                     env=env, capture_output=True, text=True, timeout=30)
  assert p.returncode == 0, p.stderr
  port = 20000 + 123456 % 20000
  assert p.stdout.split("\n")[:2] == [f"ENV node-a1:{port} 2 0 -", f"ENV node-a1:{port} 2 1 -"]
  outside = {k: v for k, v in env.items() if k != "SLURM_JOB_NODELIST"}
  p = subprocess.run(["bash", os.path.join(LAUNCH, "slurm.sh"), "true"], env=outside, capture_output=True, text=True)
  assert p.returncode != 0 and "sbatch" in p.stderr


def test_tpu_pod_script_runs_the_command_on_every_worker(tmp_path):
  # A stand-in gcloud: records its arguments and runs --command for 2 workers.
  log = tmp_path / "gcloud.args"
  bin_dir = _fake_bin(tmp_path, "gcloud", textwrap.dedent(f"""
      printf '%s\\n' "$@" > {str(log)!r}
      for a in "$@"; do [[ $a == --command=* ]] && cmd=${{a#--command=}}; done
      for w in 0 1; do (cd {str(tmp_path)!r} && bash -c "$cmd") || exit $?; done
  """))
  (tmp_path / "work dir").mkdir()
  env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"], "TPU_ZONE": "us-central2-b",
         "SAEMNESIA_REMOTE_DIR": "work dir"}
  for k in [k for k in env if k.startswith("SAEMNESIA_") and k != "SAEMNESIA_REMOTE_DIR"] + ["TPU_PROJECT"]:
    env.pop(k, None)
  p = subprocess.run(["bash", os.path.join(LAUNCH, "tpu_pod.sh"), "my-pod", sys.executable, "-c",
                      SHOW_ENV + "; print('CWD', os.path.basename(os.getcwd()))"],
                     env=env, capture_output=True, text=True, timeout=30)
  assert p.returncode == 0, p.stderr
  assert p.stdout.splitlines() == ["ENV - - - 1", "CWD work dir"] * 2
  args = log.read_text().splitlines()
  assert args[:6] == ["compute", "tpus", "tpu-vm", "ssh", "my-pod", "--zone=us-central2-b"]
  assert "--worker=all" in args
  p = subprocess.run(["bash", os.path.join(LAUNCH, "tpu_pod.sh"), "my-pod", "true"],
                     env={k: v for k, v in env.items() if k != "TPU_ZONE"}, capture_output=True, text=True)
  assert p.returncode != 0 and "TPU_ZONE" in p.stderr


def test_initialize_distributed_env_errors(monkeypatch):
  for k in list(os.environ):
    if k.startswith("SAEMNESIA_"):
      monkeypatch.delenv(k)
  assert units.initialize_distributed() is False  # nothing set: one process, nothing done
  monkeypatch.setenv("SAEMNESIA_COORDINATOR", "127.0.0.1:1")
  with pytest.raises(ValueError, match="SAEMNESIA_NUM_PROCESSES must be an integer"):
    units.initialize_distributed()
  monkeypatch.setenv("SAEMNESIA_NUM_PROCESSES", "2")
  monkeypatch.setenv("SAEMNESIA_PROCESS_ID", "2")
  with pytest.raises(ValueError, match=r"SAEMNESIA_PROCESS_ID=2 must be in \[0, SAEMNESIA_NUM_PROCESSES=2\)"):
    units.initialize_distributed()
  monkeypatch.setenv("SAEMNESIA_COORDINATOR", "no-port")
  with pytest.raises(ValueError, match="host:port"):
    units.initialize_distributed()
