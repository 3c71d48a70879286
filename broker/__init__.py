"""Everything on the wire: message schemas, the topology, and connection/publish helpers."""
