"""The Plan Scheduler service: orders plans and decides which may use each mechanism."""
