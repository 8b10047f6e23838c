# shellcheck shell=bash
# Sourced by the bench scripts: install_servers PACKAGE... installs Debian packages
# of servers (sshd, nginx, Caddy) without letting them start host-wide (a temporary
# policy-rc.d): only the bench script's own instances run. Needs root; refreshes the
# package lists once when the first install fails. Bounded (10 min per apt call).
install_servers() {
    local made_policy=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        made_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    timeout 600 apt-get install -y -q "$@" >&2 ||
        { timeout 600 apt-get update -q >&2 && timeout 600 apt-get install -y -q "$@" >&2; } ||
        true
    if [ -n "$made_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi
}
