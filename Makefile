# fondation-worker: the two commands that matter are `make run` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_SECRET := var/dev-secret

.PHONY: run test lint pytest js-test bench bench-smoke submit clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

deploy/node_modules/.installed: deploy/package.json deploy/package-lock.json
	cd deploy && npm ci --no-audit --no-fund --loglevel=error
	touch $@

## The Convex component, built and packed, installed from its tarball into the example host
## app (offline), as a host app installs it. The bridge and the Convex tests use that copy.
COMPONENT_SRC := $(shell find deploy/convex/src -name '*.ts' 2>/dev/null) deploy/convex/package.json deploy/convex/tsconfig.build.json
EXAMPLE := deploy/convex/example/node_modules/.installed
$(EXAMPLE): deploy/node_modules/.installed deploy/convex/example/package.json deploy/convex/pack-example.sh $(COMPONENT_SRC)
	sh deploy/convex/pack-example.sh
	touch $@

$(DEV_SECRET):
	mkdir -p var
	$(PY) -c 'import base64,secrets;print("whsec_"+base64.b64encode(secrets.token_bytes(32)).decode())' > $@
	chmod 600 $@

## Run the worker on the embedded default (SQLite under ./var, no account anywhere), on
## 127.0.0.1: HOST=0.0.0.0 make run exposes the job API and docs to the network.
## Uses the real `fondation` CLI when it is installed, else the bundled simulator.
run: $(STAMP) $(DEV_SECRET)
	@if command -v fondation >/dev/null 2>&1; then \
	  echo "using the real fondation CLI: $$(command -v fondation)"; \
	else \
	  echo "fondation CLI not found: using the SIMULATOR (fondation-simulator); set FONDATION_COMMAND to change"; \
	  if [ -z "$${FONDATION_COMMAND:-}" ]; then \
	    export FONDATION_COMMAND='$(CURDIR)/$(BIN)/fondation-simulator analyze {repo_dir} --output-dir {output_dir} --profile production'; \
	  fi; \
	fi; \
	export WEBHOOK_SECRETS="$${WEBHOOK_SECRETS:-$$(cat $(DEV_SECRET))}"; \
	export PATH="$(CURDIR)/$(BIN):$$PATH"; \
	export HOST="$${HOST:-127.0.0.1}"; \
	echo "worker on http://$${HOST}:$${PORT:-8080}; send a job with: make submit REPO=https://github.com/owner/repo.git"; \
	exec $(BIN)/fondation-worker serve

## Send a signed job.start for REPO to the worker started by `make run`, and follow it.
submit: $(STAMP) $(DEV_SECRET)
	@test -n "$(REPO)" || { echo "usage: make submit REPO=https://github.com/owner/repo.git [REF=main]"; exit 2; }
	WEBHOOK_SECRET="$${WEBHOOK_SECRET:-$$(cat $(DEV_SECRET))}" $(BIN)/fondation-worker submit "$(REPO)" $(if $(REF),--ref "$(REF)")

lint: $(STAMP)
	$(BIN)/ruff check app tests deploy bench
	$(BIN)/ruff format --check app tests deploy bench
	$(BIN)/mypy

pytest: $(STAMP) $(EXAMPLE)
	$(BIN)/pytest -q -p no:cacheprovider

js-test: $(EXAMPLE)
	cd deploy && npm run typecheck && npm test

## Run every test: lint, type checks, Python tests (unit, app, end to end) and the Convex tests.
test: lint pytest js-test

bench: $(STAMP) $(EXAMPLE)
	$(BIN)/python -m bench

bench-smoke: $(STAMP) $(EXAMPLE)
	$(BIN)/python -m bench --smoke

clean:
	rm -rf $(VENV) deploy/node_modules deploy/convex/dist deploy/convex/example/node_modules deploy/convex/example/vendor var .pytest_cache .mypy_cache .ruff_cache
