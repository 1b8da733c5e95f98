# corekube: `make cluster` builds everything, `make test` tests it. Each stage also runs
# alone (`make fetch`). Variables: CONFIG=file LOCK=file OFFLINE=1 DRY_RUN=1 FORCE=1 JOBS=n TARGET=openstack
SHELL := /bin/bash
.DEFAULT_GOAL := help

# Node 24 comes from the npm package `node` (a devDependency): node_modules/.bin first.
export PATH := $(CURDIR)/node_modules/.bin:$(PATH)
# Node keeps the compiled modules of the CLI here: a no-op run starts in half the time.
export NODE_COMPILE_CACHE ?= $(CURDIR)/cache/node-compile-cache
NPM_STAMP := node_modules/.package-lock.json

flag = $(if $(filter-out 0 false,$($(1))),$(2))
CLI = node tasks/cli.ts $(call flag,OFFLINE,--offline) $(call flag,DRY_RUN,--dry-run) $(call flag,FORCE,--force) $(call flag,ONLY,--only) $(if $(TARGET),--target $(TARGET))

# Read by the CLI and the tests from the environment (make hands command-line variables
# on to them); docs/tasks.md says what each does, and test/docs.test.ts that each is read.
ENV_VARIABLES := CONFIG LOCK JOBS VERIFY_TIMEOUT DOWN_TIMEOUT COREKUBE_ACCEL BUTANE COREKUBE_HTTP_RETRIES COREKUBE_STALL_TIMEOUT TEST_FILE_TIMEOUT TEST_JOBS

# The stages, as in tasks/stages.ts.
STAGES := pin fetch images pki disk ignition boot verify

.PHONY: help cluster $(STAGES) bundle unbundle fsck down ssh deps test e2e typecheck bench clean clean-pki distclean

help:
	@echo "make cluster      build and boot everything (the stages below but pin, in order; fresh ones are skipped; pin first when there is no lock; installs missing system tools)"
	@echo "make pin          resolve cluster.yaml against upstream, write corekube.lock.yaml (online; prints what changed)"
	@echo "make fetch        download FCOS and the Kubernetes binaries into cache/, verified"
	@echo "make images       copy the pinned images by digest into one OCI layout (cache/oci, out/images)"
	@echo "make pki          the cluster CA (made once, kept), bootstrap token, out/kubeconfig"
	@echo "make disk         the image disk out/image-disk.img (ext4, label corekube), reproducible"
	@echo "make ignition     per-node files and Ignition configs out/ignition/NODE.ign from fcc/"
	@echo "make boot         start one QEMU per node (KVM if usable); consoles in out/logs/"
	@echo "make verify       wait (VERIFY_TIMEOUT s) until the cluster is ready, or say what is not"
	@echo "make bundle       one tar with the lock, cluster.yaml and every cache entry they need (for an air-gapped host)"
	@echo "make unbundle FILE=f   verify a bundle, then add it to cache/ (FORCE=1 replaces a differing lock/config)"
	@echo "make fsck         hash every cache entry and output against what names it; FIX=1 moves bad ones aside for the next build"
	@echo "make down         stop the nodes (power button, then kill after DOWN_TIMEOUT s)"
	@echo "make ssh NODE=n   a shell on node n as core"
	@echo "make deps         install the system tools the stages need (apt-get or dnf)"
	@echo "make test         install the tools the tests need (if missing), type-check and run the tests"
	@echo "make e2e          the real-cluster tier: upstream built from source, pin + cluster + verify + down per version (slow; VERSIONS=\"v1.37.2 v1.35.4\")"
	@echo "make bench        run the benchmarks in bench/"
	@echo "make clean        remove out/ but the cluster CA (out/pki, out/kubeconfig); keeps cache/"
	@echo "make clean-pki    remove the cluster CA too: the next build makes a new one"
	@echo "make distclean    remove out/, cache/ and node_modules/"
	@echo "variables: CONFIG=cluster.yaml LOCK=corekube.lock.yaml OFFLINE=1 DRY_RUN=1 FORCE=1 ONLY=1 JOBS=4 TARGET=qemu|openstack PURGE=1 (down, openstack: the images too)"
	@echo "read from the environment too: $(ENV_VARIABLES) (docs/tasks.md)"

# A fresh clone installs its npm dependencies on first use, and again when the lock changes.
$(NPM_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund
	@touch $@

# A first run on a machine without the system tools installs them (exit code 4: missing
# tools), then goes on; a run that finds them all pays nothing for the check.
cluster: $(NPM_STAMP)
	@$(CLI) cluster; rc=$$?; \
	if [ $$rc -eq 4 ]; then node tasks/cli.ts deps --install cluster && $(CLI) cluster; else exit $$rc; fi

# `make images disk` is one run of the CLI with both tasks (one start-up, one plan),
# not one per goal: the first stage goal runs them all, the others have nothing to do.
STAGE_GOALS := $(filter $(STAGES),$(MAKECMDGOALS))
$(STAGES): $(NPM_STAMP)
	$(if $(filter $@,$(firstword $(STAGE_GOALS))),$(CLI) $(STAGE_GOALS),@:)

bundle: $(NPM_STAMP)
	$(CLI) bundle $(if $(FILE),--file "$(FILE)")

unbundle: $(NPM_STAMP)
	@if [ -z "$(FILE)" ]; then echo "usage: make unbundle FILE=path/to/corekube-bundle-NAME.tar [FORCE=1] [DRY_RUN=1]" >&2; exit 2; fi
	$(CLI) unbundle --file "$(FILE)"

fsck: $(NPM_STAMP)
	node tasks/cli.ts fsck $(call flag,FIX,--fix)

down: $(NPM_STAMP)
	node tasks/cli.ts down $(if $(TARGET),--target $(TARGET)) $(call flag,PURGE,--purge) $(call flag,DRY_RUN,--dry-run)

ssh: $(NPM_STAMP)
	node tasks/cli.ts ssh $(NODE)

deps: $(NPM_STAMP)
	node tasks/cli.ts deps --install

typecheck: $(NPM_STAMP)
	tsc -p tsconfig.json

# The tests drive real tools (a registry, skopeo, QEMU, Ignition…): the missing ones are
# installed first (apt-get or dnf, as root or with sudo), from the list in tasks/lib/run/tools.ts.
test: $(NPM_STAMP)
	@node tasks/cli.ts deps --test --install
	tsc -p tsconfig.json
	node test/run.ts

# The real-cluster tier, never part of `make test`: builds upstream's programs from source
# (Go module proxy; cached under ~/.cache/corekube-test), then a real cluster per version.
e2e: $(NPM_STAMP)
	@node tasks/cli.ts deps --test --install
	node test/cluster.e2e.ts $(VERSIONS)

bench: $(NPM_STAMP)
	node bench/run.ts

# The CA outlives a clean: nodes and the host kubeconfig trust it across rebuilds.
# Running nodes are stopped first: their pid files are in out/run.
clean:
	@if [ -d out/run ]; then node tasks/cli.ts down; fi
	@if [ -d out ]; then find out -mindepth 1 -maxdepth 1 ! -name pki ! -name kubeconfig -exec rm -rf {} +; fi

clean-pki:
	rm -rf out/pki out/kubeconfig

distclean:
	@if [ -d out/run ] && [ -d node_modules ]; then node tasks/cli.ts down; fi
	rm -rf out cache node_modules
