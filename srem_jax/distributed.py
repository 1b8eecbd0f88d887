"""Joining JAX's distributed runtime when a run spans several processes.

Owns the `--coordinator_address`, `--num_processes` and `--process_id` flags and
`initialize`, which must run before any other JAX call. It starts
`jax.distributed` when the flags are given (launch/local.sh, or any launcher
that assigns ranks itself), on a TPU pod or multislice TPU VM, and under a
multi-task SLURM step; on a single process it does nothing, so the same command
runs on a laptop, one GPU host, a SLURM allocation or a TPU pod.

    _DISTRIBUTED = distributed.define_flags()
    ...
    distributed.initialize(*[flag.value for flag in _DISTRIBUTED])
"""

import glob
import importlib.util
import os
from typing import Callable

from absl import flags

from srem_jax.errors import UserError

FLAG_NAMES = ("coordinator_address", "num_processes", "process_id")

# Set by the TPU runtime on GKE, multislice and some pod setups; a GCE TPU VM
# may carry none of them and is recognised by its TPU devices instead.
_TPU_ENV_VARS = (
  "TPU_WORKER_HOSTNAMES",
  "TPU_PROCESS_ADDRESSES",
  "MEGASCALE_COORDINATOR_ADDRESS",
  "CLOUD_TPU_TASK_ID",
)
# jax's SLURM detection reads all of these; SLURM_STEP_NODELIST exists only
# inside an `srun` step, so a plain `python` in a batch script stays single.
_SLURM_ENV_VARS = (
  "SLURM_JOB_ID",
  "SLURM_STEP_NODELIST",
  "SLURM_NTASKS",
  "SLURM_PROCID",
  "SLURM_LOCALID",
)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS):
  """Defines the three flags; returns their holders in `initialize`'s order."""
  coordinator = flags.DEFINE_string(
    "coordinator_address",
    None,
    "host:port of process 0 for a multi-process run (with --num_processes and "
    "--process_id); not needed on TPU pods or under srun, which are detected.",
    flag_values=flag_values,
  )
  count = flags.DEFINE_integer(
    "num_processes",
    None,
    "Number of processes of a multi-process run.",
    flag_values=flag_values,
  )
  index = flags.DEFINE_integer(
    "process_id",
    None,
    "This process's rank in 0..num_processes-1.",
    flag_values=flag_values,
  )
  return coordinator, count, index


def _check_explicit(coordinator_address, num_processes, process_id) -> None:
  given = dict(zip(FLAG_NAMES, (coordinator_address, num_processes, process_id)))
  missing = [f"--{name}" for name, value in given.items() if value is None]
  if missing:
    present = [f"--{name}" for name, value in given.items() if value is not None]
    raise UserError(
      f"{' and '.join(missing)} missing: {', '.join(present)} given, but "
      "--coordinator_address, --num_processes and --process_id go together "
      "(launch/local.sh sets all three)"
    )
  host, _, port = coordinator_address.rpartition(":")
  if not host or not port.isdigit():
    raise UserError(
      f"--coordinator_address={coordinator_address!r}: expected host:port, "
      "e.g. 127.0.0.1:12355"
    )
  if num_processes < 1:
    raise UserError(f"--num_processes={num_processes}: expected at least 1")
  if not 0 <= process_id < num_processes:
    raise UserError(
      f"--process_id={process_id}: expected 0..{num_processes - 1} for "
      f"--num_processes={num_processes}"
    )


def _on_tpu_vm() -> bool:
  """A TPU VM has libtpu installed and TPU chips under /dev."""
  if importlib.util.find_spec("libtpu") is None:
    return False
  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def detected_cluster() -> str | None:
  """ "tpu" or "slurm" when jax can find every process from the environment."""
  if any(os.environ.get(name) for name in _TPU_ENV_VARS) or _on_tpu_vm():
    return "tpu"
  if all(name in os.environ for name in _SLURM_ENV_VARS):
    if int(os.environ["SLURM_NTASKS"]) > 1:
      return "slurm"
  return None


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  log: Callable[[str], None] = print,
) -> None:
  """Joins the distributed runtime when launched on several processes.

  Explicit flags win (all three, or none); otherwise a TPU pod or a multi-task
  SLURM step is detected and jax reads its ranks from there; otherwise this is
  a single process and jax starts on its own. Logs one line either way.
  """
  # jax is imported here, not at module level, so `--help` and flag mistakes
  # stay instant; importing it does not start a backend.
  import jax

  explicit = (coordinator_address, num_processes, process_id)
  if any(value is not None for value in explicit):
    _check_explicit(*explicit)
    if num_processes > 1:
      # The ranks are given: stop jax's SLURM detection from also restricting
      # each process to the GPU numbered SLURM_LOCALID, which would leave a
      # one-task-per-node job on a single GPU per node.
      jax.distributed.initialize(
        coordinator_address,
        num_processes,
        process_id,
        cluster_detection_method="deactivate",
      )
  elif detected_cluster() is not None:
    # jax's cluster detection fills in the coordinator, ranks and (under SLURM
    # on GPUs) one device per task. CPU collectives default to gloo in jax
    # 0.10, so CPU multi-process runs need no extra setting.
    jax.distributed.initialize()
  log(
    f"process {jax.process_index()} of {jax.process_count()}: "
    f"{jax.local_device_count()} local of {jax.device_count()} "
    f"{jax.default_backend()} devices"
  )
