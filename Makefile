# Gatekeeper: `make run` starts the gateway, `make test` runs the whole test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= etc/gatekeeper.toml
TRIAL_JOBS ?= 2

.PHONY: run test lint demo venv test-venv system-deps clean

$(BIN)/gatekeeper: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# compat mode puts the checkout itself on sys.path, where twistd finds twisted/plugins/.
	$(BIN)/pip install -q -e . --config-settings editable_mode=compat
	touch $@

$(VENV)/.test-deps: $(BIN)/gatekeeper setup.py
	$(BIN)/pip install -q -e '.[test]' --config-settings editable_mode=compat
	touch $@

venv: $(BIN)/gatekeeper

test-venv: $(VENV)/.test-deps

run: venv
	$(BIN)/gatekeeper --config $(CONFIG) init --if-absent
	$(BIN)/twistd -n gatekeeper --config $(CONFIG)

system-deps:
	.ci/install-debian-packages

# The scan after the suite counts as one more test in the closing line.
test: system-deps test-venv
	@rm -rf _trial_temp _trial_temp.log; \
	$(BIN)/python -m twisted.trial -j$(TRIAL_JOBS) --temp-directory=_trial_temp tests 2>&1 | tee _trial_temp.log; \
	$(BIN)/python tests/scan.py _trial_temp; scan=$$?; \
	$(BIN)/python tests/summary.py _trial_temp.log --extra $$scan

lint: test-venv
	$(BIN)/ruff check gatekeeper tests bench twisted
	$(BIN)/ruff format --check gatekeeper tests bench twisted
	$(BIN)/mypy

demo: venv
	$(BIN)/gatekeeper demo

clean:
	rm -rf $(VENV) _trial_temp* build *.egg-info
