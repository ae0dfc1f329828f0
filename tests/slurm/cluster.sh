#!/usr/bin/env bash
# A throw-away single-node SLURM cluster for the `slurm`-marked test (tests/test_slurm.py), from Debian's packages
# (Debian 12: slurm 22.05, MariaDB 10.11). Run as root: slurmd starts each job as its submitter.
#
#   apt-get install slurmctld slurmd slurm-client slurmdbd munge mariadb-server
#   eval "$(tests/slurm/cluster.sh up)"   # starts the daemons in a fresh temp dir, waits until the node is idle,
#                                         # prints `export SLURM_CONF=… MBS_SLURM_CLUSTER=…`
#   python -m pytest -m slurm
#   tests/slurm/cluster.sh down "$MBS_SLURM_CLUSTER"   # stops the daemons it started (by pid), removes the dir
#
# Everything lives in the temp dir: slurm.conf, slurmdbd.conf, the munge key and socket, the database, pid files,
# logs, state and spool. Ports 16306 (MariaDB, 127.0.0.1 only), 16817-16819 (not SLURM's defaults) keep it clear
# of a real SLURM on the same machine.
#
# Why a database: submitit polls job states with `sacct`, which in SLURM 22.05 reads only accounting storage
# (slurmdbd); with AccountingStorageType=accounting_storage/none it exits 1 ("Slurm accounting storage is
# disabled") and submitit warns on every poll. Job completion logging (jobcomp/filetxt) feeds only `sacct -c`,
# which submitit does not call.
set -euo pipefail

wait_for() {  # wait_for SECONDS WHAT COMMAND...: poll COMMAND until it succeeds
  local limit=$1 what=$2 start=$SECONDS
  shift 2
  until "$@" >/dev/null 2>&1; do
    if (( SECONDS - start > limit )); then
      echo "cluster.sh: $what not ready after $limit s; the end of its logs:" >&2
      tail -n 5 "$dir"/*.log >&2 || true
      exit 1
    fi
    sleep 0.2
  done
}

node_idle() { sinfo -h -p cpu -o %t | grep -qx idle; }

up() {
  local host cpus mem
  for cmd in munged slurmctld slurmd slurmdbd sinfo sbatch sacct mariadbd mariadb-install-db mariadb-admin; do
    command -v "$cmd" >/dev/null || {
      echo "cluster.sh: $cmd not found (apt-get install slurmctld slurmd slurm-client slurmdbd munge mariadb-server)" >&2
      exit 1
    }
  done
  dir=$(mktemp -d /tmp/mbs-slurm.XXXXXX)
  trap '[[ -n "${KEEP:-}" ]] || down "$dir"' EXIT  # a failed start leaves nothing running (KEEP=1: keep the logs)
  chmod 755 "$dir"  # jobs (run as their submitter) read slurm.conf
  host=$(hostname -s)
  cpus=$(nproc)
  mem=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 / 2 ))  # MB: half the machine
  mkdir -p "$dir/munge" "$dir/state" "$dir/spool"
  chmod 711 "$dir/munge"
  dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
  chmod 400 "$dir/munge/munge.key"
  : > "$dir/plugstack.conf"  # not /etc/slurm/plugstack.conf
  cat > "$dir/slurm.conf" <<CONF
ClusterName=mbs-test
SlurmctldHost=$host
SlurmctldPort=16817
SlurmdPort=16818
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
CredType=cred/munge
PlugStackConfig=$dir/plugstack.conf
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$host
AccountingStoragePort=16819
# the munge socket for connections to slurmdbd (AuthInfo is not used there)
AccountingStoragePass=$dir/munge/munge.socket
MailProg=/bin/true
JobAcctGatherType=jobacct_gather/linux
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=cpu Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
  cat > "$dir/slurmdbd.conf" <<CONF
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
DbdHost=$host
DbdPort=16819
SlurmUser=root
PidFile=$dir/slurmdbd.pid
LogFile=$dir/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=16306
StorageUser=slurm
StoragePass=mbs-test
StorageLoc=slurm_acct_db
CONF
  chmod 600 "$dir/slurmdbd.conf"  # slurmdbd refuses a readable one (it holds the database password)
  export SLURM_CONF="$dir/slurm.conf"  # slurmdbd reads slurmdbd.conf from the same directory

  munged --force --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
    --pid-file="$dir/munged.pid" --log-file="$dir/munged.log" --seed-file="$dir/munge/munged.seed"

  mariadb-install-db --no-defaults --datadir="$dir/db" --user=root --auth-root-authentication-method=socket \
    --skip-test-db > "$dir/mariadb-install.log" 2>&1
  mariadbd --no-defaults --datadir="$dir/db" --socket="$dir/mariadb.sock" --bind-address=127.0.0.1 --port=16306 \
    --user=root --pid-file="$dir/mariadbd.pid" --log-error="$dir/mariadbd.log" --skip-log-bin \
    --innodb-lock-wait-timeout=900 </dev/null >/dev/null 2>&1 &
  wait_for 60 MariaDB mariadb-admin --no-defaults --socket="$dir/mariadb.sock" -u root ping
  mariadb --no-defaults --socket="$dir/mariadb.sock" -u root -e \
    "CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY 'mbs-test'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"

  slurmdbd
  wait_for 60 slurmdbd sacctmgr -n list cluster
  slurmctld -f "$SLURM_CONF"  # registers the cluster in the database
  slurmd -f "$SLURM_CONF"
  wait_for 60 "the node" node_idle
  trap - EXIT
  echo "export SLURM_CONF=$dir/slurm.conf MBS_SLURM_CLUSTER=$dir"
}

down() {
  local dir=${1:?usage: cluster.sh down DIR} name pid
  [[ -f "$dir/slurm.conf" ]] || { echo "cluster.sh: $dir is not a cluster dir" >&2; exit 1; }
  local pids=()
  for name in slurmd slurmctld slurmdbd mariadbd munged; do
    [[ -s "$dir/$name.pid" ]] || continue
    pid=$(cat "$dir/$name.pid")
    kill "$pid" 2>/dev/null && pids+=("$pid")
  done
  for pid in "${pids[@]}"; do  # 10 s each to stop, then killed
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
  rm -rf "$dir"
}

case "${1:-}" in
  up) up ;;
  down) down "${2:-}" ;;
  *) echo "usage: $0 up | down DIR" >&2; exit 2 ;;
esac
