"""`python -m upcycle.jobs.cli`: what a submitted Ray job runs (upcycle.jobs.submit)."""

from upcycle.jobs.cli import app

app()
