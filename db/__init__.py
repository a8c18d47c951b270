"""Persistence: engine and sessions, ORM models, the job state machine's transitions."""
