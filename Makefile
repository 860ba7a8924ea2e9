# splittun — `make demo` and `make test` are all a newcomer needs on a fresh Debian machine (as root).
# Both install what they need: Debian packages via apt-get when missing, and a virtualenv in .venv.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Debian packages the project uses: firewall (legacy iptables: this kernel queues only through xt NFQUEUE),
# nft (wg-quick style lab rule), netlink tools, the NFQUEUE library netfilterqueue builds against,
# the real clients and servers of tests and benchmarks, and the browser the web panel is tested in.
APT_PACKAGES := iptables nftables iproute2 conntrack libnetfilter-queue-dev gcc make \
                iperf3 curl socat haproxy wrk procps psmisc util-linux openssl \
                chromium chromium-driver

.PHONY: all deps venv test lint demo bench clean distclean

all: test

deps:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" -eq 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

test: deps venv lint
	$(BIN)/pytest -q

demo: deps venv  # KEEP=SECONDS: leave splittun running that long, its web panel at 127.0.0.1:8817
	$(BIN)/python -m splittun.demo $(if $(KEEP),--keep $(KEEP))

bench: deps venv
	$(BIN)/python -m bench

clean:
	-$(BIN)/splittun lab down --all 2>/dev/null
	rm -rf .pytest_cache .ruff_cache

distclean: clean
	rm -rf $(VENV)
