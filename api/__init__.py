"""The HTTP surface (AI Horde API v2) and the trusted services that own job state."""
