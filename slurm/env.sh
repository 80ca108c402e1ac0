# Common environment for the sbatch scripts (sourced, not run). Rank discovery itself happens in Python
# (pretrain/distributed.py reads SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS); this file fixes the rendezvous
# address and port for every task of the job, and the thread / NCCL settings.

# Ranks come from SLURM_PROCID/SLURM_NTASKS: torchrun variables that sbatch copied from the submitting shell
# would override them in every task (pretrain/distributed.py prefers RANK/WORLD_SIZE when set).
unset RANK LOCAL_RANK WORLD_SIZE

# First host of the allocation is the rendezvous; the port depends on the job id so jobs sharing a node
# do not collide (same formula as pretrain.distributed.slurm_port).
if [ -z "${MASTER_ADDR:-}" ]; then
    MASTER_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST:?SLURM_JOB_NODELIST is not set (run under sbatch)}" | head -n 1)
fi
export MASTER_ADDR
export MASTER_PORT=${MASTER_PORT:-$((15000 + ${SLURM_JOB_ID:-0} % 20000))}

# One rank per GPU: give each rank its CPUs' worth of threads (data workers are separate processes).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-4}}
export TOKENIZERS_PARALLELISM=false

# NCCL: fail fast instead of hanging on a dead peer; InfiniBand when present. Adjust NCCL_SOCKET_IFNAME /
# NCCL_IB_HCA for your cluster (e.g. export NCCL_SOCKET_IFNAME=ib0 before sbatch).
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}

# Compute nodes usually have no internet: never wait on the model hub; wandb offline unless asked.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export WANDB_MODE=${WANDB_MODE:-offline}

PYTHON=${PYTHON:-python}
# Exit code with which `python -m pretrain|finetune` says "checkpoint saved after a preemption signal".
REQUEUE_EXIT_CODE=${REQUEUE_EXIT_CODE:-85}

# DRY_RUN=1: print the commands instead of running them.
run_cmd() {
    if [ "${DRY_RUN:-0}" = "1" ]; then echo "$*"; return 0; fi
    "$@"
}

# launch_and_requeue MODULE CONFIG [OVERRIDES...]: one srun task per GPU; requeue the job when the run
# stopped for preemption (all ranks saved and exited with REQUEUE_EXIT_CODE).
# Signals: SLURM gives USR1/TERM to every process of the step; the ranks take them (pretrain/preemption.py),
# agree on the step to stop after, save and exit with REQUEUE_EXIT_CODE, and srun returns it. A signal sent
# to this batch shell instead (scancel --batch/--full, --signal=B:USR1@T) is handed to srun as USR1, which
# passes it to every task; the shell keeps waiting for srun (TERM to srun itself would make it kill the step).
launch_and_requeue() {
    local module=$1 config=$2
    shift 2
    local cmd=(srun --kill-on-bad-exit=1 --cpu-bind=none
               "$PYTHON" -m "$module" --config "$config" run.resume=latest "run.requeue_exit_code=$REQUEUE_EXIT_CODE" "$@")
    echo "[$(date -u +%FT%TZ)] job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0}: $module on ${SLURM_NNODES:-1} node(s), ${SLURM_NTASKS:-1} task(s), master ${MASTER_ADDR}:${MASTER_PORT}"
    if [ "${DRY_RUN:-0}" = "1" ]; then echo "${cmd[*]}"; return 0; fi
    "${cmd[@]}" &
    local srun_pid=$! rc
    trap "echo \"[\$(date -u +%FT%TZ)] batch shell got USR1: passing it to the tasks\"; kill -USR1 $srun_pid 2>/dev/null" USR1
    trap "echo \"[\$(date -u +%FT%TZ)] batch shell got TERM: passing USR1 to the tasks\"; kill -USR1 $srun_pid 2>/dev/null" TERM
    while kill -0 "$srun_pid" 2>/dev/null; do
        wait "$srun_pid"                # returns early (128+n) when a trapped signal arrives
    done
    wait "$srun_pid"; rc=$?             # srun's own exit status (bash keeps it after the child is reaped)
    trap - USR1 TERM
    if [ "$rc" -eq "$REQUEUE_EXIT_CODE" ]; then
        echo "[$(date -u +%FT%TZ)] preempted: checkpoint saved, requeueing job ${SLURM_JOB_ID}"
        scontrol requeue "$SLURM_JOB_ID"
    fi
    return "$rc"
}
