# The two commands a new user runs: `make demo` and `make test`.
# Both create .venv if needed; both work with no PostgreSQL installed (an
# embedded one is started), with a server on 127.0.0.1:5432, or with $DGP_DSN.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: test test-matrix test-django test-embedded demo bench bench-quick lint clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# The suite runs four times: with gevent's monkey-patching (greenlets) and
# without it (OS threads), each on psycopg2 and on psycopg 3, so both ways of
# serving and both drivers are proven.
test: $(STAMP)
	$(PY) -m ruff check .
	DGP_TEST_MODE=gevent DGP_TEST_DRIVER=psycopg2 $(PY) -m pytest
	DGP_TEST_MODE=threads DGP_TEST_DRIVER=psycopg2 $(PY) -m pytest
	DGP_TEST_MODE=gevent DGP_TEST_DRIVER=psycopg $(PY) -m pytest
	DGP_TEST_MODE=threads DGP_TEST_DRIVER=psycopg $(PY) -m pytest

# The suite (greenlet mode) on the other supported Python x Django cells, each
# in its own venv under .cache/matrix/ (`make test` is the Python 3.11 / Django
# 5.2 one): see .ci/matrix for the cells, and README.rst, Install.
test-matrix:
	.ci/matrix

# Django's own test suite (from the sdist of the installed Django, cached in
# .cache/) through our engine, with psycopg2 and psycopg 3, in both modes (the
# stock backend on the same driver beside it, two runs at a time, to check which
# deviations it shares): fails on any failure not listed with its reason in
# tests/django_suite/expected.py. Then once more with POOL_MODE "transaction"
# (psycopg2, greenlets; 2 to 4 minutes): connections go back to the pool
# between statements outside atomic() (a TestCase holds one in atomic()
# throughout: TransactionTestCases and the suite's setup are what exercise it).
test-django: $(STAMP)
	$(PY) tests/django_suite/run.py --backend both
	$(PY) tests/django_suite/run.py --driver psycopg2 --modes gevent --pool-mode transaction
	$(PY) tests/django_suite/run.py --driver pymysql --backend both
	$(PY) tests/django_suite/run.py --driver pymysql --modes gevent --pool-mode transaction

# The suite as on a fresh machine with no PostgreSQL: the system server hidden
# (as root: private network and mount namespaces), the embedded one used.
# (On psycopg 3: psycopg2 has the system server's runs above.)
test-embedded: $(STAMP)
	.ci/without-system-server env DGP_TEST_MODE=gevent DGP_TEST_DRIVER=psycopg $(PY) -m pytest

# `make demo DB=mysql`: the same on MySQL/MariaDB ($DGP_MYSQL, default 127.0.0.1:3306).
demo: $(STAMP)
	DGP_DEMO_DB=$(DB) $(PY) examples/demo.py

# Benchmarks against the alternatives, side by side (own environment: .bench-venv).
bench: $(STAMP)
	$(PY) benchmarks/run.py

bench-quick: $(STAMP)
	$(PY) benchmarks/run.py --quick

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check django_gevent_pool

clean:
	rm -rf $(VENV) build *.egg-info
