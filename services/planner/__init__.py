"""The Plan service: turns each positive verdict into a plan with the policy's ``plan``."""
