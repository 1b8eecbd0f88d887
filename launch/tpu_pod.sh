#!/usr/bin/env bash
# Trains on a Cloud TPU VM or pod slice: creates the TPU (or reuses it), copies
# this checkout to every worker, installs it, and runs the main command on all
# workers at once. jax finds the other workers by itself
# (srem_jax.distributed), and the workdir lives in a gs:// bucket shared by
# every worker, so running this script again resumes the run.
#
#   TPU_NAME=srem-v4 ZONE=us-central2-b ACCELERATOR_TYPE=v4-32 \
#   WORKDIR=gs://my-bucket/srem/flickr-40 CONFIG=configs/flickr.py \
#   DATA_SRC=gs://my-bucket/data launch/tpu_pod.sh --config.noise.ratio=0.4
#
# Arguments after the variables are passed to `python -m srem_jax.main`.
#
# Required:
#   TPU_NAME          name of the TPU VM (created when it does not exist)
#   ZONE              its zone, e.g. us-central2-b
#   CONFIG            config file inside this checkout, e.g. configs/flickr.py
#   WORKDIR           gs://bucket/path of the run (checkpoints, metrics)
# Required only to create the TPU:
#   ACCELERATOR_TYPE  e.g. v4-32, v5litepod-16
# Optional:
#   PROJECT           gcloud project (default: gcloud's configured one)
#   RUNTIME_VERSION   TPU VM image (default tpu-ubuntu2204-base)
#   SPOT=1            create a Spot TPU (preemptible; rerun to resume)
#   DATA_SRC          gs:// folder copied to each worker's disk as the data
#                     root (the SCAN folders and vocab/, as configs expect
#                     under data/); without it the config's data.raw_dir is used
#   REMOTE_DIR        checkout folder in the workers' home (default srem_jax)
#   DRY_RUN=1         print the gcloud commands instead of running them
set -euo pipefail

RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
REMOTE_DIR="${REMOTE_DIR:-srem_jax}"
DRY_RUN="${DRY_RUN:-0}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

die() {
  echo "launch/tpu_pod.sh: $*" >&2
  exit 2
}

for name in TPU_NAME ZONE CONFIG WORKDIR; do
  [[ -n "${!name:-}" ]] || die "$name is not set (see the variables at the top of this script)"
done
[[ "$WORKDIR" == gs://* ]] ||
  die "WORKDIR=$WORKDIR: expected a gs:// path, which every worker sees and a rerun resumes from"
[[ -f "$REPO_ROOT/$CONFIG" ]] || die "CONFIG=$CONFIG: no such file in $REPO_ROOT"
[[ "$REMOTE_DIR" =~ ^[A-Za-z0-9._-]+$ ]] ||
  die "REMOTE_DIR=$REMOTE_DIR: expected one folder name (it sits in the workers' home)"
[[ -z "${DATA_SRC:-}" || "$DATA_SRC" == gs://* ]] ||
  die "DATA_SRC=$DATA_SRC: expected a gs:// folder"
if [[ "$DRY_RUN" != 1 ]]; then
  command -v gcloud >/dev/null || die "gcloud not found; install the Google Cloud CLI"
fi

# Prints a command (DRY_RUN=1) or runs it.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}

tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$ZONE")
if [[ -n "${PROJECT:-}" ]]; then
  where+=(--project="$PROJECT")
fi

# ---- TPU VM: reuse or create -------------------------------------------------
if [[ "$DRY_RUN" != 1 ]] && "${tpu[@]}" describe "$TPU_NAME" "${where[@]}" >/dev/null 2>&1; then
  echo "reusing TPU $TPU_NAME in $ZONE"
else
  [[ -n "${ACCELERATOR_TYPE:-}" ]] ||
    die "TPU $TPU_NAME not found in $ZONE: set ACCELERATOR_TYPE (e.g. v4-32) to create it"
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "# unless \`${tpu[*]} describe $TPU_NAME\` finds it:"
  fi
  create=("${tpu[@]}" create "$TPU_NAME" "${where[@]}"
    --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION")
  if [[ "${SPOT:-0}" == 1 ]]; then
    create+=(--spot)
  fi
  run "${create[@]}"
fi

# ---- code and dependencies on every worker ------------------------------------
# The checkout as it is now (uncommitted edits included), without data or runs.
archive="$(mktemp -t srem_jax.XXXXXX.tar.gz)"
trap 'rm -f "$archive"' EXIT
run tar -czf "$archive" -C "$REPO_ROOT" --exclude=.git --exclude=./data \
  --exclude=./workdirs --exclude=./logs --exclude='*.egg-info' --exclude=__pycache__ .
run "${tpu[@]}" scp "$archive" "$TPU_NAME:srem_jax.tar.gz" "${where[@]}" --worker=all

setup="set -e; mkdir -p $REMOTE_DIR && tar -xzf srem_jax.tar.gz -C $REMOTE_DIR"
setup+="; [ -d srem_venv ] || python3 -m venv srem_venv"
# The package pins jax; jax[tpu] of the same version adds the matching libtpu.
setup+="; srem_venv/bin/pip install -q -e ./$REMOTE_DIR 'jax[tpu]==0.10.2'"
data_flag=()
if [[ -n "${DATA_SRC:-}" ]]; then
  setup+="; mkdir -p srem_data && gcloud storage rsync -r $(printf '%q' "$DATA_SRC") srem_data"
  data_flag=(--config.data.raw_dir=../srem_data)
fi
run "${tpu[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command="$setup"

# ---- train on all workers ------------------------------------------------------
# In the foreground: run this script from tmux/screen. If it is cut off, run it
# again; the run resumes from the last checkpoint in WORKDIR.
main=(../srem_venv/bin/python -m srem_jax.main --config="$CONFIG" --workdir="$WORKDIR"
  "${data_flag[@]}" "$@")
# `cd` so that configs/ and relative data paths resolve as they do locally.
train="cd $REMOTE_DIR && $(printf '%q ' "${main[@]}")"
run "${tpu[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command="$train"
