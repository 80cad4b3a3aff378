#!/usr/bin/env bash
# Train fourfold on a Cloud TPU VM slice (one host or a multi-host pod) from your machine.
#
#   [VAR=value ...] bash launch/tpu_pod.sh {create|setup|mount|train|logs|stop|kill|copy|delete}
#
#   create   create the TPU VM slice
#   setup    on every worker: with BUCKET set, install gcsfuse and mount the bucket at
#            MOUNT_DIR; clone REPO_URL (or update the clone), make a Python venv,
#            pip install -e . and jax[tpu]
#   mount    on every worker: mount BUCKET at MOUNT_DIR unless it is mounted already
#            (`train` does this too, e.g. after the VMs restarted)
#   train    on every worker, the same `python -m train.main` command; each worker appends
#            its output to ~/fourfold-train.log. On a pod slice train.main initializes
#            jax.distributed by itself (no coordinator flags). DETACH=1 starts it in the
#            background and returns (see `logs` and `stop`).
#   logs     follow worker 0's log
#   stop     send SIGTERM to train.main on every worker: the processes agree on a step, save
#            a checkpoint there and exit 0; waits up to STOP_WAIT seconds for them. `train`
#            again resumes from that checkpoint.
#   kill     SIGKILL train.main on every worker (no checkpoint; `train` resumes from the last
#            one saved)
#   copy     copy a local WORKDIR from worker 0 to LOCAL_DIR (a bucket WORKDIR is already in
#            GCS: this prints the `gcloud storage cp` command that downloads it)
#   delete   delete the TPU VM slice
#
# Every variable below can be set in the environment, e.g.
#   TPU_NAME=my-pod BUCKET=my-bucket REPO_URL=https://github.com/<you>/fourfold.git \
#     bash launch/tpu_pod.sh setup
#
# WORKDIR must be a path (train.main refuses gs:// URLs) that every worker sees on a
# multi-host slice: every process writes its own shards of each checkpoint, and process 0
# alone writes metrics.jsonl, TensorBoard events and config.json. With BUCKET set, setup
# mounts the bucket with Cloud Storage FUSE (gcsfuse) at the same MOUNT_DIR on every worker
# and WORKDIR defaults to a directory in it, so gs://BUCKET/fourfold/runs/RUN_NAME holds the
# run. Without BUCKET, WORKDIR defaults to /tmp/runs/RUN_NAME on each worker's own disk,
# which works on a single-host slice only (v5litepod-1/4/8).
set -euo pipefail

TPU_NAME="${TPU_NAME:-fourfold}"                          # name of the TPU VM slice
ZONE="${ZONE:-us-west4-a}"                                # a zone that has ACCELERATOR_TYPE
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5litepod-16}"      # v5litepod-16: 16 v5e chips, 4 hosts
RUNTIME_VERSION="${RUNTIME_VERSION:-v2-alpha-tpuv5-lite}" # TPU VM image for v5e
PROJECT="${PROJECT:-}"                                    # empty: gcloud's configured project
EXTRA_CREATE_FLAGS="${EXTRA_CREATE_FLAGS:-}"              # e.g. --spot
REPO_URL="${REPO_URL:-}"                                  # git URL of fourfold (setup needs it)
GIT_REF="${GIT_REF:-}"                                    # branch/tag/commit; empty: default branch
REPO_DIR="${REPO_DIR:-fourfold}"                          # clone, relative to the remote home
VENV_DIR="${VENV_DIR:-fourfold-venv}"                     # venv, relative to the remote home
# The TPU VM images ship an older system Python than fourfold needs (>= 3.11): setup
# installs uv and lets it fetch this Python version for the venv.
PYTHON_VERSION="${PYTHON_VERSION:-3.12}"
CONFIG="${CONFIG:-configs/llama.py:size=1B}"
RUN_NAME="${RUN_NAME:-llama_1b}"
BUCKET="${BUCKET:-}"                                      # GCS bucket name, without gs://
MOUNT_DIR="${MOUNT_DIR:-/mnt/gcs/${BUCKET}}"              # where every worker mounts BUCKET
# gcsfuse flags. --implicit-dirs shows directories that exist only as object-name prefixes
# (written by gcloud storage, say). Orbax commits a checkpoint by renaming its temporary
# directory; on a bucket without hierarchical namespace gcsfuse renames a directory only if it
# holds fewer objects than --rename-dir-limit (0 by default, so every rename would fail).
GCSFUSE_FLAGS="${GCSFUSE_FLAGS:---implicit-dirs --rename-dir-limit=200000}"
if [[ -n "${BUCKET}" ]]; then
  WORKDIR="${WORKDIR:-${MOUNT_DIR}/fourfold/runs/${RUN_NAME}}"
else
  WORKDIR="${WORKDIR:-/tmp/runs/${RUN_NAME}}"
fi
# Extra train.main flags, split on spaces on the workers. Training keeps 16 bytes per
# parameter (float32 weights, gradients and two AdamW moments): about 14.5 GiB for the 974M
# parameters of the 1B Llama preset, close to a v5e chip's 16 GB of HBM. So the default
# shards them over all chips (FSDP) instead of replicating them on each; check a setting with
# `python -m launch.aot --config=... --topology=...` before creating the slice.
EXTRA_FLAGS="${EXTRA_FLAGS:---config.model.dtype=bfloat16 --config.mesh.data=1 --config.mesh.fsdp=-1}"
LOG_FILE="${LOG_FILE:-fourfold-train.log}"                # on each worker, relative to home
LOCAL_DIR="${LOCAL_DIR:-runs}"                            # where `copy` puts the workdir
DETACH="${DETACH:-0}"                                     # 1: train in the background
STOP_WAIT="${STOP_WAIT:-600}"                             # seconds `stop` waits for the exit

usage() {
  cat >&2 <<USAGE
usage: [VAR=value ...] bash $0 {create|setup|mount|train|logs|stop|kill|copy|delete}

  create  gcloud compute tpus tpu-vm create ${TPU_NAME} (${ACCELERATOR_TYPE}, ${RUNTIME_VERSION}, ${ZONE})
  setup   mount BUCKET with gcsfuse (if set), clone REPO_URL, pip install fourfold + jax[tpu]
          on every worker
  mount   mount BUCKET at ${MOUNT_DIR} on every worker (skipped where it is mounted)
  train   python -m train.main --config=${CONFIG} --workdir=${WORKDIR} on every worker
  logs    follow worker 0's ~/${LOG_FILE}
  stop    SIGTERM train.main on every worker: it saves a checkpoint and exits (resume: train)
  kill    SIGKILL train.main on every worker, without saving
  copy    copy a local WORKDIR from worker 0 to ${LOCAL_DIR}/
  delete  delete ${TPU_NAME}

Variables (environment): TPU_NAME ZONE ACCELERATOR_TYPE RUNTIME_VERSION PROJECT REPO_URL
GIT_REF CONFIG RUN_NAME BUCKET MOUNT_DIR GCSFUSE_FLAGS WORKDIR EXTRA_FLAGS DETACH STOP_WAIT
LOCAL_DIR (see the top of $0).
USAGE
}

q() { printf '%q' "$1"; }  # quotes a value for the bash scripts run on the workers

sh_quote() {
  # Single-quotes a whole script for the worker's login shell, whatever shell that is.
  local squote="'"
  printf "'%s'" "${1//${squote}/${squote}\\${squote}${squote}}"
}

tpu_vm() {
  # gcloud compute tpus tpu-vm <verb> <args...> with the zone and project.
  local verb="$1"
  shift
  gcloud compute tpus tpu-vm "${verb}" "$@" --zone="${ZONE}" ${PROJECT:+"--project=${PROJECT}"}
}

on_workers() {
  # Runs a bash script on the given worker(s) ("all" or an index).
  local worker="$1" script="$2"
  tpu_vm ssh "${TPU_NAME}" --worker="${worker}" --command="bash -c $(sh_quote "${script}")"
}

venv_prelude() {
  # shellcheck disable=SC2016  # $HOME expands on the worker
  printf 'set -euo pipefail; cd "$HOME"; . %s/bin/activate; cd %s' "$(q "${VENV_DIR}")" "$(q "${REPO_DIR}")"
}

# Installs gcsfuse from Google's apt repository (the route Cloud Storage FUSE documents for
# Ubuntu, which the TPU VM images run) where it is missing.
# shellcheck disable=SC2016  # expands on the worker
INSTALL_GCSFUSE='if ! command -v gcsfuse > /dev/null 2>&1; then
  echo "$(hostname): installing gcsfuse"
  echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main" |
    sudo tee /etc/apt/sources.list.d/gcsfuse.list > /dev/null
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg |
    sudo tee /usr/share/keyrings/cloud.google.asc > /dev/null
  sudo apt-get -q -o DPkg::Lock::Timeout=300 update
  sudo DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout=300 install gcsfuse
fi'

mount_script() {
  # Mounts BUCKET at MOUNT_DIR on a worker unless it is mounted already (idempotent). stat
  # fails on the mount of a gcsfuse that died, which is then unmounted and mounted again.
  local mnt bucket
  mnt="$(q "${MOUNT_DIR}")"
  bucket="$(q "${BUCKET}")"
  cat <<MOUNT
if mountpoint -q ${mnt} && stat ${mnt} > /dev/null 2>&1; then
  echo "\$(hostname): gs://${bucket} is mounted at ${mnt}"
else
  if ! command -v gcsfuse > /dev/null 2>&1; then
    echo "\$(hostname): gcsfuse is not installed; run: bash launch/tpu_pod.sh setup" >&2
    exit 1
  fi
  fusermount -u -z ${mnt} 2> /dev/null || true
  sudo mkdir -p ${mnt}
  sudo chown "\$(id -u):\$(id -g)" ${mnt}
  gcsfuse ${GCSFUSE_FLAGS} ${bucket} ${mnt}
  echo "\$(hostname): mounted gs://${bucket} at ${mnt}"
fi
MOUNT
}

need_bucket() {
  if [[ -z "${BUCKET}" ]]; then
    echo "$1: set BUCKET to the name of a GCS bucket (without gs://)" >&2
    exit 2
  fi
}

check_workdir() {
  if [[ "${WORKDIR}" == *://* ]]; then
    echo "WORKDIR=${WORKDIR}: train.main takes a path, not a URL." >&2
    if [[ "${WORKDIR}" == gs://*/* ]]; then
      local object="${WORKDIR#gs://}"
      echo "Use the bucket through its gcsfuse mount instead: BUCKET=${object%%/*}" \
        "WORKDIR=/mnt/gcs/${object} (setup mounts gs://${object%%/*} at" \
        "/mnt/gcs/${object%%/*} on every worker)." >&2
    else
      echo "Set BUCKET to mount a GCS bucket with gcsfuse on every worker, or give a path on" \
        "a filesystem every worker mounts." >&2
    fi
    exit 2
  fi
  local n="${ACCELERATOR_TYPE##*-}"
  # v2-8, v3-8, v4-8, v5p-8, v5litepod-8 and v6e-8 and smaller are one host; larger ones have
  # several (the number counts chips or TensorCores, at most 8 per host).
  if [[ -z "${BUCKET}" && "${n}" =~ ^[0-9]+$ ]] && ((n > 8)); then
    echo "warning: ${ACCELERATOR_TYPE} has several hosts, and without BUCKET WORKDIR=${WORKDIR}" \
      "must be a filesystem every worker mounts; a local /tmp workdir only works on a" \
      "single-host slice. Set BUCKET to mount a bucket with gcsfuse." >&2
  fi
}

cmd_create() {
  # shellcheck disable=SC2086  # EXTRA_CREATE_FLAGS is a list of flags
  tpu_vm create "${TPU_NAME}" --accelerator-type="${ACCELERATOR_TYPE}" \
    --version="${RUNTIME_VERSION}" ${EXTRA_CREATE_FLAGS}
}

cmd_setup() {
  if [[ -z "${REPO_URL}" ]]; then
    echo "setup: set REPO_URL to the git URL of fourfold" >&2
    exit 2
  fi
  local repo venv update gcs=""
  repo="$(q "${REPO_DIR}")"
  venv="$(q "${VENV_DIR}")"
  if [[ -n "${GIT_REF}" ]]; then
    update="git -C ${repo} fetch -q origin && git -C ${repo} checkout -q $(q "${GIT_REF}")"
  else
    update="git -C ${repo} pull -q --ff-only"
  fi
  if [[ -n "${BUCKET}" ]]; then
    gcs="${INSTALL_GCSFUSE}
$(mount_script)"
  fi
  on_workers all "set -euo pipefail; cd \"\$HOME\"
${gcs}
[ -d ${repo}/.git ] || git clone -q $(q "${REPO_URL}") ${repo}
${update}
python3 -m pip install -q --user --upgrade uv || curl -LsSf https://astral.sh/uv/install.sh | sh
UV=\"\$HOME/.local/bin/uv\"
[ -x ${venv}/bin/python ] || \"\$UV\" venv -q --python $(q "${PYTHON_VERSION}") ${venv}
\"\$UV\" pip install -q --python ${venv}/bin/python -e ${repo} 'jax[tpu]'
${venv}/bin/python -c 'import sys, jax; print(sys.version.split()[0], \"jax\", jax.__version__)'"
}

cmd_mount() {
  need_bucket mount
  on_workers all "set -euo pipefail
$(mount_script)"
}

train_command() {
  printf 'python -m train.main --config=%s --workdir=%s %s' \
    "$(q "${CONFIG}")" "$(q "${WORKDIR}")" "${EXTRA_FLAGS}"
}

cmd_train() {
  check_workdir
  local log mount=""
  log="\"\$HOME\"/$(q "${LOG_FILE}")"
  if [[ -n "${BUCKET}" ]]; then
    mount="$(mount_script)"
  fi
  if [[ "${DETACH}" == 1 ]]; then
    on_workers all "$(venv_prelude)
${mount}
nohup $(train_command) >> ${log} 2>&1 < /dev/null &
echo \"\$(hostname): started pid \$!, log ${log}\""
  else
    on_workers all "$(venv_prelude)
${mount}
$(train_command) 2>&1 | tee -a ${log}"
  fi
}

cmd_logs() {
  on_workers 0 "tail -n 100 -F \"\$HOME\"/$(q "${LOG_FILE}")"
}

# pgrep/pkill pattern for the train.main process, whose command line starts with python. It
# does not match the shells that gcloud ssh runs, whose command lines hold the train command
# (`train`) or this pattern (`stop`, `kill`; [.] does not match the text "[.]").
TRAIN_PATTERN="'^[^ ]*python[0-9.]* -m train[.]main( |\$)'"

cmd_stop() {
  on_workers all "pattern=${TRAIN_PATTERN}
if ! pgrep -f \"\$pattern\" > /dev/null; then
  echo \"\$(hostname): train.main is not running\"
  exit 0
fi
pkill -TERM -f \"\$pattern\"
echo \"\$(hostname): sent SIGTERM to train.main; it saves a checkpoint and exits\"
waited=0
while pgrep -f \"\$pattern\" > /dev/null; do
  if [ \"\$waited\" -ge $(q "${STOP_WAIT}") ]; then
    echo \"\$(hostname): train.main still runs after \${waited}s; see ~/$(q "${LOG_FILE}"), or SIGKILL it with: bash launch/tpu_pod.sh kill\" >&2
    exit 1
  fi
  sleep 5
  waited=\$((waited + 5))
done
echo \"\$(hostname): train.main exited\""
}

cmd_kill() {
  on_workers all "pattern=${TRAIN_PATTERN}
if pkill -KILL -f \"\$pattern\"; then
  echo \"\$(hostname): killed train.main (SIGKILL, no checkpoint)\"
else
  echo \"\$(hostname): train.main is not running\"
fi"
}

cmd_copy() {
  if [[ -n "${BUCKET}" && "${WORKDIR}" == "${MOUNT_DIR}"/* ]]; then
    local object="gs://${BUCKET}/${WORKDIR#"${MOUNT_DIR}"/}"
    echo "WORKDIR=${WORKDIR} is ${object} (mounted with gcsfuse); nothing to copy from" \
      "the workers. Download it with:" >&2
    echo "  gcloud storage cp -r ${object} ${LOCAL_DIR}/   # or: gsutil -m cp -r ..." >&2
    return 0
  fi
  mkdir -p "${LOCAL_DIR}"
  tpu_vm scp --recurse --worker=0 "${TPU_NAME}:${WORKDIR}" "${LOCAL_DIR}/"
}

cmd_delete() {
  tpu_vm delete "${TPU_NAME}" --quiet
}

case "${1:-}" in
  create | setup | mount | train | logs | stop | kill | copy | delete)
    "cmd_$1"
    ;;
  -h | --help | help)
    usage
    ;;
  *)
    usage
    exit 2
    ;;
esac
