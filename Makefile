# The two commands of the README: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
RUNTIME := $(VENV)/.installed-runtime
STAMP  := $(VENV)/.installed
DEB_PACKAGES := postfix swaks testssl.sh nmap sasl2-bin libsasl2-modules s-nail logrotate

.PHONY: run test lint venv system-deps bench clean

# make run: relaygw and its runtime dependencies only.
$(RUNTIME): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	touch $(RUNTIME)

# make test, lint, bench: the test tools too.
$(STAMP): $(RUNTIME)
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

# Debian packages used as real peers in tests (smtp-sink, smtp-source, swaks, testssl,
# nmap, saslpasswd2 and its modules, s-nail, logrotate).
system-deps:
	@missing=""; \
	command -v smtp-sink >/dev/null 2>&1 || missing="$$missing postfix"; \
	command -v swaks >/dev/null 2>&1 || missing="$$missing swaks"; \
	command -v testssl >/dev/null 2>&1 || missing="$$missing testssl.sh"; \
	command -v nmap >/dev/null 2>&1 || missing="$$missing nmap"; \
	command -v saslpasswd2 >/dev/null 2>&1 || missing="$$missing sasl2-bin"; \
	command -v s-nail >/dev/null 2>&1 || missing="$$missing s-nail"; \
	command -v logrotate >/dev/null 2>&1 || missing="$$missing logrotate"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DEB_PACKAGES) >/dev/null; \
	  else \
	    echo "missing Debian packages:$$missing (run as root or install them; their tests will be skipped)"; \
	  fi; \
	fi

run: $(RUNTIME)
	$(BIN)/relaygw run

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

# The daemon-level suites run a second time with everything in one process
# ([server] workers = 0); the first run uses the default, one worker per core.
test: $(STAMP) system-deps lint
	$(BIN)/python -m pytest
	RELAYGW_TEST_WORKERS=0 $(BIN)/python -m pytest -q tests/integration tests/reliability tests/interop

bench: $(STAMP) system-deps
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) build *.egg-info twisted/plugins/dropin.cache
