"""Compatibility suite: dispy programs run with `import dispynb as dispy`."""
