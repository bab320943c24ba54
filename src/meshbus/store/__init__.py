"""Durable queues (design notes follow)."""
