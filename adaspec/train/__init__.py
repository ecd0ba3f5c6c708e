"""Training of the embedded default target/draft pair (`python -m adaspec.train`)."""
