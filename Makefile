# fleet-access: the single entry point for building, testing and generating.
# `make test` installs what the tests need (Debian packages, moto, the Go-built kube-apiserver,
# etcd and session-manager-plugin, into a cache outside the checkout) and runs every test.

CARGO ?= cargo
# Keep CI output readable and builds within the machine's two cores.
export CARGO_TERM_COLOR ?= never

.PHONY: demo plan test disk-space test-unit test-integration stress setup lint fmt clippy fuzz-check generate check-generated bench

## The main job on its embedded default: no AWS account, no cluster.
demo:
	$(CARGO) run --bin fleet-access-demo

## What a grant applies, offline.
plan:
	$(CARGO) run --bin fleet-access-operator -- plan -f deploy/examples/classic-allow-ssh.yaml

## Install and build what the integration tests need (idempotent; cached in ~/.cache/fleet-access).
setup:
	bash tests/env/setup.sh

## Everything: lints, generated files, the fuzz targets type-checked, unit tests, integration
## tests against real components. Refuses to start on a disk that cannot hold the build
## (tests/env/disk-space.sh). Incremental compilation is off unless CARGO_INCREMENTAL says
## otherwise: one full run gains nothing from it, and its files are a quarter of the build.
test: export CARGO_INCREMENTAL ?= 0
test: disk-space lint check-generated fuzz-check setup
	bash tests/env/with-services.sh $(CARGO) test --workspace --no-fail-fast

disk-space:
	bash tests/env/disk-space.sh

## Fast tests without external components (no setup needed): unit tests, goldens, the CRDs'
## validation, the operator's command line, and the bridge's driver against in-process fakes.
test-unit:
	$(CARGO) test --workspace --lib --bins
	$(CARGO) test -p fleet-access-crds --tests
	$(CARGO) test -p fleet-access-operator --test cli --test golden
	$(CARGO) test -p fleet-access-agent-bridge --tests

## Tests against real components: kube-apiserver + etcd, moto, sshd, Prometheus, the official plugin.
test-integration: setup
	bash tests/env/with-services.sh $(CARGO) test -p fleet-access-tests -p fleet-access-ssm-emulator -p fleet-access-agent-bridge --tests

## The end-to-end test binaries RUNS times in a row (default 20) under a background release
## build, bounded by LIMIT seconds; prints each failure with its test name (tests/env/stress.sh).
stress: setup
	bash tests/env/stress.sh

lint: fmt clippy

## The cargo-fuzz targets (agent-bridge/fuzz, their own workspace) still compile; running them
## needs nightly. Their properties run on stable in agent-bridge/tests/randomized.rs.
fuzz-check:
	$(CARGO) check --manifest-path agent-bridge/fuzz/Cargo.toml --target-dir $${CARGO_TARGET_DIR:-target}/fuzz

fmt:
	$(CARGO) fmt --all --check

clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## Benchmarks (not tests: nothing asserts a time): release builds of what they run, then
## BENCHMARKS.md. The official plugin, kube-apiserver, etcd and moto come from `make setup`.
## BENCH_ARGS=--quick for a short run, BENCH_ARGS="--only operator" for one part.
bench:
	$(CARGO) build --release -p fleet-access-agent-bridge -p fleet-access-ssm-emulator -p fleet-access-operator -p fleet-access-bench
	ulimit -n $$(ulimit -Hn); $${CARGO_TARGET_DIR:-target}/release/fleet-access-bench run --perf --out BENCHMARKS.md $(BENCH_ARGS)

## Regenerate deploy/crds/ from the API types.
generate:
	$(CARGO) run -q -p fleet-access-crds --bin crdgen > deploy/crds/fleet-access.yaml

## Fails when deploy/crds/ differs from what the types generate (the crds tests check it too).
check-generated:
	@$(CARGO) run -q -p fleet-access-crds --bin crdgen | diff -u deploy/crds/fleet-access.yaml - \
		|| (echo "deploy/crds/ is out of date: run make generate" && exit 1)
