"""Django's own test suite, run through this package's engine (``make test-django``)."""
