# The two commands the README opens with. Each sets up .venv/ itself when missing.
PY      := .venv/bin/python
STAMP   := .venv/.installed
DEMO    := demo_out

.PHONY: demo test test-fast lint setup clean soak

demo: $(STAMP)
	.venv/bin/hardneg demo --out $(DEMO)

# The suite runs as on a new machine (scripts/loopback_only.py; when root and unshare allow, else it says so):
# in a private network namespace with only loopback, so every server a test starts is on 127.0.0.1 and
# unreachable from outside, and a private mount namespace whose /tmp is a fresh empty folder holding HOME and
# the caches. Two tiers (scripts/test_tiers.py): `make test` runs both and prints each tier's wall time and the
# 25 slowest tests; `make test-fast` runs the tests that start no Ray, no server and no browser (the inner loop).
test: $(STAMP) lint
	$(PY) scripts/loopback_only.py $(PY) scripts/test_tiers.py all

test-fast: $(STAMP)
	$(PY) scripts/loopback_only.py $(PY) scripts/test_tiers.py fast

# Lint and types: ruff's rules and formatting on the whole tree, mypy on the modules [tool.mypy] lists.
lint: $(STAMP)
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy

setup: $(STAMP)

# Not part of `make test`: one longer demo training with every fault injected (docs/faults.md), ~15 min on 2 cores.
soak: $(STAMP)
	$(PY) scripts/soak.py

# Reinstall when the dependency list changes; the stamp makes a second `make` instant.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@# FFCV builds from source against Debian's OpenCV and libjpeg-turbo. Best effort: if the packages
	@# cannot be installed or the build fails, everything else works and the FFCV paths say why not.
	-@if ! dpkg -s pkg-config libopencv-dev libturbojpeg0-dev >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing pkg-config libopencv-dev libturbojpeg0-dev (for FFCV)"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pkg-config libopencv-dev libturbojpeg0-dev >/dev/null; \
	  else echo "note: FFCV needs pkg-config libopencv-dev libturbojpeg0-dev (apt-get as root); not installing them"; fi; \
	fi
	-$(PY) -m pip install -q -e '.[ffcv]' || echo "note: FFCV did not build; --format ffcv and data.format=ffcv will say why"
	@# The MLflow UI test drives Debian's Chromium through Playwright (no browser download); best effort too:
	@# without it tests/test_mlflow_ui.py is skipped and says why.
	-@if ! command -v chromium >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium (for the MLflow UI test)"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "note: the MLflow UI test needs chromium (apt-get install -y chromium as root); it will be skipped"; fi; \
	fi
	touch $(STAMP)

clean:
	rm -rf $(DEMO) mlflow.db mlartifacts
