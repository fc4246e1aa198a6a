"""Host runtime: sandboxes, their daemon, their state."""
