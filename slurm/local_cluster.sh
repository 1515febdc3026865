#!/usr/bin/env bash
# A real single-node SLURM on this machine, for testing ftlab's SLURM launcher (root only).
#
#   slurm/local_cluster.sh up       install (apt) if missing, configure, start, wait until idle
#   slurm/local_cluster.sh status   daemons, pids and `sinfo`; exit 0 only when the node answers
#   slurm/local_cluster.sh down     cancel jobs, stop the daemons by pid (pid files)
#
# No systemd: munged (as user munge), mariadbd, slurmdbd, slurmctld and `slurmd -N localhost`
# run in the foreground of their own sessions, each pid kept in $FTLAB_SLURM_STATE/pids/.
# Accounting (slurmdbd) is required: without it a killed job leaves submitit waiting forever.
# `up` on a running cluster is a no-op. Cluster "ftlab", partition "debug", account "ftlab".
set -euo pipefail

STATE=${FTLAB_SLURM_STATE:-/var/tmp/ftlab-slurm}
CONF_DIR=/etc/slurm
MARK="# Written by ftlab slurm/local_cluster.sh"
CLUSTER=ftlab
PARTITION=debug
ACCOUNT=ftlab
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)   # start order; stopped in reverse

log() { echo "local_cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

pid_of() {  # the live pid of a daemon we started, or nothing
  local f="$STATE/pids/$1.pid" pid
  [[ -s $f ]] || return 0
  pid=$(<"$f")
  # The pid must still be that daemon (pids are reused): compare argv[0]'s base name.
  local argv0
  [[ -r /proc/$pid/cmdline ]] || return 0
  argv0=$(tr '\0' '\n' 2>/dev/null <"/proc/$pid/cmdline" | head -1) || return 0
  [[ ${argv0##*/} == "$1" ]] && echo "$pid"
  return 0
}

start() {  # start NAME CMD...: in its own session, output to its log, pid recorded
  local name=$1; shift
  [[ -n $(pid_of "$name") ]] && return 0
  setsid "$@" </dev/null >>"$STATE/logs/$name.log" 2>&1 &
  echo $! >"$STATE/pids/$name.pid"
}

wait_for() {  # wait_for SECONDS WHAT CMD...: retry CMD until it succeeds
  local secs=$1 what=$2; shift 2
  for _ in $(seq $((secs * 5))); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  die "$what did not come up in ${secs}s; logs: $STATE/logs/"
}

node_state() { timeout 10 sinfo -h -N -n localhost -o %T 2>/dev/null | head -1; }

is_up() {
  local d
  for d in "${DAEMONS[@]}"; do [[ -n $(pid_of "$d") ]] || return 1; done
  [[ $(node_state) =~ ^(idle|mixed|allocated|completing) ]]
}

install_packages() {
  local missing=0 b
  for b in munged mariadbd slurmdbd slurmctld slurmd sinfo sacctmgr mariadb; do
    command -v "$b" >/dev/null || missing=1
  done
  ((missing)) || return 0
  [[ $(id -u) == 0 ]] || die "SLURM packages are missing and installing them needs root"
  log "installing slurm-wlm munge mariadb-server slurmdbd (apt)"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    slurm-wlm munge mariadb-server slurmdbd >/dev/null
}

write_if_ours() {  # write_if_ours PATH MODE: stdin to PATH, refusing a config we did not write
  local path=$1 mode=$2 text
  text=$(cat)
  if [[ -e $path ]] && ! grep -qF "$MARK" "$path"; then
    die "$path exists and was not written by this script: is this a real cluster? not touching it"
  fi
  printf '%s\n' "$text" >"$path"
  chmod "$mode" "$path"
}

configure() {
  mkdir -p "$STATE"/{pids,logs,slurmctld,slurmd} "$CONF_DIR" /run/munge /run/mysqld \
    /var/lib/munge /var/log/munge
  chown munge:munge /run/munge /var/lib/munge /var/log/munge
  chmod 0755 /run/munge
  chown mysql:mysql /run/mysqld
  if [[ ! -s /etc/munge/munge.key ]]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown munge:munge /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key

  # This node as slurmd sees it (CPUs, memory); the node is named localhost (`slurmd -N`).
  local hw cpus mem
  hw=$(slurmd -C | head -1)
  cpus=$(sed -E 's/.* CPUs=([0-9]+).*/\1/' <<<"$hw")
  mem=$(sed -E 's/.* RealMemory=([0-9]+).*/\1/' <<<"$hw")
  write_if_ours "$CONF_DIR/slurm.conf" 0644 <<EOF
$MARK (single-node test cluster; rewritten by \`up\`)
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
# No cgroups here (no systemd): track processes through /proc, no task confinement.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without a default, one job would take the whole node's memory.
DefMemPerCPU=2000
# A request no node or partition can ever satisfy is refused at submission, not left pending.
EnforcePartLimits=ALL
ReturnToService=2
SchedulerType=sched/backfill
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/slurmctld/slurmctld.pid
SlurmdPidFile=$STATE/slurmd/slurmd.pid
SlurmctldLogFile=$STATE/logs/slurmctld.daemon.log
SlurmdLogFile=$STATE/logs/slurmd.daemon.log
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStorageEnforce=associations,limits,qos
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
MailProg=/bin/true
KillWait=10
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
  write_if_ours "$CONF_DIR/slurmdbd.conf" 0600 <<EOF
$MARK (accounting for the single-node test cluster)
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=ftlab-local
PidFile=$STATE/slurmctld/slurmdbd.pid
LogFile=$STATE/logs/slurmdbd.daemon.log
EOF
}

sacct_has() { sacctmgr -n -P show "$1" format="$2" 2>/dev/null | grep -qx "$3"; }

up() {
  [[ $(id -u) == 0 ]] || die "run as root (it writes /etc/slurm and starts system daemons)"
  if is_up; then log "already up"; return 0; fi
  install_packages
  configure

  start munged setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged -F
  wait_for 20 munged munge -n

  if [[ ! -d /var/lib/mysql/mysql ]]; then
    mariadb-install-db --user=mysql --datadir=/var/lib/mysql >>"$STATE/logs/mariadbd.log" 2>&1
  fi
  start mariadbd /usr/sbin/mariadbd --user=mysql --skip-networking \
    --socket=/run/mysqld/mysqld.sock --pid-file=/run/mysqld/mysqld.pid
  wait_for 60 mariadbd mariadb-admin --socket=/run/mysqld/mysqld.sock ping
  mariadb --socket=/run/mysqld/mysqld.sock -e "
    CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'ftlab-local';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"

  start slurmdbd /usr/sbin/slurmdbd -D
  wait_for 60 slurmdbd sacctmgr -n show cluster
  sacct_has cluster cluster "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
  sacct_has account account "$ACCOUNT" || sacctmgr -i add account "$ACCOUNT" \
    cluster="$CLUSTER" description=ftlab organization=ftlab >/dev/null
  sacct_has assoc account,user "$ACCOUNT|root" \
    || sacctmgr -i add user root account="$ACCOUNT" cluster="$CLUSTER" >/dev/null

  # Job ids go on past every job the accounting database remembers. A slurmctld whose saved
  # state is gone (a wiped $STATE, a new machine with the old /var/lib/mysql) starts again
  # at 1, and `sacct -j 8`, submitit's view of a requeued job 8, answered with an old job 8's
  # COMPLETED: the sweep failed while the job went on.
  local last
  last=$(mariadb --socket=/run/mysqld/mysqld.sock -N -e "SELECT COALESCE(MAX(id_job), 0)
    FROM slurm_acct_db.${CLUSTER}_job_table" 2>/dev/null || echo 0)
  echo "FirstJobId=$((last + 1))" >>"$CONF_DIR/slurm.conf"  # configure() just wrote it

  start slurmctld /usr/sbin/slurmctld -D -i
  wait_for 60 slurmctld scontrol ping
  start slurmd /usr/sbin/slurmd -D -N localhost
  local s
  for _ in $(seq 150); do
    s=$(node_state)
    [[ $s =~ ^(idle|mixed|allocated) ]] && break
    # A node left down/drained by an unclean stop comes back.
    [[ $s =~ ^(down|drain) ]] && scontrol update nodename=localhost state=resume >/dev/null 2>&1
    sleep 0.2
  done
  [[ $(node_state) =~ ^(idle|mixed|allocated) ]] \
    || die "node localhost is '$(node_state)', not idle; logs: $STATE/logs/"
  log "up: $(sinfo -h -o '%P %a %D %t %c CPUs %m MB' | head -1) (state $STATE)"
}

down() {
  if [[ -n $(pid_of slurmctld) ]]; then  # jobs first, so no job step outlives the cluster
    local jobs
    jobs=$(timeout 10 squeue -h -o %A 2>/dev/null || true)
    if [[ -n $jobs ]]; then
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
      for _ in $(seq 75); do
        [[ -z $(timeout 10 squeue -h -o %A 2>/dev/null) ]] && break
        sleep 0.2
      done
    fi
  fi
  local i d pid
  for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
    d=${DAEMONS[i]}
    pid=$(pid_of "$d")
    if [[ -n $pid ]]; then
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      if kill -0 "$pid" 2>/dev/null; then
        log "$d ($pid) ignored SIGTERM for 20 s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
      fi
      log "stopped $d ($pid)"
    fi
    rm -f "$STATE/pids/$d.pid"
  done
}

status() {
  local d pid rc=0
  for d in "${DAEMONS[@]}"; do
    pid=$(pid_of "$d")
    printf '%-10s %s\n' "$d" "${pid:-not running}"
    [[ -n $pid ]] || rc=1
  done
  timeout 10 sinfo 2>&1 || rc=1
  return $rc
}

case ${1:-} in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status   (state: \$FTLAB_SLURM_STATE, default $STATE)" >&2; exit 2 ;;
esac
