"""Monitors of the machine: memory, and later NVML, PSI, desktop and udev."""
