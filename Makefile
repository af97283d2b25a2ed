# sparkd: build, package, test. GNU make. `make help` lists the targets.
#
# `make test` is what CI runs (.ci/run): bootstrap, lint, typecheck and the three test tiers.
# It runs every step even when an earlier one fails, then reports each step and fails if
# any did. The single-step targets stop at their first error, as usual.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:

VENV := .venv
PYTEST := $(VENV)/bin/pytest
VERSION := $(shell sed -n 's/^version *= *"\(.*\)"/\1/p' pyproject.toml | head -n 1)
ARCH := $(shell dpkg --print-architecture 2>/dev/null || echo unknown)
DEB := build/sparkd_$(VERSION)_$(ARCH).deb

# Everything that ends up in the package: a change to any of them rebuilds it.
DEB_INPUTS := pyproject.toml $(wildcard README.md LICENSE) \
	$(shell find sparkd units etc docs packaging -type f \
		-not -name '*.pyc' -not -path '*/__pycache__/*' 2>/dev/null)

# Run one test tier; pytest's exit status 5 (no tests collected) counts as success, since a
# tier may legitimately be empty while the project grows.
define pytest_tier
	@rc=0; $(PYTEST) tests/$(1) -q || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "tests/$(1): no tests collected"; rc=0; fi; exit $$rc
endef

.PHONY: help
help:
	@echo "make venv              system packages (as root) and the dev virtualenv $(VENV)"
	@echo "make lint              ruff check"
	@echo "make typecheck         mypy --strict on the package, tests, bench and scripts"
	@echo "make test-unit         tests/unit (pure, fast)"
	@echo "make llama-server      build (or reuse) the real llama-server the tests run"
	@echo "make test-integration  tests/integration (real processes and sockets on loopback)"
	@echo "make test-system       tests/system (booted systemd container, root; builds the .deb)"
	@echo "make test-system-trixie  the package's life on Debian 13 (Python 3.13, systemd 257):"
	@echo "                       debootstrap image cached in $(IMAGE_CACHE), .deb built in it"
	@echo "make test              all of the above, as CI runs it"
	@echo "make deb               $(DEB)"
	@echo "make lintian           lintian on the .deb: no error, no warning"
	@echo "make demo              scripts/demo.py"
	@echo "make engine-fixtures   sparkd/engine/fixtures/ from the real vLLM/SGLang parsers (downloads)"
	@echo "make clean             build outputs and caches (keeps $(VENV) and the wheel cache)"
	@echo "make distclean         clean, and $(VENV) and the wheel cache .whl/"

.PHONY: venv bootstrap system-deps
venv bootstrap:
	scripts/bootstrap.sh

# What building the .deb needs from the system (pip for /usr/bin/python3, a compiler and
# libsystemd-dev for pystemd). An order-only prerequisite: it never forces a rebuild.
system-deps:
	@scripts/bootstrap.sh --system

$(PYTEST):
	scripts/bootstrap.sh --venv

.PHONY: lint
lint: | $(PYTEST)
	$(VENV)/bin/ruff check sparkd tests bench scripts packaging

.PHONY: typecheck
# One mypy run per tree: the test directories have no __init__.py and import their sibling
# modules (fakes, harness, ...) by plain name, so each run gets its own MYPYPATH, and
# tests/ as a whole would have one conftest module too many.
typecheck: | $(PYTEST)
	$(VENV)/bin/mypy --strict sparkd
	MYPYPATH=tests/unit:tests:bench $(VENV)/bin/mypy --strict tests/unit
	MYPYPATH=tests/integration:tests:bench $(VENV)/bin/mypy --strict tests/integration
	MYPYPATH=tests/system $(VENV)/bin/mypy --strict tests/system
	MYPYPATH=bench:tests/system $(VENV)/bin/mypy --strict bench
	MYPYPATH=bench:tests/system $(VENV)/bin/mypy --strict scripts
	$(VENV)/bin/mypy --strict tests/conftest.py
	$(VENV)/bin/mypy --strict packaging

# The upstream llama-server (llama.cpp as published on PyPI, CPU only), cached by build number
# outside the checkout: about 8 minutes on 2 cores when cold, a fraction of a second after.
.PHONY: llama-server
llama-server: | $(PYTEST)
	@scripts/build-llama-server.sh >/dev/null

.PHONY: test-unit test-integration test-system test-system-trixie
test-unit: | $(PYTEST)
	$(call pytest_tier,unit)

test-integration: llama-server | $(PYTEST)
	$(call pytest_tier,integration)

test-system: $(DEB) | $(PYTEST)
	$(call pytest_tier,system)

# The second image: a Debian 13 root made with debootstrap (cached under $(IMAGE_CACHE), keyed
# by a stamp of what goes into it; the first run takes a few minutes) and the .deb built in it
# with its own python3 and dpkg-deb (build/trixie/). Only the tests that matter most on a
# Spark's generation of Python and systemd run there (TRIXIE_TESTS): the package's life.
IMAGE_CACHE := /var/cache/sparkd-test
TRIXIE_TESTS := tests/system/test_package.py
test-system-trixie: | $(PYTEST) system-deps
	@out=$$(SPARKD_TEST_IMAGE_CACHE=$(IMAGE_CACHE) $(VENV)/bin/python tests/system/images.py trixie); \
	root=$$(sed -n 1p <<<"$$out"); deb=$$(sed -n 2p <<<"$$out"); \
	echo "trixie image $$root, package $$deb"; \
	SPARKD_TEST_IMAGE_ROOT=$$root SPARKD_TEST_DEB=$$deb $(PYTEST) $(TRIXIE_TESTS) -q

.PHONY: deb
deb: $(DEB)

$(DEB): $(DEB_INPUTS) | system-deps
	packaging/build-deb.sh
	@dpkg-deb --info $@ >/dev/null
	@dpkg-deb --contents $@ >build/deb-contents.txt
	@for path in usr/bin/sparkd usr/bin/sparkctl usr/lib/systemd/system/sparkd.service \
		usr/lib/systemd/system/sparkd-gateway.service usr/lib/systemd/system/sparkd.slice \
		usr/share/man/man1/sparkctl.1.gz usr/share/man/man1/sparkd.1.gz \
		usr/share/bash-completion/completions/sparkctl \
		etc/sparkd.toml usr/lib/sparkd/python/sparkd/main.py; do \
		grep -q " ./$$path$$" build/deb-contents.txt || { echo "$@ lacks /$$path"; exit 1; }; \
	done

# lintian comes with scripts/bootstrap.sh --system. Errors and warnings fail; the few tags
# that do not apply to a self-contained package are overridden, each with its reason, in
# packaging/lintian-overrides.
.PHONY: lintian
lintian: $(DEB)
	@command -v lintian >/dev/null || { echo "make lintian: apt-get install lintian"; exit 1; }
	lintian --tag-display-limit 0 --fail-on error,warning $(DEB)

.PHONY: test
test: venv
	@failed=(); \
	for step in llama-server lint typecheck test-unit test-integration lintian test-system test-system-trixie; do \
		start=$$SECONDS; \
		echo "=== make $$step"; \
		if $(MAKE) --no-print-directory $$step; then result=ok; else result=FAILED; failed+=("$$step"); fi; \
		echo "=== make $$step: $$result in $$((SECONDS - start)) s"; \
	done; \
	if (( $${#failed[@]} )); then echo "make test: FAILED: $${failed[*]}"; exit 1; fi; \
	echo "make test: all steps passed"

# The real argument parsers of each supported vLLM and SGLang release, recorded as JSON for
# tests/unit/test_engine_fixtures.py (docs/units.md "Engine versions"). Downloads each engine's
# wheel and what its parser imports into throwaway venvs under $(ENGINE_VENVS); CI replays the
# committed fixtures and does not run this.
ENGINE_VENVS ?= /tmp/sparkd-engines
.PHONY: engine-fixtures
engine-fixtures: | $(PYTEST)
	$(VENV)/bin/python scripts/engine_fixtures.py --venvs $(ENGINE_VENVS)

.PHONY: demo
demo: $(DEB) | $(PYTEST)
	$(VENV)/bin/python scripts/demo.py

.PHONY: clean distclean
clean:
	rm -rf build .mypy_cache .ruff_cache .pytest_cache .hypothesis
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) .whl *.egg-info
