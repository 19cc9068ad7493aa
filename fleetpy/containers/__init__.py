"""Container units: generate them from a template, and build the offline lab image."""
