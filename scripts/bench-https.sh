#!/usr/bin/env bash
# Benchmarks of the HTTPS edge (issue 16): requests per second and p99 latency through
# vmkit's edge against nginx and Caddy proxying the same upstream, on this machine in
# the same run, printed as one table (and kept in target/bench-https-results.txt).
#
#  1. h1: small responses over kept-alive HTTP/1.1 (h2load --h1, C_H1 connections);
#  2. h2: small responses over HTTP/2 (h2load, C_H2 connections x M_H2 streams each);
#  3. conn: new TLS connections per second, one request per connection (h2load
#     --h1 with `Connection: close`: every request a new TCP and TLS handshake,
#     C_CONN at once, N_CONN requests in all; its p99 is of the request's time on
#     its new connection, after the handshake, as h2load logs it).
#
# The same for all three proxies:
#  - the upstream: an nginx serving a 13-byte body ("hello, world\n") on 127.0.0.1
#    over plain HTTP/1.1, one worker; each proxy keeps connections to it alive;
#  - the certificate and key: one ECDSA P-256 leaf for web.vm.test, vm.test and
#    *.vm.test from a local CA, issued by vmkit's runner and written for nginx and
#    Caddy to serve;
#  - TLS 1.3 only, the client offering TLS_AES_128_GCM_SHA256 only, ALPN h2 and
#    http/1.1 (checked in h2load's output: the protocol and the cipher);
#  - no access logs; as many workers as CPUs (nginx worker_processes auto, Caddy's
#    GOMAXPROCS, vmkit's multi-threaded tokio runtime);
#  - the client: h2load, one thread, URL https://web.vm.test:PORT/ with
#    --connect-to 127.0.0.1 (the SNI and Host are web.vm.test).
# vmkit's side is benches/https_edge.rs (built --release): HttpsEdge over a fake
# host with one VM `web` shared public, its route pointed at the upstream.
#
# Each h1 and h2 run lasts DURATION seconds after WARMUP seconds of warm-up; the three proxies
# take turns, REPS rounds; the table shows the median of the rounds for req/s and
# for p99 (computed from h2load's per-request log), and the ratios
# vmkit/nginx and vmkit/caddy (req/s: higher is better; p99: lower is better). Every
# figure's raw rounds are printed below the table. The client, the proxies and the
# upstream share this machine's CPUs: compare within the run, not across machines.
# The load average at the start and at the end is printed with the table: another
# busy process on the machine skews the figures (the rounds alternate the proxies so
# that it skews all three alike, roughly). Everything listens on 127.0.0.1 only; on exit, even on failure, every process the
# script started is stopped (trap).
#
# Run with: scripts/bench-https.sh    (as root when nginx, caddy or h2load are missing:
#           it installs them)
# Environment: REPS (3), DURATION (10), WARMUP (2), C_H1 (32), C_H2 (8), M_H2 (16),
#              C_CONN (16), N_CONN (20000), BASE_PORT (18440: it uses BASE_PORT..BASE_PORT+3),
#              PERF=1: also profile vmkit's edge with `perf record -g` during its first
#              round of each figure; the top of each profile is printed after the table
#              (and kept in target/bench-https-perf-FIGURE.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/install-servers.sh
. scripts/lib/install-servers.sh

reps=${REPS:-3}
duration=${DURATION:-10}
warmup=${WARMUP:-2}
c_h1=${C_H1:-32}
c_h2=${C_H2:-8}
m_h2=${M_H2:-16}
c_conn=${C_CONN:-16}
n_conn=${N_CONN:-20000}
base=${BASE_PORT:-18440}
profile=${PERF:-0}
up_port=$base
declare -A port=([vmkit]=$((base + 1)) [nginx]=$((base + 2)) [caddy]=$((base + 3)))
proxies=(vmkit nginx caddy)
host=web.vm.test
cipher=TLS_AES_128_GCM_SHA256
results=target/bench-https-results.txt
mkdir -p target
export PATH="$HOME/.cargo/bin:$PATH:/usr/sbin:/sbin"

say() { echo "==> $*" >&2; }
die() {
    echo "bench-https.sh: $*" >&2
    exit 1
}
for v in reps duration warmup c_h1 c_h2 m_h2 c_conn n_conn base; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive whole number (is ${!v})"
done

# --- what it needs -------------------------------------------------------------
need=()
command -v nginx >/dev/null || need+=(nginx)
command -v caddy >/dev/null || need+=(caddy)
command -v h2load >/dev/null || need+=(nghttp2-client)
if ((${#need[@]})); then
    [ "$(id -u)" = 0 ] || die "missing ${need[*]}: run apt-get install ${need[*]} (as root), or this script as root"
    say "installing ${need[*]}"
    install_servers "${need[@]}"
fi
nginx_version=$(nginx -v 2>&1) || die "nginx does not run: $nginx_version"
caddy_version=$(caddy version 2>&1) || die "caddy does not run: $caddy_version"
h2load_version=$(h2load --version 2>&1) || die "h2load does not run: $h2load_version"
h2load --help | grep -q -- --connect-to || die "this h2load has no --connect-to ($h2load_version)"
for p in "$up_port" "${port[@]}"; do
    ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || die "port $p is taken: set BASE_PORT"
done

if [ "$profile" = 1 ]; then
    perf --version >/dev/null 2>&1 || die "PERF=1 wants perf (apt-get install linux-perf)"
fi

say "building vmkit's runner (release)"
cargo build -q --release -p vmkit-benches --bin https-edge
runner="${CARGO_TARGET_DIR:-target}/release/https-edge"

# --- the servers, and their removal ---------------------------------------------
work=$(mktemp -d /tmp/vmkbench-https.XXXXXX)
pids=()
cleanup() {
    local status=$? pid i
    set +e
    trap - EXIT INT TERM
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    for ((i = 0; i < 50; i++)); do
        alive=0
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        ((alive)) || break
        sleep 0.1
    done
    for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null; done
    rm -rf "$work"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# wait_port PORT WHAT LOG: until something accepts on 127.0.0.1:PORT (10 s at most);
# else fails with the end of WHAT's LOG.
wait_port() {
    local i
    for ((i = 0; i < 100; i++)); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    die "$2 does not listen on 127.0.0.1:$1: $(tail -5 "$3" 2>/dev/null)"
}

mkdir -p "$work/up" "$work/nginx" "$work/caddy" "$work/vmkit"
# nginx's workers (nobody, under a root master) read the upstream's body.
chmod 711 "$work"
chmod 755 "$work/up"
printf 'hello, world\n' >"$work/up/index.html"
# nginx_conf DIR BODY: an nginx configuration with its files under DIR; BODY is
# its http block's servers. Runs in the foreground (the script keeps its pid).
nginx_conf() {
    cat <<EOF
daemon off;
pid $1/nginx.pid;
error_log $1/error.log warn;
$3
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $1/body;
    proxy_temp_path $1/proxy;
    fastcgi_temp_path $1/fastcgi;
    uwsgi_temp_path $1/uwsgi;
    scgi_temp_path $1/scgi;
    keepalive_requests 1000000;
$2
}
EOF
}
nginx_conf "$work/up" "
    server {
        listen 127.0.0.1:$up_port;
        root $work/up;
        location = / { try_files /index.html =404; }
    }" "worker_processes 1;" >"$work/up/nginx.conf"
nginx -p "$work/up" -c "$work/up/nginx.conf" -e "$work/up/error.log" </dev/null >/dev/null 2>&1 &
pids+=($!)
wait_port "$up_port" "the upstream nginx" "$work/up/error.log"
[ "$(curl -sS --max-time 5 "http://127.0.0.1:$up_port/")" = "hello, world" ] ||
    die "the upstream does not answer: $(cat "$work/up/error.log")"

say "starting vmkit's edge on 127.0.0.1:${port[vmkit]}"
"$runner" "${port[vmkit]}" "$up_port" "$work/vmkit" </dev/null >"$work/vmkit/out" 2>"$work/vmkit/err" &
vmkit_pid=$!
pids+=("$vmkit_pid")
wait_port "${port[vmkit]}" "vmkit's edge" "$work/vmkit/err"
cert=$work/vmkit/cert.pem
key=$work/vmkit/key.pem

say "starting nginx on 127.0.0.1:${port[nginx]} ($nginx_version)"
nginx_conf "$work/nginx" "
    upstream web { server 127.0.0.1:$up_port; keepalive 64; }
    server {
        listen 127.0.0.1:${port[nginx]} ssl http2;
        server_name $host;
        ssl_certificate $cert;
        ssl_certificate_key $key;
        ssl_protocols TLSv1.3;
        http2_max_concurrent_streams 128;
        location / {
            proxy_pass http://web;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_set_header Host \$host;
            proxy_set_header X-Forwarded-For \$remote_addr;
            proxy_set_header X-Forwarded-Proto https;
            proxy_set_header X-Forwarded-Host \$http_host;
        }
    }" "worker_processes auto;" >"$work/nginx/nginx.conf"
nginx -p "$work/nginx" -c "$work/nginx/nginx.conf" -e "$work/nginx/error.log" </dev/null >/dev/null 2>&1 &
pids+=($!)
wait_port "${port[nginx]}" nginx "$work/nginx/error.log"

say "starting Caddy on 127.0.0.1:${port[caddy]} ($caddy_version)"
cat >"$work/caddy/Caddyfile" <<EOF
{
    admin off
    auto_https off
    storage file_system $work/caddy/data
    servers {
        protocols h1 h2
    }
}
https://$host:${port[caddy]} {
    bind 127.0.0.1
    tls $cert $key {
        protocols tls1.3
    }
    reverse_proxy 127.0.0.1:$up_port
}
EOF
HOME="$work/caddy" XDG_DATA_HOME="$work/caddy/data" XDG_CONFIG_HOME="$work/caddy/config" \
    caddy run --config "$work/caddy/Caddyfile" --adapter caddyfile </dev/null >/dev/null 2>"$work/caddy/log" &
pids+=($!)
wait_port "${port[caddy]}" Caddy "$work/caddy/log"

for p in "${proxies[@]}"; do
    got=$(curl -sS --max-time 5 --cacert "$work/vmkit/ca.pem" --resolve "$host:${port[$p]}:127.0.0.1" \
        "https://$host:${port[$p]}/") || die "$p does not answer through TLS"
    [ "$got" = "hello, world" ] || die "$p answers \"$got\", not the upstream's body"
done

# --- the runs -------------------------------------------------------------------
# run PROXY SCENARIO ROUND: one h2load run; appends "PROXY SCENARIO REQ/S P99_MS"
# to $work/figures.
run() {
    local p=$1 scenario=$2 round=$3 out log args
    out="$work/$p.$scenario.$round.out"
    log="$work/$p.$scenario.$round.log"
    args=(-t 1 --log-file "$log" --tls13-ciphers "$cipher" --connect-to "127.0.0.1:${port[$p]}")
    case $scenario in
    h1) args+=(-D "$duration" --warm-up-time "$warmup" --h1 -c "$c_h1") ;;
    h2) args+=(-D "$duration" --warm-up-time "$warmup" -c "$c_h2" -m "$m_h2") ;;
    # h2load reconnects after `Connection: close` in its count mode only (in its
    # timed mode it stalls): a number of requests instead of a duration.
    conn) args+=(-n "$n_conn" --h1 -c "$c_conn" -H "Connection: close") ;;
    esac
    local perf_pid=
    if [[ $profile = 1 && $p = vmkit && $round = 1 ]]; then
        perf record -q -g -F 499 -o "$work/perf.$scenario.data" -p "$vmkit_pid" \
            -- sleep "$([ "$scenario" = conn ] && echo 5 || echo "$duration")" >/dev/null 2>&1 &
        perf_pid=$!
        pids+=("$perf_pid")
    fi
    timeout $((duration + warmup + 120)) h2load "${args[@]}" "https://$host:${port[$p]}/" >"$out" 2>&1 ||
        die "h2load against $p ($scenario) failed: $(tail -20 "$out")"
    if [ -n "$perf_pid" ]; then
        wait "$perf_pid" || true
        perf report -i "$work/perf.$scenario.data" --no-children --sort dso,symbol --stdio 2>/dev/null |
            awk '/^ +[0-9.]+%/ && n++ < 40 { sub(/ +- +- *$/, ""); gsub(/ +/, " "); print }' \
                >"target/bench-https-perf-$scenario.txt" || true
    fi
    local proto rps ok total failed s2 s3 s4 s5 logged p99
    proto=$(sed -n 's/^Application protocol: //p' "$out" | head -1)
    case $scenario in
    h2) [ "$proto" = h2 ] || die "$p $scenario: ALPN chose \"$proto\", not h2" ;;
    *) [ "$proto" = http/1.1 ] || die "$p $scenario: ALPN chose \"$proto\", not http/1.1" ;;
    esac
    grep -q "^TLS Protocol: TLSv1.3" "$out" || die "$p $scenario: not TLS 1.3: $(grep ^TLS "$out")"
    grep -q "^Cipher: $cipher" "$out" || die "$p $scenario: not $cipher: $(grep ^Cipher "$out")"
    rps=$(sed -n 's/^finished in [^,]*, \([0-9.]*\) req\/s.*/\1/p' "$out")
    read -r total ok failed < <(sed -n 's/^requests: \([0-9]*\) total, .* \([0-9]*\) succeeded, \([0-9]*\) failed.*/\1 \2 \3/p' "$out")
    read -r s2 s3 s4 s5 < <(sed -n 's/^status codes: \([0-9]*\) 2xx, \([0-9]*\) 3xx, \([0-9]*\) 4xx, \([0-9]*\) 5xx.*/\1 \2 \3 \4/p' "$out")
    [[ -n $rps && -n $ok && -n $s2 ]] || die "$p $scenario: no figures in h2load's output: $(cat "$out")"
    ((s2 > 0 && s3 + s4 + s5 == 0)) || die "$p $scenario: answers other than 2xx: $(grep '^status codes' "$out")"
    # In the timed mode, requests still in flight at the end count as failed.
    ((failed == 0)) || say "  $p $scenario: $failed of $total requests failed or were cut at the end"
    logged=$(wc -l <"$log")
    # p99 of the per-request times (third column, microseconds), in ms.
    p99=$(awk '{ print $3 }' "$log" | sort -n | awk '{ v[NR] = $1 } END {
        i = int(NR * 0.99 + 0.999999); if (i < 1) i = 1; printf "%.2f", v[i] / 1000 }')
    echo "$p $scenario $rps $p99" >>"$work/figures"
    say "  $p $scenario round $round: $rps req/s, p99 $p99 ms ($logged requests logged)"
}

load_start=$(cut -d' ' -f1-3 /proc/loadavg)
: >"$work/figures"
for scenario in h1 h2 conn; do
    for ((r = 1; r <= reps; r++)); do
        for p in "${proxies[@]}"; do
            say "$scenario, round $r/$reps: $p"
            run "$p" "$scenario" "$r"
        done
    done
done

# --- the table ------------------------------------------------------------------
# median PROXY SCENARIO COLUMN: the median over the rounds (column 3 req/s, 4 p99).
median() {
    awk -v p="$1" -v s="$2" -v c="$3" '$1 == p && $2 == s { print $c }' "$work/figures" | sort -g |
        awk '{ v[NR] = $1 } END { m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; printf "%.2f", m }'
}
raw() { awk -v p="$1" -v s="$2" -v c="$3" '$1 == p && $2 == s { print $c }' "$work/figures" | paste -sd' '; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
declare -A label=(
    [h1]="h1 keep-alive, $c_h1 conns"
    [h2]="h2, $c_h2 conns x $m_h2 streams"
    [conn]="new TLS conn/req, $n_conn, $c_conn at once"
)
{
    echo
    echo "vmkit HTTPS edge benchmarks, $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs ($(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1))"
    echo "$nginx_version; Caddy $caddy_version; $h2load_version; TLS 1.3 $cipher, ECDSA P-256 certificate; h1/h2 ${duration}s runs after ${warmup}s warm-up; median of $reps rounds"
    echo "load average at the start $load_start, at the end $(cut -d' ' -f1-3 /proc/loadavg)"
    echo
    printf '%-38s | %-6s | %12s | %12s | %12s | %11s | %11s\n' figure "" vmkit nginx caddy vmkit/nginx vmkit/caddy
    printf -- '-%.0s' {1..118}
    echo
    for s in h1 h2 conn; do
        for c in 3 4; do
            v=$(median vmkit "$s" $c)
            n=$(median nginx "$s" $c)
            k=$(median caddy "$s" $c)
            unit=$([ $c = 3 ] && echo "req/s" || echo "p99 ms")
            printf '%-38s | %-6s | %12s | %12s | %12s | %11s | %11s\n' \
                "$([ $c = 3 ] && echo "${label[$s]}")" "$unit" "$v" "$n" "$k" "$(ratio "$v" "$n")" "$(ratio "$v" "$k")"
        done
    done
    echo
    echo "req/s: higher is better; p99: lower is better. Raw rounds (req/s; p99 ms):"
    for s in h1 h2 conn; do
        for p in "${proxies[@]}"; do
            printf '  %-5s %-6s %s; %s\n' "$s" "$p" "$(raw "$p" "$s" 3)" "$(raw "$p" "$s" 4)"
        done
    done
    if [ "$profile" = 1 ]; then
        for s in h1 h2 conn; do
            echo
            echo "vmkit's edge, $s, perf (self time, top 15 of dso and symbol):"
            awk 'NR <= 15' "target/bench-https-perf-$s.txt" 2>/dev/null
        done
    fi
} | tee "$results"
