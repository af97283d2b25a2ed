"""systemd: the manager Protocol (pure types) and its pystemd adapter."""
