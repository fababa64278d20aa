# nbdsrv — see README.md. `make demo` and `make test` are the quick start.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := qemu-utils qemu-system-common qemu-system-x86 libnbd-bin python3-libnbd nbdkit python3-venv openssl cpio e2fsprogs \
  libvirt-daemon-system libvirt-clients python3-libvirt
# libvirt's postinst scripts only add systemd links and users: without systemd nothing is
# started, and the tests start `virtlogd -d` and `libvirtd -d` themselves.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: deps demo test lint bench clean

deps: $(VENV)/.installed
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi
	@# Bytecode for the package, as pip writes it for a regular install: an editable install
	@# has none, and where Python does not write it (PYTHONDONTWRITEBYTECODE) every start of the
	@# CLI compiled cli.py again, more than half of a client command's own start-up. Only
	@# changed files are compiled; a stale .pyc is never used (Python checks each source's mtime).
	@$(PY) -m compileall -q nbdsrv

$(VENV)/.installed: pyproject.toml
	@dpkg-query -W -f='$${Status}' python3-venv 2>/dev/null | grep -q "ok installed" || \
	  { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq python3-venv; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,lint]'
	touch $@

lint: deps
	$(VENV)/bin/ruff check nbdsrv tests bench
	$(VENV)/bin/ruff format --check nbdsrv tests bench
	$(VENV)/bin/mypy

test: deps lint
	$(VENV)/bin/pytest -q

demo: deps
	bash scripts/demo.sh

bench: deps
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
