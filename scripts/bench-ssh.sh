#!/usr/bin/env bash
# Benchmarks of the SSH gateway (issue 15), each against a baseline measured in the
# same run, printed as one table (and kept in target/bench-ssh-results.txt):
#
#  1. time to SSH: wall time from `ssh HANDLE@gw new --image base` to the end of the
#     first `ssh NAME@gw true`, against the time from that VM's `creating VM` to its
#     `agent ready` line in the daemon's log (the agent's hello of the same boot).
#     RUNS runs (argument, default 3), mean and median; goal <= 1.5x.
#  2. lobby round trip: `ssh -p 2222 HANDLE@127.0.0.1 ls --json` against
#     `ssh -p 2200 root@127.0.0.1 true` to a host OpenSSH sshd started here with its
#     own temporary config, host key and authorized keys; 20 of each, alternating;
#     ratio of the medians; goal <= 1.5x.
#  3. throughput: `cat` of a 200 MB file made in the VM from /dev/urandom (in /tmp, or
#     /dev/shm when /tmp has no room), to the client, through `ssh NAME@gw`
#     (relayed by the gateway), `ssh vmkit@VM_IP`
#     (straight to the VM's sshd) and `ssh -J HANDLE@gw vmkit@NAME.vm.test` (a TCP
#     relay through the gateway, end to end to the VM's sshd); MB/s (10^6 bytes) and
#     ratios; goal >= 0.8x direct. Every OpenSSH client offers chacha20-poly1305 only
#     (and curve25519-sha256 only, the gateway's key exchange, in every figure);
#     the negotiated ciphers are printed. The gateway's own hop to the VM's sshd is a
#     russh client with russh's default order, chacha20-poly1305 first.
#  4. memory per idle connection: the daemon's VmRSS with no client, then with 1,000
#     signed-in idle `ssh -N HANDLE@gw` (25 from each of 40 source addresses
#     127.0.0.11-50, as the gateway admits 32 per address), checked by the daemon's
#     "signed in over SSH" lines and by the established sockets; (RSS_1000 -
#     RSS_0) / 1000 in KiB.
#
# How: builds the CLI and the daemon (debug, as the tests do) and the test images
# (scripts/test-assets.sh), then runs the daemon (real QEMU, bridge network), the
# host sshd and every client inside a network namespace of its own (`ip netns add`,
# `nsenter --net`), as bins/vmkit-gateway/tests/ssh_qemu.rs does. Every wait is
# bounded; on exit, even on failure, the clients, sshd, VMs, daemon and namespace are
# removed (the daemon's log is kept in target/bench-ssh-daemon.log). Under QEMU TCG
# (no usable KVM) VMs are slow: read the ratios, not the absolute figures.
#
# Reading the table: each row is "figure | measured | baseline | ratio | goal"; a
# ratio is gateway / baseline for times (lower is better) and gateway / direct for
# throughput (higher is better). Rows marked MISSED did not meet their goal.
#
# Run with: sudo scripts/bench-ssh.sh [RUNS]    (RUNS of the time-to-SSH figure, default 3)
# Environment: BENCH_TP_ROUNDS (throughput rounds per path, default 2),
# BENCH_IDLE (idle connections, default 1000), VMKIT_TEST_DATA (test images).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/install-servers.sh
. scripts/lib/install-servers.sh

runs=${1:-3}
if ! [[ $runs =~ ^[1-9][0-9]?$ ]]; then
    echo "usage: $0 [RUNS]   (RUNS: 1-99 time-to-SSH runs, default 3)" >&2
    exit 2
fi
if [ "$(id -u)" != 0 ]; then
    echo "bench-ssh.sh: run as root (it makes a network namespace and boots VMs)" >&2
    exit 2
fi
tp_rounds=${BENCH_TP_ROUNDS:-2}
idle=${BENCH_IDLE:-1000}
per_addr=25
export PATH="$HOME/.cargo/bin:$PATH"

ns="vmkbench$$"
subnet=10.79.0.0/24
port=2222
sshd_port=2200
domain=vm.test
handle=bencher
file_bytes=$((200 * 1024 * 1024))
results=target/bench-ssh-results.txt

now() { date +%s.%N; }
# calc EXPR: floating-point arithmetic.
calc() { awk "BEGIN { printf \"%.3f\\n\", $1 }"; }
# stats: mean and median of the numbers on stdin, "MEAN MEDIAN".
stats() {
    sort -g | awk '{ v[NR] = $1; s += $1 }
        END { m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2;
              printf "%.3f %.3f\n", s / NR, m }'
}
say() { echo "==> $*" >&2; }
die() {
    echo "bench-ssh.sh: $*" >&2
    exit 1
}

# --- what it needs ---------------------------------------------------------------
if [ ! -x /usr/sbin/sshd ]; then
    say "installing openssh-server (for the host sshd baseline)"
    install_servers openssh-server
fi
sshd_version=$(/usr/sbin/sshd -V 2>&1 | head -1) || true
case $sshd_version in
OpenSSH*) ;;
*) die "/usr/sbin/sshd does not run (sshd -V: $sshd_version)" ;;
esac

say "building the CLI and the daemon"
cargo build -q -p vmkit -p vmkit-gateway
bin="${CARGO_TARGET_DIR:-target}/debug"
bin=$(cd "$bin" && pwd)
say "building the test images"
export VMKIT_TEST_DATA="${VMKIT_TEST_DATA:-$PWD/target/vmkit-test}"
scripts/test-assets.sh >&2
images="$VMKIT_TEST_DATA/images"
[ -e "$images/base/manifest.json" ] || die "no base image in $images"

# --- the namespace, its daemon and sshd, and their removal -----------------------
work=$(mktemp -d /tmp/vmkbench.XXXXXX)
# A confined VMM runs as its VM's uid: the directories above its disks must be
# searchable by others.
chmod 711 "$work"
data="$work/data"
log="$data/daemon.log"
mkdir -p "$data/images" "$work/sshd"
ln -s "$images/tiny" "$data/images/tiny"
ln -s "$images/base" "$data/images/base"
: >"$work/clients.pids"
daemon_pid=
sshd_pid=
vms=()

cli() { timeout 300 "$bin/vmkit" --socket "$data/vmkit.sock" --data-dir "$data" "$@"; }
inns() { nsenter --net="/run/netns/$ns" "$@"; }

cleanup() {
    local status=$? pid i
    set +e
    trap - EXIT INT TERM
    if [ -s "$work/clients.pids" ]; then
        xargs -r kill <"$work/clients.pids" 2>/dev/null
    fi
    [ -n "$sshd_pid" ] && kill "$sshd_pid" 2>/dev/null
    if [ -n "$daemon_pid" ] && kill -0 "$daemon_pid" 2>/dev/null; then
        for vm in "${vms[@]}"; do
            timeout 120 "$bin/vmkit" --socket "$data/vmkit.sock" --data-dir "$data" vm rm "$vm" >/dev/null 2>&1
        done
        kill -TERM "$daemon_pid"
        for ((i = 0; i < 300; i++)); do
            kill -0 "$daemon_pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$daemon_pid" 2>/dev/null
    fi
    if ip netns list | grep -qw "$ns"; then
        # Whatever still runs in the namespace (a VMM the daemon left) is ours.
        for pid in $(ip netns pids "$ns"); do
            kill -KILL "$pid" 2>/dev/null
        done
        sleep 1
        ip netns del "$ns"
    fi
    [ -f "$log" ] && cp "$log" target/bench-ssh-daemon.log
    rm -rf "$work"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ip netns add "$ns"
ip -n "$ns" link set lo up

say "starting the daemon in namespace $ns"
# nsenter and env exec what they run: $! is the daemon's pid.
nsenter --net="/run/netns/$ns" env -u VMKIT_DATA_DIR -u VMKIT_SOCKET \
    VMKIT_LOG=info VMKIT_HYPERVISOR=qemu VMKIT_NETWORK_ENABLED=true \
    VMKIT_NETWORK_SUBNET="$subnet" VMKIT_NETWORK_DNS=local VMKIT_DEFAULT_IMAGE=base \
    VMKIT_SSH_LISTEN="127.0.0.1:$port" VMKIT_SSH_DOMAIN="$domain" \
    VMKIT_TIMEOUTS_BOOT_SECS=300 \
    "$bin/vmkit-gateway" --data-dir "$data" </dev/null >/dev/null 2>"$log" &
daemon_pid=$!
for ((i = 0; ; i++)); do
    kill -0 "$daemon_pid" 2>/dev/null || die "the daemon exited: $(tail -20 "$log")"
    grep -q "SSH gateway listening" "$log" && cli vm ls >/dev/null 2>&1 && break
    ((i < 600)) || die "the daemon did not come up in 60 s: $(tail -20 "$log")"
    sleep 0.1
done

# One key for every client: the gateway's user, the host sshd's root and (installed
# by the agent) the VM's user vmkit.
key="$work/id_ed25519"
ssh-keygen -q -t ed25519 -N "" -C "$handle" -f "$key"
cli user add "$handle" --key "$key.pub" >/dev/null
cfg="$work/ssh_config"
cat >"$cfg" <<EOF
Host gw
  HostName 127.0.0.1
  Port $port
  User $handle
Host hostsshd
  HostName 127.0.0.1
  Port $sshd_port
  User root
Host *.$domain
  User vmkit
  ProxyJump gw
Host *
  IdentityFile $key
  IdentitiesOnly yes
  BatchMode yes
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  LogLevel error
  ConnectTimeout 60
  Ciphers chacha20-poly1305@openssh.com
  KexAlgorithms curve25519-sha256
  ControlMaster no
  ControlPath none
EOF
# ssh ARGS...: the OpenSSH client in the namespace with the config above, bounded.
ssh_ns() { inns timeout 600 ssh -F "$cfg" "$@"; }

say "starting a host sshd on 127.0.0.1:$sshd_port ($sshd_version)"
ssh-keygen -q -t ed25519 -N "" -f "$work/sshd/host_ed25519"
cp "$key.pub" "$work/sshd/authorized_keys"
cat >"$work/sshd/sshd_config" <<EOF
ListenAddress 127.0.0.1:$sshd_port
HostKey $work/sshd/host_ed25519
AuthorizedKeysFile $work/sshd/authorized_keys
PidFile $work/sshd/sshd.pid
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
MaxStartups 100
# root's bash would source its ~/.bashrc for the command (bash does under sshd
# unless SHLVL is set), which is not OpenSSH's cost.
SetEnv SHLVL=1
EOF
mkdir -p /run/sshd
nsenter --net="/run/netns/$ns" /usr/sbin/sshd -D -e -f "$work/sshd/sshd_config" </dev/null 2>"$work/sshd/log" &
sshd_pid=$!
for ((i = 0; ; i++)); do
    ssh_ns hostsshd true 2>/dev/null && break
    ((i < 50)) || die "the host sshd does not answer: $(cat "$work/sshd/log")"
    sleep 0.2
done

# log_epoch PATTERN VM: the time of the first log line with PATTERN for VM.
log_epoch() {
    local ts
    ts=$(grep -a -- "$1" "$log" | grep -a -E "vm=$2( |\$)" | head -1 | awk '{ print $1 }')
    [ -n "$ts" ] || die "no \"$1\" line for $2 in the daemon's log"
    date -d "$ts" +%s.%N
}

# --- 1. time to SSH -----------------------------------------------------------------
: >"$work/tts"
for ((r = 1; r <= runs; r++)); do
    vm="tts$r"
    say "time to SSH, run $r/$runs: ssh gw new --name $vm --image base"
    vms+=("$vm")
    t0=$(now)
    ssh_ns gw new --name "$vm" --image base --memory 1024 >"$work/new.out" 2>&1 ||
        die "new $vm: $(cat "$work/new.out")"
    tries=0
    until ssh_ns "$vm@gw" true 2>"$work/true.err"; do
        tries=$((tries + 1))
        ((tries < 30)) || die "ssh $vm@gw true: $(cat "$work/true.err")"
        sleep 0.2
    done
    t1=$(now)
    created=$(log_epoch "creating VM" "$vm")
    ready=$(log_epoch "agent ready" "$vm")
    wall=$(calc "$t1 - $t0")
    hello=$(calc "$ready - $created")
    echo "$wall $hello $(calc "$wall / $hello")" >>"$work/tts"
    say "  ssh: ${wall}s, agent hello: ${hello}s (first ssh retried $tries times)"
    if ((r < runs)); then
        cli vm rm "$vm" >/dev/null
        unset 'vms[-1]'
    fi
done
read -r tts_wall_mean tts_wall_med < <(awk '{ print $1 }' "$work/tts" | stats)
read -r tts_hello_mean tts_hello_med < <(awk '{ print $2 }' "$work/tts" | stats)
read -r tts_ratio_mean tts_ratio_med < <(awk '{ print $3 }' "$work/tts" | stats)
vm="tts$runs"

# --- 2. lobby round trip ------------------------------------------------------------
say "lobby round trip: 20 x ssh gw ls --json against 20 x ssh hostsshd true"
: >"$work/rtt.gw"
: >"$work/rtt.sshd"
for ((i = 0; i < 20; i++)); do
    t0=$(now)
    ssh_ns gw ls --json >/dev/null || die "ssh gw ls --json failed"
    t1=$(now)
    ssh_ns hostsshd true || die "ssh hostsshd true failed"
    t2=$(now)
    calc "$t1 - $t0" >>"$work/rtt.gw"
    calc "$t2 - $t1" >>"$work/rtt.sshd"
done
read -r rtt_gw_mean rtt_gw_med < <(stats <"$work/rtt.gw")
read -r rtt_sshd_mean rtt_sshd_med < <(stats <"$work/rtt.sshd")
rtt_ratio=$(calc "$rtt_gw_med / $rtt_sshd_med")
say "  ls --json median ${rtt_gw_med}s, sshd true median ${rtt_sshd_med}s: ${rtt_ratio}x"

# --- 3. throughput ------------------------------------------------------------------
vm_ip=$(cli --json vm show "$vm" | grep -o '"ip": *"[0-9.]*"' | grep -o '[0-9.]*[0-9]' | head -1)
[ -n "$vm_ip" ] || die "no address for $vm"
say "throughput: 200 MB from $vm ($vm_ip)"
# In /tmp, or in /dev/shm when the VM's /tmp has no room for it (the base image's
# root file system is small). The command is expanded in the VM.
# shellcheck disable=SC2016
read -r file made < <(ssh_ns "$vm@gw" 'd=/tmp
    [ "$(df -Pk /tmp | awk "NR == 2 { print \$4 }")" -gt 220000 ] || d=/dev/shm
    head -c 200M /dev/urandom >$d/f && echo $d/f $(stat -c %s $d/f)') || true
[ "$made" = "$file_bytes" ] || die "the file in the VM has ${made:-no} bytes"
say "  made $file"
# cipher DEST: the ciphers OpenSSH negotiated on the way to DEST (server->client).
cipher() {
    ssh_ns -v "$@" true 2>&1 | sed -n 's/.*kex: server->client cipher: \([^ ]*\).*/\1/p' |
        sort -u | paste -sd, -
}
cipher_gw=$(cipher "$vm@gw")
cipher_direct=$(cipher "vmkit@$vm_ip")
cipher_jump=$(cipher "$vm.$domain")
# cpu_ticks: the daemon's user + system CPU time, in clock ticks.
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$daemon_pid/stat"; }
hz=$(getconf CLK_TCK)
: >"$work/tp"
for ((i = 0; i < tp_rounds; i++)); do
    for path in gw direct jump; do
        case $path in
        gw) dest="$vm@gw" ;;
        direct) dest="vmkit@$vm_ip" ;;
        jump) dest="$vm.$domain" ;;
        esac
        c0=$(cpu_ticks)
        t0=$(now)
        got=$(ssh_ns "$dest" cat "$file" | wc -c)
        t1=$(now)
        c1=$(cpu_ticks)
        [ "$got" = "$file_bytes" ] || die "$path: $got bytes of $file_bytes"
        echo "$path $(calc "$file_bytes / 1e6 / ($t1 - $t0)") $(calc "($c1 - $c0) / $hz")" >>"$work/tp"
        say "  $path: $(tail -1 "$work/tp" | awk '{ print $2 " MB/s, daemon CPU " $3 " s" }')"
    done
done
tp() { awk -v p="$1" '$1 == p { print $2 }' "$work/tp" | stats | awk '{ print $1 }'; }
tp_gw=$(tp gw)
tp_direct=$(tp direct)
tp_jump=$(tp jump)
# cpu PATH: the daemon's mean CPU seconds per transfer on PATH.
cpu() { awk -v p="$1" '$1 == p { s += $3; n++ } END { printf "%.1f", s / n }' "$work/tp"; }

# --- 4. memory per idle connection --------------------------------------------------
rss() { awk '/^VmRSS:/ { print $2 }' "/proc/$daemon_pid/status"; }
signed_in() { grep -a -c "signed in over SSH" "$log" || true; }
established() {
    inns ss -Htn state established "( sport = :$port )" | wc -l
}
sleep 2
[ "$(established)" = 0 ] || die "connections to the gateway are still open"
rss0=$(rss)
base=$(signed_in)
addrs=$(((idle + per_addr - 1) / per_addr))
say "memory: RSS $rss0 KiB with no client; opening $idle idle connections from $addrs addresses"
opened=0
for ((a = 0; a < addrs; a++)); do
    src="127.0.0.$((11 + a))"
    for ((j = 0; j < per_addr && opened < idle; j++)); do
        nsenter --net="/run/netns/$ns" ssh -F "$cfg" -N -b "$src" gw </dev/null >/dev/null 2>>"$work/idle.err" &
        echo $! >>"$work/clients.pids"
        opened=$((opened + 1))
    done
    for ((i = 0; $(signed_in) - base < opened; i++)); do
        ((i < 600)) || die "only $(($(signed_in) - base)) of $opened signed in after 60 s: $(tail -3 "$work/idle.err")"
        sleep 0.1
    done
done
sleep 5
idle_signed=$(($(signed_in) - base))
idle_sockets=$(established)
rss1=$(rss)
alive=0
while read -r pid; do
    kill -0 "$pid" 2>/dev/null && alive=$((alive + 1))
done <"$work/clients.pids"
xargs -r kill <"$work/clients.pids" 2>/dev/null || true
: >"$work/clients.pids"
per_conn=$(calc "($rss1 - $rss0) / $idle")
if ((idle_signed < idle || idle_sockets < idle || alive < idle)); then
    die "not all $idle idle connections held: signed in $idle_signed, sockets $idle_sockets, clients $alive"
fi

# --- the table ----------------------------------------------------------------------
accel=$(sed -n 's/.*QEMU accelerator chosen accel=\([a-z]*\).*/\1/p' "$log" | head -1)
# verdict RATIO OP GOAL: "ok" or "MISSED".
verdict() { awk -v r="$1" -v g="$3" -v op="$2" 'BEGIN { ok = (op == "<=") ? r <= g : r >= g; print ok ? "ok" : "MISSED" }'; }
{
    echo
    echo "vmkit SSH gateway benchmarks, $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs ($(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)), QEMU accel=${accel:-unknown}, $sshd_version"
    echo
    printf '%-42s | %-42s | %-40s | %-16s | %s\n' figure measured baseline ratio goal
    printf -- '-%.0s' {1..160}
    echo
    printf '%-42s | %-42s | %-40s | %-16s | %s\n' \
        "1. time to SSH, base image ($runs runs)" \
        "new..ssh true: mean ${tts_wall_mean}s med ${tts_wall_med}s" \
        "create..agent hello: ${tts_hello_mean}s / ${tts_hello_med}s" \
        "${tts_ratio_mean}x / ${tts_ratio_med}x" \
        "<= 1.5x ($(verdict "$tts_ratio_med" '<=' 1.5))"
    printf '%-42s | %-42s | %-40s | %-16s | %s\n' \
        "2. lobby round trip (20 each, alternating)" \
        "ls --json: med ${rtt_gw_med}s mean ${rtt_gw_mean}s" \
        "sshd true: med ${rtt_sshd_med}s mean ${rtt_sshd_mean}s" \
        "${rtt_ratio}x medians" \
        "<= 1.5x ($(verdict "$rtt_ratio" '<=' 1.5))"
    printf '%-42s | %-42s | %-40s | %-16s | %s\n' \
        "3a. throughput ssh NAME@gw, 200 MB" "$tp_gw MB/s" "direct: $tp_direct MB/s" \
        "$(calc "$tp_gw / $tp_direct")x direct" ">= 0.8x ($(verdict "$(calc "$tp_gw / $tp_direct")" '>=' 0.8))"
    printf '%-42s | %-42s | %-40s | %-16s | %s\n' \
        "3b. throughput ssh -J gw NAME.$domain" "$tp_jump MB/s" "direct: $tp_direct MB/s" \
        "$(calc "$tp_jump / $tp_direct")x direct" ">= 0.8x ($(verdict "$(calc "$tp_jump / $tp_direct")" '>=' 0.8))"
    printf '%-42s | %-42s | %-40s | %-16s | %s\n' \
        "3c. ssh -J against ssh NAME@gw" "$tp_jump MB/s" "NAME@gw: $tp_gw MB/s" \
        "$(calc "$tp_jump / $tp_gw")x" "-"
    printf '%-42s | %-42s | %-40s | %-16s | %s\n' \
        "4. daemon memory per idle connection" "RSS $rss1 KiB at $idle conns" "RSS $rss0 KiB at 0" \
        "$per_conn KiB/conn" "-"
    echo
    echo "throughput: $tp_rounds rounds per path, mean of MB/s; negotiated (server->client): NAME@gw $cipher_gw, direct $cipher_direct, -J $cipher_jump (end to end; its hop to the gateway the same); gateway->VM hop: russh default order, chacha20-poly1305 first"
    echo "daemon CPU per 200 MB transfer: NAME@gw $(cpu gw) s, -J $(cpu jump) s, direct $(cpu direct) s; daemon built with the dev profile (unoptimised, as the tests)"
    echo "idle connections: $idle_signed signed in (daemon log), $idle_sockets established sockets, $alive clients alive"
    echo "time to SSH per run (ssh s, hello s, ratio):"
    sed 's/^/  /' "$work/tts"
} | tee "$results"
