# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Each creates the virtualenv .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision that work together; on the CI machines these come from local disk.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
DEMO_DIR ?= demo-out

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

.PHONY: install demo test clean
install: $(VENV)/.installed

# The whole pipeline on the shipped tiny model (about 5 minutes on a laptop CPU); see `awaker demo --help`.
demo: $(VENV)/.installed
	$(VENV)/bin/awaker demo $(DEMO_DIR) --force

test: $(VENV)/.installed
	$(PY) -m pytest -q

clean:
	rm -rf $(DEMO_DIR)
