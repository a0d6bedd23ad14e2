# keyward's one entry point. `make run` and `make test` install what a fresh
# Debian machine lacks (SoftHSM2, OpenSC, a C compiler for cgo, systemd's
# systemd-analyze for checking the unit, strace for failed-fsync tests,
# Chromium for the dashboard's browser tests) first.

GO        ?= go
SUDO      := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
RUN_DIR   ?= .run
BENCHTIME ?= 1s
PKGS      := ./...

.PHONY: all build run fleet hsm-check test bench profile lint generate generate-check deps fuzz screenshots clean

all: build

## deps: install the Debian packages the tests and `make run` need, if missing
deps:
	@command -v $(GO) >/dev/null || { echo "Go 1.26 or newer is needed: https://go.dev/doc/install" >&2; exit 1; }
	@missing=""; \
	[ -n "$$(ls /usr/lib/softhsm/libsofthsm2.so /usr/lib/*/softhsm/libsofthsm2.so 2>/dev/null)" ] || missing="$$missing softhsm2"; \
	command -v softhsm2-util >/dev/null || missing="$$missing softhsm2"; \
	command -v pkcs11-tool >/dev/null || missing="$$missing opensc"; \
	command -v gcc >/dev/null || missing="$$missing gcc libc6-dev"; \
	/usr/bin/python3 -c 'import jwt, cryptography' 2>/dev/null || missing="$$missing python3-jwt python3-cryptography"; \
	/usr/bin/python3 -c 'import grpc, google.protobuf' 2>/dev/null || missing="$$missing python3-grpcio python3-protobuf"; \
	[ -n "$$(ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null)" ] || missing="$$missing postgresql"; \
	command -v systemd-analyze >/dev/null || missing="$$missing systemd"; \
	command -v strace >/dev/null || missing="$$missing strace"; \
	command -v openssl >/dev/null || missing="$$missing openssl"; \
	[ -x /usr/sbin/rsyslogd ] || missing="$$missing rsyslog"; \
	[ -n "$$(ls /usr/lib/*/rsyslog/lmnsd_gtls.so 2>/dev/null)" ] || missing="$$missing rsyslog-gnutls"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	[ -x /usr/sbin/nginx ] || missing="$$missing nginx"; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

## build: build every command into bin/
build:
	$(GO) build -o bin/ ./cmd/...

## run: keywardd --dev: a throw-away SoftHSM2 token, data directory and policy; prints what to try
run: deps build
	@echo "starting keywardd --dev (Ctrl-C stops it and removes its directory); the CLI is ./bin/keyward"
	@PATH="$(CURDIR)/bin:$$PATH" ./bin/keywardd --dev

## fleet: three keywardd nodes on a 3-member etcd cluster and one throw-away token; prints what to try (docs/fleet.md)
fleet: deps build
	@echo "starting a fleet (Ctrl-C stops it and removes its directory)"
	@$(GO) run ./softhsm-test/fleet -bin bin -dir $(RUN_DIR)/fleet

## hsm-check: make a throw-away token in .run/ and check the HSM layer on it
hsm-check: deps build
	@rm -rf $(RUN_DIR)/token && mkdir -p $(RUN_DIR)
	@softhsm-test/create-token $(RUN_DIR)/token keyward-dev > $(RUN_DIR)/token.env
	@. ./$(RUN_DIR)/token.env; export SOFTHSM2_CONF; ./bin/keyward hsm check -module "$$module" -token keyward-dev -pin-file "$$pin_file"

## test: every test, with the race detector
test: deps
	$(GO) test -race -count=1 $(PKGS)

## bench: every benchmark (ops/s, p50, p99, CPU per call; keywardd against its floor: docs/performance.md)
bench: deps
	$(GO) test -run '^$$' -bench . -benchtime $(BENCHTIME) $(PKGS)

## profile: CPU, mutex and block profiles of one benchmark, BENCH in PKG, into PROFILE_DIR
PROFILE_DIR ?= $(RUN_DIR)/profile
BENCH       ?= BenchmarkDaemon/daemon=ping/callers=16$$
PKG         ?= ./daemon/
profile: deps
	@mkdir -p $(PROFILE_DIR)
	$(GO) test -run '^$$' -bench '$(BENCH)' -benchtime 5s -cpuprofile $(PROFILE_DIR)/cpu.out \
		-mutexprofile $(PROFILE_DIR)/mutex.out -blockprofile $(PROFILE_DIR)/block.out -o $(PROFILE_DIR)/bench.test $(PKG)
	@echo "read them with: go tool pprof -top -cum $(PROFILE_DIR)/bench.test $(PROFILE_DIR)/cpu.out (or mutex.out, block.out)"

## screenshots: the dashboard's pages, from its browser test, into docs/dashboard/
screenshots: deps
	KEYWARD_SCREENSHOTS=$(CURDIR)/docs/dashboard $(GO) test -count=1 -run '^TestDashboard$$' ./cmd/keyward/

## fuzz: run every fuzz target for FUZZTIME each (default 30s)
FUZZTIME ?= 30s
fuzz:
	@for pkg in $$($(GO) list $(PKGS)); do \
		for f in $$($(GO) test -list '^Fuzz' $$pkg | grep '^Fuzz'); do \
			echo "== $$pkg $$f"; \
			$(GO) test $$pkg -run '^$$' -fuzz "^$$f\$$" -fuzztime $(FUZZTIME) || exit 1; \
		done; \
	done

## lint: gofmt, go vet, staticcheck and buf lint (pinned in go.mod as tools)
lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi
	$(GO) vet $(PKGS)
	$(GO) tool staticcheck $(PKGS)
	@bash -n softhsm-test/create-token .ci/run
	cd daemon/api/v1 && $(GO) tool buf lint
	cd daemon/api/envoyauth && $(GO) tool buf lint
	cd plugins/proto/v1 && $(GO) tool buf lint

## generate: regenerate generated code; generate-check fails if it was stale
generate:
	$(GO) generate $(PKGS)

generate-check: generate
	@if [ -n "$$(git status --porcelain -- daemon/api/v1 daemon/api/envoyauth plugins/proto)" ]; then git status --short -- daemon/api/v1 daemon/api/envoyauth plugins/proto; echo "generated files are stale: run make generate and commit" >&2; exit 1; fi

clean:
	rm -rf bin $(RUN_DIR)
