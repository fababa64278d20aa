"""Start-up configuration of the daemon and CLI: default paths, memory tuning, security
options."""
