#!/usr/bin/env bash
# Run a reduced tiny experiment through `snakemake --profile profiles/slurm` on a one-node SLURM
# cluster that this script starts on loopback, then check a failing job and a completing rerun.
#
# Steps: install slurm-wlm and munge when missing (Debian 12, needs root), start munged,
# slurmctld and slurmd in the foreground as children of this shell, and then run three times:
#   1. the general text file is empty, so trace_general_text fails inside its SLURM job and
#      snakemake must exit non-zero without leaving that job's output;
#   2. with the file fixed but profiles/slurm unchanged, trace_general_text requests a GPU that
#      this cluster lacks, so sbatch rejects it and snakemake must exit non-zero;
#   3. with a copy of profiles/slurm that requests no GPU, the rerun must finish every job.
# Every output is then checked, and the daemons are stopped by their pids in reverse order.
#
# The DAG is the tiny config cut to one task, one target language, SFT and RA-MoE, and one seed
# (23 SLURM jobs). The full tiny DAG has about 65 jobs, and each SLURM job took 10-27 s on a
# busy 2-core machine, mostly to start Python three times (sbatch's snakemake, srun's snakemake
# and the rule's script). Runtime on a 2-core machine: see README ("Cluster test").
#
# Usage: tests/slurm/run_cluster_test.sh   (as root; KEEP=1 keeps the run folder on success)
# Environment: PYTHON (default .venv/bin/python), SNAKEMAKE_TIMEOUT_S (per snakemake run, 900),
# SLURMCTLD_PORT and SLURMD_PORT (6817 and 6818).
set -euo pipefail

# Bash reads a script while it runs. The braces make it parse the whole body first, so that
# editing this file during a run cannot change the run.
{
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
SNAKEMAKE_TIMEOUT_S=${SNAKEMAKE_TIMEOUT_S:-900}
SLURMCTLD_PORT=${SLURMCTLD_PORT:-6817}
SLURMD_PORT=${SLURMD_PORT:-6818}

RUN=$(mktemp -d /tmp/ramoe-slurm.XXXXXX)
chmod 755 "$RUN"  # munged runs as user munge and must reach its folder below
WORK=$RUN/work
export SLURM_CONF=$RUN/slurm.conf
# snakemake-executor-plugin-slurm-jobstep 0.6.1 removes SLURM_CONF from the environment of the
# srun that it starts inside each job, so that srun reads the compiled-in path, which this
# script links to its own config for as long as the cluster runs.
DEFAULT_CONF=/etc/slurm/slurm.conf
LINKED_CONF=
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

DAEMON_PIDS=()
DAEMON_NAMES=()
STARTED=$(date +%s)

log() { printf '%s cluster-test: %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

fail() {
    log "FAILED: $*"
    for file in "$RUN"/slurmctld.log "$RUN"/slurmd.log; do
        [[ -f $file ]] && { log "last lines of $file:"; tail -n 20 "$file" >&2; }
    done
    exit 1
}

stop_daemons() {
    local status=$?
    # Cancel jobs still queued on this private cluster (after a timeout) before stopping it.
    if ((${#DAEMON_PIDS[@]} == 3)); then
        squeue -h -o %i 2>/dev/null | xargs -r scancel 2>/dev/null || true
    fi
    for ((i = ${#DAEMON_PIDS[@]} - 1; i >= 0; i--)); do
        local pid=${DAEMON_PIDS[i]} name=${DAEMON_NAMES[i]}
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid"
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
            if kill -0 "$pid" 2>/dev/null; then
                log "$name (pid $pid) ignored SIGTERM for 10 s; sending SIGKILL"
                kill -9 "$pid"
            fi
        fi
        wait "$pid" 2>/dev/null || true
        log "stopped $name (pid $pid)"
    done
    if [[ -n $LINKED_CONF && $(readlink "$DEFAULT_CONF") == "$SLURM_CONF" ]]; then
        rm "$DEFAULT_CONF"
        log "removed the link $DEFAULT_CONF"
    fi
    if ((status == 0)) && [[ -z ${KEEP:-} ]]; then
        rm -rf "$RUN"
    else
        log "run folder kept: $RUN"
    fi
    exit "$status"
}
trap stop_daemons EXIT

# ---------------------------------------------------------------- install

[[ $(id -u) == 0 ]] || fail "run as root: the script installs packages and starts SLURM daemons"
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    log "installing slurm-wlm and munge"
    # A fresh machine may have no package lists yet, so one failed install is retried after an update.
    install_packages() { DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends slurm-wlm munge; }
    install_packages >"$RUN/apt.log" 2>&1 || { apt-get update && install_packages; } >>"$RUN/apt.log" 2>&1 \
        || fail "apt-get install slurm-wlm munge failed; see $RUN/apt.log"
fi
"$PYTHON" -c "import snakemake_executor_plugin_slurm" 2>/dev/null \
    || fail "snakemake-executor-plugin-slurm is missing; run: $REPO/.venv/bin/pip install -e '$REPO[slurm]'"
if [[ -e $DEFAULT_CONF || -L $DEFAULT_CONF ]]; then
    fail "$DEFAULT_CONF exists, and this test must put its own config there. Run it on a machine without a SLURM configuration of its own."
fi
for port in "$SLURMCTLD_PORT" "$SLURMD_PORT"; do
    [[ -z $(ss -ltnH "sport = :$port") ]] || fail "port $port is in use; set SLURMCTLD_PORT and SLURMD_PORT to free ports"
done

# ---------------------------------------------------------------- munge

MUNGE=$RUN/munge
mkdir -p "$MUNGE"
mungekey --create --keyfile "$MUNGE/munge.key"
chown -R munge:munge "$MUNGE"
chmod 755 "$MUNGE"  # munged requires a socket folder that everyone can search. The key stays 0600.
# setpriv execs munged, so $! is munged's own pid.
setpriv --reuid=munge --regid=munge --init-groups munged --foreground --socket="$MUNGE/munge.socket" \
    --key-file="$MUNGE/munge.key" --pid-file="$MUNGE/munged.pid" --log-file="$MUNGE/munged.log" \
    --seed-file="$MUNGE/munged.seed" &
DAEMON_PIDS+=($!)
DAEMON_NAMES+=(munged)
for _ in $(seq 50); do [[ -S $MUNGE/munge.socket ]] && break; sleep 0.2; done
munge -n -S "$MUNGE/munge.socket" | unmunge -S "$MUNGE/munge.socket" >/dev/null \
    || fail "munged does not answer on $MUNGE/munge.socket"
log "munged running (pid ${DAEMON_PIDS[0]})"

# ---------------------------------------------------------------- slurm

CPUS=$(nproc)
MEMORY_MB=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
[[ -n $MEMORY_MB ]] || fail "slurmd -C reported no RealMemory"
mkdir -p "$RUN/state" "$RUN/spool"
cat >"$SLURM_CONF" <<EOF
# One-node test cluster on loopback. Every path lies below $RUN.
ClusterName=ramoe-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$SLURMCTLD_PORT
SlurmdPort=$SLURMD_PORT
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE/munge.socket
StateSaveLocation=$RUN/state
SlurmdSpoolDir=$RUN/spool
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$RUN/slurmctld.log
SlurmdLogFile=$RUN/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobCompType=jobcomp/filetxt
JobCompLoc=$RUN/jobcomp.txt
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
# Finished jobs stay visible to squeue for 10 minutes, which the profile's squeue status polls need.
MinJobAge=600
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEMORY_MB State=UNKNOWN
PartitionName=test Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF

mkdir -p "$(dirname "$DEFAULT_CONF")"
ln -s "$SLURM_CONF" "$DEFAULT_CONF"
LINKED_CONF=1

slurmctld -D -c &
DAEMON_PIDS+=($!)
DAEMON_NAMES+=(slurmctld)
slurmd -D -N localhost &
DAEMON_PIDS+=($!)
DAEMON_NAMES+=(slurmd)
for _ in $(seq 100); do
    [[ $(sinfo -h -n localhost -o %T 2>/dev/null) == idle ]] && break
    sleep 0.3
done
[[ $(sinfo -h -n localhost -o %T 2>/dev/null) == idle ]] || fail "node localhost did not become idle"
log "slurmctld (pid ${DAEMON_PIDS[1]}) and slurmd (pid ${DAEMON_PIDS[2]}) running: $CPUS CPUs, $MEMORY_MB MB"

check_loopback_only() {
    local pid address listening=0
    for pid in "${DAEMON_PIDS[@]}"; do
        while read -r address; do
            [[ $address == 127.0.0.1:* || $address == "[::1]:"* ]] \
                || fail "pid $pid listens on $address, beyond loopback"
            listening=$((listening + 1))
        done < <(ss -ltnpH | grep "pid=$pid," | awk '{print $4}')
    done
    ((listening >= 2)) || fail "expected slurmctld and slurmd to listen on 127.0.0.1, found $listening sockets"
    log "ss -ltn: the daemons listen on $listening sockets, all on loopback"
}
check_loopback_only

# ---------------------------------------------------------------- workflow inputs

mkdir -p "$WORK"
: >"$WORK/general.txt"  # empty: the fault of run 1
"$PYTHON" - "$REPO" "$WORK" "$RUN/profile" "$MEMORY_MB" "$CPUS" <<'EOF'
"""Write the reduced tiny config and a copy of profiles/slurm that asks for no GPU."""
import sys
from pathlib import Path

import yaml

repo, work, profile_dir, memory_mb, cpus = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), *map(int, sys.argv[4:])

config = yaml.safe_load((repo / "tests/configs/tiny.yaml").read_text())
config["tasks"] = ["arith"]
config["target_languages"] = ["xa"]
config["finetune"]["methods"] = ["sft", "ramoe"]
config["finetune"]["seeds"] = [0]
config["routing"]["general_text"] = {"source": "file", "path": "general.txt"}
(work / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

# Same profile, minus the GPUs this cluster lacks, with memory requests capped at one CPU's
# share of the node so that two jobs can run at once. The first status poll after a submission
# comes after 10 s instead of the plugin's 40 s, and each later one 10 s later than the one
# before. The jobs of this DAG take 10-30 s each, and it has 10 levels.
profile = yaml.safe_load((repo / "profiles/slurm/config.yaml").read_text())
for resources in profile["set-resources"].values():
    resources["gpu"] = 0
    resources["mem_mb"] = min(resources.get("mem_mb", 0), memory_mb // cpus) or memory_mb // cpus
profile["slurm-init-seconds-before-status-checks"] = 10
profile_dir.mkdir()
(profile_dir / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
EOF

run_snakemake() {
    local profile=$1
    shift
    # Targets come first because --configfile takes every word after it.
    timeout -k 30 "$SNAKEMAKE_TIMEOUT_S" "$PYTHON" -m snakemake "$@" --profile "$profile" \
        --snakefile "$REPO/Snakefile" --directory "$WORK" --configfile "$WORK/config.yaml"
}

JOBS=$(run_snakemake "$RUN/profile" -n --quiet rules 2>&1 | awk '$1 == "total" {print $2; exit}' || true)
[[ -n $JOBS ]] || fail "snakemake -n printed no job count"
log "the reduced DAG has $JOBS jobs (rule all runs locally)"

# ---------------------------------------------------------------- run 1: a job fails inside SLURM

log "run 1: empty general text, trace_general_text must fail inside its SLURM job"
set +e
run_snakemake "$RUN/profile" >"$RUN/run1.log" 2>&1
status=$?
set -e
((status != 0)) || fail "run 1 exited 0 although trace_general_text had no input text"
((status != 124 && status != 137)) || fail "run 1 timed out after $SNAKEMAKE_TIMEOUT_S s instead of failing"
grep -q "contains no passages" "$WORK/results/logs/traces/test-olmoe/general_text.log" \
    || fail "the trace_general_text log does not name the empty general text"
[[ ! -e $WORK/results/traces/test-olmoe/general_text.sequences.parquet ]] || fail "run 1 left the failed job's output"
[[ -z $(find "$WORK/results" -name '.tmp-*') ]] || fail "run 1 left .tmp- files"
grep -q "JobState=FAILED" "$RUN/jobcomp.txt" || fail "SLURM recorded no failed job"
log "run 1 exited $status; the SLURM job failed and left no output"

# ---------------------------------------------------------------- run 2: sbatch rejects a GPU request

cp "$WORK/results/data/general_text.txt" "$WORK/general.txt"
log "run 2: profiles/slurm as shipped asks for a GPU for trace_general_text, which sbatch must reject here"
set +e
# The shorter first status poll only shortens the shutdown, which waits for one poll interval.
run_snakemake "$REPO/profiles/slurm" results/traces/test-olmoe/general_text.sequences.parquet \
    --slurm-init-seconds-before-status-checks 10 >"$RUN/run2.log" 2>&1
status=$?
set -e
((status != 0)) || fail "run 2 exited 0 although no node has a GPU"
((status != 124 && status != 137)) || fail "run 2 timed out after $SNAKEMAKE_TIMEOUT_S s instead of failing"
grep -qi "sbatch" "$RUN/run2.log" || fail "run 2's output does not mention the rejected sbatch call"
log "run 2 exited $status after sbatch rejected the GPU request"

# ---------------------------------------------------------------- run 3: the rerun completes

log "run 3: rerun with no GPU requests"
run_snakemake "$RUN/profile" >"$RUN/run3.log" 2>&1 || fail "run 3 exited $?; see $RUN/run3.log"
run_snakemake "$RUN/profile" -n >"$RUN/dry.log" 2>&1 || fail "the dry run after run 3 failed"
grep -q "Nothing to be done" "$RUN/dry.log" || fail "outputs are missing or out of date after run 3"

completed=$(grep -c "JobState=COMPLETED" "$RUN/jobcomp.txt")
failed=$(grep -c "JobState=FAILED" "$RUN/jobcomp.txt")
# A job cancelled when run 1 stopped runs again in run 3, so at least every job completed once.
((completed >= JOBS - 1)) || fail "SLURM completed $completed jobs, expected at least $((JOBS - 1))"
((failed == 1)) || fail "SLURM recorded $failed failed jobs, expected 1"
check_loopback_only

"$PYTHON" - "$WORK" <<'EOF' || fail "an output of the run is missing or wrong"
"""Check every table, figure and checkpoint of the reduced run."""
import sys
from pathlib import Path

import polars as pl

results = Path(sys.argv[1]) / "results"
accuracy = pl.read_csv(results / "tables/accuracy_base.csv")
assert set(accuracy["lang"]) == {"en", "xa"}, accuracy
categories = pl.read_csv(results / "tables/categories.csv")
assert categories["lang"].to_list() == ["xa"], categories
assert abs(categories.select(pl.sum_horizontal("cc", "ci", "ic", "ii")).item() - 1) < 1e-9, categories
assert set(pl.read_csv(results / "tables/divergence.csv")["layer"]) == {0, 1}
assert pl.read_csv(results / "tables/alignment_zone.csv")["method"].unique().to_list() == ["override"]
assert pl.read_csv(results / "tables/task_experts.csv").height == 2 * 4  # layers x experts
main = pl.read_csv(results / "tables/main_results.csv")
assert set(main["method"]) == {"base", "steering", "sft", "ramoe"}, main
assert (main["n"] == 8).all(), main
assert pl.read_csv(results / "tables/ci_vs_gain.csv").height == 1
for name in ("categories", "divergence_by_layer", "task_experts", "main_results", "ci_vs_gain"):
    for suffix in ("pdf", "png"):
        assert (results / f"figures/{name}.{suffix}").stat().st_size > 1000, name
for method in ("sft", "ramoe"):
    folder = results / f"checkpoints/test-olmoe/{method}/seed0/arith/xa"
    assert (folder / "model.safetensors").stat().st_size > 0, folder
    assert (folder / "metrics.jsonl").read_text().strip(), folder
leftovers = list(results.rglob(".tmp-*"))
assert not leftovers, leftovers
print("every output checked")
EOF

log "passed: $JOBS-job DAG through SLURM, one job failure, one sbatch rejection, rerun complete in $(($(date +%s) - STARTED)) s"
exit
}
