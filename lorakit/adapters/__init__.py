"""The public API on adapted models: apply, merge, hooks and parameter groups, save and load, targets,
quantising a base, and the summary."""
