"""The click front end: parse, call a pipeline, print."""
