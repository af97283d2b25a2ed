"""The control socket: JSON lines between sparkctl and the daemon."""
