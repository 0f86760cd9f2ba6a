# megadoremi: every target does its own set-up on a fresh machine.
# Users who bring their own torch: make test TORCH_SPEC="torch==2.5.1" (or TORCH_SPEC= to keep what is installed).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
DEEPSPEED_SPEC ?= deepspeed==0.19.8
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.megadoremi-installed
DEMO_DIR ?= demo_workdir

.PHONY: venv test demo test-fast clean-demo

venv: $(STAMP)

# Torch first and pinned: any unpinned torch requirement would pull the multi-GB CUDA build.
$(STAMP): setup.py requirements-test.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip wheel setuptools
	if [ -n "$(TORCH_SPEC)" ]; then $(PIP) install --quiet "$(TORCH_SPEC)"; fi
	DS_BUILD_OPS=0 $(PIP) install --quiet --no-build-isolation "$(DEEPSPEED_SPEC)"
	$(PIP) install --quiet sentencepiece numpy mpi4py mpich pyyaml tqdm tensorboard matplotlib scipy==1.17.1
	$(PIP) install --quiet -r requirements-test.txt
	# megatron-core is a test-only oracle for file formats and blending: no deps, never imported by the package.
	$(PIP) install --quiet --no-deps megatron-core
	$(PIP) install --quiet --no-deps --no-build-isolation -e .
	# DeepSpeed JIT-compiles its CPU shared-memory comm op at the first distributed start: do it now, once.
	$(PY) -c "from megadoremi.distributed.env import prebuild_deepspeed_ops; prebuild_deepspeed_ops()"
	touch $(STAMP)

test: venv
	$(PY) -m pytest -q tests

demo: venv
	$(PY) -m megadoremi.demo --workdir $(DEMO_DIR)

clean-demo:
	rm -rf $(DEMO_DIR)

# The slurm/ scripts against a one-node Slurm cluster the tests start (a few minutes on 2 cores). Installs Debian's
# slurm-wlm and munge when missing (root); if that fails the tests fail and say so.
.PHONY: test-slurm
test-slurm: venv
	@if ! PATH="$$PATH:/usr/sbin:/sbin" sh -c 'command -v slurmctld && command -v munged && command -v sbatch' \
			>/dev/null 2>&1; then \
		echo "test-slurm: installing slurm-wlm and munge with apt-get"; \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null; } \
			|| echo "test-slurm: could not install slurm-wlm and munge (apt-get as root); the Slurm tests will fail" >&2; \
	fi
	MEGADOREMI_SLURM_TESTS=1 $(PY) -m pytest -q tests/slurm
