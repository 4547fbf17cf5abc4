# taskd developer entry points. Every target installs into .venv from the one pin file,
# so what is tested is what runs and what ships.
PYTHON ?= python3
VENV ?= .venv
PIP := $(VENV)/bin/pip
CONSTRAINTS := requirements/constraints.txt
STAMP := $(VENV)/.installed

.PHONY: venv run test lock clean

$(STAMP): setup.cfg pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c $(CONSTRAINTS) --config-settings editable_mode=compat -e '.[test,mysql]'
	touch $(STAMP)

venv: $(STAMP)

## Start the task-server in the foreground on :8082 with the embedded sqlite database.
run: $(STAMP)
	mkdir -p var
	$(VENV)/bin/twistd --nodaemon --pidfile= taskserver --config etc/task-server.dev.ini

## Run the whole test suite (needs MariaDB on 127.0.0.1:3306; see .ci/run).
test: $(STAMP)
	$(VENV)/bin/python -m pytest

## Re-pin every dependency after changing setup.cfg.
lock:
	rm -rf .lockvenv && $(PYTHON) -m venv .lockvenv && .lockvenv/bin/pip install -q '.[test,mysql]'
	( head -2 $(CONSTRAINTS); .lockvenv/bin/pip freeze | grep -vi '^taskd' ) > $(CONSTRAINTS).new && mv $(CONSTRAINTS).new $(CONSTRAINTS)
	rm -rf .lockvenv

clean:
	rm -rf $(VENV) *.egg-info var
