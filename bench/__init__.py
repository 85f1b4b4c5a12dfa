"""Side-by-side races against the peers, and the soak. Run from the repository root as modules
(``python -m bench.compare``), so that the checkout's own packages are the ones imported, by the
benchmark and by every process it starts."""
