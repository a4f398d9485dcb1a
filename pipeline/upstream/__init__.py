"""Workarounds for upstream bugs, one file each, named after the bug: delete the file when the bug is fixed."""
