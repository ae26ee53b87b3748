#!/usr/bin/env bash
# Submits a multi-node GPU run of calm_jax to SLURM.
#
# One process per node, each seeing all of its node's GPUs. The job exports
# JAX_COORDINATOR_ADDRESS (first node) and JAX_NUM_PROCESSES, and each task
# sets JAX_PROCESS_ID from SLURM_PROCID; calm_jax.distributed reads them.
# Run from the repository root on a filesystem all nodes share.
#
#   launch/slurm_gpu.sh --nodes=2 --gpus_per_node=8 \
#     --config=experiments/kv_arithmetic.py --workdir=/shared/runs/run1 \
#     [--partition=P] [--account=A] [--time=HH:MM:SS] [--python=python3] \
#     [--dry-run] [-- --config.train.steps=100]
#
# --dry-run (or DRY_RUN=1) prints the sbatch command and job script instead.
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
die() { echo "slurm_gpu.sh: error: $*" >&2; exit 2; }

nodes="" gpus="" config="" workdir="" partition="" account="" time_limit=""
python="python3" dry_run="${DRY_RUN:-0}"
extra=()
while (($#)); do
  case "$1" in
    --nodes=*) nodes="${1#*=}" ;;
    --gpus_per_node=*) gpus="${1#*=}" ;;
    --config=*) config="${1#*=}" ;;
    --workdir=*) workdir="${1#*=}" ;;
    --partition=*) partition="${1#*=}" ;;
    --account=*) account="${1#*=}" ;;
    --time=*) time_limit="${1#*=}" ;;
    --python=*) python="${1#*=}" ;;
    --dry-run|--dry_run) dry_run=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) usage; die "unknown argument '$1' (calm_jax.main flags go after '--')." ;;
  esac
  shift
done

[[ "$nodes" =~ ^[1-9][0-9]*$ ]] \
  || die "--nodes='$nodes' must be a positive integer."
[[ "$gpus" =~ ^[1-9][0-9]*$ ]] \
  || die "--gpus_per_node='$gpus' must be a positive integer (GPUs per node)."
[[ -d calm_jax ]] || die "run from the repository root (no calm_jax/ in $(pwd))."
[[ -n "$config" ]] || die "--config=PATH[:variant] is required."
[[ -f "${config%%:*}" ]] \
  || die "--config: file '${config%%:*}' not found (relative to $(pwd))."
[[ -n "$workdir" ]] \
  || die "--workdir=DIR is required (on a filesystem all nodes share, or gs://)."

sbatch_cmd=(sbatch --job-name=calm_jax "--nodes=$nodes" --ntasks-per-node=1
  "--gpus-per-node=$gpus" "--chdir=$(pwd)" --output=slurm-%j.out)
[[ -n "$partition" ]] && sbatch_cmd+=("--partition=$partition")
[[ -n "$account" ]] && sbatch_cmd+=("--account=$account")
[[ -n "$time_limit" ]] && sbatch_cmd+=("--time=$time_limit")

main_cmd=$(printf '%q ' "$python" -m calm_jax.main "--config=$config" \
  "--workdir=$workdir" ${extra[@]+"${extra[@]}"})
# The job script. \$ defers expansion to the job; JAX_PROCESS_ID must be set
# inside each task, hence the single-quoted bash -c.
job=$(cat <<EOF
#!/usr/bin/env bash
set -euo pipefail
# sed, not head: head exits early, and the SIGPIPE fails the job (pipefail).
head_node=\$(scontrol show hostnames "\$SLURM_JOB_NODELIST" | sed -n 1p)
# A port derived from the job id, so jobs sharing a node do not collide.
export JAX_COORDINATOR_ADDRESS="\$head_node:\$((61440 + SLURM_JOB_ID % 4096))"
export JAX_NUM_PROCESSES="\$SLURM_NNODES"
srun --ntasks-per-node=1 --kill-on-bad-exit=1 \\
  bash -c 'export JAX_PROCESS_ID=\$SLURM_PROCID; exec "\$@"' _ ${main_cmd% }
EOF
)

if [[ "$dry_run" == 1 ]]; then
  quote "${sbatch_cmd[@]}"; echo '<<JOB'
  printf '%s\nJOB\n' "$job"
else
  command -v sbatch >/dev/null || die "sbatch not found; run on a SLURM login node."
  sbatch "${sbatch_cmd[@]:1}" <<<"$job"
fi
