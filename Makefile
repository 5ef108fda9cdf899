# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Each creates the virtualenv .venv on first use, with exactly the versions CI tested (requirements/lock.txt).
VENV ?= .venv
LOCK ?= requirements/lock.txt
PY := $(VENV)/bin/python
DEMO_DIR ?= demo-out
PIP := $(PY) -m pip --disable-pip-version-check

# The locked set, no resolver involved (--no-deps), then awaker itself from this checkout; `pip check`
# fails if the lock is not self-consistent. The venv is rebuilt when the lock or pyproject.toml change.
$(VENV)/.installed: pyproject.toml $(LOCK)
	rm -rf $(VENV)
	python3 -m venv $(VENV)
	$(PIP) install -q --no-deps -r $(LOCK)
	$(PIP) install -q --no-deps --no-build-isolation -e .
	$(PIP) check
	touch $@

.PHONY: install demo test test-oldest test-latest lock clean
install: $(VENV)/.installed

# The whole pipeline on the shipped tiny model (about 5 minutes on a laptop CPU); see `awaker demo --help`.
demo: $(VENV)/.installed
	$(VENV)/bin/awaker demo $(DEMO_DIR) --force

test: $(VENV)/.installed
	$(PY) -m pytest -q

# The oldest supported versions (torch 2.11, transformers 5.17, triton 3.6, ...), from their own lock.
test-oldest:
	$(MAKE) test VENV=.venv-oldest LOCK=requirements/oldest.txt

# The newest versions pip offers inside pyproject.toml's ranges (not in CI: what a `pip install awaker`
# into a new environment would get today). On success the tested set is written to .venv-latest/tested.txt;
# `make lock` copies it to requirements/lock.txt.
test-latest:
	rm -rf .venv-latest
	python3 -m venv .venv-latest
	.venv-latest/bin/python -m pip --disable-pip-version-check install -q --upgrade -e '.[dev]'
	.venv-latest/bin/python -m pip --disable-pip-version-check list --format=freeze \
		| grep -iE '^(torch|torchvision|transformers|triton|tokenizers|huggingface.hub|bitsandbytes|numpy|accelerate|safetensors)=='
	.venv-latest/bin/python -m pytest -q
	.venv-latest/bin/python -m pip --disable-pip-version-check freeze --all --exclude-editable \
		| grep -vE '^pip==' > .venv-latest/tested.txt

lock: test-latest
	{ echo "# The tested set that make demo / make test install (written by make lock after the suite passed)."; \
	  echo "# Linux x86-64, CPython 3.11; regenerate with make lock (see README, Tested versions)."; \
	  cat .venv-latest/tested.txt; } > requirements/lock.txt

clean:
	rm -rf $(DEMO_DIR) .venv-latest
