"""Restore sessions: writable exports into images and disks, and live restore."""
