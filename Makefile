# Esup-Pod xAPI deployment bundle: the two commands of the README, and what they build on.
#   make demo   lab hosts up, site.yml applied, one statement delivered end to end and reported
#   make test   lint, the worker's tests, every molecule scenario
SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTHON ?= python3

export CONTAINERS_CONF := $(CURDIR)/lab/containers.conf
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg
# Tools and collections come from the pinned venv, never from whatever the machine has.
export PATH := $(CURDIR)/.venv/bin:$(PATH)

VENV := .venv
WORKER_VENV := .venv-worker
RALPH_VENV := .venv-ralph
BENCH_VENV := .venv-bench
SCENARIOS ?= default sysv multi resilience

.PHONY: system-deps venvs help demo demo-down test lint worker-test molecule resilience bench image clean lock lock-check docs

help:
	@echo "make demo       bring the lab up, apply site.yml, deliver one statement"
	@echo "make demo-down  remove the lab hosts"
	@echo "make test       lint + worker tests + molecule scenarios ($(SCENARIOS))"
	@echo "make bench      deployed pipeline benchmark (own hosts), docs/benchmarks.md"

# --- environments -------------------------------------------------------------------------
$(VENV)/.done: tools/requirements.txt | system-deps
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r tools/requirements.txt
	touch $@

$(WORKER_VENV)/.done: xapi_worker/pyproject.toml xapi_worker/constraints.txt
	$(PYTHON) -m venv $(WORKER_VENV)
	$(WORKER_VENV)/bin/pip install -q --upgrade pip
	$(WORKER_VENV)/bin/pip install -q -c xapi_worker/constraints.txt -e './xapi_worker[test]'
	touch $@

$(BENCH_VENV)/.done: bench/requirements.txt
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q -r bench/requirements.txt
	touch $@

$(RALPH_VENV)/.done: tools/ralph-requirements.txt
	$(PYTHON) -m venv $(RALPH_VENV)
	$(RALPH_VENV)/bin/pip install -q -r tools/ralph-requirements.txt
	touch $@

venvs: $(VENV)/.done $(WORKER_VENV)/.done $(RALPH_VENV)/.done

system-deps:
	bash tools/install-system-deps.sh

image: system-deps
	bash lab/build-image.sh

# --- the two README commands ---------------------------------------------------------------
demo: $(VENV)/.done image
	bash lab/sweep-networks.sh
	bash lab/up.sh
	ansible-playbook -i inventories/lab lab/prepare.yml
	ansible-playbook -i inventories/lab site.yml
	ansible-playbook -i inventories/lab playbooks/check.yml

demo-down:
	bash lab/down.sh

# Stages longest first, TEST_JOBS (default 3) at a time (tools/run-tests.sh): the worker's
# tests run while the first scenario builds the lab image (one build: the others wait for it
# on its lock, then find it there).
TEST_JOBS ?= 3
TEST_SCENARIOS = $(filter $(SCENARIOS),resilience default sysv multi)
MOLECULE_STAGE = flock .ansible/image.lock bash lab/build-image.sh && molecule test -s
test: $(VENV)/.done $(WORKER_VENV)/.done $(RALPH_VENV)/.done system-deps
	mkdir -p .ansible
	bash lab/sweep-networks.sh
	TEST_JOBS=$(TEST_JOBS) bash tools/run-tests.sh \
	  $(foreach s,$(firstword $(TEST_SCENARIOS)),"molecule-$(s)=$(MOLECULE_STAGE) $(s)") \
	  "worker-tests=$(MAKE) --no-print-directory worker-test" \
	  $(foreach s,$(wordlist 2,9,$(TEST_SCENARIOS)),"molecule-$(s)=$(MOLECULE_STAGE) $(s)") \
	  "bundle-tests=pytest -q -p no:cacheprovider tests" \
	  "lint=$(MAKE) --no-print-directory lint"

# Each role README's table of variables, from its meta/argument_specs.yml (tools/role_docs.py;
# tests/test_role_docs.py fails on a stale one).
docs: $(VENV)/.done
	python tools/role_docs.py

lint: $(VENV)/.done
	yamllint -s .
	ansible-lint --profile production
	ruff check .
	ruff format --check .

worker-test: $(WORKER_VENV)/.done $(RALPH_VENV)/.done
	RALPH_VENV=$(CURDIR)/$(RALPH_VENV) $(WORKER_VENV)/bin/pytest -q xapi_worker/tests

# The hashed locks of the worker's venv, one per Debian release of the encoding hosts, and of
# its wheel's build (PyPI). Each is resolved by its release's own Python: Debian 12's here
# (LOCK_PYTHON, a python3.11), Debian 13's (3.13) in a throw-away container of the lab's
# trixie image, with the tools venv's pip and packaging.
LOCK_PYTHON ?= /usr/bin/python3
LOCK_TRIXIE = podman run --rm -v $(CURDIR):/src -v $(CURDIR)/$(VENV)/lib/python3.11/site-packages:/tools:ro \
  -v /etc/ssl/certs/ca-certificates.crt:/ca.crt:ro -e PYTHONPATH=/tools -e PIP_CERT=/ca.crt \
  -e SSL_CERT_FILE=/ca.crt localhost/xapi-lab-debian:trixie-1 python3 /src/tools/lock-worker.py \
  --release 13 --python /usr/bin/python3
lock: $(VENV)/.done
	bash lab/build-image.sh trixie
	$(VENV)/bin/python tools/lock-worker.py --release 12 --python $(LOCK_PYTHON)
	$(LOCK_TRIXIE)

lock-check: $(VENV)/.done
	bash lab/build-image.sh trixie
	$(VENV)/bin/python tools/lock-worker.py --check --release 12 --python $(LOCK_PYTHON)
	$(LOCK_TRIXIE) --check

molecule: $(VENV)/.done image
	bash lab/sweep-networks.sh
	set -e; for s in $(SCENARIOS); do molecule test -s $$s; done

resilience: $(VENV)/.done image
	bash lab/sweep-networks.sh
	molecule test -s resilience

# Not part of make test: fresh bench hosts, every configuration deployed and measured
# (~95 min, an hour of it the seed configuration run to the end, 3 of them the dead letters),
# docs/benchmarks.md regenerated. BENCH_ARGS="--seed-window 480" time-boxes the seed run;
# "--n 200 --phases b,c" to try it.
bench: $(VENV)/.done $(BENCH_VENV)/.done image
	bash bench/run.sh $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(WORKER_VENV) $(RALPH_VENV) $(BENCH_VENV)
