"""Entry points users meet: the `upcycle` CLI and the jobs it runs."""
