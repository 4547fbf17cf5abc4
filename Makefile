# taskd developer entry points. Every target installs into .venv from the one pin file,
# so what is tested is what runs and what ships.
PYTHON ?= python3
VENV ?= .venv
PIP := $(VENV)/bin/pip
# The one pin file, hashed. pip will not take hashes in a -c file next to an editable
# install, so the venv gets a copy with the hashes stripped (same pins, same versions);
# debian/rules uses the hashed file itself with --require-hashes.
CONSTRAINTS := requirements/constraints.txt
VENV_CONSTRAINTS := $(VENV)/constraints-nohash.txt
STAMP := $(VENV)/.installed
PIP_TOOLS ?= pip-tools==7.6.2
# `make lock LOCK_FLAGS=--upgrade` re-pins everything to the newest releases.
LOCK_FLAGS ?=

.PHONY: venv run test lock package-test clean

$(STAMP): setup.cfg pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	sed -E -e '/^[[:space:]]*--hash=/d' -e 's/[[:space:]]*\\$$//' $(CONSTRAINTS) > $(VENV_CONSTRAINTS)
	$(PIP) install -q -c $(VENV_CONSTRAINTS) --config-settings editable_mode=compat -e '.[test,mysql]'
	touch $(STAMP)

venv: $(STAMP)

## Start the task-server in the foreground on :8082 with the embedded sqlite database.
run: $(STAMP)
	mkdir -p var
	$(VENV)/bin/twistd --nodaemon --pidfile= taskserver --config etc/task-server.dev.ini

## Run the whole test suite (needs MariaDB on 127.0.0.1:3306 and nginx; see .ci/run).
test: $(STAMP)
	$(VENV)/bin/python -m pytest

## Re-pin after changing setup.cfg: keeps existing pins, resolves what changed, and
## writes every pin with the sha256 hashes of all its files on PyPI.
lock:
	rm -rf .lockvenv && $(PYTHON) -m venv .lockvenv && .lockvenv/bin/pip install -q --upgrade pip '$(PIP_TOOLS)'
	sed -n '/^#/!q;p' $(CONSTRAINTS) > $(CONSTRAINTS).header
	env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null .lockvenv/bin/pip-compile -q $(LOCK_FLAGS) \
	  --generate-hashes --allow-unsafe --strip-extras --no-emit-find-links --no-emit-index-url \
	  --no-header --extra test --extra mysql -o $(CONSTRAINTS) setup.cfg
	cat $(CONSTRAINTS).header $(CONSTRAINTS) > $(CONSTRAINTS).new && mv $(CONSTRAINTS).new $(CONSTRAINTS)
	rm -rf .lockvenv $(CONSTRAINTS).header

## Build the Debian package, install it, run the server as the unit does, purge it (root).
package-test:
	bash ci/package-test.sh

clean:
	rm -rf $(VENV) *.egg-info var

## Benchmarks (issue 6): a real twistd taskserver against bare Klein/Autobahn in the same
## run, one table, bench/results.md; under 10 minutes. BENCH_FLAGS=--mysql uses MariaDB.
BENCH_FLAGS ?=
.PHONY: bench bench-security
## Security figures (issue 12): auth flood, hostile catalogs, schemathesis; bench/security.md.
bench-security: $(STAMP)
	$(VENV)/bin/python -m bench.security

bench: $(STAMP)
	$(VENV)/bin/python -m bench $(BENCH_FLAGS)

## Agent benchmark (issue 7): a real twistd taskagent (builtin executor) runs 1,000 tcp tasks
## every 10 s; lateness p50/p99/max, runs/s, skips, agent CPU and RSS over 60 s, written to
## bench/agent-results.md; about 90 s. BENCH_AGENT_FLAGS=--smoke for the toy size.
BENCH_AGENT_FLAGS ?=
.PHONY: bench-agent
bench-agent: $(STAMP)
	$(VENV)/bin/python -m bench.agent_lateness $(BENCH_AGENT_FLAGS)
	$(VENV)/bin/python -m bench.vs_blackbox $(BENCH_BLACKBOX_FLAGS)
## ... then 10,000 http tasks every 10 s (1,000 runs/s) and Debian's
## prometheus-blackbox-exporter probing the same target at the same rate, CPU per check
## of both: bench/agent-vs-blackbox.md, about 4 minutes (apt-get install prometheus-blackbox-exporter).
BENCH_BLACKBOX_FLAGS ?=

## Chaos figures (issue 11): SIGKILL one of three servers behind nginx with 300 light agents
## and 3 real builtin agents (their checks' largest gap in points is reported), and
## time the repair (agents offline, `any` tasks moved, agents reconnected), then SIGSTOP of
## a server, of mariadbd, a MariaDB restart, a RabbitMQ outage, a lone server's restart;
## writes bench/chaos.md; about four minutes. Needs MariaDB (and mariadb-install-db),
## RabbitMQ and nginx, as `make test` does.
CHAOS_FLAGS ?=
.PHONY: chaos
chaos: $(STAMP)
	$(VENV)/bin/python -m bench.chaos $(CHAOS_FLAGS)
