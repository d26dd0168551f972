# Two entry points: `make demo` (the main job end to end) and `make test` (the suite).
# Both create .venv when missing and are safe to run again.
PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip
# The torch build to install first. The default is the CPU build this project is tested with;
# on a GPU machine install your CUDA torch into .venv before running make (it is kept), or set
# e.g. TORCH_SPEC="torch==2.13.0" TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu".
TORCH_SPEC     ?= torch==2.13.0
TORCH_PIP_ARGS ?=
STAMP       := $(VENV)/.installed
DEMO_DIR    ?= demo_out
PYTEST_ARGS ?= -n 2

.PHONY: all demo test venv versions sysdeps schemas clean help

help:
	@echo "make demo   - build the bundled example end to end (writes $(DEMO_DIR)/)"
	@echo "make test   - run the test suite"
	@echo "make schemas - re-export the JSON Schemas into docs/schemas/"

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(MAKE) --no-print-directory sysdeps
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PIP) install -e ".[dev,ray]"
	@touch $(STAMP)

# open3d needs libusb-1.0 at import time. Installed when we are root; otherwise we say what to do.
sysdeps:
	@if ldconfig -p 2>/dev/null | grep -q 'libusb-1.0.so.0'; then :; \
	elif [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
		echo "installing libusb-1.0-0 (needed by open3d)"; \
		(apt-get install -y -q libusb-1.0-0 >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q libusb-1.0-0 >/dev/null)); \
	else \
		echo "open3d needs the system library libusb-1.0-0: run 'sudo apt-get install -y libusb-1.0-0' and re-run make" >&2; exit 1; \
	fi
	@# optional: headless chromium for the browser test of `fwdata report` (skipped without it); never fails make
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
		echo "installing chromium (optional: the browser test of fwdata report)"; \
		(apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1)) \
			|| echo "chromium could not be installed; the browser test of fwdata report will be skipped" >&2; \
	else \
		echo "optional: 'sudo apt-get install -y chromium' lets the tests check fwdata report's page in a browser" >&2; \
	fi

# the resolved versions of the packages whose behaviour the dataset bytes depend on (CI prints them first)
versions: $(STAMP)
	@$(PY) -c "import importlib.metadata as m, platform; print('python', platform.python_version(), platform.machine()); [print(n, m.version(n)) for n in ('torch', 'av', 'decord', 'pycolmap', 'open3d', 'transformers', 'diffusers', 'numpy', 'pillow')]"

demo: $(STAMP)
	$(VENV)/bin/fwmodel demo $(DEMO_DIR)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS) tests --ignore=tests/benchmarks

schemas: $(STAMP)
	$(VENV)/bin/fwdata schema export docs/schemas

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
