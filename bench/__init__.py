"""Side-by-side benchmarks of healthgate against nginx, a naive health endpoint and node-exporter."""
