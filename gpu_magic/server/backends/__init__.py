"""How a granted job runs: ``local`` (runner subprocesses on this host)."""
