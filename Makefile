# minivmm: `make demo` and `make test` set everything up themselves.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench lint native clean

# A PYTHON given (command line or environment) must be the venv's: `make PYTHON=python3.12
# test` over a .venv made by 3.11 tested 3.11 without a word. Compared (install prefix and
# major.minor) only then, so a plain `make` starts no interpreter to check.
ifneq ($(filter command line environment,$(origin PYTHON)),)
ifneq ($(wildcard $(PY)),)
_PYID := import sys; print(sys.base_prefix, sys.version_info[:2])
ifneq ($(shell $(PY) -c '$(_PYID)' 2>&1),$(shell $(PYTHON) -c '$(_PYID)' 2>&1))
VENV_OTHER := yes
endif
endif
endif
.PHONY: FORCE

# Idempotent: re-installs only when pyproject.toml changed, the venv is broken or a PYTHON
# given is not the venv's (above). A venv without a working pip (Ctrl-C during `venv`, no
# ensurepip) or whose python is gone is made again: it failed every later make with 'No
# module named pip' or 'No such file'.
$(STAMP): pyproject.toml $(PY) $(if $(VENV_OTHER),FORCE)
	@$(if $(VENV_OTHER),echo '$(VENV) was made by another Python than $(PYTHON): making it again'; \
		$(PYTHON) -m venv --clear $(VENV), \
		$(PY) -m pip --version >/dev/null 2>&1 || $(PYTHON) -m venv --clear $(VENV))
	@$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,plot]'
	@touch $(STAMP)

# No recipe: a missing (or dangling) .venv/bin/python only puts the stamp out of date.
$(PY): ;

demo: $(STAMP)
	@$(VENV)/bin/minivmm caps
	@echo; echo '$$ minivmm run hello_real'; $(VENV)/bin/minivmm run hello_real
	@echo; echo '$$ minivmm run hello_protected'; $(VENV)/bin/minivmm run hello_protected
	@echo; echo '$$ minivmm run hello_long'; $(VENV)/bin/minivmm run hello_long
	@echo; echo '$$ minivmm run multi_vcpu --vcpus 4'; $(VENV)/bin/minivmm run multi_vcpu --vcpus 4
	@echo; echo '$$ minivmm dirty --tracker both --vcpus 2 --pages 4096 --iterations 5'; \
		$(VENV)/bin/minivmm dirty --tracker both --vcpus 2 --pages 4096 --iterations 5

test: $(STAMP)
	$(PY) -m pytest -q tests

native:
	@$(MAKE) --no-print-directory -C benchmarks/native

bench: $(STAMP) native
	$(PY) -m benchmarks.run

lint: $(STAMP)
	@$(PY) -m pip install --quiet --disable-pip-version-check 'pyflakes>=3.0'
	$(PY) -m compileall -q minivmm tests benchmarks
	$(PY) -m pyflakes minivmm tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info benchmarks/out
	@$(MAKE) --no-print-directory -C benchmarks/native clean 2>/dev/null || true
