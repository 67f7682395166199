"""Metrics, GPU readings and the metrics port; the audit log and logs live beside them."""
