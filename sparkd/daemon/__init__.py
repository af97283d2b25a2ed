"""sparkd's wing: the daemon (composition root, Supervisor, engine views, event stream)."""
