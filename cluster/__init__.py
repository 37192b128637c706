"""Orchestration on Ray: the coordinator (driver side), thin stage actors, transport. No math."""
