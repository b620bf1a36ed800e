#!/usr/bin/env bash
# A real SLURM cluster on this one machine, for the tests and for trying the wrappers.
#
#   slurm/local_cluster.sh start     # install (Debian packages) if needed, start munged, slurmctld and
#                                    # the slurmd(s), wait until the nodes take jobs; a no-op when up
#   slurm/local_cluster.sh status    # "running ..." (exit 0) or "stopped" (exit 1)
#   slurm/local_cluster.sh stop      # cancel its jobs, stop the daemons it started (pid files), nothing else
#   export SLURM_CONF=$(slurm/local_cluster.sh conf)   # point sbatch, srun, squeue... at it
#
# What it is: SLURM 22.05 from Debian, one slurmctld and FIXRES_SLURM_NODES slurmd daemons
# (default 2) on this machine; each slurmd is a node with all the machine's CPUs, named
# `hostname -s`, then <host>-2, ... A 2-node job therefore really runs one srun task on each
# of two nodes, with SLURM_NODEID 0 and 1, as on a cluster. Each node also advertises
# FIXRES_SLURM_GPUS GPUs (default 2) that are /dev/null and /dev/zero: nothing runs on them,
# but SLURM hands them out as on a GPU cluster (--gpus-per-node, SLURM_GPUS_ON_NODE), which is
# what the wrappers read. FIXRES_SLURM_NODES=1 FIXRES_SLURM_GPUS=0 gives a plain one-node cluster.
#
# Needs root (SlurmUser=root; munged runs as the munge user); no systemd or cgroups.
# Everything lives in $FIXRES_SLURM_DIR (default /tmp/fixres-slurm): slurm.conf, state,
# spool, logs and pid files. Its ports are not SLURM's defaults, so a site's own SLURM is
# left alone. Settings from ../shared/docs/slurm-local.md; cred_expire and sched_interval
# make a requeued job start again after ~15 s instead of ~160 s.
set -euo pipefail

DIR=${FIXRES_SLURM_DIR:-/tmp/fixres-slurm}
CONF=$DIR/slurm.conf
NODES=${FIXRES_SLURM_NODES:-2}
GPUS=${FIXRES_SLURM_GPUS:-2}
CTLD_PORT=${FIXRES_SLURMCTLD_PORT:-6917}
SLURMD_PORT=${FIXRES_SLURMD_PORT:-6918}    # node i listens on SLURMD_PORT + i - 1
HOST=$(hostname -s)

die() { echo "local_cluster: $*" >&2; exit 1; }
log() { echo "local_cluster: $*"; }

node_names() {
    echo "$HOST"
    for ((i = 2; i <= NODES; i++)); do echo "$HOST-$i"; done
}

alive() {  # alive PIDFILE NAME: the pid in the file runs a program called NAME
    [[ -s $1 ]] || return 1
    local pid
    pid=$(<"$1")
    [[ -r /proc/$pid/comm ]] && [[ $(</proc/$pid/comm) == "$2" ]]
}

all_alive() {
    alive "$DIR/slurmctld.pid" slurmctld || return 1
    local node
    for node in $(node_names); do alive "$DIR/slurmd-$node.pid" slurmd || return 1; done
}

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    command -v munged >/dev/null || missing+=(munge)
    ((${#missing[@]} == 0)) && return
    command -v apt-get >/dev/null || die "missing ${missing[*]}, and no apt-get to install them"
    log "installing ${missing[*]} (log: $DIR/apt.log)"
    local install=(apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge)
    # without systemd the packages' scripts cannot start the daemons: this script does
    DEBIAN_FRONTEND=noninteractive "${install[@]}" >"$DIR/apt.log" 2>&1 ||
        { apt-get update -q >>"$DIR/apt.log" 2>&1 && DEBIAN_FRONTEND=noninteractive "${install[@]}" >>"$DIR/apt.log" 2>&1; } ||
        die "apt-get install failed; see $DIR/apt.log"
}

write_conf() {
    local cpus node i=0 gres="" gpu_files
    cpus=$(nproc)
    ((GPUS > 0)) && gres=" Gres=gpu:$GPUS"
    {
        echo "# written by slurm/local_cluster.sh: $NODES node(s) on this one machine, for fixres' tests"
        echo "ClusterName=fixres-local"
        echo "SlurmctldHost=$HOST(127.0.0.1)"
        echo "SlurmctldPort=$CTLD_PORT"
        echo "SlurmUser=root"
        echo "AuthType=auth/munge"
        echo "CredType=cred/munge"
        echo "# credentials expire after 10 s instead of 120 s: a requeued job may start again sooner"
        echo "AuthInfo=cred_expire=10"
        echo "# look for jobs to start every 5 s (default 60): a requeued job starts again quickly"
        echo "SchedulerParameters=sched_interval=5"
        echo "JobRequeue=1"
        echo "StateSaveLocation=$DIR/state"
        echo "SlurmctldPidFile=$DIR/slurmctld.pid"
        echo "SlurmctldLogFile=$DIR/slurmctld.log"
        echo "SlurmdSpoolDir=$DIR/spool/%n"
        echo "SlurmdPidFile=$DIR/slurmd-%n.pid"
        echo "SlurmdLogFile=$DIR/slurmd-%n.log"
        echo "ProctrackType=proctrack/linuxproc"
        echo "TaskPlugin=task/none"
        echo "SelectType=select/cons_tres"
        echo "SelectTypeParameters=CR_Core"
        echo "ReturnToService=2"
        echo "MpiDefault=none"
        echo "MailProg=/bin/true"
        ((GPUS > 0)) && echo "GresTypes=gpu"
        for node in $(node_names); do
            echo "NodeName=$node NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((SLURMD_PORT + i))" \
                 "CPUs=$cpus Sockets=1 CoresPerSocket=$cpus ThreadsPerCore=1$gres State=UNKNOWN"
            i=$((i + 1))
        done
        echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
    } >"$CONF.tmp"
    mv "$CONF.tmp" "$CONF"
    if ((GPUS > 0)); then
        # stand-in device files: SLURM counts and hands out GPUs by file; nothing opens them
        gpu_files=$(printf '/dev/null,/dev/zero,/dev/full,/dev/random,/dev/urandom,/dev/tty,/dev/ptmx,/dev/console' |
                    cut -d, -f"1-$GPUS")
        [[ $(tr -cd , <<<"$gpu_files" | wc -c) -eq $((GPUS - 1)) ]] || die "at most 8 stand-in GPUs per node"
        echo "Name=gpu File=$gpu_files" >"$DIR/gres.conf"
    else
        rm -f "$DIR/gres.conf"
    fi
}

start_munge() {
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        return  # a munged already answers (ours or the machine's): use it; stop leaves it alone unless ours
    fi
    [[ -s /etc/munge/munge.key ]] || die "no /etc/munge/munge.key (the munge package creates it)"
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid \
        || die "munged did not start; see /var/log/munge/munged.log"
    for _ in $(seq 50); do [[ -s /run/munge/munged.pid ]] && break; sleep 0.1; done
    cp /run/munge/munged.pid "$DIR/munged.pid"   # our copy: this script started it
}

cmd_start() {
    [[ $(id -u) == 0 ]] || die "needs root (SlurmUser=root, munged as the munge user)"
    ((NODES >= 1)) || die "FIXRES_SLURM_NODES must be >= 1"
    mkdir -p "$DIR/state"
    install_packages
    export SLURM_CONF=$CONF   # slurmd reads gres.conf beside the slurm.conf this names
    local node
    if all_alive && [[ -s $CONF ]] && grep -q "^NodeName=$(node_names | tail -n1) " "$CONF"; then
        log "already running"
    else
        write_conf
        start_munge
        alive "$DIR/slurmctld.pid" slurmctld || /usr/sbin/slurmctld -f "$CONF" ||
            die "slurmctld did not start; see $DIR/slurmctld.log"
        for node in $(node_names); do
            mkdir -p "$DIR/spool/$node"
            alive "$DIR/slurmd-$node.pid" slurmd || /usr/sbin/slurmd -f "$CONF" -N "$node" ||
                die "slurmd $node did not start; see $DIR/slurmd-$node.log"
        done
    fi
    local states="" waiting
    for _ in $(seq 120); do
        states=$(sinfo -h -N -o "%N %T" 2>/dev/null || true)
        waiting=$(awk '$2 !~ /^(idle|mixed|allocated|completing)$/' <<<"$states")  # idle* = not responding yet
        if [[ -n $states && -z $waiting ]]; then
            log "up: $(wc -l <<<"$states") node(s) ($(node_names | paste -sd, -)); export SLURM_CONF=$CONF"
            return
        fi
        # a node marked down or drained by an earlier, unclean stop: give it back to service
        awk '$2 ~ /^(down|drain|inval)/ {print $1}' <<<"$waiting" | while read -r node; do
            scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true
        done
        sleep 0.5
    done
    die "nodes not ready after 60 s: $(tr '\n' ' ' <<<"$states"); see $DIR/*.log"
}

cmd_stop() {
    local name pid file
    if alive "$DIR/slurmctld.pid" slurmctld; then
        # jobs of this cluster only (its own slurmctld): their steps outlive slurmd otherwise
        SLURM_CONF=$CONF scancel --quiet --full --user=root 2>/dev/null || true
        for _ in $(seq 50); do
            [[ -z $(SLURM_CONF=$CONF squeue -h -o %i 2>/dev/null) ]] && break
            sleep 0.2
        done
    fi
    # the nodes' slurmd first (they may still talk to slurmctld while they stop), then slurmctld and
    # munged; each takes about 2 s to exit, so those of a step stop together
    stop_daemons "$DIR"/slurmd-*.pid
    stop_daemons "$DIR/slurmctld.pid" "$DIR/munged.pid"
}

stop_daemons() {  # PID_FILE...: SIGTERM to each that is alive, then wait for each (10 s at most, then SIGKILL)
    local file name pid
    local -A pids=()
    for file in "$@"; do
        [[ -e $file ]] || continue
        name=$(basename "$file" .pid)
        if alive "$file" "${name%%-*}"; then
            pids[$name]=$(<"$file")
            kill "${pids[$name]}"
        fi
    done
    for name in "${!pids[@]}"; do
        pid=${pids[$name]}
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid"; fi
        log "stopped $name ($pid)"
    done
    rm -f "$@"
}

cmd_status() {
    if all_alive; then
        echo "running: $(node_names | paste -sd, -); SLURM_CONF=$CONF"
    else
        echo "stopped"
        return 1
    fi
}

case ${1:-} in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    conf) echo "$CONF" ;;
    *) echo "usage: $0 start|stop|status|conf   (env: FIXRES_SLURM_DIR, FIXRES_SLURM_NODES, FIXRES_SLURM_GPUS)" >&2
       exit 2 ;;
esac
