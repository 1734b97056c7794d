#!/bin/sh
# Install nsbridge from this checkout into a virtual environment of its own.
#
# Why a venv: Debian 12 and Ubuntu 24.04 mark their Python "externally managed" (PEP 668),
# so `pip install .` into the system Python is refused, and Debian's python3-pyroute2 (0.7)
# is too old for nsbridge run.  A venv keeps nsbridge and its pyroute2 apart from the
# system's packages; the commands are linked onto PATH.
#
# As root:  venv /opt/nsbridge, commands in /usr/local/bin, man pages in /usr/local/share/man,
#           bash completion in /usr/local/share/bash-completion/completions.  Missing Debian
#           packages (python3-venv; gcc and python3-dev for the optional native relay) are
#           installed with apt-get.
# As a user: venv ~/.local/share/nsbridge/venv, commands in ~/.local/bin (and so on); nothing
#           is installed with apt-get, a missing package is named instead.
#
# Settings (environment): NSBRIDGE_VENV, NSBRIDGE_BIN, NSBRIDGE_SHARE (where man/ and
# bash-completion/ go), NSBRIDGE_PYTHON (default /usr/bin/python3, else python3 on PATH),
# NSBRIDGE_NATIVE=0 (skip gcc/python3-dev: UDP and ping are then served by Python, slower).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
say() { printf 'install.sh: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

if [ "$(id -u)" = 0 ]; then
    venv=${NSBRIDGE_VENV:-/opt/nsbridge}
    bin=${NSBRIDGE_BIN:-/usr/local/bin}
    share=${NSBRIDGE_SHARE:-/usr/local/share}
    root=1
else
    venv=${NSBRIDGE_VENV:-$HOME/.local/share/nsbridge/venv}
    bin=${NSBRIDGE_BIN:-$HOME/.local/bin}
    share=${NSBRIDGE_SHARE:-$HOME/.local/share}
    root=0
fi

if [ -n "${NSBRIDGE_PYTHON:-}" ]; then
    python=$NSBRIDGE_PYTHON
elif [ -x /usr/bin/python3 ]; then
    python=/usr/bin/python3
else
    python=$(command -v python3) || die "no python3 found: install Python 3.11 or later"
fi
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    die "$python is Python $("$python" -c 'import sys; print(sys.version.split()[0])'); nsbridge needs 3.11 or later (set NSBRIDGE_PYTHON)"

# Debian packages that may be missing on a fresh machine.
packages=""
"$python" -c 'import ensurepip, venv' 2>/dev/null || packages="python3-venv"
if [ "${NSBRIDGE_NATIVE:-1}" != 0 ]; then
    command -v gcc >/dev/null 2>&1 || packages="$packages gcc"
    include=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
    [ -f "$include/Python.h" ] || packages="$packages python3-dev"
fi
if [ -n "$packages" ]; then
    if [ "$root" = 1 ] && command -v apt-get >/dev/null 2>&1; then
        say "installing Debian packages:$packages"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        # shellcheck disable=SC2086
        apt-get install -y -qq $packages >/dev/null
    elif echo "$packages" | grep -q python3-venv; then
        die "Python's venv module is missing: run 'sudo apt-get install python3-venv' (or run this script as root)"
    else
        say "note: without$packages the optional native UDP/ping relay is not built (Python serves them, slower); 'sudo apt-get install$packages' and re-run to build it"
    fi
fi

say "creating the virtual environment $venv"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
"$venv/bin/python" -m pip install -q --disable-pip-version-check "$here"

mkdir -p "$bin"
for command in nsbridge netns-tcp-bridge netns_tcp_bridge nsbridge-slirp4netns; do
    ln -sf "$venv/bin/$command" "$bin/$command"
done
if [ -d "$venv/share/man/man1" ]; then
    mkdir -p "$share/man/man1"
    for page in "$venv"/share/man/man1/*.1; do
        ln -sf "$page" "$share/man/man1/$(basename "$page")"
    done
fi
completion="$venv/share/bash-completion/completions/nsbridge"
if [ -f "$completion" ]; then
    mkdir -p "$share/bash-completion/completions"
    ln -sf "$completion" "$share/bash-completion/completions/nsbridge"
fi

version=$("$venv/bin/nsbridge" --version)
say "installed $version: $bin/nsbridge (venv $venv)"
case ":$PATH:" in
    *":$bin:"*) ;;
    *) say "note: $bin is not on your PATH; add it, or run $bin/nsbridge" ;;
esac
say "check what this machine supports with: nsbridge doctor"
