"""kilnlm.cluster: see DESIGN.md."""
