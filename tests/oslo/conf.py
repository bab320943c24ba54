"""oslo.messaging's configuration for the plugin's tests and their peer scripts."""

from __future__ import annotations

from oslo_config import cfg
from oslo_messaging._metrics import client as metrics
from oslo_messaging._tracing import client as tracing


def configuration() -> cfg.ConfigOpts:
    """A fresh configuration, with the options oslo.messaging registers only on its global one (its own
    ConfFixture does this, but needs the `fixtures` package)."""
    conf = cfg.ConfigOpts()
    conf.register_opts(metrics.oslo_messaging_metrics, group="oslo_messaging_metrics")
    conf.register_opts(tracing.oslo_messaging_tracing, group="oslo_messaging_tracing")
    conf([])
    return conf
