# shellcheck shell=bash
# Shared logic of the vltrain sbatch templates (pretrain / finetune / eval.sbatch).
# Sourced, never run: it only defines functions. A template sets its defaults and calls
#
#     vltrain_main "$@"        # "$@": extra key=value config overrides from the sbatch line
#
# What vltrain_main does, in order:
#   1. builds the run.py command line from the variables below (+ EXTRA and "$@");
#   2. resolves the run folder OUTPUT_ROOT/RUN_NAME with vltrain's own config loader, so a
#      bad config fails here in a second (exit 2, job FAILED, not requeued);
#   3. exports the rendezvous (MASTER_ADDR = the job's first node's NodeAddr, MASTER_PORT from the job
#      id), NCCL defaults, and starts ONE srun TASK PER GPU running `python vltrain/run.py`
#      (each task maps SLURM_PROCID/LOCALID/NTASKS/NODEID to RANK/LOCAL_RANK/WORLD_SIZE/
#      NODE_RANK itself: vltrain/engine/distributed.py);
#   4. reads every task's exit code and decides:
#        all 0                    -> done: exit 0 (COMPLETED, not requeued)
#        75 (and no real error)   -> the ranks checkpointed on SIGUSR1: `scontrol requeue`
#                                    (at most MAX_REQUEUES times, counted by SLURM_RESTART_COUNT);
#                                    the requeued job resumes from `latest` (train.resume=auto)
#        69 (beside 0/1/75/killed) -> the object store did not answer: requeued the same way, at
#                                    most STORAGE_REQUEUES times in a row without a new checkpoint
#                                    (the 69 rank ignores srun's SIGTERM as it exits: not a 143)
#        anything else            -> a real failure: exit with that code (FAILED, not requeued)
#
# Variables (export them before sbatch, or `sbatch --export=ALL,CONFIG=...`):
#   CONFIG          recipe YAML (default: the template's)
#   DS_CONFIG       DeepSpeed JSON (default ds_configs/zero2.json)
#   RUN_NAME        -> run_name     (default: the recipe's run_name; in a job array it must hold
#                   %a, replaced by the array task id, so each task has its own run folder;
#                   %a and %A, the array's job id, are replaced in every override too)
#   OUTPUT_ROOT     -> output_root  (default: the recipe's output_root, relative to the submit dir)
#   DATA_REMOTE     -> data.train   (an s3://bucket/prefix or a shared folder of MDS shards)
#   DATA_VAL_REMOTE -> data.val
#   CACHE_DIR       -> data.cache_dir (node-local disk; vltrain appends node<N>/<run_name>)
#   INIT_FROM       -> train.init_from
#   EXTRA           more key=value overrides, space-separated (positional args come last and win)
#   MAX_REQUEUES    requeue cap (default 20)
#   STORAGE_REQUEUES  requeues after storage failures in a row, no checkpoint between (default 3)
#   PYTHON          interpreter of the shared venv (default: `python` on PATH)
#   CPUS_PER_TASK   CPUs per rank (default: sbatch --cpus-per-task, else the smallest node's
#                   CPUs / tasks per node)
#   VLTRAIN_MASTER_PORT  rendezvous port (default 10000 + job id % 20000, or the next port free
#                   on the job's first node)
#   VLTRAIN_HOME    the vltrain checkout (default: the folder above the submitted template,
#                   found by the template itself; else the submit dir)
#   VLTRAIN_SIGNAL_LEAD_S  the USR1 lead of --signal=USR1@N, for the time-limit check (default 300)
#   VLTRAIN_SHARED_WAIT_S  how long a rank looks for the run folder the batch node made (90)
# Secrets (AWS_* for S3) travel in the environment: this file never prints the environment.
#
# Resources (Slurm 22.05): an sbatch command-line option beats the same SBATCH_* variable,
# which beats the template's #SBATCH line. The templates ask for 8 tasks x 8 GPUs per node on
# whole nodes (--exclusive; the CPUs are split evenly between the ranks here). On nodes without
# GPUs drop the GPU request with `--gpus-per-node=0` (or SBATCH_GPUS_PER_NODE=0); a request for
# GPUs a node lacks is refused at submission ("Invalid generic resource (gres) specification").
# CPUs deliberately are not tied to GPUs (--cpus-per-gpu): with zero GPUs that is refused too.
#
# Signals: `#SBATCH --signal=USR1@T` (no "B:") and `scancel --signal=USR1 JOBID` reach every
# process of the training step; the ranks finish the step, checkpoint and exit 75. USR1 to the
# batch shell (`--signal=B:USR1@T`, `scancel --batch --signal=USR1`) is forwarded the same way.
# SIGTERM (scancel, time limit, preemption) reaches every process of the job; the ranks treat it
# as USR1 (their DataLoader workers ignore it: vltrain/data/worker_signals.py) and must finish
# the step and checkpoint before SIGKILL: KillWait after a cancel or the time limit (30 s by
# default), the partition's GraceTime on preemption. A preemption signals only the step, so the
# ranks' 75 requeues the job as USR1's does (PreemptMode=REQUEUE would too); when the batch
# shell got SIGTERM as well (scancel, time limit) the script does not requeue. Hence the USR1
# lead time before the time limit: there, requeueing is the point.

VLTRAIN_EXIT_PREEMPTED=75   # vltrain/engine/signals.py EXIT_PREEMPTED
VLTRAIN_EXIT_BAD_INPUT=2
VLTRAIN_EXIT_STORAGE=69     # vltrain/run.py EXIT_STORAGE

vltrain_log() {
    echo "[vltrain-slurm $(date '+%F %T')] job=${SLURM_JOB_ID:--} restart=${SLURM_RESTART_COUNT:-0}: $*"
}

vltrain_fail() {   # vltrain_fail CODE MESSAGE...
    local code=$1
    shift
    vltrain_log "ERROR: $*" >&2
    exit "$code"
}

# Tasks per node of this job as started (SLURM_TASKS_PER_NODE looks like "8(x4)"; uneven
# layouts are refused before this is read), not as asked (SLURM_NTASKS_PER_NODE: the
# template's 8 even under `sbatch --ntasks=4`, which starts 4).
vltrain_tasks_per_node() {
    local tpn="${SLURM_TASKS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-1}}"
    tpn="${tpn%%,*}"
    tpn="${tpn%%(*}"
    echo "${tpn:-1}"
}

# Wait for child $1 to end; its exit code in vltrain_rc (not $(...): a subshell cannot wait for
# this shell's children). Polled, not `wait`ed: a trapped signal cuts a blocking `wait` short,
# and one that arrives as the child ends can lose the child's status in bash (5.2: the retried
# wait reports -1, so a finished run read as failed). `sleep` defers the traps (signal
# forwarding) by at most a second; the final `wait` returns the status bash kept.
vltrain_wait() {
    while kill -0 "$1" 2>/dev/null; do
        # sleep with USR1/TERM ignored: Slurm signals every process of the step, and bash
        # reports a killed sleep ("User defined signal 1"), which reads like a crash in the log;
        # a signal between the subshell's fork and its trap still kills it (seen under load):
        # bash's report of that goes to the group's stderr, /dev/null
        { (trap '' USR1 TERM; exec sleep 1); } 2>/dev/null
    done
    wait "$1"
    vltrain_rc=$?
}

# The fewest CPUs any node of the job has (SLURM_JOB_CPUS_PER_NODE looks like "128(x3),64"):
# srun --cpus-per-task x tasks per node must fit on every node, not only on the batch node.
vltrain_min_cpus_per_node() {
    local spec="${SLURM_JOB_CPUS_PER_NODE:-${SLURM_CPUS_ON_NODE:-1}}"
    tr ',' '\n' <<<"$spec" | sed 's/(.*//' | sort -n | head -n1
}

# A job array's tasks would all train in one run folder (RUN_NAME is fixed at submission),
# overwriting each other's checkpoints and resuming from each other's: each needs its own.
# "%a" in RUN_NAME becomes the task id (as in sbatch --output); without it, refused.
vltrain_array_run_name() {
    [[ -n "${SLURM_ARRAY_TASK_ID:-}" ]] || return 0
    [[ "${RUN_NAME:-}" == *%a* ]] \
        || vltrain_fail 2 "job array task $SLURM_ARRAY_TASK_ID: every task would train in the same run folder; set RUN_NAME with %a (e.g. RUN_NAME=sweep_%a), which becomes the task id"
}

# In a job array task, "%a" in $1 becomes the task id and "%A" the array's job id (sbatch
# --output's letters), so RUN_NAME=sweep_%A_%a and overrides like train.seed=%a vary per task.
vltrain_array_fields() {
    local v=$1
    if [[ -n "${SLURM_ARRAY_TASK_ID:-}" ]]; then
        v="${v//%a/$SLURM_ARRAY_TASK_ID}"
        v="${v//%A/${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}}"
    fi
    printf '%s' "$v"
}

# The first TCP port from $2 (wrapping within 10000-29999) that $1 (python) can bind on this host.
vltrain_free_port() {
    "$1" - "$2" <<'PY'
import socket, sys
start = int(sys.argv[1])
for port in [*range(start, 30000), *range(10000, start)]:
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            continue
    print(port)
    break
PY
}

# Whether run folder $1 holds a complete checkpoint (a tag with its completion record).
vltrain_has_checkpoint() {
    local f    # "$1" quoted: [ ] * ? in a run folder's name are characters, not a pattern
    for f in "$1"/checkpoints/*/vltrain_ckpt.json; do
        [[ -e "$f" ]] && return 0
    done
    return 1
}

# The value of field $1 in a line of `scontrol show ... -o` on stdin: up to the next " Key="
# (a path may hold spaces, where grep -o 'StdOut=[^ ]*' cut it short).
vltrain_job_field() {
    sed -n -E "s/^(.* )?$1=//p" | sed -E 's/ [A-Za-z][A-Za-z0-9_:/]*=.*//'
}

# $1 with credentials masked by vltrain/redact.py's rules (tests/test_redact.py holds the two
# to the same cases): a URL's user:password@ or bare user@ (up to the token's last @, kept
# when it holds a / and no :), a presigned URL's signature parameters, the value after a secret's name.
# The overrides echoed to the batch log may carry one.
vltrain_redact() {
    local secret_names="AWS_SECRET_ACCESS_KEY|AWS_SESSION_TOKEN|HF_TOKEN|HUGGING_FACE_HUB_TOKEN|GCS_SECRET"
    secret_names+="|AZURE_ACCOUNT_ACCESS_KEY|DATABRICKS_TOKEN|COMET_API_KEY|WANDB_API_KEY"
    sed -E -e 's#([A-Za-z][A-Za-z0-9_+.-]*://)[^[:space:]]*:[^[:space:]]*@#\1***@#g' \
        -e 's#([A-Za-z][A-Za-z0-9_+.-]*://)[^[:space:]/:]*@([^[:space:]@]*)([[:space:]]|$)#\1***@\2\3#g' \
        -e 's~([?&](x-amz-(signature|credential|security-token)|x-goog-(signature|credential)|signature|sig|awsaccesskeyid)=)[^&#[:space:]]+~\1***~gI' \
        -e 's~([A-Za-z0-9_]*('"$secret_names"')["'"'"']?[[:blank:]]*[=:][[:blank:]]*)("[^"]*"|'"'"'[^'"'"']*'"'"'|[^[:space:]"'"'"',}]+)~\1***~gI' \
        <<<"$1"
}

# This job for scontrol: an array task as <array job>_<task>. The bare SLURM_JOB_ID of the
# array's first task is also the array's id, and `scontrol requeue` of it requeues every
# task of the array (running ones killed, finished ones run again).
vltrain_job_ref() {
    if [[ -n "${SLURM_ARRAY_TASK_ID:-}" && -n "${SLURM_ARRAY_JOB_ID:-}" ]]; then
        echo "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
    else
        echo "$SLURM_JOB_ID"
    fi
}

# One rank per GPU: more tasks on a node than GPUs there leaves ranks without a GPU (an
# error about device indices from the ranks); fewer is allowed (some GPUs stay idle).
vltrain_check_gpus_per_node() {   # vltrain_check_gpus_per_node TASKS_PER_NODE
    local gpus="${SLURM_GPUS_ON_NODE:-0}"
    [[ "$gpus" =~ ^[0-9]+$ ]] || return 0
    ((gpus == 0 || $1 <= gpus)) \
        || vltrain_fail 2 "$1 tasks per node but $gpus GPUs per node: one rank per GPU; submit with --ntasks-per-node=$gpus (the templates' default is 8)"
}

# Uneven layouts ("8(x3),4") are refused: streaming partitions the data by world / ranks per
# node, so ranks on nodes of different sizes would disagree on it (run.py refuses them too).
# A task count that does not fill the nodes evenly (--nodes=2 --ntasks=3 --ntasks-per-node=2)
# leaves SLURM_TASKS_PER_NODE even ("2(x2)"): srun ignores --ntasks-per-node then and starts
# 2 + 1, so SLURM_NTASKS is checked against it too.
vltrain_check_even_tasks() {
    local tpn="${SLURM_TASKS_PER_NODE:-1}" counts total
    counts="$(tr ',' '\n' <<<"$tpn" | sed 's/(.*//' | sort -u)"
    [[ "$(wc -l <<<"$counts")" -eq 1 ]] \
        || vltrain_fail 2 "tasks per node are uneven ($tpn): vltrain needs the same number of ranks on every node; submit with --ntasks-per-node=N"
    total="$(tr ',' '\n' <<<"$tpn" | awk -F'[(x)]' '{n += $1 * ($3 == "" ? 1 : $3)} END {print n}')"
    [[ -z "${SLURM_NTASKS:-}" || "$SLURM_NTASKS" -eq "$total" ]] \
        || vltrain_fail 2 "--ntasks=$SLURM_NTASKS does not fill the job's nodes evenly (tasks per node: $tpn, $total in all): srun would start the ranks unevenly; submit with --nodes=N --ntasks-per-node=M and no --ntasks"
}

# The error lines of the ranks' last run in LOG_DIR/JOB-<rank>.log (appended to across
# requeues), at most 10. An uncaught exception has no ERROR line: its traceback's last line.
# A message several ranks logged is one line naming them (every rank refusing the same config
# filled the 10 lines with one error, hiding another rank's own).
vltrain_rank_errors() {
    local f
    # ranks in numeric order (the glob's is 0, 1, 10, 100, 11, ...)
    printf '%s\n' "$1/$2"-*.log | sort -V | while IFS= read -r f; do
        [[ -f "$f" ]] && awk '/: starting vltrain\/run.py$/ {buf = ""; last = ""}
            / ERROR / {buf = buf $0 "\n"}
            /^[A-Za-z_][A-Za-z0-9_.]*(Error|Exception|Interrupt)(: |$)/ {last = $0}
            END {printf "%s", (buf != "" ? buf : (last != "" ? last "\n" : ""))}' "$f"
    done | awk '{
            msg = $0; rank = ""
            if (match(msg, / rank=[0-9]+( worker=[0-9]+)? /)) {
                rank = substr(msg, RSTART + 6); sub(/ .*/, "", rank); msg = substr(msg, RSTART + RLENGTH)
            }
            if ((msg, rank) in seen) next          # a rank and its worker logging it: one rank
            seen[msg, rank] = 1
            if (!(msg in n)) order[++count] = msg
            n[msg]++
            if (rank != "" && n[msg] <= 3) ranks[msg] = ranks[msg] (ranks[msg] == "" ? "" : ",") rank
        }
        END {
            for (i = 1; i <= count && i <= 10; i++) {
                m = order[i]; tag = ""
                if (ranks[m] != "") tag = (n[m] > 1 ? " [ranks " : " [rank ") ranks[m] (n[m] > 3 ? " and " n[m] - 3 " more" : "") "]"
                print m tag
            }
        }'
}

# Seconds of a Slurm time as squeue's %l prints it ([D-]HH:MM:SS or MM:SS); nothing for
# UNLIMITED, NOT_SET and the like.
vltrain_seconds() {
    local t=$1 d=0 h=0 m=0 sec=0
    local -a p
    if [[ "$t" =~ ^([0-9]+)-(.+)$ ]]; then
        d=${BASH_REMATCH[1]}
        t=${BASH_REMATCH[2]}
    fi
    [[ "$t" =~ ^[0-9]+(:[0-9]+){1,2}$ ]] || return 0
    IFS=: read -r -a p <<<"$t"
    if ((${#p[@]} == 3)); then
        h=${p[0]} m=${p[1]} sec=${p[2]}
    else
        m=${p[0]} sec=${p[1]}
    fi
    echo $(((((d * 24 + 10#$h) * 60) + 10#$m) * 60 + 10#$sec))
}

# A time limit within the USR1 lead (the templates' --signal=USR1@300; VLTRAIN_SIGNAL_LEAD_S if
# you changed it): Slurm sends USR1 right after the start, so every run would checkpoint and
# requeue after its first steps, MAX_REQUEUES times, training nothing. $1: squeue's %l.
vltrain_check_time_limit() {
    local limit lead="${VLTRAIN_SIGNAL_LEAD_S:-300}"
    limit="$(vltrain_seconds "$1")"
    [[ -z "$limit" ]] || ((limit > lead)) \
        || vltrain_fail 2 "the job's time limit ($1) is not above the USR1 lead (${lead} s: #SBATCH --signal=USR1@${lead}): every run would checkpoint and requeue right after its start; submit with a longer --time, or a shorter lead (--signal=USR1@60 with VLTRAIN_SIGNAL_LEAD_S=60)"
}

# ------------------------------------------------------------------------------ per task
# Runs inside every srun task (see vltrain_main): one header line, the accelerator choice for
# THIS node, then python as a child whose exit code is written to EXIT_DIR/<rank>.
#
# Signals: Slurm signals every process of the step (`--signal=USR1@T`, `scancel --signal=USR1`),
# so python gets USR1/TERM directly; the traps keep this small shell alive and forward the
# signal too (harmless twice: the trainer only sets a flag), for launch setups that signal only
# the task's top process.
vltrain_task() {
    local exit_dir=$1
    shift
    local rank="${SLURM_PROCID:-0}" waited=0
    # The batch node made the run folder. A node that does not see it writes checkpoints no
    # other node reads (a node-local OUTPUT_ROOT): refuse. NFS may hide a new folder for up to
    # its attribute-cache time (acdirmax, 60 s by default), so look for a while first.
    while [[ ! -d "$exit_dir" ]] && ((waited < ${VLTRAIN_SHARED_WAIT_S:-90})); do
        sleep 1
        waited=$((waited + 1))
    done
    if [[ ! -d "$exit_dir" ]]; then
        echo "rank $rank on $(hostname -s): the run folder ${exit_dir%/logs/*} is not there: OUTPUT_ROOT must be on a filesystem every node sees (not /tmp or node-local scratch)" >&2
        exit "$VLTRAIN_EXIT_BAD_INPUT"
    fi
    # No GPU on this node: DeepSpeed's CPU accelerator + gloo. A node where Slurm allocated GPUs
    # is left to DeepSpeed's own detection even without nvidia-smi (containers, ROCm).
    if [[ -z "${DS_ACCELERATOR:-}" ]] && ((${SLURM_GPUS_ON_NODE:-0} == 0)) && [[ -z "${SLURM_STEP_GPUS:-}${SLURM_JOB_GPUS:-}" ]] \
        && ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }; then
        export DS_ACCELERATOR=cpu
    fi
    echo "$(date '+%F %T') job=${SLURM_JOB_ID:--} rank=$rank local_rank=${SLURM_LOCALID:-0} node=${SLURMD_NODENAME:-?} host=$(hostname -s) restart=${SLURM_RESTART_COUNT:-0} accelerator=${DS_ACCELERATOR:-auto}: starting vltrain/run.py"
    local child rc
    # run.py handles USR1 from its first lines on; before that (interpreter start) USR1 would
    # end it. Started with USR1 ignored (inherited across exec until run.py sets its handler),
    # a USR1 that early is lost instead of fatal: the rank still checkpoints on the SIGTERM
    # that ends the job.
    trap '' USR1
    "$@" &
    child=$!
    trap 'kill -USR1 "$child" 2>/dev/null' USR1
    trap 'kill -TERM "$child" 2>/dev/null' TERM
    vltrain_wait "$child"
    rc=$vltrain_rc
    echo "$rc" >"$exit_dir/$rank" 2>/dev/null || true
    echo "$(date '+%F %T') job=${SLURM_JOB_ID:--} rank=$rank node=${SLURMD_NODENAME:-?}: vltrain/run.py exited with $rc"
    exit "$rc"
}

# The object store did not answer (a rank exited 69; a peer that lost it may exit 1). A store
# that is down now may be up in minutes: requeue as for a preemption, but at most
# STORAGE_REQUEUES times in a row without a new checkpoint between (counted in the run's
# logs folder, per job), so a store that stays down, or an endpoint typed wrong, fails the
# job. Slurm starts a requeued job no sooner than about 2 min later (its credential delay):
# the pause between tries. $1 run dir, $2 log dir, $3 restart count, $4 1 if Slurm sent TERM.
# Returns only after a requeue.
vltrain_requeue_on_storage() {
    local max="${STORAGE_REQUEUES:-3}" state="$2/.storage_requeues.$SLURM_JOB_ID"
    local latest count=0 seen=""
    latest="$(cat "$1/checkpoints/latest" 2>/dev/null)"
    latest="${latest:--}"
    [[ -f "$state" ]] && read -r count seen <"$state"
    [[ "$seen" == "$latest" ]] || count=0      # a checkpoint since the last try: count afresh
    count=$((count + 1))
    vltrain_rank_errors "$2" "$SLURM_JOB_ID" >&2
    if (($4)); then
        vltrain_fail "$VLTRAIN_EXIT_STORAGE" "the object store did not answer, and Slurm is ending the job (cancel / time limit): not requeueing; resubmit to resume"
    fi
    if ((count > max)) || (($3 >= ${MAX_REQUEUES:-20})); then
        rm -f "$state"
        vltrain_fail "$VLTRAIN_EXIT_STORAGE" "the object store did not answer in $count runs in a row without a new checkpoint (STORAGE_REQUEUES=$max, MAX_REQUEUES=${MAX_REQUEUES:-20}, requeued $3 times): not requeueing; check the store and S3_ENDPOINT_URL, then resubmit to resume"
    fi
    echo "$count $latest" >"$state"
    vltrain_log "the object store did not answer (exit $VLTRAIN_EXIT_STORAGE): requeueing (storage try $count of at most $max in a row); the next run resumes from latest"
    scontrol requeue "$(vltrain_job_ref)" \
        || vltrain_fail "$VLTRAIN_EXIT_STORAGE" "scontrol requeue $(vltrain_job_ref) failed; resubmit to resume"
}

# ------------------------------------------------------------------------------ batch script
vltrain_main() {
    # USR1 to this shell (--signal=B:USR1@T) before the ranks exist would end the job (bash's
    # default action): nothing to checkpoint yet, so say so and carry on. TERM: the job is
    # being ended; the ranks are not started (checked just before srun), and never requeued.
    local got_term=0
    trap 'vltrain_log "USR1 before the ranks started: nothing to checkpoint yet, ignored"' USR1
    trap 'got_term=1' TERM
    [[ -n "${SLURM_JOB_ID:-}" ]] || vltrain_fail 2 "not inside a Slurm job: submit with sbatch"
    # srun without --het-group runs on the first component only: the others would sit idle
    [[ -z "${SLURM_HET_SIZE:-}" ]] \
        || vltrain_fail 2 "heterogeneous job ($SLURM_HET_SIZE components): not supported; submit one homogeneous job"
    local home="${VLTRAIN_HOME:?}"
    [[ -f "$home/vltrain/run.py" && -d "$home/configs" ]] \
        || vltrain_fail 2 "VLTRAIN_HOME=$home is not vltrain's git checkout (no vltrain/run.py, configs/): the templates run from a checkout installed with pip install -e ."
    local restart="${SLURM_RESTART_COUNT:-0}"
    local python="${PYTHON:-python}"
    command -v "$python" >/dev/null 2>&1 \
        || vltrain_fail 2 "python interpreter '$python' not found: activate the shared venv before sbatch or set PYTHON=/path/to/venv/bin/python"
    [[ -n "${CONFIG:-}" ]] || vltrain_fail 2 "set CONFIG=configs/<recipe>.yaml (export it before sbatch, or sbatch --export=ALL,CONFIG=...)"
    local ds_config="${DS_CONFIG:-$home/ds_configs/zero2.json}"
    [[ -f "$ds_config" ]] || vltrain_fail 2 "DS_CONFIG=$ds_config does not exist"

    # Launcher variables from the submitting shell would stop run.py from mapping SLURM_*.
    unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE LOCAL_SIZE NODE_RANK GROUP_RANK CROSS_RANK CROSS_SIZE

    vltrain_array_run_name
    [[ "${VLTRAIN_MODE:-train}" == train ]] \
        && vltrain_check_time_limit "$(squeue -h -j "$(vltrain_job_ref)" -o %l 2>/dev/null | head -n1)"
    # ---- overrides, lowest priority first (the config loader applies them in order).
    local -a ov=() extra=()
    [[ -n "${VLTRAIN_MODE:-}" && "${VLTRAIN_MODE}" != train ]] && ov+=("mode=$VLTRAIN_MODE")
    [[ -n "${OUTPUT_ROOT:-}" ]] && ov+=("output_root=$OUTPUT_ROOT")
    [[ -n "${RUN_NAME:-}" ]] && ov+=("run_name=$RUN_NAME")
    [[ -n "${DATA_REMOTE:-}" ]] && ov+=("data.train=$DATA_REMOTE")
    [[ -n "${DATA_VAL_REMOTE:-}" ]] && ov+=("data.val=$DATA_VAL_REMOTE")
    [[ -n "${CACHE_DIR:-}" ]] && ov+=("data.cache_dir=$CACHE_DIR")
    [[ -n "${INIT_FROM:-}" ]] && ov+=("train.init_from=$INIT_FROM")
    local resume=0
    [[ "${VLTRAIN_MODE:-train}" == train ]] && resume=1
    # First run: resume=auto picks up a previous job of the same run (resubmission), and the
    # user may still point train.resume at a checkpoint. A requeued run continues from its
    # own latest checkpoint, so there it comes last and wins -- once the run has one (below):
    # requeued before its first save, the user's train.resume still applies.
    ((resume)) && ((restart == 0)) && ov+=("train.resume=auto")
    read -r -a extra <<<"${EXTRA:-}"
    ov+=("${extra[@]}" "$@")
    ((resume)) && ((restart > 0)) && ov+=("train.resume=auto")
    local kv i
    for i in "${!ov[@]}"; do
        kv="$(vltrain_array_fields "${ov[$i]}")"
        [[ "$kv" == *=* ]] || vltrain_fail 2 "argument '$(vltrain_redact "$kv")' is not a key=value config override"
        ov[i]=$kv
    done

    # ---- the run folder, exactly as run.py will compute it (and the config checked early).
    local run_dir
    run_dir="$(PYTHONPATH="$home${PYTHONPATH:+:$PYTHONPATH}" "$python" - "$CONFIG" "${ov[@]}" <<'PY'
import importlib.util, os, sys
missing = [m for m in ("torch", "deepspeed", "streaming", "yaml") if importlib.util.find_spec(m) is None]
if missing:
    print(f"{sys.executable} cannot import {', '.join(missing)}: activate vltrain's venv before sbatch or set "
          "PYTHON=/path/to/venv/bin/python; with sbatch --export=..., include ALL (--export=ALL,CONFIG=...), "
          "else the job has neither your PATH nor your AWS_* variables", file=sys.stderr)
    sys.exit(2)
from vltrain.redact import install_excepthook
install_excepthook()          # a traceback quoting an override holds no credential
from vltrain.config import ConfigError, check_placeholders, load_config
try:
    cfg = load_config(sys.argv[1], sys.argv[2:])
    check_placeholders(cfg)
except ConfigError as e:
    print(f"bad configuration: {e}", file=sys.stderr)
    sys.exit(2)
print(os.path.abspath(os.path.join(cfg.output_root, cfg.run_name)))
PY
)" || vltrain_fail "$VLTRAIN_EXIT_BAD_INPUT" "config check failed for CONFIG=$CONFIG (message above); not starting the ranks"

    if ((resume)) && ((restart > 0)) && ! vltrain_has_checkpoint "$run_dir"; then
        unset 'ov[${#ov[@]}-1]'   # no checkpoint of its own yet: drop the requeue's resume=auto
        vltrain_log "requeued before the run's first checkpoint: train.resume as configured"
    fi

    local log_dir="$run_dir/logs"
    local exit_dir="$log_dir/.exit/$SLURM_JOB_ID.$restart"
    # srun --output expands %-letters anywhere in its path (%% is a %), and a backslash turns
    # every expansion off: all ranks would write one file named "%j-%t.log"
    [[ "$log_dir" != *\\* ]] || vltrain_fail 2 "the run folder $run_dir has a backslash, which stops srun from naming each rank's log; choose another OUTPUT_ROOT / RUN_NAME"
    mkdir -p "$log_dir" "$exit_dir" || vltrain_fail 1 "cannot create $log_dir (OUTPUT_ROOT must be on a filesystem every node sees)"
    rm -f "$exit_dir"/* 2>/dev/null
    # The batch log itself (#SBATCH --output) stays where sbatch put it; link it beside the ranks' logs.
    local batch_log
    batch_log="$(scontrol show job -o "$(vltrain_job_ref)" 2>/dev/null | head -n1 | vltrain_job_field StdOut)"
    [[ -n "$batch_log" && -f "$batch_log" ]] && ln -sfn "$batch_log" "$log_dir/$SLURM_JOB_ID-batch.out" 2>/dev/null

    # ---- distributed environment shared by all ranks (per-rank variables are mapped in run.py).
    # The first node's NodeAddr: the address Slurm itself reaches it at. Its NodeName (what
    # `scontrol show hostnames` gives) need not resolve on the other nodes (cloud clusters).
    local first
    first="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"
    MASTER_ADDR="$(scontrol show node -o "$first" 2>/dev/null | head -n1 | vltrain_job_field NodeAddr)"
    MASTER_ADDR="${MASTER_ADDR:-$first}"
    # Port from the job id (= vltrain.engine.distributed.port_from_job_id): two jobs sharing a
    # node differ; if it is taken on this node (the job's first: rank 0 listens here) by a
    # service or a job whose id differs by a multiple of 20000, the next free one. Every rank
    # reads MASTER_PORT from here. VLTRAIN_MASTER_PORT overrides it (a blocked port range).
    if [[ -n "${VLTRAIN_MASTER_PORT:-}" ]]; then
        MASTER_PORT=$VLTRAIN_MASTER_PORT
    else
        MASTER_PORT="$(vltrain_free_port "$python" $((10000 + SLURM_JOB_ID % 20000)))"
        [[ -n "$MASTER_PORT" ]] || vltrain_fail 1 "no free TCP port in 10000-29999 on $(hostname -s) for the rendezvous; set VLTRAIN_MASTER_PORT"
        ((MASTER_PORT == 10000 + SLURM_JOB_ID % 20000)) || vltrain_log "port $((10000 + SLURM_JOB_ID % 20000)) is taken on this node: rendezvous on $MASTER_PORT"
    fi
    export MASTER_ADDR MASTER_PORT
    local tpn cpt
    vltrain_check_even_tasks
    tpn="$(vltrain_tasks_per_node)"
    vltrain_check_gpus_per_node "$tpn"
    cpt="${CPUS_PER_TASK:-${SLURM_CPUS_PER_TASK:-}}"
    if [[ -z "$cpt" ]]; then
        cpt=$(( $(vltrain_min_cpus_per_node) / (tpn > 0 ? tpn : 1) ))
        ((cpt >= 1)) || cpt=1
    fi
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$cpt}"
    export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
    # NCCL (ignored on CPU nodes). Async error handling turns a dead peer into an error on
    # every rank (with --kill-on-bad-exit the job then ends) instead of a hang.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
    # A job submitted from inside another allocation (salloc, a Jupyter kernel on a compute
    # node) inherits its SLURM_MEM_PER_CPU / _PER_GPU; beside this job's SLURM_MEM_PER_NODE
    # (--mem=0) srun stops with "mutually exclusive"
    [[ -n "${SLURM_MEM_PER_NODE:-}" ]] && unset SLURM_MEM_PER_CPU SLURM_MEM_PER_GPU
    # Cluster-specific, set them before sbatch when needed:
    #   NCCL_SOCKET_IFNAME=ib0 (or ^lo,docker0)  the interface for NCCL's bootstrap/socket traffic
    #   NCCL_IB_HCA=mlx5_0,mlx5_1                 the InfiniBand HCAs to use (=^mlx5_4 excludes one)
    #   NCCL_DEBUG=INFO                           topology and transport choices in the rank logs
    #   NCCL_NET_GDR_LEVEL, NCCL_IB_GID_INDEX     GPUDirect RDMA / RoCE settings from your admins
    #   GLOO_SOCKET_IFNAME=eth0                   CPU nodes (gloo): ONE interface name (no ^ lists);
    #                                             without it gloo binds what the hostname resolves
    #                                             to, loopback where /etc/hosts maps it to 127.0.1.1

    local -a cmd=("$python" "$home/vltrain/run.py" --config "$CONFIG" --deepspeed_config "$ds_config" "${ov[@]}")
    vltrain_log "nodes=$SLURM_JOB_NODELIST ntasks=${SLURM_NTASKS:-?} tasks_per_node=$tpn cpus_per_task=$cpt master=$MASTER_ADDR:$MASTER_PORT"
    vltrain_log "run dir $run_dir; rank logs $log_dir/$SLURM_JOB_ID-<rank>.log"
    vltrain_log "command: $(vltrain_redact "${cmd[*]}")"

    # ---- one task per GPU. --kill-on-bad-exit: one rank failing ends the others at once.
    # srun's own exit code is then the killed ranks' (143), so the ranks' codes are read from
    # exit_dir instead. --gpu-bind=none: every rank sees all GPUs of its node and takes
    # cuda:LOCAL_RANK (a site default binding one GPU per task would break that index and
    # CUDA peer-to-peer between the ranks of a node). --distribution=block:block: each node's ranks
    # consecutive, as streaming assumes (a site's or the job's `-m cyclic` would deal them
    # round-robin), and their CPUs socket by socket (Slurm's default second level, cyclic, puts
    # ranks 0, 2, 4, ... on socket 0: half of them far from their GPU on DGX-like nodes).
    # --export=ALL: the ranks need what this script exported (MASTER_*, OMP_NUM_THREADS, NCCL_*);
    # after `sbatch --export=A,B` srun would pass only A and B (it reads SLURM_EXPORT_ENV).
    local srun_pid rc
    ((got_term)) && vltrain_fail 143 "SIGTERM before the ranks started (job cancelled or preempted): not starting them"
    # shellcheck disable=SC2016  # $1/$@ expand in the task's shell, not here
    srun --export=ALL --kill-on-bad-exit=1 --cpus-per-task="$cpt" --gpu-bind=none --distribution=block:block \
        --output="${log_dir//%/%%}/%j-%t.log" --open-mode=append \
        bash -c 'source "$1"; shift; vltrain_task "$@"' vltrain-task "$home/slurm/common.sh" "$exit_dir" "${cmd[@]}" &
    srun_pid=$!
    # USR1 to this shell (`--signal=B:USR1@T`, `scancel --batch --signal=USR1`): pass it on
    # through srun, which forwards it to every task. TERM to this shell means Slurm itself is
    # ending the job (scancel, time limit, preemption): forward it, but never requeue after it.
    trap 'kill -USR1 "$srun_pid" 2>/dev/null' USR1
    trap 'got_term=1; kill -TERM "$srun_pid" 2>/dev/null' TERM
    vltrain_wait "$srun_pid"
    rc=$vltrain_rc
    trap - USR1 TERM

    local f code codes="" preempted=0 storage=0 ones=0 failed_code=""
    for f in "$exit_dir"/*; do
        [[ -f "$f" ]] || continue
        code="$(tr -dc '0-9' <"$f")"
        codes+=" rank${f##*/}=$code"
        if [[ "$code" == "$VLTRAIN_EXIT_PREEMPTED" ]]; then
            preempted=1
        elif [[ "$code" == "$VLTRAIN_EXIT_STORAGE" ]]; then
            storage=1
        elif [[ "$code" == 1 ]]; then
            ones=1      # an error, or a rank that lost its peer (after a 69: collateral)
        elif [[ -n "$code" && "$code" -ne 0 && "$code" -lt 128 && -z "$failed_code" ]]; then
            failed_code=$code   # a real error (killed-by-signal codes >=128 are srun's collateral)
        fi
    done
    rm -rf "$exit_dir"
    rmdir "$log_dir/.exit" 2>/dev/null
    vltrain_log "srun exited with $rc; ranks:${codes:- none reported}"
    local reported
    reported="$(wc -w <<<"$codes")"
    ((rc == 0 || reported >= ${SLURM_NTASKS:-1})) \
        || vltrain_log "$reported of ${SLURM_NTASKS:-?} ranks reported an exit code: the others could not reach $log_dir (OUTPUT_ROOT must be on a filesystem every node sees: not /tmp or node-local scratch), or were killed first"

    if ((rc == 0)); then
        rm -f "$log_dir/.storage_requeues.$SLURM_JOB_ID"
        vltrain_log "finished"
        return 0
    fi
    if ((storage)) && [[ -z "$failed_code" ]]; then
        vltrain_requeue_on_storage "$run_dir" "$log_dir" "$restart" "$got_term"
        return 0
    fi
    ((ones)) && [[ -z "$failed_code" ]] && failed_code=1
    if ((preempted)) && [[ -z "$failed_code" ]]; then
        # 75 means every rank passed the checkpoint commit, whatever srun then did to the others.
        if ((got_term)); then
            vltrain_log "checkpointed after SIGTERM from Slurm (cancel / time limit): not requeueing; resubmit to continue"
            exit "$VLTRAIN_EXIT_PREEMPTED"
        fi
        local max="${MAX_REQUEUES:-20}"
        if ((restart >= max)); then
            vltrain_log "checkpointed, but the job was already requeued $restart times (MAX_REQUEUES=$max): not requeueing"
            exit "$VLTRAIN_EXIT_PREEMPTED"
        fi
        vltrain_log "checkpointed on signal: requeueing (requeue $((restart + 1)) of at most $max); the next run resumes from latest"
        if scontrol requeue "$(vltrain_job_ref)"; then
            return 0
        fi
        vltrain_fail "$VLTRAIN_EXIT_PREEMPTED" "scontrol requeue $(vltrain_job_ref) failed; resubmit to resume"
    fi
    code="${failed_code:-$rc}"
    ((code != 0)) || code=1
    vltrain_rank_errors "$log_dir" "$SLURM_JOB_ID" >&2
    vltrain_fail "$code" "training failed (exit $code); not requeued. See $log_dir/$SLURM_JOB_ID-<rank>.log"
}
