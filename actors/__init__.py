"""kilnlm.actors: see DESIGN.md."""
