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
COMPARE_DIR ?= compare_workdir
# Mixing methods side by side on the demo corpus, 3 training seeds each. The online methods' schedules are the
# authors' (60k-100k steps) scaled to 400 steps: ADO leaves its prior after 40 steps and refits every 40 steps
# from every 2nd step's loss from step 20 on (smoothing window 21); ODM leaves its prior after 40 steps.
COMPARE_ARGS ?= --methods stratified,natural,doremi,ado,odm --seeds 3 --set mixing.warmup_steps=40 \
	--set mixing.ado.refit_interval=40 --set mixing.ado.ignore_steps=20 --set mixing.ado.fit_stride=2 \
	--set mixing.ado.smoothing_window=21 --set mixing.ado.min_fit_points=10

GPU_CHECK_OUT ?= gpu_check_out
GPU_CHECK_ARGS ?=
# The wheels an offline CUDA machine with torch preinstalled lacks (docs/gpu.md): DeepSpeed and what it needs.
GPU_WHEEL_PYTHON ?= 3.12

.PHONY: venv test demo compare test-fast clean-demo gpu-check gpu-check-cpu gpu-wheels

venv: $(STAMP)

# Torch first and pinned: any unpinned torch requirement would pull the multi-GB CUDA build.
$(STAMP): setup.py requirements-test.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip wheel setuptools
	if [ -n "$(TORCH_SPEC)" ]; then $(PIP) install --quiet "$(TORCH_SPEC)"; fi
	DS_BUILD_OPS=0 $(PIP) install --quiet --no-build-isolation "$(DEEPSPEED_SPEC)"
	$(PIP) install --quiet sentencepiece numpy mpi4py mpich pyyaml tqdm tensorboard matplotlib scipy==1.17.1
	# Export to Hugging Face transformers and downstream evaluation (megadoremi-export-hf, megadoremi-eval);
	# torch is already satisfied, so it stays the CPU build.
	$(PIP) install --quiet transformers==5.24.0 safetensors==0.8.0 protobuf==7.36.2 accelerate==1.15.0 lm-eval==0.4.13
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

# About 40 minutes on 2 cores: reference, proxy and 14 main models (5 methods x 3 seeds, one reused).
compare: venv
	$(PY) -m megadoremi.demo --workdir $(COMPARE_DIR) $(COMPARE_ARGS)

# The GPU questions in one run of at most 8 minutes on one CUDA device (docs/gpu.md). On a GPU node with pip
# access: make gpu-check VENV=.venv-gpu TORCH_SPEC=torch==2.13.0 (PyPI's Linux torch wheels are CUDA builds).
gpu-check: venv
	$(PY) tools/gpu_check.py --out $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)

# Its CPU form (the test suite runs the same command): every part, tiny sizes, about a minute.
gpu-check-cpu: venv
	$(PY) tools/gpu_check.py --device cpu --preset tiny --quick --out $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)

# For a GPU machine without network whose python already has CUDA torch: wheels into .whl (docs/gpu.md).
gpu-wheels: venv
	GPU_WHEEL_PYTHON=$(GPU_WHEEL_PYTHON) DEEPSPEED_SPEC="$(DEEPSPEED_SPEC)" PY=$(PY) sh tools/gpu_wheels.sh .whl

clean-demo:
	rm -rf $(DEMO_DIR) $(COMPARE_DIR)

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

# Two-node Slurm on network namespaces (tests/multinode, about 3 minutes on 2 cores): hosts head, node1, node2
# joined by a bridge, munged + slurmctld on head, slurmd + sshd on each node; every phase across both nodes,
# preemption, a node lost mid-run, DeepSpeed's pdsh launcher. Needs root; installs Debian's slurm-wlm, munge,
# openssh-server and pdsh when missing. Afterwards checks that nothing (namespaces, links, daemons) was left.
.PHONY: test-multinode
test-multinode: venv
	@missing=""; for program in slurmctld slurmd munged sbatch sshd pdsh ip nsenter unshare; do \
		PATH="$$PATH:/usr/sbin:/sbin" sh -c "command -v $$program" >/dev/null 2>&1 || missing="$$missing $$program"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "test-multinode: installing slurm-wlm munge openssh-server pdsh iproute2 with apt-get (missing:$$missing)"; \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge openssh-server \
			pdsh iproute2 >/dev/null; } || echo "test-multinode: could not install them (apt-get as root); the tests will fail" >&2; \
	fi
	status=0; trap 'status=130' INT TERM; \
	MEGADOREMI_MULTINODE_TESTS=1 $(PY) -m pytest -q tests/multinode || status=$$?; \
	$(PY) -m tests.multinode.netns --check --sweep || status=1; \
	exit $$status
