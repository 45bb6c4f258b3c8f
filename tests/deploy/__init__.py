"""Tests of dispynb.deploy: node registration and launchers."""
