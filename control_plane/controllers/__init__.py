"""The control plane's endpoints, one controller module per area."""
