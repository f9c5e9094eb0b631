"""healthgate: a load-balancer health-check agent that publishes one binary verdict."""

__version__ = "0.1.0"
