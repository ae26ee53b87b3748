#!/usr/bin/env bash
# Runs calm_jax on every worker of a Cloud TPU VM pod slice.
#
# One process per TPU VM host; calm_jax.distributed.initialize finds the pod
# through JAX's TPU auto-detection, so no coordinator is passed here. The
# repository must already be on every worker at --repo_dir (see README.md).
#
#   launch/tpu_pod.sh --tpu=my-v4-32 --zone=us-central2-b \
#     --config=experiments/kv_arithmetic.py --workdir=gs://bucket/run1 \
#     [--project=P] [--worker=all] [--repo_dir='~/calm_jax'] [--dry-run] \
#     [-- --config.train.steps=100]
#
# --dry-run (or DRY_RUN=1) prints the gcloud command instead of running it.
set -euo pipefail

# The usage text is the header comment.
usage() { awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0" >&2; }
# Prints arguments as shell words, quoting only where needed.
quote() {
  local a
  for a; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then printf '%s ' "$a"
    else printf "'%s' " "${a//\'/\'\\\'\'}"; fi
  done
}
die() { echo "tpu_pod.sh: error: $*" >&2; exit 2; }

tpu="" zone="" project="" config="" workdir="" worker="all"
repo_dir='~/calm_jax' python="python3" dry_run="${DRY_RUN:-0}"
extra=()
while (($#)); do
  case "$1" in
    --tpu=*) tpu="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --config=*) config="${1#*=}" ;;
    --workdir=*) workdir="${1#*=}" ;;
    --worker=*) worker="${1#*=}" ;;
    --repo_dir=*) repo_dir="${1#*=}" ;;
    --python=*) python="${1#*=}" ;;
    --dry-run|--dry_run) dry_run=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) usage; die "unknown argument '$1' (calm_jax.main flags go after '--')." ;;
  esac
  shift
done

[[ -n "$tpu" ]] || die "--tpu=NAME is required (the TPU VM name)."
[[ -n "$zone" ]] || die "--zone=ZONE is required (e.g. --zone=us-central2-b)."
[[ -n "$config" ]] || die "--config=PATH[:variant] is required."
[[ -n "$workdir" ]] || die "--workdir=gs://BUCKET/DIR is required."
# Pod hosts share no disk: checkpoints written to a local path would be split
# across hosts and unreadable on restore.
[[ "$workdir" == gs://* ]] \
  || die "--workdir='$workdir' must be a gs:// path (pod hosts share no disk)."
[[ "$worker" == all || "$worker" =~ ^[0-9]+(,[0-9]+)*$ ]] \
  || die "--worker='$worker' must be 'all' or worker indices like 0,1."

# The remote command, each argument quoted for the remote shell. repo_dir is
# left unquoted so that a leading '~' expands on the worker.
remote="cd $repo_dir && $(printf '%q ' "$python" -m calm_jax.main \
  "--config=$config" "--workdir=$workdir" ${extra[@]+"${extra[@]}"})"
cmd=(gcloud compute tpus tpu-vm ssh "$tpu" "--zone=$zone" "--worker=$worker")
[[ -n "$project" ]] && cmd+=("--project=$project")
cmd+=("--command=${remote% }")

if [[ "$dry_run" == 1 ]]; then
  quote "${cmd[@]}"; echo
else
  command -v gcloud >/dev/null || die "gcloud not found; install the Cloud SDK."
  exec "${cmd[@]}"
fi
