"""The `upcycle` command line: thin typed functions over the jobs (their docstrings are --help).

One module per command group; importing them registers their commands on `app`, in the order
`upcycle --help` lists them (so the imports below keep their order).
"""

# isort: off
from upcycle.jobs.cli.common import app
from upcycle.jobs.cli import data, training, rlhf, conversion, serving, evaluation  # noqa: F401
from upcycle.jobs.cli import info, synthesis, synthesis_text  # noqa: F401
# isort: on

__all__ = ["app"]
