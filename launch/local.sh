#!/usr/bin/env bash
# Runs one command as N cooperating JAX processes on this machine (CPU).
#
# Each process gets --coordinator_address=127.0.0.1:PORT --num_processes=N
# --process_id=i appended to the arguments given here, sees
# DEVICES_PER_PROCESS fake CPU devices, and writes its own log file. The
# script waits for all of them and exits non-zero if any failed (printing the
# tail of that process's log).
#
#   NUM_PROCESSES=2 launch/local.sh --config=configs/demo.py --workdir=workdirs/demo-2p
#
# Variables (all optional):
#   NUM_PROCESSES        processes to start (default 2)
#   DEVICES_PER_PROCESS  CPU devices each process sees (default 1)
#   PYTHON               interpreter (default: python3)
#   ENTRY                module to run with -m, or a path to a .py script
#                        (default srem_jax.main)
#   PORT                 coordinator port on 127.0.0.1 (default: a free one)
#   LOG_DIR              folder for process<i>.log (default logs/local-<time>)
#   DRY_RUN=1            print the commands instead of running them
set -euo pipefail

NUM_PROCESSES="${NUM_PROCESSES:-2}"
DEVICES_PER_PROCESS="${DEVICES_PER_PROCESS:-1}"
PYTHON="${PYTHON:-python3}"
ENTRY="${ENTRY:-srem_jax.main}"
LOG_DIR="${LOG_DIR:-logs/local-$(date +%Y%m%d-%H%M%S)}"
DRY_RUN="${DRY_RUN:-0}"

die() {
  echo "launch/local.sh: $*" >&2
  exit 2
}

[[ "$NUM_PROCESSES" =~ ^[1-9][0-9]*$ ]] ||
  die "NUM_PROCESSES=$NUM_PROCESSES: expected a positive integer"
[[ "$DEVICES_PER_PROCESS" =~ ^[1-9][0-9]*$ ]] ||
  die "DEVICES_PER_PROCESS=$DEVICES_PER_PROCESS: expected a positive integer"
command -v "$PYTHON" >/dev/null || die "PYTHON=$PYTHON: no such interpreter"
if [[ "$ENTRY" == *.py ]]; then
  [[ -f "$ENTRY" ]] || die "ENTRY=$ENTRY: no such script"
  entry=("$ENTRY")
else
  entry=(-m "$ENTRY")
fi

if [[ -z "${PORT:-}" ]]; then
  # Bind port 0 and read what the kernel chose; it is free a moment later too.
  PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi
[[ "$PORT" =~ ^[0-9]+$ ]] || die "PORT=$PORT: expected a port number"

# Multi-process CPU runs need the CPU backend; a GPU/TPU on this machine
# would otherwise be shared by every process.
export JAX_PLATFORMS=cpu
export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS"

# Sets `cmd` to the command line of process $1.
process_command() {
  cmd=("$PYTHON" "${entry[@]}" "${args[@]}"
    "--coordinator_address=127.0.0.1:$PORT"
    "--num_processes=$NUM_PROCESSES"
    "--process_id=$1")
}
args=("$@")

if [[ "$DRY_RUN" == 1 ]]; then
  echo "export JAX_PLATFORMS=$JAX_PLATFORMS XLA_FLAGS=$(printf '%q' "$XLA_FLAGS")"
  echo "mkdir -p $(printf '%q' "$LOG_DIR")"
  for ((i = 0; i < NUM_PROCESSES; i++)); do
    process_command "$i"
    echo "$(printf '%q ' "${cmd[@]}")> $(printf '%q' "$LOG_DIR/process$i.log") 2>&1 &"
  done
  echo "wait"
  exit 0
fi

mkdir -p "$LOG_DIR"
pids=()
# Sends signal $1 to every process still running.
signal_all() {
  for pid in "${pids[@]}"; do
    [[ -z "$pid" ]] || kill "-$1" "$pid" 2>/dev/null || true
  done
}
# Background processes of a script ignore Ctrl-C; pass it on as SIGTERM, on
# which training saves a checkpoint and exits (rerun to resume).
trap 'signal_all TERM; wait; exit 130' INT TERM

for ((i = 0; i < NUM_PROCESSES; i++)); do
  process_command "$i"
  "${cmd[@]}" >"$LOG_DIR/process$i.log" 2>&1 &
  pids+=("$!")
done
echo "started $NUM_PROCESSES processes (coordinator 127.0.0.1:$PORT); logs in $LOG_DIR/"

# Poll rather than wait in rank order: when one process dies, the others
# block in their next collective, so they are killed as soon as it is seen
# (SIGTERM would not do: its checkpoint save needs the dead process too).
status=0
running=$NUM_PROCESSES
while ((running > 0)); do
  sleep 1
  for ((i = 0; i < NUM_PROCESSES; i++)); do
    pid="${pids[$i]}"
    if [[ -z "$pid" ]] || kill -0 "$pid" 2>/dev/null; then
      continue # already collected, or still running
    fi
    code=0
    wait "$pid" || code=$?
    pids[i]=""
    running=$((running - 1))
    if ((code != 0 && status == 0)); then
      status=$code
      echo "process $i failed (exit $code); last lines of $LOG_DIR/process$i.log:" >&2
      tail -n 20 "$LOG_DIR/process$i.log" >&2
      signal_all KILL
    fi
  done
done
exit "$status"
