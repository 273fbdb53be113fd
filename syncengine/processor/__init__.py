"""The card processor boundary: the interface the forwarder calls, and a sandbox service."""
