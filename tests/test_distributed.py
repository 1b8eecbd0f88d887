"""Joining the distributed runtime, and training on 2 processes = on 1 process.

The unit tests mock `jax.distributed.initialize` and check when it is called
and with what. The end-to-end test starts tests/distributed_driver.py twice at
once: as 2 processes with 1 CPU device each through launch/local.sh, and as 1
process with 2 devices; both see the same global batches and must end with
the same parameters.
"""

import json
import os
import pathlib
import subprocess
import sys
import time
from unittest import mock

import chex
import numpy as np
import pytest
import xla_env
from absl import flags

from srem_jax import distributed
from srem_jax.errors import UserError

REPO = pathlib.Path(__file__).resolve().parents[1]
LOCAL_SH = REPO / "launch" / "local.sh"
DRIVER = REPO / "tests" / "distributed_driver.py"

CLUSTER_VARS = distributed._TPU_ENV_VARS + distributed._SLURM_ENV_VARS


@pytest.fixture
def bare_env(monkeypatch):
  """No cluster in sight; yields the mocked `jax.distributed.initialize`."""
  for name in CLUSTER_VARS:
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(distributed, "_on_tpu_vm", lambda: False)
  with mock.patch("jax.distributed.initialize") as init:
    yield init


def test_single_process_does_not_start_the_runtime(bare_env):
  lines = []
  distributed.initialize(log=lines.append)
  bare_env.assert_not_called()
  assert lines == ["process 0 of 1: 8 local of 8 cpu devices"]


def test_explicit_flags_start_the_runtime_without_cluster_detection(bare_env):
  distributed.initialize("10.0.0.1:1234", 4, 3, log=lambda line: None)
  bare_env.assert_called_once_with(
    "10.0.0.1:1234", 4, 3, cluster_detection_method="deactivate"
  )


def test_explicit_single_process_does_not_start_the_runtime(bare_env):
  distributed.initialize("127.0.0.1:1234", 1, 0, log=lambda line: None)
  bare_env.assert_not_called()


@pytest.mark.parametrize(
  "given, missing",
  [
    (dict(coordinator_address="h:1"), "--num_processes and --process_id missing"),
    (dict(num_processes=2, process_id=0), "--coordinator_address missing"),
    (dict(coordinator_address="h:1", num_processes=2), "--process_id missing"),
  ],
)
def test_some_explicit_flags_name_the_missing_ones(bare_env, given, missing):
  with pytest.raises(UserError, match=missing):
    distributed.initialize(**given)
  bare_env.assert_not_called()


@pytest.mark.parametrize(
  "args, field",
  [
    (("localhost", 2, 0), "--coordinator_address='localhost'"),
    (("h:1", 2, 2), "--process_id=2: expected 0..1"),
    (("h:1", 0, 0), "--num_processes=0"),
  ],
)
def test_bad_explicit_values_are_user_errors(bare_env, args, field):
  with pytest.raises(UserError, match=field):
    distributed.initialize(*args)
  bare_env.assert_not_called()


SRUN_ENV = dict(
  SLURM_JOB_ID="77",
  SLURM_STEP_NODELIST="gpu[01-02]",
  SLURM_PROCID="1",
  SLURM_LOCALID="1",
)


@pytest.mark.parametrize(
  "env, detected",
  [
    ({**SRUN_ENV, "SLURM_NTASKS": "4"}, True),
    ({**SRUN_ENV, "SLURM_NTASKS": "1"}, False),
    # An sbatch script that runs python without srun has no step.
    (dict(SLURM_JOB_ID="77", SLURM_NTASKS="4", SLURM_PROCID="0"), False),
    (dict(TPU_WORKER_HOSTNAMES="t-w-0,t-w-1"), True),
    (dict(MEGASCALE_COORDINATOR_ADDRESS="10.0.0.2"), True),
  ],
)
def test_clusters_are_left_to_jax_detection(bare_env, monkeypatch, env, detected):
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  distributed.initialize(log=lambda line: None)
  if detected:
    bare_env.assert_called_once_with()
  else:
    bare_env.assert_not_called()


def test_tpu_vm_without_env_vars_is_detected(bare_env, monkeypatch):
  monkeypatch.setattr(distributed, "_on_tpu_vm", lambda: True)
  distributed.initialize(log=lambda line: None)
  bare_env.assert_called_once_with()


def test_flags_parse_into_initialize_arguments():
  flag_values = flags.FlagValues()
  holders = distributed.define_flags(flag_values)
  flag_values(
    ["prog", "--coordinator_address=h:9", "--num_processes=3", "--process_id=2"]
  )
  assert [h.value for h in holders] == ["h:9", 3, 2]


# ---- launch/local.sh ---------------------------------------------------------


def launcher_env(**extra):
  """This environment without conftest's 8 devices, plus `extra`."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(PYTHON=sys.executable, **extra)
  return env


def test_local_launcher_dry_run_prints_every_rank(tmp_path):
  out = subprocess.run(
    ["bash", str(LOCAL_SH), "--config=configs/demo.py"],
    env=launcher_env(
      DRY_RUN="1", NUM_PROCESSES="3", PORT="4321", LOG_DIR=str(tmp_path / "logs")
    ),
    capture_output=True,
    text=True,
    check=True,
  ).stdout
  for rank in range(3):
    assert (
      f"-m srem_jax.main --config=configs/demo.py "
      f"--coordinator_address=127.0.0.1:4321 --num_processes=3 "
      f"--process_id={rank} > {tmp_path}/logs/process{rank}.log"
    ) in out
  assert not (tmp_path / "logs").exists()


def test_local_launcher_fails_fast_when_one_process_fails(tmp_path):
  script = tmp_path / "rank.py"
  script.write_text(
    "import sys, time\nif '--process_id=1' in sys.argv: sys.exit(3)\ntime.sleep(60)\n"
  )
  start = time.monotonic()
  result = subprocess.run(
    ["bash", str(LOCAL_SH)],
    env=launcher_env(ENTRY=str(script), LOG_DIR=str(tmp_path / "logs")),
    capture_output=True,
    text=True,
  )
  assert result.returncode == 3
  assert "process 1 failed (exit 3)" in result.stderr
  # Process 0 was stopped rather than waited for.
  assert time.monotonic() - start < 30


# ---- 2 processes x 1 device == 1 process x 2 devices --------------------------


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_two_devices(tmp_path):
  single = subprocess.Popen(
    [sys.executable, str(DRIVER), f"--out={tmp_path}/single"],
    env={
      **launcher_env(),
      "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": xla_env.flags(2),
    },
    cwd=REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  multi = subprocess.run(
    ["bash", str(LOCAL_SH), f"--out={tmp_path}/multi"],
    env=launcher_env(
      ENTRY=str(DRIVER),
      NUM_PROCESSES="2",
      LOG_DIR=str(tmp_path / "logs"),
      XLA_FLAGS=xla_env.FAST_COMPILE,
    ),
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  single_log, _ = single.communicate(timeout=300)
  assert single.returncode == 0, single_log
  assert multi.returncode == 0, multi.stderr

  reference = dict(np.load(tmp_path / "single.process0.npz"))
  np.testing.assert_array_equal(reference["devices"], [2, 2])
  trained = {k: v for k, v in reference.items() if k.startswith("params/")}
  moved = max(np.abs(v - reference[f"initial_{k}"]).max() for k, v in trained.items())
  assert moved > 1e-3, "the steps did not change the parameters"
  for rank in range(2):
    result = dict(np.load(tmp_path / f"multi.process{rank}.npz"))
    np.testing.assert_array_equal(result.pop("devices"), [1, 2])
    chex.assert_trees_all_close(
      result,
      {k: v for k, v in reference.items() if k != "devices"},
      rtol=1e-5,
      atol=1e-6,
    )


@pytest.mark.slow
def test_main_command_on_two_processes_writes_one_set_of_outputs(tmp_path):
  """The whole main job, checkpoints and evaluation included, on 2 processes."""
  overrides = [
    "--config=configs/demo.py",
    f"--workdir={tmp_path}/run",
    f"--config.data.raw_dir={tmp_path}/data",
    "--config.data.synthetic.num_train=24",
    "--config.data.synthetic.num_dev=10",
    "--config.data.synthetic.num_test=10",
    "--config.data.synthetic.num_regions=4",
    "--config.data.synthetic.feature_dim=16",
    "--config.model.img_dim=16",
    "--config.model.embed_dim=16",
    "--config.model.word_dim=8",
    "--config.model.sim_dim=8",
    "--config.train.epochs=2",
    "--config.train.warmup_epochs=1",
    "--config.train.batch_size=16",
    "--config.execution.img_tile=8",
  ]
  result = subprocess.run(
    ["bash", str(LOCAL_SH), *overrides],
    env=launcher_env(
      NUM_PROCESSES="2", LOG_DIR=str(tmp_path / "logs"), XLA_FLAGS=xla_env.FAST_COMPILE
    ),
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr
  run = tmp_path / "run"
  assert (run / "results.json").is_file()
  splits = [
    json.loads(line)["split"]
    for line in (run / "metrics.jsonl").read_text().splitlines()
  ]
  assert splits == ["train", "val", "train", "val", "test"]  # process 0 alone wrote
  for rank in range(2):
    log = (tmp_path / "logs" / f"process{rank}.log").read_text()
    assert f"process {rank} of 2" in log and "best epoch" in log
