#!/usr/bin/env bash
# The main job on a fresh machine: installs what vmkit needs, builds the guest agent
# and the tiny image, starts the daemon (if it is not running) with its SSH lobby on
# port 2222, creates a VM and runs `uname -a` in it; then registers a user with an
# SSH key, makes a VM as that user through the lobby (`ssh -p 2222 localhost new`),
# runs `uname -a` in it over SSH (`ssh -p 2222 NAME@localhost`), starts a web server
# in it and fetches its page over HTTPS (`https://NAME.localhost:8443`, certificates
# from the daemon's local CA, `vmkit ca`): private (sign in with the one-time link
# `ssh -p 2222 localhost browser` prints), then shared with everyone; and says what
# to try next.
#
# Run with: scripts/demo.sh (as root)
# State goes to $VMKIT_DATA_DIR (default /var/lib/vmkit).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "demo.sh: run as root: the daemon creates VMs, disks and (later) bridges" >&2
    exit 2
fi
export PATH="$HOME/.cargo/bin:$PATH"
export VMKIT_DATA_DIR="${VMKIT_DATA_DIR:-/var/lib/vmkit}"
say() { echo "==> $*"; }

say "installing Debian packages (qemu, busybox, e2fsprogs, ...)"
scripts/install-deps.sh
say "building the static guest agent"
agent=$(scripts/build-agent.sh)
say "building vmkit and vmkit-gateway"
cargo build -q -p vmkit -p vmkit-gateway
bin="$(cd "${CARGO_TARGET_DIR:-target}/debug" && pwd)"
vmkit="$bin/vmkit"

say "building the tiny image (cached; rebuilt only when its recipe changes)"
"$vmkit" image build tiny --agent "$agent"

socket="$VMKIT_DATA_DIR/vmkit.sock"
if "$vmkit" vm ls >/dev/null 2>&1; then
    say "vmkit-gateway is already running on $socket"
else
    say "starting vmkit-gateway (log: $VMKIT_DATA_DIR/gateway.log)"
    mkdir -p "$VMKIT_DATA_DIR"
    VMKIT_SSH_LISTEN="${VMKIT_SSH_LISTEN:-0.0.0.0:2222}" \
        VMKIT_HTTPS_LISTEN="${VMKIT_HTTPS_LISTEN:-0.0.0.0:8443}" \
        nohup "$bin/vmkit-gateway" >>"$VMKIT_DATA_DIR/gateway.log" 2>&1 &
    echo $! >"$VMKIT_DATA_DIR/gateway.pid"
    for _ in $(seq 100); do
        "$vmkit" vm ls >/dev/null 2>&1 && break
        sleep 0.2
    done
fi

name="demo-$(date +%s)"
say "creating VM $name (boots a real kernel; under software emulation this takes a few seconds)"
time "$vmkit" vm create "$name" --image tiny
say "running uname -a inside $name"
"$vmkit" vm exec "$name" -- uname -a

lobby_port=2222
if ! (exec 3<>"/dev/tcp/127.0.0.1/$lobby_port") 2>/dev/null; then
    say "the running daemon has no SSH lobby on port $lobby_port (set [ssh] listen, restart it)"
else
    key="$VMKIT_DATA_DIR/demo_ed25519"
    [ -f "$key" ] || ssh-keygen -q -t ed25519 -N "" -C "vmkit demo" -f "$key"
    users=$("$vmkit" user ls --json)
    if ! grep -q '"handle":"demo"' <<<"$users"; then
        say "registering user demo with the key $key.pub"
        "$vmkit" user add demo --key "$key.pub"
    fi
    ssh_opts=(-p "$lobby_port" -i "$key" -o IdentitiesOnly=yes -o BatchMode=yes
        -o StrictHostKeyChecking=accept-new -o "UserKnownHostsFile=$VMKIT_DATA_DIR/demo_known_hosts"
        -o LogLevel=error)
    ssh_name="ssh-$(date +%s)"
    say "as user demo, over SSH: ssh -p $lobby_port demo@localhost new --name $ssh_name --image tiny"
    time ssh "${ssh_opts[@]}" demo@localhost new --name "$ssh_name" --image tiny
    say "as user demo, over SSH: ssh -p $lobby_port demo@localhost ls"
    ssh "${ssh_opts[@]}" demo@localhost ls
    say "into the VM over SSH: ssh -p $lobby_port $ssh_name@localhost uname -a"
    time ssh "${ssh_opts[@]}" "$ssh_name@localhost" uname -a

    https_port=8443
    url="https://$ssh_name.localhost:$https_port/"
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$https_port") 2>/dev/null; then
        say "the running daemon serves no HTTPS on port $https_port (set [https] listen, restart it)"
        url=""
    else
        say "a web server in the VM: ssh -p $lobby_port $ssh_name@localhost 'busybox httpd -p 80 -h /www'"
        ssh "${ssh_opts[@]}" "$ssh_name@localhost" \
            "mkdir -p /www && echo \"hello from $ssh_name, over HTTPS\" > /www/index.html && busybox httpd -p 80 -h /www"
        ca="$VMKIT_DATA_DIR/demo-ca.crt"
        "$vmkit" ca >"$ca"
        say "its page, private: curl --cacert $ca $url"
        curl -sS -o /dev/null -w '%{http_code} -> %{redirect_url}\n' --cacert "$ca" "$url"
        say "signed in with the link from ssh -p $lobby_port demo@localhost browser"
        link=$(ssh "${ssh_opts[@]}" demo@localhost browser | grep -o 'https://[^ ]*/__vmkit/login?token=[^ ]*')
        jar=$(mktemp)
        curl -sS -o /dev/null --cacert "$ca" -c "$jar" -b "$jar" "$link"
        curl -sS -L --cacert "$ca" -c "$jar" -b "$jar" "$url"
        rm -f "$jar"
        say "shared with everyone: ssh -p $lobby_port demo@localhost share $ssh_name public"
        ssh "${ssh_opts[@]}" demo@localhost share "$ssh_name" public
        curl -sS --cacert "$ca" "$url"
    fi
fi

cat <<MSG

It works. Try next:
  $vmkit vm ls                              list VMs
  $vmkit vm exec $name -- cat /proc/cpuinfo   run anything in the VM
  echo hi | $vmkit vm exec -i $name -- cat    stdin is passed with -i
  $vmkit vm stop $name; $vmkit vm start $name
  $vmkit events                             what happened, in order
  $vmkit vm rm $name                        remove it and everything it held
  ssh -p $lobby_port -i $VMKIT_DATA_DIR/demo_ed25519 demo@localhost help   the SSH lobby, as user demo
  ssh -t -p $lobby_port -i $VMKIT_DATA_DIR/demo_ed25519 ${ssh_name:-NAME}@localhost   a shell in that VM
  ssh -p $lobby_port -i $VMKIT_DATA_DIR/demo_ed25519 demo@localhost browser   a link that signs your browser in
  $vmkit ca                                 the local CA, for your browser to trust
${url:+Its web page (trust $VMKIT_DATA_DIR/demo-ca.crt first):
  $url
}The daemon keeps running (pid $(cat "$VMKIT_DATA_DIR/gateway.pid" 2>/dev/null || echo '?')); stop it with
  kill \$(cat $VMKIT_DATA_DIR/gateway.pid)    VMs keep running and are re-attached at its next start
MSG
