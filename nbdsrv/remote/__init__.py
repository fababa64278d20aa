"""The control protocol for remote clients: over TLS with client certificates (server.py),
each certificate seeing and acting on the VMs ``--remote-allow`` grants it (grants.py)."""
