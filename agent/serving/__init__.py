"""Serving: what every consumer hears. `decision` is the one serving decision (fresh, live, healthy, up, the
code and the reasons); the rest publish it: the HTTP listener and its fast responder, the handlers and the
status page, the HAProxy agent-check, the Prometheus metrics, systemd's notifications and the capacity weight."""
