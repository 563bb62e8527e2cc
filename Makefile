# The two set-up commands in the README are `make demo` and `make test`; both start from a fresh clone.
.PHONY: demo test unit test39 deb rpm bench clean

VENV := .venv
PY := $(VENV)/bin/python

# A marker, not the venv's python: `make demo` may have made a lighter .venv first.
TEST_READY := $(VENV)/.test-ready

$(TEST_READY): pyproject.toml scripts/setup-test-env.sh
	bash scripts/setup-test-env.sh
	touch $(TEST_READY)

# The demo needs only the venv with moto (and, as root, mkfs/losetup): lighter than the test setup.
DEMO_READY := $(VENV)/.demo-ready

$(DEMO_READY): pyproject.toml scripts/setup-demo-env.sh
	bash scripts/setup-demo-env.sh
	touch $(DEMO_READY)

demo: $(DEMO_READY)
	$(PY) -m agent demo

# The whole suite, as CI runs it: unit tests on Python 3.9 too, then everything on the default Python.
test: $(TEST_READY)
	@if [ -x .venv39/bin/python ]; then .venv39/bin/python -m pytest -q -p no:cacheprovider tests/unit; \
	 else echo "test: no Python 3.9 found for the 3.9 unit run" >&2; exit 1; fi
	$(PY) -m pytest -q -p no:cacheprovider tests

unit: $(TEST_READY)
	$(PY) -m pytest -q -p no:cacheprovider tests/unit

deb:
	bash packaging/deb/build.sh

rpm:
	bash packaging/rpm/build.sh

# Every benchmark at its documented size (bench/all.py; `python -m bench.all --quick`: the smoke sizes).
bench: $(TEST_READY)
	$(PY) -m bench.all

clean:
	rm -rf build dist *.egg-info packaging/deb/build packaging/rpm/build
