"""Stages composed from the library: train-teacher, precompute, cache admin."""
