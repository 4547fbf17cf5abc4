#!/usr/bin/env bash
# The Debian package, end to end, on this machine (root; Debian bookworm):
#   build it from a copy of the tree (dpkg-buildpackage -us -uc -b), install it with apt,
#   check the taskd user, /var/lib/taskd, the conffiles, the units and the venv, reinstall
#   it (postinst must be idempotent), run both daemons with the exact ExecStart lines of
#   the installed units as the taskd user (systemd itself does not run here), curl the
#   server, systemd-analyze verify the installed units, then purge it and check that
#   the data and the package's directories are gone.
# Run by `make package-test` (from .ci/run after `make test`).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV=/opt/venvs/taskd
UNITS=/lib/systemd/system
START=$SECONDS
export DEBIAN_FRONTEND=noninteractive

say() { printf 'package-test: %s\n' "$*"; }
fail() { printf 'package-test: FAIL: %s\n' "$*" >&2; exit 1; }
phase() { say "$1 ($((SECONDS - PHASE_START))s)"; PHASE_START=$SECONDS; }
PHASE_START=$SECONDS

[ "$(id -u)" = 0 ] || fail "needs root (apt-get install/purge, the taskd user)"

# -- tools ---------------------------------------------------------------------------------
NEEDED=(build-essential dpkg-dev debhelper dh-virtualenv python3 python3-venv python3-pip
        python3-setuptools python3-wheel python3-packaging adduser systemd curl nginx)
missing=()
for pkg in "${NEEDED[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$pkg")
done
if ((${#missing[@]})); then
  say "installing ${missing[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
phase "build tools ready"

WORK=$(mktemp -d /tmp/taskd-package-test.XXXXXX)
PIDS=()
cleanup() {
  local rc=$?
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if dpkg-query -W -f='${Status}' taskd 2>/dev/null | grep -q 'ok installed\|config-files'; then
    say "purging taskd left installed by a failed run"
    apt-get purge -y -qq taskd >/dev/null 2>&1 || true
  fi
  if ((rc != 0)); then
    for log in "$WORK"/*.log; do [ -f "$log" ] && { echo "---- $log (last 40 lines)"; tail -40 "$log"; }; done
  fi
  rm -rf "$WORK"
  exit $rc
}
trap cleanup EXIT

if dpkg-query -W -f='${Status}' taskd 2>/dev/null | grep -q 'ok installed\|config-files'; then
  say "purging a taskd package already installed"
  apt-get purge -y -qq taskd >/dev/null
fi

# -- build ---------------------------------------------------------------------------------
mkdir "$WORK/taskd"
tar -C "$REPO" --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./var \
    --exclude=./.pytest_cache --exclude='*.egg-info' --exclude=__pycache__ --exclude=dropin.cache \
    --exclude='./debian/.build' --exclude='./debian/taskd' --exclude='./debian/.debhelper' \
    -cf - . | tar -C "$WORK/taskd" -xf -
(cd "$WORK/taskd" && dpkg-checkbuilddeps && dpkg-buildpackage -us -uc -b) > "$WORK/build.log" 2>&1 \
  || fail "dpkg-buildpackage failed (see $WORK/build.log below)"
DEB=$(ls "$WORK"/taskd_*.deb)
[ "$(ls "$WORK"/*.deb | wc -l)" = 1 ] || fail "expected one .deb, got: $(ls "$WORK"/*.deb)"
phase "built $(basename "$DEB") ($(du -h "$DEB" | cut -f1))"

# -- install -------------------------------------------------------------------------------
apt-get install -y -qq "$DEB" > "$WORK/install.log" 2>&1 || fail "apt-get install failed"
phase "installed"

check_installed() {
  local passwd uid home shell
  passwd=$(getent passwd taskd) || fail "no taskd user"
  IFS=: read -r _ _ uid _ _ home shell <<<"$passwd"
  ((uid < 1000)) || fail "taskd is not a system user (uid $uid)"
  [ "$home" = /var/lib/taskd ] || fail "taskd's home is $home"
  [ "$shell" = /usr/sbin/nologin ] || fail "taskd's shell is $shell"
  getent group taskd >/dev/null || fail "no taskd group"
  [ "$(stat -c '%U:%G %a' /var/lib/taskd)" = "taskd:taskd 750" ] \
    || fail "/var/lib/taskd is $(stat -c '%U:%G %a' /var/lib/taskd)"
  local conffiles
  conffiles=$(dpkg-query -W -f='${Conffiles}\n' taskd | awk 'NF {print $1}' | sort | tr '\n' ' ')
  [ "$conffiles" = "/etc/nginx/sites-available/taskd /etc/taskd/task-agent.ini /etc/taskd/task-server.ini " ] \
    || fail "conffiles are: $conffiles"
  for conf in /etc/taskd/task-server.ini /etc/taskd/task-agent.ini; do
    [ "$(stat -c '%U:%G %a' "$conf")" = "root:taskd 640" ] || fail "$conf is $(stat -c '%U:%G %a' "$conf")"
    ! grep -q EASY "$conf" || fail "$conf contains the development key EASY"
  done
  grep -Eq '^db-connect-str[[:space:]]*=[[:space:]]*$' /etc/taskd/task-server.ini \
    || fail "task-server.ini sets db-connect-str (the default /var/lib/taskd/task-server.db is wanted)"
  for unit in task-server task-agent; do
    [ -f "$UNITS/$unit.service" ] || fail "no $UNITS/$unit.service"
    for doc in $(sed -n 's/^Documentation=//p' "$UNITS/$unit.service"); do
      [ -f "${doc#file:}" ] || fail "$unit: Documentation= $doc is not installed"
    done
  done
  [ "$(readlink -f "$VENV/bin/python")" = "$(readlink -f /usr/bin/python3)" ] \
    || fail "$VENV/bin/python is not Debian's python3"
  "$VENV/bin/twistd" taskserver --help >/dev/null || fail "twistd taskserver --help"
  "$VENV/bin/twistd" taskagent --help >/dev/null || fail "twistd taskagent --help"
  "$VENV/bin/taskd-db" --help >/dev/null || fail "taskd-db --help"
  /usr/bin/taskctl --help >/dev/null || fail "taskctl --help (/usr/bin/taskctl)"
  for shipped in grafana/taskd.json prometheus/taskd-rules.yml prometheus/taskd-rules.test.yml; do
    [ -f "/usr/share/taskd/$shipped" ] || fail "/usr/share/taskd/$shipped is not installed"
  done
  "$VENV/bin/python" -m pip check -q >/dev/null || fail "pip check in $VENV"
  ! "$VENV/bin/python" -c 'import pytest' 2>/dev/null || fail "test-only pins (pytest) are in the venv"
  [ -f "$VENV/lib/python3.11/site-packages/twisted/plugins/dropin.cache" ] || fail "no twistd plugin cache"
}
check_installed
uid_before=$(id -u taskd)
apt-get install -y -qq --reinstall "$DEB" > "$WORK/reinstall.log" 2>&1 || fail "reinstall failed"
check_installed
[ "$(id -u taskd)" = "$uid_before" ] || fail "reinstall changed taskd's uid"
phase "user, dirs, conffiles, units and venv checked; reinstall idempotent"

# -- run the daemons as the units do ------------------------------------------------------
exec_start() {  # the unit's ExecStart=, split into words (the lines hold no quotes)
  local line
  line=$(sed -n 's/^ExecStart=//p' "$UNITS/$1.service")
  [ -n "$line" ] && [ "$(grep -c '^ExecStart=' "$UNITS/$1.service")" = 1 ] || fail "$1: one ExecStart= expected"
  case "$line" in *[\"\'\\]*) fail "$1: ExecStart has quoting this script does not parse: $line";; esac
  echo "$line"
}
# User=taskd, NoNewPrivileges=yes, WorkingDirectory=/var/lib/taskd, a clean environment
# with the unit's Environment=, plus this test's overrides.
run_as_unit() {  # run_as_unit UNIT LOG VAR=VALUE...
  local unit=$1 log=$2; shift 2
  local -a argv env
  read -ra argv <<<"$(exec_start "$unit")"
  mapfile -t env < <(sed -n 's/^Environment=//p' "$UNITS/$unit.service")
  [ "${argv[0]}" = "$VENV/bin/twistd" ] || fail "$unit: ExecStart does not run $VENV/bin/twistd"
  say "$unit: ${argv[*]}"
  (cd /var/lib/taskd && exec setpriv --reuid=taskd --regid=taskd --init-groups --no-new-privs \
      env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 HOME=/var/lib/taskd "${env[@]}" "$@" \
      "${argv[@]}") > "$WORK/$log" 2>&1 &
  PIDS+=($!)
}

PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
KEY=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
BASE=http://127.0.0.1:$PORT
run_as_unit task-server server.log TASKSERVER_ADDR="127.0.0.1:$PORT" TASKSERVER_ADMIN_KEY="$KEY"
SERVER_PID=${PIDS[-1]}
for _ in $(seq 300); do
  curl -fsS -o /dev/null "$BASE/" 2>/dev/null && break
  kill -0 "$SERVER_PID" 2>/dev/null || fail "task-server exited"
  sleep 0.1
done
code=$(curl -sS -o "$WORK/root.json" -w '%{http_code}' "$BASE/") || fail "GET / failed"
[ "$code" = 200 ] || fail "GET / answered $code"
[ -f /var/lib/taskd/task-server.db ] || fail "no /var/lib/taskd/task-server.db"
[ "$(stat -c %U /var/lib/taskd/task-server.db)" = taskd ] || fail "the database is not taskd's"
phase "task-server up on 127.0.0.1:$PORT as taskd"

# The notes' registration, as the README writes it (admin key and address from this test).
code=$(curl -sS -o "$WORK/agent.json" -w '%{http_code}' -X POST \
  "$BASE/api/v1/agents" \
  -H "Authorization: Bearer $KEY" \
  -H 'Cache-Control: no-cache' \
  -H 'Content-Type: application/x-www-form-urlencoded' \
  -H 'Postman-Token: 4ba0a028-5b71-f875-718b-63d71eb866ae' \
  -H 'content-type: multipart/form-data; boundary=----WebKitFormBoundary7MA4YWxkTrZu0gW' \
  -F name=agent1)
[ "$code" = 200 ] || fail "POST /api/v1/agents answered $code: $(cat "$WORK/agent.json")"
python3 - "$WORK/agent.json" <<'EOF' || fail "unexpected registration answer: $(cat "$WORK/agent.json")"
import json, sys
env = json.load(open(sys.argv[1]))
assert env["meta"] == {"code": 200, "message": "success", "type": "agent"}, env
assert env["body"]["name"] == "agent1" and env["body"]["id"] >= 1, env
EOF

# The agent, with its unit's command line, connects to it.
run_as_unit task-agent agent.log TASKAGENT_SERVER_URL="ws://127.0.0.1:$PORT/api/v1" \
  TASKAGENT_API_KEY="$KEY" TASKAGENT_NAME=agent1
AGENT_PID=${PIDS[-1]}
online=
for _ in $(seq 150); do
  kill -0 "$AGENT_PID" 2>/dev/null || fail "task-agent exited"
  if curl -fsS -H "Authorization: Bearer $KEY" "$BASE/api/v1/agents?name=agent1" \
     | python3 -c 'import json, sys; sys.exit(0 if json.load(sys.stdin)["body"][0]["online"] else 1)'; then
    online=yes; break
  fi
  sleep 0.2
done
[ -n "$online" ] || fail "agent1 did not come online"
phase "notes' registration answered 200; task-agent online"

for pid in "$AGENT_PID" "$SERVER_PID"; do
  kill -TERM "$pid"
  for _ in $(seq 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null && fail "pid $pid did not stop on SIGTERM"
  # twistd ends itself with the signal that stopped it: 143, which systemd counts as a
  # clean stop (Restart=on-failure does not restart it).
  rc=0; wait "$pid" || rc=$?
  [ "$rc" = 0 ] || [ "$rc" = 143 ] || fail "pid $pid exited $rc on SIGTERM"
done
PIDS=()
! grep -n 'Traceback' "$WORK/server.log" "$WORK/agent.log" || fail "a daemon logged a traceback"
phase "both daemons stopped cleanly on SIGTERM"

# -- the installed units -------------------------------------------------------------------
out=$(systemd-analyze verify "$UNITS/task-server.service" "$UNITS/task-agent.service" 2>&1) \
  || fail "systemd-analyze verify: $out"
# verify also lints every other unit file on the machine (Debian's carbon-cache.service,
# installed for the graphite tests, draws "syslog is obsolete"): lines about another
# unit's file do not count; everything else does.
unit_line="^/(lib|usr/lib|etc)/systemd/system/[^:]+\.service:[0-9]+: "
ours=$(printf '%s\n' "$out" | grep -Ev "$unit_line" || true)
ours+=$(printf '%s\n' "$out" | grep -E "$unit_line" | grep -E "/task-(server|agent)\.service:" || true)
[ -z "$ours" ] || fail "systemd-analyze verify is not clean: $out"
if [ -x /usr/sbin/nginx ]; then
  printf 'pid %s/nginx.pid;\nerror_log stderr;\nevents {}\nhttp {\n  include /etc/nginx/sites-available/taskd;\n}\n' \
    "$WORK" > "$WORK/nginx.conf"
  out=$(/usr/sbin/nginx -e stderr -t -c "$WORK/nginx.conf" 2>&1) || fail "nginx -t on the installed site: $out"
fi
phase "systemd-analyze verify clean; nginx -t accepts the installed site"

# -- purge ---------------------------------------------------------------------------------
apt-get purge -y -qq taskd > "$WORK/purge.log" 2>&1 || fail "apt-get purge failed"
! dpkg-query -W -f='${Status}' taskd 2>/dev/null | grep -q 'installed\|config-files' || fail "taskd still known to dpkg"
for path in /var/lib/taskd /etc/taskd "$VENV" /etc/nginx/sites-available/taskd \
            "$UNITS/task-server.service" "$UNITS/task-agent.service"; do
  [ ! -e "$path" ] || fail "$path is still there after purge"
done
# dpkg leaves (and warns about) shared directories that still hold other things, such as
# /opt here; a warning about anything else, or about a directory of taskd's, fails.
warnings=$(grep -i 'warning' "$WORK/purge.log" | grep -Ev "directory '[^']*' not empty so not removed" || true)
taskd_dirs=$(grep -Eo "directory '[^']*taskd[^']*' not empty" "$WORK/purge.log" || true)
[ -z "$warnings$taskd_dirs" ] || fail "purge warned: $warnings$taskd_dirs"
phase "purged: data, configs, venv and units gone (the taskd system user stays, as Debian keeps them)"

say "OK in $((SECONDS - START))s"
