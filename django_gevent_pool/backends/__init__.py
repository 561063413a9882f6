"""Django database backends built on the pool."""
