"""targets: see shared DESIGN.md §1; built by its own issue."""
