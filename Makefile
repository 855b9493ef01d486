# The two commands of the README. Each creates .venv on first use and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: demo tiers test benchmark clean

# On CPU, XLA allocates each step's scratch buffers afresh (hundreds of MB for the demo
# teacher) and glibc maps them with 4 KiB pages, so every step page-faults them in again;
# transparent huge pages for malloc's mappings make the demo's training steps ~10-25% faster
# (2-core CPU). glibc < 2.35 and other platforms ignore the variable.
CPU_MALLOC := GLIBC_TUNABLES=glibc.malloc.hugetlb=1

demo: $(INSTALLED)
	$(CPU_MALLOC) $(BIN)/python -m dmd_jax.main --config configs/demo.py:pipeline --workdir runs/demo

# After `make demo`: a middle tier, a weaker edge, their labels, switchers and hybrids, and
# the edge -> middle -> cloud cascade (configs/tiers.py), into runs/demo/tiers.
TIER_STAGES := cloud middle strong weak label:edge switcher:edge hybrid:edge label:middle \
	switcher:middle hybrid:middle label:strong switcher:strong hybrid:strong label:weak \
	switcher:weak hybrid:weak cascade:middle cascade:strong
tiers: $(INSTALLED)
	for stage in $(TIER_STAGES); do \
	  $(CPU_MALLOC) $(BIN)/python -m dmd_jax.main --config configs/tiers.py:$$stage \
	    --workdir runs/demo/tiers/$$(echo $$stage | tr : _) || exit 1; done

# Two test workers, one per core: more do not help (cold, 2-core AMD EPYC VM, 2026-12-03:
# 11 min 26 s with 2 workers, 11 min 12 s with 3, 10 min 39 s with 4; ~1.75 cores busy
# in each).
test: $(INSTALLED)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=25 tests

benchmark: $(INSTALLED)
	$(BIN)/python -m benchmarks.suite

# torch first and pinned: any other version (or a range) pulls multi-GB CUDA builds.
$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) runs .jax_cache
