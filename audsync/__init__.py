"""audsync: keep Gleap contacts in step with audiences and traits defined as SQL.

The public surface is the ``audsync`` command (:mod:`audsync.cli`), the config
format (:mod:`audsync.config`), the history tables (:mod:`audsync.models`) and
the exception tree (:mod:`audsync.errors`).
"""

__version__ = "0.1.0"
