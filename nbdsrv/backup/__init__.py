"""What a backup is, whatever drives the VM: checkpoint chains, snapshot bitmap rules,
sessions, the crash-safe store."""
