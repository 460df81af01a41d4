"""Thin helpers shared by the method scripts: task families, offline datasets, evaluation, run plumbing."""
