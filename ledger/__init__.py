"""Kudos: pure math (pricing, tiers), the append-only ledger, its consumer and admin reports."""
